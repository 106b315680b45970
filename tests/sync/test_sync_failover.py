"""End to end against the simulator over real HTTP: webhooks stop, the library fails over to
polling within the lag threshold, webhooks resume, it returns after the stable period; every
event applied exactly once, counted against the simulator's own event log."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from idis.integrations._audit import list_audit_events
from idis.integrations.config import Settings, SyncSettings
from idis.integrations.observability._metrics import Metrics
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.sync._mode import Mode, Reason
from idis.integrations.sync._models import SyncInbox
from idis.integrations.sync._service import TickReport
from idis.integrations.sync._state import sync_summary
from idis.integrations.sync._timeline import coverage
from idis.integrations.testing import (
    RunningSimulator,
    run_simulator,
    simulator_settings,
)

from ..conftest import sample
from .conftest import HostTable, OffsetClock, ServiceHarness, provider_log

P = "crm_provider"
LAG = timedelta(seconds=20)
STABLE = timedelta(seconds=60)
SENTINEL = timedelta(seconds=5)
POLL = timedelta(seconds=10)


@pytest.fixture
def clock() -> OffsetClock:
    """Real time plus a movable offset, shared with the simulator."""
    return OffsetClock()


@pytest.fixture
def sim(clock: OffsetClock) -> Iterator[RunningSimulator]:
    """A simulator on 127.0.0.1 running on the shared clock."""
    with run_simulator(clock=clock.now) as running:
        yield running


def _settings(sim: RunningSimulator, url: str, **sync: Any) -> Settings:
    base = simulator_settings(sim.url, providers=(P,), database_url=url)
    values: dict[str, Any] = {
        "lag_threshold": LAG,
        "stable_period": STABLE,
        "sentinel_interval": SENTINEL,
        "crm_poll_interval": POLL,
        "poll_overlap": timedelta(seconds=15),
        "lock_timeout": timedelta(seconds=3),
        "page_size": 50,
    }
    values.update(sync)
    return replace(base, sync=SyncSettings(**values))


class _Run:
    """Drives a service tick by tick on the shared clock."""

    def __init__(self, service: ServiceHarness, sim: RunningSimulator, clock: OffsetClock) -> None:
        self.service = service
        self.sim = sim
        self.clock = clock
        self.transitions: list[tuple[Any, TickReport]] = []

    def step(self, seconds: float = SENTINEL.total_seconds()) -> TickReport:
        self.sim.control.flush_webhooks(P)
        self.clock.advance(seconds)
        report = self.service.tick(P)
        if report.transition is not None:
            self.transitions.append((self.clock.now(), report))
        return report


def test_webhooks_stop_and_resume_failover_and_return_nothing_lost_or_doubled(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    metrics: Metrics,
) -> None:
    """Stop webhooks mid-stream: polling within the lag threshold; resume: webhook mode after the
    stable period; every provider event applied exactly once."""
    settings = _settings(sim, str(sqlite_engine.url))
    service = ServiceHarness(settings, sqlite_engine, registry=sqlite_host.registry(), clock=clock)
    records = [f"deal_{i}" for i in range(7)]
    with service, service.serve() as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
        run = _Run(service, sim, clock)
        assert Mode.WEBHOOK == run.step(0).mode  # first sentinel check: baseline

        # 1. healthy webhooks
        for _ in range(4):
            sim.control.emit(P, 5, record_ids=records)
            assert Mode.WEBHOOK == run.step().mode
        webhook_applied = len(sqlite_host.rows())

        # 2. webhooks stop, changes continue
        sim.control.set_webhook_mode(P, "stop")
        first_missed = sim.control.emit(P, 3, record_ids=records)[0]
        while run.step().mode is Mode.WEBHOOK:
            sim.control.emit(P, 3, record_ids=records)
            assert len(run.transitions) == 0
            assert clock.now() < sim.control.now() + timedelta(seconds=1)
        switched_at, failover = run.transitions[0]
        lag_at_switch = switched_at - _parse(first_missed["occurred_at"])

        # 3. polling keeps everything applied while webhooks stay down
        for _ in range(4):
            sim.control.emit(P, 4, record_ids=records)
            run.step()

        # 4. webhooks resume: back to webhook mode after the stable period
        sim.control.set_webhook_mode(P, "deliver")
        resumed_at = clock.now()
        while run.step().mode is Mode.POLLING:
            sim.control.emit(P, 2, record_ids=records)
            assert clock.now() - resumed_at < STABLE * 3
        returned_at, back = run.transitions[1]

        # 5. healthy again; settle
        for _ in range(3):
            sim.control.emit(P, 3, record_ids=records)
            run.step()
        run.step()

        log = provider_log(sim.url, P)
        with Session(sqlite_engine) as session:
            inbox = {row.event_id: row for row in session.scalars(select(SyncInbox))}
            audit = list_audit_events(session, provider=P, actions=["sync.mode_changed"])
            summary = sync_summary(session)
            timeline = coverage(session, P, _parse(log[0].occurred_at.isoformat()), clock.now())

    # the switches
    assert failover.transition is not None
    assert back.transition is not None
    assert (Mode.POLLING, Reason.WEBHOOK_LAG) == (
        failover.transition.to_mode,
        failover.transition.reason,
    )
    assert LAG < lag_at_switch <= LAG + SENTINEL + timedelta(seconds=1)
    assert (Mode.WEBHOOK, Reason.RECOVERED) == (back.transition.to_mode, back.transition.reason)
    assert STABLE <= returned_at - resumed_at <= STABLE + 3 * SENTINEL
    assert 2 == len(run.transitions)
    assert ["webhook_lag", "recovered"] == [a.details["reason"] for a in audit]
    # polling started from the last webhook-confirmed position, not from the switch
    assert first_missed["seq"] - 1 == audit[0].details["poll_from_seq"]
    assert 1.0 == sample(
        metrics,
        "integration_sync_mode_switches_total",
        provider=P,
        to_mode="polling",
        reason="webhook_lag",
    )
    assert 0.0 == sample(metrics, "integration_sync_mode", provider=P)
    assert "webhook" == summary[0].mode

    # exactly once, nothing missed: the simulator's log against the inbox and the host table
    applied = [row[0] for row in sqlite_host.rows()]
    doubled = [event for event, count in Counter(applied).items() if count > 1]
    missed = [e.id for e in log if e.id not in inbox]
    superseded = [e.id for e in log if e.id in inbox and inbox[e.id].status == "superseded"]
    assert 20 == webhook_applied
    assert [] == doubled
    assert [] == missed
    assert len(log) == len(applied) + len(superseded)
    assert set(applied) | set(superseded) == {e.id for e in log}
    sources = Counter(inbox[e].source for e in applied)
    assert sources["webhook"] > 0
    assert sources["poll"] > 0
    # the host ends with every record at the provider's newest version
    newest: dict[str, int] = {}
    for event in log:
        newest[event.record_id] = max(newest.get(event.record_id, 0), event.version)
    with sqlite_engine.connect() as conn:
        held = dict(
            conn.execute(
                text("SELECT record_id, MAX(version) FROM host_applied GROUP BY record_id")
            ).all()
        )
    assert newest == held
    # the window between the last good webhook and the switch is covered
    sources_in_timeline = {i.source for i in timeline}
    assert {"webhook", "poll"} <= sources_in_timeline


def _parse(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_crm_mode_polling_polls_every_interval_from_start_and_never_returns(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """CRM_MODE=polling CRM_POLL_INTERVAL=5m: a poll at start and every 5 minutes, no sentinel,
    no return to webhooks however healthy they are."""
    env = {"CRM_MODE": "polling", "CRM_POLL_INTERVAL": "5m"}
    from_env = Settings.from_env(env)
    settings = replace(
        simulator_settings(sim.url, providers=(P,), database_url=str(sqlite_engine.url)),
        sync=from_env.sync,
    )
    service = ServiceHarness(settings, sqlite_engine, registry=sqlite_host.registry(), clock=clock)
    with service, service.serve() as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
        polled_at: list[int] = []
        for tick in range(int(timedelta(minutes=21).total_seconds() / 30)):
            sim.control.emit(P, 1)
            sim.control.flush_webhooks(P)
            report = service.tick(P)
            assert Mode.POLLING == report.mode
            assert report.transition is None
            assert report.sentinel is None
            if report.poll is not None:
                polled_at.append(tick * 30)
            clock.advance(30)
        with Session(sqlite_engine) as session:
            summary = sync_summary(session)[0]

    assert [0, 300, 600, 900, 1200] == polled_at
    assert ("polling", "config") == (summary.mode, summary.reason)
    assert summary.last_webhook_at is not None  # webhooks kept arriving and were applied


def test_defaults_when_unset(
    sim: RunningSimulator, sqlite_engine: Engine, clock: OffsetClock
) -> None:
    """With CRM_MODE and CRM_POLL_INTERVAL unset: webhook mode with failover on, 5-minute polls."""
    from_env = Settings.from_env({})
    settings = replace(
        simulator_settings(sim.url, providers=(P,), database_url=str(sqlite_engine.url)),
        sync=from_env.sync,
    )

    with ServiceHarness(settings, sqlite_engine, clock=clock) as service:
        report = service.tick(P)

    assert ("webhook", timedelta(minutes=5), True) == (
        from_env.sync.crm_mode,
        from_env.sync.crm_poll_interval,
        from_env.sync.auto_failover,
    )
    assert (Mode.WEBHOOK, None) == (report.mode, report.poll)
    assert report.sentinel is not None


def test_bad_signatures_alone_never_switch_modes(
    sim: RunningSimulator,
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: OffsetClock,
    metrics: Metrics,
) -> None:
    """Twelve forged deliveries are rejected and counted, and the mode stays webhook (issue 17).

    Anyone can POST a bad signature; only a missing flow of valid deliveries
    (lag) fails over. The sentinel repairs the changes those deliveries stood for.
    """
    settings = _settings(sim, str(sqlite_engine.url), lag_threshold=timedelta(minutes=10))
    service = ServiceHarness(settings, sqlite_engine, registry=sqlite_host.registry(), clock=clock)
    with service, service.serve() as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
        service.tick(P)
        sim.control.set_webhook_mode(P, "corrupt")
        sim.control.emit(P, 12)
        sim.control.flush_webhooks(P)
        clock.advance(1)
        report = service.tick(P)
        service.tick(P)
        with Session(sqlite_engine) as session:
            audit = list_audit_events(session, provider=P, actions=["sync.mode_changed"])

    assert (Mode.WEBHOOK, None) == (report.mode, report.transition)
    assert [] == audit
    assert 12.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="bad_signature"
    )


def test_duplicated_and_reordered_webhooks_apply_once_in_version_order(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """Duplicate and reorder delivery: each event handled once, never older after newer."""
    settings = _settings(sim, str(sqlite_engine.url))
    service = ServiceHarness(settings, sqlite_engine, registry=sqlite_host.registry(), clock=clock)
    with service, service.serve() as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
        service.tick(P)
        sim.control.set_webhook_mode(P, "duplicate")
        sim.control.emit(P, 10, record_ids=["a", "b"])
        sim.control.set_webhook_mode(P, "reorder", batch=5)
        sim.control.emit(P, 20, record_ids=["a", "b"])
        sim.control.flush_webhooks(P)
        clock.advance(30)  # past the lag threshold: anything lost would be repaired now
        report = service.tick(P)
        log = provider_log(sim.url, P)
        with Session(sqlite_engine) as session:
            statuses = Counter(row.status for row in session.scalars(select(SyncInbox)))

    rows = sqlite_host.rows()
    ids = [r[0] for r in rows]
    assert Mode.WEBHOOK == report.mode
    assert len(ids) == len(set(ids))
    assert 30 == len(log) == statuses["applied"] + statuses["superseded"]
    assert statuses["superseded"] > 0  # reordering delivered some older versions late
    for record in ("a", "b"):
        versions = [r[2] for r in rows if r[1] == record]
        assert sorted(versions) == versions
        assert 15 == versions[-1]


def test_provider_outage_opens_the_breaker_and_fails_over(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """An outage makes the sentinel's calls fail until the breaker opens: failover (breaker_open);
    after recovery the poller catches up everything emitted during the outage."""
    settings = _settings(sim, str(sqlite_engine.url))
    service = ServiceHarness(settings, sqlite_engine, registry=sqlite_host.registry(), clock=clock)
    with service, service.serve() as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
        service.tick(P)
        sim.control.outage(P)
        sim.control.set_webhook_mode(P, "stop")
        sim.control.emit(P, 5)
        reports = []
        for _ in range(6):
            clock.advance(SENTINEL.total_seconds())
            reports.append(service.tick(P))
            if reports[-1].transition is not None:
                break
        sim.control.clear_faults(P)
        clock.advance(5)  # past the breaker's reset timeout
        caught_up = service.tick(P)

    switch = reports[-1].transition
    assert switch is not None
    assert (Mode.POLLING, Reason.BREAKER_OPEN) == (switch.to_mode, switch.reason)
    assert all(r.error is not None for r in reports)
    assert caught_up.poll is not None
    assert 5 == len(sqlite_host.rows())


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_service_fails_over_and_applies_everything(
    sim: RunningSimulator, sqlite_url: str, clock: OffsetClock, anyio_backend: str
) -> None:
    """AsyncSyncService (async engine, AsyncGateway, async handlers): same failover, same count."""
    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.sync._inbox import HandlerRegistry
    from idis.integrations.sync._service import AsyncSyncService

    applied: list[str] = []

    async def on_change(session: Any, event: Any) -> None:
        applied.append(event.id)

    registry = HandlerRegistry()
    registry.register_async("*", on_change)
    engine = create_async_db_engine(sqlite_url)
    settings = _settings(sim, sqlite_url)
    service = AsyncSyncService(settings, engine=engine, registry=registry, clock=clock)
    control = sim.control

    async def call(func: Any, *args: Any, **kwargs: Any) -> Any:
        # The receiver shares this event loop: block a thread, never the loop.
        return await asyncio.to_thread(func, *args, **kwargs)

    try:
        async with _serve_on_this_loop(service.asgi_app()) as url:
            await call(control.set_webhook_target, P, f"{url}/{P}", [DEFAULT_WEBHOOK_SECRET])
            await service.tick(P)
            await call(control.emit, P, 5)
            await call(control.flush_webhooks, P)
            clock.advance(SENTINEL.total_seconds())
            await service.tick(P)
            await call(control.set_webhook_mode, P, "stop")
            await call(control.emit, P, 5)
            transition = None
            for _ in range(10):
                clock.advance(SENTINEL.total_seconds())
                report = await service.tick(P)
                transition = transition or report.transition
            log = await call(_provider_log_async_free, sim)
    finally:
        await service.aclose()
        await engine.dispose()

    assert transition is not None
    assert Reason.WEBHOOK_LAG == transition.reason
    assert sorted(applied) == sorted(log)
    assert len(applied) == len(set(applied)) == 10


@asynccontextmanager
async def _serve_on_this_loop(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn as a task on the running loop (as an async host does)."""
    import socket

    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", http="h11")
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def _provider_log_async_free(sim: RunningSimulator) -> list[str]:
    from idis.integrations._http import httpx

    body = httpx.get(f"{sim.url}/p/{P}/changes", params={"after": 0, "limit": 500}).json()
    return [e["id"] for e in body["events"]]


def test_a_second_replica_does_not_lead(
    sim: RunningSimulator, sqlite_engine: Engine, clock: OffsetClock
) -> None:
    """While replica A leads, replica B's tick does nothing and says so (leader=False)."""
    settings = _settings(sim, str(sqlite_engine.url))
    with (
        ServiceHarness(settings, sqlite_engine, clock=clock) as a,
        ServiceHarness(settings, sqlite_engine, clock=clock) as b,
    ):
        led = a.tick(P)
        follower = b.tick(P)
        clock.advance(SENTINEL.total_seconds())
        still = a.tick(P)

    assert (True, None) == (led.leader, led.error)
    assert (False, None, None) == (follower.leader, follower.error, follower.sentinel)
    assert (True, None) == (still.leader, still.error)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_down_database_is_retried_with_backoff(tmp_path: Any, anyio_backend: str) -> None:
    """While every tick fails (the database is unreachable), the worker's waits grow (the
    library's one Backoff) instead of hammering it every tick interval."""
    from structlog.testing import capture_logs

    from idis.integrations._clock import ManualClock
    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.sync._service import AsyncSyncService

    # Nothing listens on port 9: every connect is refused at once. (A SQLite file in a
    # missing folder fails too, but aiosqlite's failed connect leaves a thread that may call
    # into this test's event loop after it closed, an error in whichever test runs next.)
    url = "postgresql://postgres@127.0.0.1:9/idis"
    settings = simulator_settings("http://127.0.0.1:9", providers=(P,), database_url=url)
    clock = ManualClock()
    engine = create_async_db_engine(url)
    service = AsyncSyncService(settings, engine=engine, clock=clock, receiver=False)
    start = clock.now()
    with capture_logs() as logs:
        task = asyncio.create_task(service.run())
        while clock.now() - start < timedelta(minutes=10):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await service.aclose()
    await engine.dispose()

    # On PostgreSQL the leader lock is the first thing a tick asks of the database: a tick
    # that cannot ask is a failed tick (it used to be "standing by", every 5 s, no backoff).
    failures = [
        e for e in logs if e["event"] in ("idis.sync.tick_failed", "idis.sync.lock_unavailable")
    ]
    assert 5 <= len(failures) <= 30  # every 5 s tick interval would be 120


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_wait_after_failed_rounds_grows_and_a_good_round_resets_it(
    anyio_backend: str,
) -> None:
    """``pause_after`` (what ``run`` and ``idis-integrations sync run`` wait between rounds):
    the tick interval while ticks work, more after each round in which every tick failed."""
    from idis.integrations._clock import ManualClock
    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.sync._service import AsyncSyncService

    url = "postgresql://postgres@127.0.0.1:9/idis"  # nothing listens: every tick fails
    settings = simulator_settings("http://127.0.0.1:9", providers=(P,), database_url=url)
    engine = create_async_db_engine(url)
    service = AsyncSyncService(settings, engine=engine, clock=ManualClock(), receiver=False)
    try:
        failed = [await service.tick_all() for _ in range(4)]
        waits = [service.pause_after(reports) for reports in failed]
        after_good = service.pause_after([])
    finally:
        await service.aclose()
        await engine.dispose()

    assert all(r.failed for reports in failed for r in reports)
    # Equal jitter: each backoff is at least half its doubling ceiling (1, 2, 4, 8 s).
    assert all(w >= service.interval + 2**n / 2 for n, w in enumerate(waits)), waits
    assert waits[-1] > waits[0]
    assert service.interval == after_good
