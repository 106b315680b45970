"""The pure decisions of reconciliation: retention, page plans, gaps, record comparison."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idis.integrations._clock import ManualClock
from idis.integrations.exceptions import ReplayWindowExceeded
from idis.integrations.providers import OrderKey
from idis.integrations.reconciliation._logic import (
    FieldDiff,
    LocalRecord,
    check_retention,
    compare_record,
    compute_gaps,
    data_hash,
    merge_intervals,
)
from idis.integrations.reconciliation._sources import StaticReplaySource
from idis.integrations.sync._inbox import ApplyOutcome, plan_batch

from .conftest import PROVIDER, T0, make_event


def _at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


def test_retention_check_names_the_window_the_retention_and_the_fallback() -> None:
    """A since older than the retention raises, naming both and the resync command."""
    with pytest.raises(ReplayWindowExceeded) as caught:
        check_retention(PROVIDER, _at(0), timedelta(hours=72), _at(80 * 3600))

    message = str(caught.value)
    assert "3d8h ago" in message
    assert "replay retention of 3d" in message
    assert f"reconcile --provider {PROVIDER}" in message
    assert "--resync" in message
    assert (PROVIDER, "replay") == (caught.value.provider, caught.value.endpoint)


def test_retention_check_accepts_a_window_inside_the_retention() -> None:
    """A since exactly at the edge of the retention is still served."""
    check_retention(PROVIDER, _at(0), timedelta(hours=1), _at(3600))


def _plan(events: list[Any], known: set[str], current: dict[str, int], handles: Any) -> Any:
    keys = [e.order if handles(e.type) else None for e in events]
    return plan_batch(
        events,
        keys,
        known=known,
        current={rid: OrderKey(v) for rid, v in current.items()},
        handles=handles,
    )


def test_plan_splits_a_page_the_way_the_inbox_would() -> None:
    """Known ids skip, unhandled types are ignored, old versions superseded, the rest applied."""
    events = [
        make_event(1),
        make_event(2, record_id="deal", version=3),
        make_event(3, record_id="deal", version=2),
        make_event(4, type="note.added"),
        make_event(5, record_id="deal", version=4),
        make_event(1),
    ]

    plan = _plan(events, {"evt_1"}, {"deal": 1}, lambda t: t.startswith("record."))

    assert [
        ApplyOutcome.DUPLICATE,
        ApplyOutcome.APPLIED,
        ApplyOutcome.SUPERSEDED,
        ApplyOutcome.IGNORED,
        ApplyOutcome.APPLIED,
        ApplyOutcome.DUPLICATE,
    ] == plan.outcomes
    assert {"deal": (OrderKey(4), "evt_5")} == plan.advance


def test_plan_treats_an_equal_version_as_superseded() -> None:
    """The version already applied is not applied again under another event id."""
    plan = _plan([make_event(9, record_id="deal", version=5)], set(), {"deal": 5}, bool)

    assert [ApplyOutcome.SUPERSEDED] == plan.outcomes


def test_gaps_are_the_uncovered_parts_of_the_window() -> None:
    """Overlapping coverage merges; what is left uncovered between and after is a gap."""
    intervals = [
        (_at(0), _at(10), "webhook"),
        (_at(5), _at(20), "poll"),
        (_at(30), _at(40), "replay"),
    ]

    gaps = compute_gaps(PROVIDER, intervals, _at(-5), _at(50))

    assert [(_at(-5), _at(0)), (_at(20), _at(30)), (_at(40), _at(50))] == [
        (g.start, g.end) for g in gaps
    ]
    assert 25.0 == sum(g.seconds for g in gaps)


def test_gaps_shorter_than_the_tolerance_are_ignored() -> None:
    """A sliver between two channels' coverage is not reported with a tolerance."""
    intervals = [(_at(0), _at(10)), (_at(10.2), _at(20))]

    assert [] == compute_gaps(PROVIDER, intervals, _at(0), _at(20), tolerance=timedelta(seconds=1))
    assert 1 == len(compute_gaps(PROVIDER, intervals, _at(0), _at(20)))


@given(
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)).map(sorted), max_size=12),
    st.integers(0, 100),
    st.integers(0, 100),
)
def test_coverage_and_gaps_partition_the_window(
    spans: list[list[int]], left: int, right: int
) -> None:
    """Merged coverage plus gaps always add up to exactly the inspected window."""
    since, until = _at(min(left, right)), _at(max(left, right))
    intervals = [(_at(a), _at(b)) for a, b in spans]

    gaps = compute_gaps(PROVIDER, intervals, since, until)
    clipped = [(max(a, since), min(b, until)) for a, b in intervals]
    covered = sum((b - a).total_seconds() for a, b in merge_intervals(clipped))

    assert (until - since).total_seconds() == covered + sum(g.seconds for g in gaps)
    assert all(g.seconds > 0 for g in gaps)


def test_a_record_changed_only_at_the_provider_differs_by_version() -> None:
    """The ledger's version behind the provider's is a mismatch naming the versions."""
    local = LocalRecord("rec_1", "tenant_1", 3)

    result = compare_record(local, "rec_1", {"tenant_id": "tenant_1", "version": 4, "data": {}})

    assert ("mismatch", (FieldDiff("version", 3, 4),)) == (result.status, result.diffs)


def test_field_level_diffs_when_the_local_source_has_data() -> None:
    """A local source with data gets one diff per differing field, or only the fields asked for."""
    local = LocalRecord("r", "t", 2, data={"stage": "won", "amount": 5, "name": "A"})
    remote = {"tenant_id": "t", "version": 2, "data": {"stage": "lost", "amount": 5, "name": "B"}}

    everything = compare_record(local, "r", remote)
    only_stage = compare_record(local, "r", remote, fields=["stage"])

    assert ["data.name", "data.stage"] == [d.field for d in everything.diffs]
    assert [FieldDiff("data.stage", "won", "lost")] == list(only_stage.diffs)


def test_hash_comparison_and_missing_sides() -> None:
    """A hash mismatch, a record gone at the provider and one never applied are all reported."""
    data = {"a": 1}
    same = LocalRecord("r", "t", 1, data_hash=data_hash({"a": 1}))
    drifted = LocalRecord("r", "t", 1, data_hash=data_hash({"a": 2}))
    remote = {"tenant_id": "t", "version": 1, "data": data}

    assert "match" == compare_record(same, "r", remote).status
    assert "data_hash" == compare_record(drifted, "r", remote).diffs[0].field
    assert "missing_remote" == compare_record(same, "r", None).status
    assert "missing_local" == compare_record(None, "r", remote).status
    assert "match" == compare_record(LocalRecord("r", "t", 2, deleted=True), "r", None).status


def test_static_source_pages_by_cursor_and_honours_retention() -> None:
    """The in-process replay source serves pages from since, then refuses an old since."""
    source = StaticReplaySource(
        PROVIDER,
        [make_event(n) for n in range(1, 8)],
        retention=timedelta(hours=1),
        clock=ManualClock(_at(100)),
    )

    first = source.replay(_at(3), limit=3)
    second = source.replay(_at(3), cursor=first.next_cursor, limit=3)

    assert (["evt_3", "evt_4", "evt_5"], ["evt_6", "evt_7"]) == (
        [e.id for e in first.events],
        [e.id for e in second.events],
    )
    assert second.next_cursor is None
    with pytest.raises(ReplayWindowExceeded, match="replay retention of 1h"):
        source.replay(_at(100 - 7200))


def test_public_names_stay_functions_whatever_was_imported_first() -> None:
    """Importing every submodule first never shadows reconcile, gaps, resync or timeline."""
    import importlib
    import pkgutil
    import types

    import idis.integrations as top
    import idis.integrations.reconciliation as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    names = ("gaps", "reconcile", "reconcile_async", "resync", "timeline", "verify_sync")

    assert [] == [n for n in names if isinstance(getattr(top, n), types.ModuleType)]
    assert [] == [n for n in names if isinstance(getattr(package, n), types.ModuleType)]
    assert set(names) <= set(top.__all__)
