"""Durations and --since values parse one way everywhere, and bad ones are named."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idis.integrations._timeparse import (
    SINCE_FORMS,
    format_duration,
    parse_duration,
    parse_since,
)
from idis.integrations.exceptions import ConfigError

NOW = datetime(2026, 1, 19, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("2d", 172800),
        ("90 minutes", 5400),
        ("1 hour 30 minutes", 5400),
        ("45", 45),
        ("1.5h", 5400),
        (" 5M ", 300),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Compact, long and bare forms all parse to the same seconds."""
    assert timedelta(seconds=seconds) == parse_duration(text)


@pytest.mark.parametrize("text", ["", "5 parsecs", "-5m", "m5", "5mm", "1h-30m", "abc", "nan"])
def test_bad_duration_names_value_and_variable(text: str) -> None:
    """A bad duration raises ConfigError naming the variable and the value."""
    with pytest.raises(ConfigError) as info:
        parse_duration(text, name="CRM_POLL_INTERVAL")

    assert "CRM_POLL_INTERVAL" in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["-1s", "-5m", "- 90 minutes", "-1h30m", "-0.5", "-2"])
def test_a_negative_duration_is_said_to_be_negative(text: str) -> None:
    """A signed duration is a duration: the error says it must not be negative (it said
    "is not a duration" for "-1s", which sends the reader looking for a typo)."""
    with pytest.raises(ConfigError) as info:
        parse_duration(text, name="CRM_POLL_INTERVAL")

    assert f"CRM_POLL_INTERVAL={text!r} must not be negative" == str(info.value)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_then_parse_round_trips(seconds: int) -> None:
    """format_duration's output parses back to the same duration."""
    assert timedelta(seconds=seconds) == parse_duration(format_duration(seconds))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 hour ago", NOW - timedelta(hours=1)),
        ("2 hours ago", NOW - timedelta(hours=2)),
        ("90 minutes ago", NOW - timedelta(minutes=90)),
        ("4 hours ago", NOW - timedelta(hours=4)),
        ("2h ago", NOW - timedelta(hours=2)),
        ("2h", NOW - timedelta(hours=2)),
        ("now", NOW),
        ("2026-01-19T10:00:00Z", datetime(2026, 1, 19, 10, tzinfo=UTC)),
        ("2026-01-19T11:00:00+01:00", datetime(2026, 1, 19, 10, tzinfo=UTC)),
        ("2026-01-19 10:00", datetime(2026, 1, 19, 10, tzinfo=UTC)),
        ("2026-01-19", datetime(2026, 1, 19, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    """RB-09's relative times and ISO-8601 give aware UTC datetimes."""
    assert expected == parse_since(text, now=lambda: NOW)


@pytest.mark.parametrize("text", ["yesterday-ish", "1 fortnight ago", "", "2027-01-01T00:00:00Z"])
def test_bad_since_names_flag_and_value(text: str) -> None:
    """A bad or future --since raises ConfigError naming the flag and the value."""
    with pytest.raises(ConfigError) as info:
        parse_since(text, now=lambda: NOW)

    assert "--since" in str(info.value)
    assert repr(text) in str(info.value)


@given(st.text(max_size=40))
def test_parse_since_never_raises_anything_but_config_error(text: str) -> None:
    """Arbitrary input either parses or raises ConfigError, nothing else."""
    try:
        result = parse_since(text, now=lambda: NOW)
    except ConfigError:
        return
    assert result.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    ["100000000 days ago", "99999999999999999999w ago", "0001-01-01T00:00:00+14:00", "1e308s"],
)
def test_since_out_of_range_is_a_config_error(text: str) -> None:
    """A --since too far back (or before the first representable time) is a clean error."""
    with pytest.raises(ConfigError) as info:
        parse_since(text, now=lambda: NOW)

    assert "--since" in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["1e308", "inf", "99999999999999999999w", "9" * 400])
def test_duration_too_long_is_a_config_error(text: str) -> None:
    """A duration longer than a timedelta holds is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match="CRM_POLL_INTERVAL"):
        parse_duration(text, name="CRM_POLL_INTERVAL")


_UNITS = ["ms", "s", "m", "h", "d", "w", "seconds", "minutes", "hours", "days", "weeks", "hour"]
_amounts = st.one_of(
    st.integers(min_value=0, max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(abs(f))),
    st.from_regex(r"\d{1,400}(\.\d{1,20})?", fullmatch=True),
)
_relative = st.builds(
    lambda amount, space, unit, ago: f"{amount}{space}{unit}{ago}",
    _amounts,
    st.sampled_from(["", " "]),
    st.sampled_from(_UNITS),
    st.sampled_from(["", " ago"]),
)
_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"
)
_iso = st.builds(
    lambda when, offset: when.isoformat() + offset,
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.one_of(_offsets, st.just("Z"), st.just("")),
)


@given(st.one_of(_relative, _iso, st.text(max_size=60)))
def test_any_since_text_parses_or_is_a_config_error(text: str) -> None:
    """Huge amounts, extreme offsets and any text: a datetime or ConfigError, never a traceback."""
    try:
        result = parse_since(text, now=lambda: NOW)
    except ConfigError:
        return
    assert result.tzinfo is not None


@given(st.one_of(_relative, st.text(max_size=60)))
def test_any_duration_text_parses_or_is_a_config_error(text: str) -> None:
    """Any duration text is a timedelta or a ConfigError, never another exception."""
    try:
        result = parse_duration(text.removesuffix(" ago"))
    except ConfigError:
        return
    assert result >= timedelta(0)


def test_every_since_form_the_error_lists_parses() -> None:
    """The forms a bad --since is told to use are all accepted (each quoted example parses),
    and so is every unit the message names, with and without "ago"."""
    examples = re.findall(r'"([^"]+)"', SINCE_FORMS)
    assert {"1 hour ago", "2h ago", "5 minutes", "2h", "now", "2026-01-19"} <= set(examples)
    for example in examples:
        if example != "ago":
            parse_since(example, now=lambda: NOW)
    units = re.search(r"units: (.*)", SINCE_FORMS)
    assert units is not None
    for unit in re.findall(r"[a-z]+", units.group(1).replace("or their words", "")):
        for text in (f"3 {unit}", f"3{unit} ago"):
            assert parse_since(text, now=lambda: NOW) < NOW


@pytest.mark.parametrize("text", ["5 minutez", "tomorrow", "45", ""])
def test_a_bad_since_lists_every_accepted_form(text: str) -> None:
    """The error names the value and lists every form parse_since takes: bare durations
    ("5 minutes", accepted) included, not only "... ago" and ISO-8601."""
    with pytest.raises(ConfigError) as info:
        parse_since(text, name="--since", now=lambda: NOW)

    message = str(info.value)
    assert f"--since={text!r}" in message
    assert SINCE_FORMS in message
    for form in ('"1 hour ago"', 'without "ago" ("5 minutes"', '"now"', "ISO-8601", "units:"):
        assert form in message


def test_a_bare_duration_is_that_long_ago() -> None:
    """'5 minutes' (no "ago") means five minutes ago, as '5 minutes ago' does."""
    bare = parse_since("5 minutes", now=lambda: NOW)
    assert NOW - timedelta(minutes=5) == bare == parse_since("5 minutes ago", now=lambda: NOW)
