"""Cases `make mutate` found missing for the ordering rule (``providers/_order.py``).

Each test kills mutants that survived every listed test (docs/testing.md, "Mutation testing"):
the key's bounds at their edges, the version rule's "a version is positive", a deletion's key
one past what was applied, ``same_state``, and the version fallback for a host's own events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from idis.integrations.exceptions import UsageError
from idis.integrations.providers._order import (
    BY_MODIFIED,
    BY_VERSION,
    MAX_MINOR_LENGTH,
    MissingOrder,
    OrderKey,
    micros,
    order_key,
)

T = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def test_the_key_takes_the_whole_signed_64_bit_range_and_nothing_past_it() -> None:
    """Both ends are keys (a PostgreSQL BIGINT holds them); one past either end is refused."""
    assert OrderKey(2**63 - 1).major == 2**63 - 1
    assert OrderKey(-(2**63)).major == -(2**63)
    for outside in (2**63, -(2**63) - 1):
        with pytest.raises(UsageError, match="outside a signed 64-bit integer"):
            OrderKey(outside)


@pytest.mark.parametrize("major", [True, 1.0, "1"])
def test_the_major_part_is_an_integer(major: object) -> None:
    """``True`` is an ``int`` to Python but not a version; floats and text are refused too."""
    with pytest.raises(UsageError, match=r"expected an integer"):
        OrderKey(major)  # type: ignore[arg-type]


def test_the_tie_break_holds_up_to_the_column_length() -> None:
    """``MAX_MINOR_LENGTH`` characters fit the ledger column; one more is refused."""
    assert len(OrderKey(1, "x" * MAX_MINOR_LENGTH).minor) == MAX_MINOR_LENGTH
    with pytest.raises(UsageError, match=f"at most {MAX_MINOR_LENGTH} characters"):
        OrderKey(1, "x" * (MAX_MINOR_LENGTH + 1))
    with pytest.raises(UsageError, match="expected text"):
        OrderKey(1, 7)  # type: ignore[arg-type]


def test_a_key_reads_as_major_or_major_slash_minor() -> None:
    """What audit rows and errors show."""
    assert str(OrderKey(42)) == "42"
    assert str(OrderKey(42, "0001:e1")) == "42/0001:e1"


def test_a_version_is_positive() -> None:
    """Version 1 is a key; 0 (what a provider sends for 'none') and negatives are missing."""
    assert BY_VERSION.event_key(event_id="e", seq=1, version=1, occurred_at=T) == OrderKey(1)
    assert BY_VERSION.record_key(version=1, updated_at=T) == OrderKey(1)
    for missing in (0, -1, None, True):
        with pytest.raises(MissingOrder, match="ORDER_BY=modified"):
            BY_VERSION.event_key(event_id="e", seq=1, version=missing, occurred_at=T)  # type: ignore[arg-type]
        with pytest.raises(MissingOrder, match="record carries no record version"):
            BY_VERSION.record_key(version=missing, updated_at=T)  # type: ignore[arg-type]


def test_a_confirmed_deletion_is_one_past_what_was_applied() -> None:
    """By version: the next version. By time: the confirmation time, or one microsecond past the
    applied key when our clock lags the provider's."""
    assert BY_VERSION.deletion_key(OrderKey(7), T) == OrderKey(8)
    applied = OrderKey(micros(T + timedelta(seconds=5)), "00000000000000000003:e3")
    assert BY_MODIFIED.deletion_key(applied, T) == OrderKey(applied.major + 1)
    assert BY_MODIFIED.deletion_key(OrderKey(micros(T)), T + timedelta(seconds=1)) == OrderKey(
        micros(T + timedelta(seconds=1))
    )


@pytest.mark.parametrize("rule", [BY_VERSION, BY_MODIFIED], ids=["version", "modified"])
def test_same_state_compares_the_major_part_only(rule: object) -> None:
    """A fetched record (empty tie-break) has the state of the event with the same major."""
    assert rule.same_state(OrderKey(5, "00000000000000000001:e1"), OrderKey(5))  # type: ignore[attr-defined]
    assert not rule.same_state(OrderKey(5), OrderKey(6))  # type: ignore[attr-defined]


def test_an_event_without_a_feed_position_is_tied_by_its_id() -> None:
    """A webhook carries no seq: its tie-break is the event id alone."""
    key = BY_MODIFIED.event_key(event_id="evt_9", seq=None, version=None, occurred_at=T)
    assert key == OrderKey(micros(T), "evt_9")
    keyed = BY_MODIFIED.event_key(event_id="evt_9", seq=3, version=None, occurred_at=T)
    assert keyed.minor == "00000000000000000003:evt_9"


def test_micros_needs_an_aware_time() -> None:
    """A naive datetime has no place on the provider's timeline; the error says why."""
    with pytest.raises(MissingOrder, match="has no timezone"):
        micros(datetime(2026, 1, 1))  # the naive value is the point


@dataclass
class _HostEvent:
    """A host's own event type: no ``order``, only a version."""

    id: str
    version: object


def test_a_host_event_without_an_order_key_is_ordered_by_its_version() -> None:
    """Version 1 is enough; 0, a bool or no version at all is refused, naming the event."""
    assert order_key(_HostEvent("h1", 1)) == OrderKey(1)
    for version in (0, True, None):
        with pytest.raises(UsageError, match="event 'h1' has no order key"):
            order_key(_HostEvent("h1", version))


def test_an_event_with_neither_order_nor_version_is_refused_by_name() -> None:
    """A host object without a ``version`` attribute gets the named error, not AttributeError."""

    @dataclass
    class Bare:
        id: str

    with pytest.raises(UsageError, match="event 'b1' has no order key and no record version"):
        order_key(Bare("b1"))


def test_a_tie_break_with_nul_is_refused() -> None:
    """PostgreSQL text cannot hold NUL; the key refuses it before any statement runs."""
    with pytest.raises(UsageError, match="contains NUL"):
        OrderKey(1, "a\x00b")
