"""Durations (``30s``, ``5m``, ``1h30m``) and the relative times RB-09 passes to ``--since``.

One parser serves every environment variable, config key and CLI flag, so an
operator's ``CRM_POLL_INTERVAL=5m`` and ``--since "2 hours ago"`` mean the same
thing everywhere, and a bad value fails with the same kind of message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from .exceptions import ConfigError

__all__ = ["SINCE_FORMS", "format_duration", "parse_duration", "parse_since", "utcnow"]

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_COMPACT = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_COMPACT_ALL = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_WORD_UNITS = {
    "millisecond": "ms",
    "milliseconds": "ms",
    "ms": "ms",
    "second": "s",
    "seconds": "s",
    "sec": "s",
    "secs": "s",
    "s": "s",
    "minute": "m",
    "minutes": "m",
    "min": "m",
    "mins": "m",
    "m": "m",
    "hour": "h",
    "hours": "h",
    "hr": "h",
    "hrs": "h",
    "h": "h",
    "day": "d",
    "days": "d",
    "d": "d",
    "week": "w",
    "weeks": "w",
    "w": "w",
}
_WORDY = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")
_DURATION_HELP = "a duration like 30s, 5m, 1h, 1h30m or 250ms"
#: Every form parse_since accepts, for its errors and the CLI's --help (each quoted example
#: parses: tests/unit/test_timeparse.py checks).
SINCE_FORMS = (
    'a duration ago ("1 hour ago", "90 minutes ago", "2h ago", "1h30m ago"), '
    'the same duration without "ago" ("5 minutes", "2h"), "now", '
    'or an ISO-8601 date or time ("2026-01-19", "2026-01-19T10:00:00Z"; UTC without an offset); '
    "units: ms, s, m, h, d, w or their words (seconds, minutes, hours, days, weeks)"
)
_SINCE_HELP = f"one of: {SINCE_FORMS}"


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def _parse_words(text: str) -> float | None:
    """Seconds in ``text`` made of number+unit pairs, or None if it is not one."""
    compact = text.replace(" ", "")
    if compact and _COMPACT_ALL.fullmatch(compact):
        return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _COMPACT.findall(compact))
    # Long form: "1 hour 30 minutes", "90 minutes", "2 hours and 5 minutes".
    cleaned = text.replace(",", " ").replace(" and ", " ")
    pos = 0
    total = 0.0
    for match in _WORDY.finditer(cleaned):
        unit = _WORD_UNITS.get(match.group(2))
        if unit is None or cleaned[pos : match.start()].strip():
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[unit]
        pos = match.end()
    if pos == 0 or cleaned[pos:].strip():
        return None
    return total


def parse_duration(value: str | float | int | timedelta, *, name: str = "duration") -> timedelta:
    """Parse a duration such as ``30s``, ``5m``, ``1h``, ``1h30m``, ``250ms`` or ``90 minutes``.

    A bare number is taken as seconds. Negative and empty values are rejected.

    Args:
        value: The text (or a number of seconds, or a timedelta) to parse.
        name: What the value is (an environment variable or flag), for the error.

    Raises:
        ConfigError: naming ``name``, the value and the expected form.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not {_DURATION_HELP}", variable=name)
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parsed: float | None
        try:
            parsed = float(text)
        except ValueError:
            parsed = _parse_words(text) if text else None
        if parsed is None and text.startswith("-") and _parse_words(text[1:].lstrip()):
            # "-1s" is a duration with a sign: say what is wrong with it, not "not a duration".
            parsed = -1.0
        if parsed is None:
            raise ConfigError(f"{name}={value!r} is not {_DURATION_HELP}", variable=name)
        seconds = parsed
    if seconds < 0 or math.isnan(seconds):
        raise ConfigError(f"{name}={value!r} must not be negative", variable=name)
    return _delta(seconds, value, name)


#: Longest duration a timedelta holds (about 2.7 million years).
_MAX_SECONDS = timedelta.max.total_seconds()


def _delta(seconds: float, value: object, name: str) -> timedelta:
    # Huge numbers ("1e308", "100000000000 weeks") overflow timedelta: say so
    # instead of letting OverflowError escape as a traceback.
    if not seconds <= _MAX_SECONDS:
        raise ConfigError(
            f"{name}={value!r} is too long: expected at most {_MAX_SECONDS / 86400:.0f} days",
            variable=name,
        )
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta | float) -> str:
    """Render a duration compactly (``1h30m``, ``45s``, ``250ms``)."""
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    if seconds < 1 and seconds > 0:
        return f"{round(seconds * 1000)}ms"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            count, whole = divmod(whole, size)
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def parse_since(
    value: str | datetime,
    *,
    name: str = "--since",
    now: Callable[[], datetime] = utcnow,
) -> datetime:
    """Parse RB-09's ``--since`` value into an aware UTC datetime.

    Accepts ``"1 hour ago"``, ``"2 hours ago"``, ``"90 minutes ago"``, ``"2h ago"``,
    a bare duration (``"2h"``, ``"5 minutes"``, meaning that long ago), ``"now"``, or an
    ISO-8601 date or time (naive times are taken as UTC). A bare number (``"45"``) is
    refused: it has no unit. :data:`SINCE_FORMS` lists the forms for messages.

    Args:
        value: The text to parse (or a datetime, which is normalised to UTC).
        name: The flag or variable, for the error message.
        now: Clock to measure relative times from (injectable for tests).

    Raises:
        ConfigError: naming the flag and the value when it cannot be parsed or
            lies in the future.
    """
    current = now()
    if isinstance(value, datetime):
        result = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        text = str(value).strip()
        lowered = text.lower()
        if not lowered:
            raise ConfigError(f"{name}={value!r} is empty: expected {_SINCE_HELP}", variable=name)
        if lowered == "now":
            return current
        relative = lowered.removesuffix("ago").strip() if lowered.endswith("ago") else lowered
        seconds = _parse_words(relative) if relative else None
        if seconds is not None:
            try:
                return current - _delta(seconds, value, name)
            except OverflowError:
                raise ConfigError(
                    f"{name}={value!r} reaches back before the year 1: expected {_SINCE_HELP}",
                    variable=name,
                ) from None
        try:
            result = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ConfigError(
                f"{name}={value!r} is not a time: expected {_SINCE_HELP}", variable=name
            ) from None
        if result.tzinfo is None:
            result = result.replace(tzinfo=UTC)
    try:
        result = result.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before the first representable time
        raise ConfigError(
            f"{name}={value!r} is out of range: expected {_SINCE_HELP}", variable=name
        ) from None
    if result > current + timedelta(seconds=1):
        raise ConfigError(
            f"{name}={value!r} is in the future ({result.isoformat()}): expected a past time",
            variable=name,
        )
    return result
