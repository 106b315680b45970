"""Each pack against the simulator's dialect of it: polling with opaque cursors, replay, limits."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from tests.sync.conftest import HostTable, OffsetClock

from idis.integrations.config import Settings, SyncSettings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ReplayWindowExceeded
from idis.integrations.providers import async_client_for, client_for
from idis.integrations.resilience import Gateway
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.sync._mode import ModePolicy
from idis.integrations.sync._poller import Poller
from idis.integrations.sync._state import get_cursor, load_state, override_mode
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def sqlite_host(sqlite_engine: Engine) -> HostTable:
    return HostTable(sqlite_engine)


@pytest.fixture
def sim(clock: OffsetClock) -> Iterator[RunningSimulator]:
    with run_simulator(clock=clock.now) as running:
        yield running


def _settings(sim: RunningSimulator, api: str, url: str = "sqlite://") -> Settings:
    base = simulator_settings(sim.url, providers=(P,), database_url=url, api=api)
    return replace(base, sync=SyncSettings(poll_overlap=timedelta(seconds=30), page_size=7))


class Polls:
    """The async poller driven from a sync test on one loop, over a pack's client."""

    def __init__(self, settings: Settings, url: str, host: HostTable, clock: OffsetClock) -> None:
        self.runner = asyncio.Runner()
        self.engine = create_async_db_engine(url)
        self.gateway = AsyncGateway(settings, clock=clock)
        self.poller = Poller(
            async_client_for(self.gateway, P),
            self.engine,
            settings,
            P,
            registry=host.registry(),
            clock=clock,
        )

    def poll(self) -> Any:
        return self.runner.run(self.poller.poll_once())

    def close(self) -> None:
        self.runner.run(self.gateway.aclose())
        self.runner.run(self.engine.dispose())
        self.runner.close()


def _cursor(engine: Engine) -> str | None:
    with Session(engine) as session:
        cursor = get_cursor(session, P)
        return None if cursor is None else cursor.position


@pytest.mark.parametrize(("api", "prefix"), [("hubspot", "hs1:"), ("salesforce", "sf1:")])
def test_polling_applies_every_change_once_through_an_opaque_cursor(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    api: str,
    prefix: str,
) -> None:
    """20 records polled in pages of 7 through the pack's own API, then 5 more: once each."""
    settings = _settings(sim, api, str(sqlite_engine.url))
    polls = Polls(settings, str(sqlite_engine.url), sqlite_host, clock)
    try:
        polls.poll()  # sets the window
        clock.advance(1)
        sim.control.emit(P, 20, record_ids=[f"deal_{i}" for i in range(20)], webhook=False)
        clock.advance(5)
        second = polls.poll()
        stored = _cursor(sqlite_engine)
        sim.control.emit(P, 5, record_ids=[f"deal_{i}" for i in range(20, 25)], webhook=False)
        clock.advance(5)
        third = polls.poll()
    finally:
        polls.close()

    applied = sorted(row[1] for row in sqlite_host.rows())
    assert sorted(f"deal_{i}" for i in range(25)) == applied
    assert (20, True) == (second.applied, second.complete)
    assert 5 == third.applied
    assert stored is not None
    assert stored.startswith(prefix)


def test_hubspot_answers_carry_its_rate_limit_headers(sim: RunningSimulator) -> None:
    gateway = Gateway(_settings(sim, "hubspot"))
    try:
        client = client_for(gateway, P)
        client.changes()
        reading = client.rate_limit
    finally:
        gateway.close()

    assert reading is not None
    assert (99, 100, 10.0) == (reading.remaining, reading.limit, reading.reset_after)


def test_salesforce_replay_returns_updates_and_deletions_in_the_window(
    sim: RunningSimulator, clock: OffsetClock
) -> None:
    start = clock.now() - timedelta(minutes=1)
    sim.control.emit(P, 3, record_ids=["opp_1", "opp_2", "opp_3"], webhook=False)
    sim.control.emit(P, 1, record_ids=["opp_2"], type="record.deleted", webhook=False)
    clock.advance(1)
    gateway = Gateway(_settings(sim, "salesforce"), clock=clock)
    try:
        client = client_for(gateway, P)
        page = client.replay(start)
        usage = client.rate_limit
        with pytest.raises(ReplayWindowExceeded) as caught:
            client.replay(clock.now() - timedelta(days=31))
    finally:
        gateway.close()

    assert [
        ("opp_1", "record.updated"),
        ("opp_3", "record.updated"),
        ("opp_2", "record.deleted"),
    ] == [(e.record_id, e.type) for e in page.events]
    assert "--resync" in str(caught.value)
    assert usage is not None
    assert usage.limit == 15_000


def test_salesforce_record_lookup_and_not_found(sim: RunningSimulator) -> None:
    sim.control.emit(P, 1, record_ids=["opp_9"], webhook=False)
    gateway = Gateway(_settings(sim, "salesforce"))
    try:
        client = client_for(gateway, P)
        found = client.get_record("opp_9")
        missing = client.get_record("opp_404")
    finally:
        gateway.close()

    assert found is not None
    assert "opp_9" == found.id
    assert missing is None


@pytest.mark.parametrize("api", ["hubspot", "salesforce"])
def test_failover_to_polling_and_back_with_an_opaque_cursor(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    api: str,
) -> None:
    """A switch to polling leaves the sentinel's feed seq in the cursor: the pack's poller reads
    from the covered moment instead of failing on a cursor that is not its own; and back."""
    settings = _settings(sim, api, str(sqlite_engine.url))
    policy = ModePolicy.from_settings(settings.sync)
    polls = Polls(settings, str(sqlite_engine.url), sqlite_host, clock)
    try:
        polls.poll()
        clock.advance(1)
        sim.control.emit(P, 3, record_ids=["deal_1", "deal_2", "deal_3"], webhook=False)
        clock.advance(1)
        polls.poll()
        covered = clock.now()
        clock.advance(1)
        sim.control.emit(P, 4, record_ids=[f"deal_{i}" for i in range(4, 8)], webhook=False)
        with Session(sqlite_engine) as session, session.begin():
            row = load_state(session, P, policy, clock.now(), for_update=True)
            row.confirmed_seq, row.confirmed_at = 3, covered  # as the sentinel records it
        with Session(sqlite_engine) as session, session.begin():
            to_polling = override_mode(
                session, P, "polling", policy=policy, now=clock.now(), actor="test"
            )
        moved = _cursor(sqlite_engine)
        clock.advance(5)
        after_failover = polls.poll()
        with Session(sqlite_engine) as session, session.begin():
            back = override_mode(session, P, "webhook", policy=policy, now=clock.now(), actor="t")
        stored = _cursor(sqlite_engine)
    finally:
        polls.close()

    assert "3" == moved
    assert 4 == after_failover.applied
    assert sorted(f"deal_{i}" for i in range(1, 8)) == sorted(r[1] for r in sqlite_host.rows())
    assert ("polling", "webhook") == (to_polling.mode.value, back.mode.value)
    assert stored is not None
    assert not stored.isdigit()
