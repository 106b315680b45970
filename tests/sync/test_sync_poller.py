"""The poller (async only) over HTTP: durable cursor by feed position, resume, late commits."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from idis.integrations.config import Settings, SyncSettings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ProviderError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.providers import AsyncProviderClient
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._poller import Poller, advance_cursor, window_start
from idis.integrations.sync._state import get_cursor
from idis.integrations.sync._timeline import coverage
from idis.integrations.testing import (
    RunningSimulator,
    run_simulator,
    serve_asgi,
    simulator_settings,
)

from ..conftest import sample
from .conftest import T0, FeedServer, HostTable, OffsetClock, feed_event, make_event

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


class Polls:
    """Async pollers driven from a sync test on one event loop (the poller is async only)."""

    def __init__(
        self, settings: Settings, url: str, registry: HandlerRegistry, clock: OffsetClock
    ) -> None:
        self.runner = asyncio.Runner()
        self.engine = create_async_db_engine(url)
        self.gateway = AsyncGateway(settings, clock=clock)
        self.feed = AsyncProviderClient(self.gateway, P)
        self.settings, self.registry, self.clock = settings, registry, clock

    def poller(self, **options: Any) -> Poller:
        return Poller(
            self.feed,
            self.engine,
            self.settings,
            P,
            registry=self.registry,
            clock=self.clock,
            **options,
        )

    def poll(self, poller: Poller | None = None, **options: Any) -> Any:
        return self.runner.run((poller or self.poller()).poll_once(**options))

    def __enter__(self) -> Polls:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.runner.run(self.gateway.aclose())
            self.runner.run(self.engine.dispose())
        finally:
            self.runner.close()


def test_window_start_and_cursor_rules() -> None:
    """The feed position wins over the watermark; a seq position never moves backwards."""
    overlap = timedelta(minutes=2)

    assert ("10", None) == window_start("10", T0, now=T0, overlap=overlap)
    assert (None, T0 - overlap) == window_start(None, T0, now=T0, overlap=overlap)
    assert ("10", None) == window_start("10", None, now=T0, overlap=overlap)
    assert (None, T0 - overlap) == window_start(None, None, now=T0, overlap=overlap)
    events = [make_event(3), make_event(4)]
    assert ("12", T0 + timedelta(hours=1)) == advance_cursor(
        "12", T0 + timedelta(hours=1), events, "4"
    )
    assert ("9", events[-1].occurred_at) == advance_cursor(None, None, events, "9")


def test_an_opaque_position_is_the_providers_to_move() -> None:
    """A position that is not a seq (a search token, a keyset) is replaced, never compared."""
    events = [make_event(3)]
    hubspot = "hs1:1764000000000:200:NTI1Cg%3D%3D"

    assert (hubspot, events[0].occurred_at) == advance_cursor("10", None, events, hubspot)
    assert ("hs1:1:0:", T0) == advance_cursor("hs1:1:0:", T0, [], None)
    assert ("sf1:b", T0) == advance_cursor("sf1:a", T0, [], "sf1:b")


def test_poll_applies_everything_once_by_feed_position(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    metrics: Metrics,
) -> None:
    """Polls apply each of 30 events once, continuing after the cursor; coverage is recorded."""
    settings = _settings(sim, str(sqlite_engine.url))
    with Polls(settings, str(sqlite_engine.url), sqlite_host.registry(), clock) as polls:
        poller = polls.poller()
        first_poll = polls.poll(poller)  # nothing yet: sets the window
        sim.control.emit(P, 20, record_ids=[f"deal_{i}" for i in range(6)], webhook=False)
        clock.advance(5)
        second = polls.poll(poller)
        sim.control.emit(P, 10, webhook=False)
        clock.advance(5)
        third = polls.poll(poller)

    applied = [row[0] for row in sqlite_host.rows()]
    assert 0 == first_poll.fetched
    assert (20, 20) == (second.fetched, second.applied)
    assert (10, 0) == (third.applied, third.duplicates)  # read from after the cursor
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
        with Polls(settings, db_url, host.registry(), clock) as polls:
            polls.poll()
            sim.control.emit(P, 25, webhook=False)
            clock.advance(1)
            cut = polls.poll(polls.poller(max_pages=1))
            rest = polls.poll()
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
    with Polls(settings, str(sqlite_engine.url), sqlite_host.registry(), clock) as polls:
        poller = polls.poller()
        polls.poll(poller)
        sim.control.emit(P, 5, webhook=False)
        sim.control.outage(P)
        with pytest.raises(ProviderError):
            polls.poll(poller)
        sim.control.clear_faults(P)
        clock.advance(2)  # past the breaker's reset timeout
        recovered = polls.poll(poller)

    assert 1.0 == sample(metrics, "integration_polls_total", provider=P, outcome="error")
    assert 5 == recovered.applied
    assert 5 == len(sqlite_host.rows())


def test_versions_apply_in_order_per_record(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """Changes to three records: each record's versions apply in increasing order, to the newest."""
    settings = _settings(sim, str(sqlite_engine.url))
    with Polls(settings, str(sqlite_engine.url), sqlite_host.registry(), clock) as polls:
        poller = polls.poller()
        polls.poll(poller)
        sim.control.emit(P, 30, record_ids=["a", "b", "c"], webhook=False)
        clock.advance(1)
        polls.poll(poller)

    by_record: dict[str, list[int]] = {}
    for _event, record, version in sqlite_host.rows():
        by_record.setdefault(record, []).append(version)
    assert {"a": list(range(1, 11)), "b": list(range(1, 11)), "c": list(range(1, 11))} == by_record
    assert Counter({"a": 10, "b": 10, "c": 10}) == Counter(r[1] for r in sqlite_host.rows())


def test_an_event_the_provider_commits_late_is_still_polled(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """A change committed after the cursor but stamped long before the overlap is applied.

    Issue 11: the time watermark won over the seq cursor, so the next poll asked
    for ``since=watermark - overlap`` and never saw an event whose
    ``occurred_at`` was older than that, though the feed served it after the cursor.
    """
    feed = FeedServer()
    now = clock.now()
    with serve_asgi(feed.app()) as url:
        settings = _settings(_Url(url), str(sqlite_engine.url))  # overlap 30 s
        with Polls(settings, str(sqlite_engine.url), sqlite_host.registry(), clock) as polls:
            poller = polls.poller()
            feed.append(feed_event(1, "deal_a", now, version=1))
            feed.append(feed_event(2, "deal_b", now, version=1))
            first = polls.poll(poller)
            # Committed now, but stamped ten minutes ago (a long transaction at the provider).
            feed.append(feed_event(3, "deal_c", now - timedelta(minutes=10), version=1))
            clock.advance(5)
            second = polls.poll(poller)

    assert (2, 1) == (first.applied, second.applied)
    assert ["evt_1", "evt_2", "evt_3"] == [row[0] for row in sqlite_host.rows()]
    assert "2" == feed.requests[-1]["after"]  # asked after the cursor, not since a time


class _Url:
    """Stands in for a RunningSimulator where only ``.url`` is read."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_events_the_feed_no_longer_serves_leave_a_gap_in_the_timeline(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
) -> None:
    """Events aged out of the feed's retention before a poll: their time is not claimed.

    The poll applies what the feed still serves and records coverage only from
    the oldest event it still serves, so the timeline shows the lost stretch as a
    gap (for reconcile to fill) instead of claiming it.
    """
    settings = _settings(sim, str(sqlite_engine.url))
    sim.control.set_feed_retention(P, 60)
    with Polls(settings, str(sqlite_engine.url), sqlite_host.registry(), clock) as polls:
        poller = polls.poller()
        first = polls.poll(poller)
        sim.control.emit(P, 5, webhook=False)
        clock.advance(120)  # the five age out of the feed
        sim.control.emit(P, 5, webhook=False)
        clock.advance(1)
        second = polls.poll(poller)
        clock.advance(1)
        third = polls.poll(poller)  # nothing lost since: no gap

    assert ["evt_6", "evt_7", "evt_8", "evt_9", "evt_10"] == [r[0] for r in sqlite_host.rows()]
    assert second.feed_gap_until is not None
    assert third.feed_gap_until is None
    assert second.window_start == second.feed_gap_until
    with Session(sqlite_engine) as session:
        intervals = coverage(session, P, first.started_at - timedelta(hours=1), clock.now())
    assert 2 == len(intervals)
    assert first.started_at == intervals[0].end
    # The lost events happened between the two intervals: nothing claims their time.
    assert first.started_at + timedelta(seconds=100) < intervals[1].start
    assert second.feed_gap_until == intervals[1].start
    assert third.started_at == intervals[1].end
