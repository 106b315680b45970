"""The poller against the simulator over HTTP: durable cursor, overlapping windows, resume."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from idis.integrations.config import Settings, SyncSettings
from idis.integrations.exceptions import ProviderError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.providers import ProviderClient
from idis.integrations.resilience._gateway import Gateway
from idis.integrations.sync._poller import Poller, advance_cursor, window_start
from idis.integrations.sync._state import get_cursor
from idis.integrations.sync._timeline import coverage
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

from ..conftest import sample
from .conftest import T0, HostTable, OffsetClock, make_event

P = "crm_provider"


@pytest.fixture
def clock() -> OffsetClock:
    """Real time plus a movable offset, shared with the simulator."""
    return OffsetClock()


@pytest.fixture
def sim(clock: OffsetClock) -> Iterator[RunningSimulator]:
    """A simulator on 127.0.0.1 running on the shared clock."""
    with run_simulator(clock=clock.now) as running:
        yield running


def _settings(sim: RunningSimulator, url: str, **sync: object) -> Settings:
    base = simulator_settings(sim.url, providers=(P,), database_url=url)
    return replace(base, sync=SyncSettings(poll_overlap=timedelta(seconds=30), page_size=7, **sync))  # type: ignore[arg-type]


def test_window_start_and_cursor_rules() -> None:
    """Windows start overlap before the watermark; the cursor never moves backwards."""
    overlap = timedelta(minutes=2)

    assert (None, T0 - overlap) == window_start(10, T0, now=T0, overlap=overlap)
    assert (10, None) == window_start(10, None, now=T0, overlap=overlap)
    assert (None, T0 - overlap) == window_start(None, None, now=T0, overlap=overlap)
    events = [make_event(3), make_event(4)]
    assert (12, T0 + timedelta(hours=1)) == advance_cursor(12, T0 + timedelta(hours=1), events, 4)
    assert (9, events[-1].occurred_at) == advance_cursor(None, None, events, 9)


def test_poll_applies_everything_once_and_overlap_rereads_are_deduped(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    metrics: Metrics,
) -> None:
    """Two polls over overlapping windows apply each of 30 events once; coverage is recorded."""
    settings = _settings(sim, str(sqlite_engine.url))
    with Gateway(settings, clock=clock) as gateway:
        poller = Poller(
            ProviderClient(gateway, P),
            sqlite_engine,
            settings,
            P,
            registry=sqlite_host.registry(),
            clock=clock,
        )
        first_poll = poller.poll_once()  # nothing yet: sets the window
        sim.control.emit(P, 20, record_ids=[f"deal_{i}" for i in range(6)], webhook=False)
        clock.advance(5)
        second = poller.poll_once()
        sim.control.emit(P, 10, webhook=False)
        clock.advance(5)
        third = poller.poll_once()

    applied = [row[0] for row in sqlite_host.rows()]
    assert 0 == first_poll.fetched
    assert (20, 20) == (second.fetched, second.applied)
    assert third.duplicates > 0  # the overlap re-read some of the previous window
    assert 10 == third.applied
    assert [f"evt_{n}" for n in range(1, 31)] == applied
    assert 3.0 == sample(metrics, "integration_polls_total", provider=P, outcome="ok")
    assert 30.0 == sample(metrics, "integration_events_applied_total", provider=P, source="poll")
    with Session(sqlite_engine) as session:
        cursor = get_cursor(session, P)
        intervals = coverage(session, P, first_poll.started_at - timedelta(hours=1), clock.now())
    assert cursor is not None
    assert 30 == cursor.after_seq
    assert 1 == len(intervals)
    assert "poll" == intervals[0].source
    assert third.started_at == intervals[0].end


def test_a_poll_stopped_halfway_resumes_without_applying_twice(
    sim: RunningSimulator, db_url: str, clock: OffsetClock
) -> None:
    """A poll limited to one page (as if killed) resumes after its last committed page."""
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(db_url)
    host = HostTable(engine)
    settings = _settings(sim, db_url)
    try:
        with Gateway(settings, clock=clock) as gateway:
            feed = ProviderClient(gateway, P)
            Poller(feed, engine, settings, P, registry=host.registry(), clock=clock).poll_once()
            sim.control.emit(P, 25, webhook=False)
            clock.advance(1)
            partial = Poller(
                feed, engine, settings, P, registry=host.registry(), clock=clock, max_pages=1
            )
            cut = partial.poll_once()
            rest = Poller(
                feed, engine, settings, P, registry=host.registry(), clock=clock
            ).poll_once()
        rows = host.rows()
    finally:
        engine.dispose()

    assert (7, False) == (cut.applied, cut.complete)
    assert (18, True) == (rest.applied, rest.complete)
    ids = [r[0] for r in rows]
    assert 25 == len(ids) == len(set(ids))


def test_provider_failure_keeps_committed_pages_and_counts_the_error(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    metrics: Metrics,
) -> None:
    """An outage fails the poll (ProviderError); the cursor stays and the next poll catches up."""
    settings = _settings(sim, str(sqlite_engine.url))
    with Gateway(settings, clock=clock) as gateway:
        poller = Poller(
            ProviderClient(gateway, P),
            sqlite_engine,
            settings,
            P,
            registry=sqlite_host.registry(),
            clock=clock,
        )
        poller.poll_once()
        sim.control.emit(P, 5, webhook=False)
        sim.control.outage(P)
        with pytest.raises(ProviderError):
            poller.poll_once()
        sim.control.clear_faults(P)
        clock.advance(2)  # past the breaker's reset timeout
        recovered = poller.poll_once()

    assert 1.0 == sample(metrics, "integration_polls_total", provider=P, outcome="error")
    assert 5 == recovered.applied
    assert 5 == len(sqlite_host.rows())


def test_versions_apply_in_order_per_record(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """Changes to three records: each record's versions apply in increasing order, to the newest."""
    settings = _settings(sim, str(sqlite_engine.url))
    with Gateway(settings, clock=clock) as gateway:
        poller = Poller(
            ProviderClient(gateway, P),
            sqlite_engine,
            settings,
            P,
            registry=sqlite_host.registry(),
            clock=clock,
        )
        poller.poll_once()
        sim.control.emit(P, 30, record_ids=["a", "b", "c"], webhook=False)
        clock.advance(1)
        poller.poll_once()

    by_record: dict[str, list[int]] = {}
    for _event, record, version in sqlite_host.rows():
        by_record.setdefault(record, []).append(version)
    assert {"a": list(range(1, 11)), "b": list(range(1, 11)), "c": list(range(1, 11))} == by_record
    assert Counter({"a": 10, "b": 10, "c": 10}) == Counter(r[1] for r in sqlite_host.rows())
