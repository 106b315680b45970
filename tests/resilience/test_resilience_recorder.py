"""The health sampler (an async worker) and what status/postmortem read from it (issue 15).

Samples of replicas that stopped reporting expire within two of their
intervals; a breaker's closing leaves an audit row like its opening, a
restart included; a database that is down or slow never holds up a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from idis.integrations._audit import AuditEvent, audit_row
from idis.integrations._http import httpx
from idis.integrations.config import BreakerPolicy, RetryPolicy, Settings
from idis.integrations.db._engine import create_db_engine, read_only
from idis.integrations.exceptions import CircuitOpen, ProviderUnavailable
from idis.integrations.ops._postmortem import build_postmortem
from idis.integrations.ops._status import collect_status
from idis.integrations.resilience import Gateway, HealthSampler, ManualClock
from idis.integrations.resilience._recorder import HealthSample, live_samples

NOW = datetime(2026, 1, 19, 12, 0, tzinfo=UTC)
P = "crm_provider"


@pytest.fixture
def db(db_url: str) -> Iterator[tuple[str, Engine]]:
    """(url, sync engine) of a migrated database; SQLite and PostgreSQL."""
    engine = create_db_engine(db_url)
    yield db_url, engine
    engine.dispose()


def _sample(
    replica: str, seconds_ago: float, state: str, calls: int = 10, failures: int = 0
) -> Any:
    return {
        "provider": P,
        "sampled_at": NOW - timedelta(seconds=seconds_ago),
        "replica": replica,
        "breaker_state": state,
        "calls": calls,
        "failures": failures,
        "error_rate": failures / calls if calls else 0.0,
        "in_flight": 0,
        "paused_for": 0.0,
    }


def _insert(
    engine: Engine, samples: list[dict[str, Any]], audits: list[dict[str, Any]] = ()
) -> None:  # type: ignore[assignment]
    with engine.begin() as conn:
        if samples:
            conn.execute(insert(HealthSample), samples)
        if audits:
            conn.execute(insert(AuditEvent), list(audits))


def _opened(seconds_ago: float, replica: str = "old-1") -> dict[str, Any]:
    return audit_row(
        "breaker.open",
        provider=P,
        actor=f"replica:{replica}",
        subject_type="breaker",
        subject_id=P,
        details={"from": "closed", "to": "open", "reason": "5 consecutive failures"},
        occurred_at=NOW - timedelta(seconds=seconds_ago),
    )


def _settings(url: str) -> Settings:
    return Settings.from_env({"IDIS_DATABASE_URL": url})


def test_status_forgets_replicas_that_stopped_reporting(db: tuple[str, Engine]) -> None:
    """Four restarted replicas last said `open` a minute ago; the one reporting now says closed.

    Before: "open (recorded by 5 replicas)" for 15 minutes after the restart.
    """
    url, engine = db
    samples = []
    for n in range(4):  # every 15 s until 60 s ago, then nothing: restarted
        samples += [_sample(f"old-{n}", ago, "open", failures=9) for ago in (90, 75, 60)]
    samples += [_sample("new-0", ago, "closed") for ago in (15, 0)]
    _insert(engine, samples, (_opened(100),))

    statuses, _ = collect_status(_settings(url), providers=[P], probe=False, now=NOW)

    (status,) = statuses
    assert ("closed", "recorded by 1 replica(s)") == (status.breaker_state, status.breaker_source)
    assert (10, 0, 0.0) == (status.calls, status.failures, status.error_rate)


def test_a_replica_counts_for_two_of_its_own_intervals(db: tuple[str, Engine]) -> None:
    """A replica sampling every 60 s still counts 90 s after its last sample, not 130 s after."""
    url, engine = db
    _insert(engine, [_sample("slow", ago, "open") for ago in (150, 90)])

    at_90 = collect_status(_settings(url), providers=[P], probe=False, now=NOW)[0][0]
    at_130 = collect_status(
        _settings(url), providers=[P], probe=False, now=NOW + timedelta(seconds=40)
    )[0][0]

    assert ("open", "recorded by 1 replica(s)") == (at_90.breaker_state, at_90.breaker_source)
    assert ("unknown", "nothing recorded") == (at_130.breaker_state, at_130.breaker_source)


def test_live_samples_use_the_default_interval_for_a_new_replica() -> None:
    """With one sample a replica counts for two default intervals (30 s)."""
    young = HealthSample(**_sample("new", 20, "closed"))
    old = HealthSample(**_sample("gone", 31, "open"))

    assert [young] == live_samples([old, young], NOW)


def test_postmortem_error_rate_stops_counting_a_dead_replica(db: tuple[str, Engine]) -> None:
    """The chart's error rate is over live replicas only: a dead replica's 90% stops counting."""
    _, engine = db
    samples = [_sample("dead", ago, "open", calls=10, failures=9) for ago in (120, 105)]
    samples += [_sample("alive", ago, "closed", calls=10, failures=1) for ago in (120, 105, 90, 45)]
    _insert(engine, samples)

    report, _ = build_postmortem(engine, P, NOW - timedelta(minutes=5), NOW)

    [rate] = [s for s in report.series if s.name == "error rate"]
    points = dict(rate.points)
    start = report.started_at  # the report zooms to the incident: its own origin

    def at(ago: float) -> float:
        return (NOW - timedelta(seconds=ago) - start).total_seconds()

    assert 0.5 == points[at(105)]  # both live: (9 + 1) / 20
    assert 0.5 == points[at(90)]  # dead's last sample is 15 s old: still live
    assert 0.1 == points[at(45)]  # dead stopped 60 s ago: only `alive` counts


# --------------------------------------------------------------------------- the worker


def _gateway(clock: ManualClock, sampler: HealthSampler, handler: Any, metrics: Any) -> Gateway:
    from idis.integrations.testing import simulator_settings

    settings = simulator_settings(
        "http://crm.test",
        providers=(P,),
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=30.0),
    )
    return Gateway(
        settings,
        clock=clock,
        metrics=metrics,
        transport=httpx.MockTransport(handler),
        on_transition=[sampler.on_transition],
    )


def _breaker_actions(engine: Engine) -> list[str]:
    # Read-only: a deferred BEGIN on SQLite, so polling from the loop never waits on a writer.
    with Session(read_only(engine)) as session:
        return [
            row.action
            for row in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action.startswith("breaker."))
                .order_by(AuditEvent.occurred_at, AuditEvent.id)
            )
        ]


def test_opening_and_closing_both_leave_audit_rows(db: tuple[str, Engine], metrics: Any) -> None:
    """A trial that succeeds audits the closing as the failures audited the opening."""
    url, engine = db
    clock = ManualClock()
    sampler = HealthSampler(url, clock=clock)
    answers = iter([503, 503, 200])
    gateway = _gateway(
        clock, sampler, lambda r: httpx.Response(next(answers), json={}), metrics=metrics
    )
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            gateway.get_json(P, "records")
    clock.advance(30)
    gateway.get_json(P, "records")
    gateway.close()

    asyncio.run(sampler.flush())

    assert ["breaker.open", "breaker.half_open", "breaker.closed"] == _breaker_actions(engine)


async def _run_until(sampler: HealthSampler, snapshot: Any, engine: Engine, rows: int) -> None:
    task = asyncio.create_task(sampler.run(snapshot, [P]))
    try:
        for _ in range(500):  # a hang guard, not a timing
            # Read from a thread: the sampler's writes need this loop to finish.
            if len(await asyncio.to_thread(_breaker_actions, engine)) >= rows or task.done():
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until_sampled(engine: Engine, replica: str) -> None:
    """Wait until ``replica`` has written a sample (a hang guard, not a timing)."""

    def sampled() -> bool:
        with Session(read_only(engine)) as session:
            query = select(HealthSample).where(HealthSample.replica == replica)
            return session.scalars(query).first() is not None

    for _ in range(500):
        # From a thread: the sampler's write needs this loop to run to commit.
        if await asyncio.to_thread(sampled):
            return
        await asyncio.sleep(0.01)


def _snapshot(state: str, shared: str = "not shared") -> Any:
    return lambda provider: {
        "state": state,
        "window_calls": 0,
        "window_failures": 0,
        "error_rate": 0.0,
        "in_flight": 0,
        "paused_for": 0.0,
        "shared": shared,
    }


def test_a_replica_started_after_an_outage_audits_the_closing(db: tuple[str, Engine]) -> None:
    """Issue 15: the trail said `open` forever after a restart; the new replica records `closed`."""
    url, engine = db
    _insert(engine, [_sample("old-1", ago, "open") for ago in (90, 75)], (_opened(100),))
    sampler = HealthSampler(url, clock=_FixedClock(NOW), replica="new-1", interval=3600)

    asyncio.run(_run_until(sampler, _snapshot("closed"), engine, rows=2))

    with Session(engine) as session:
        last = session.scalars(
            select(AuditEvent).order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
        ).first()
        samples = list(session.scalars(select(HealthSample).where(HealthSample.replica == "new-1")))
    assert last is not None
    assert ("breaker.closed", "replica:new-1") == (last.action, last.actor)
    assert "started with the breaker closed (last recorded: open)" in (last.message or "")
    assert ["closed"] == [s.breaker_state for s in samples]


def test_no_restart_closing_while_another_replica_reports_it_open(db: tuple[str, Engine]) -> None:
    """A live replica still reporting `open` means it is not closed: nothing is audited."""
    url, engine = db
    _insert(engine, [_sample("other", ago, "open") for ago in (20, 5)], (_opened(100),))
    sampler = HealthSampler(url, clock=_FixedClock(NOW), replica="new-1", interval=3600)

    async def scenario() -> None:
        task = asyncio.create_task(sampler.run(_snapshot("closed"), [P]))
        await _until_sampled(engine, "new-1")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    assert ["breaker.open"] == _breaker_actions(engine)


def test_no_restart_closing_before_the_shared_state_is_read(db: tuple[str, Engine]) -> None:
    """A replica that has not read Redis yet does not know the breaker is closed: it waits."""
    url, engine = db
    _insert(engine, [], (_opened(100),))
    sampler = HealthSampler(url, clock=_FixedClock(NOW), replica="new-1", interval=3600)

    async def scenario() -> None:
        task = asyncio.create_task(sampler.run(_snapshot("closed", "not read yet"), [P]))
        await _until_sampled(engine, "new-1")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())

    assert ["breaker.open"] == _breaker_actions(engine)


def test_an_unreachable_database_never_holds_up_a_call(metrics: Any, logs: Any) -> None:
    """With the database down, calls and breaker transitions go on; the rows are given up."""
    clock = ManualClock()
    sampler = HealthSampler("postgresql://idis@127.0.0.1:1/nowhere", clock=clock)
    gateway = _gateway(clock, sampler, lambda r: httpx.Response(503), metrics=metrics)

    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            gateway.get_json(P, "records")
    with pytest.raises(CircuitOpen):
        gateway.get_json(P, "records")
    gateway.close()
    asyncio.run(sampler.flush())

    assert 1 == sampler.dropped
    assert 1 == len(logs.events("idis.recorder.write_failed"))


def test_a_full_queue_drops_samples_and_keeps_transitions() -> None:
    """While the database lags, the oldest samples make room; transitions are all kept."""
    from idis.integrations.resilience import BreakerTransition

    sampler = HealthSampler("sqlite:///unused.sqlite3", max_queue=3)
    for _ in range(3):
        sampler.sample(_snapshot("open"), [P])
    for n in range(2):
        sampler.on_transition(BreakerTransition(P, P, "closed", "open", f"r{n}", 0.0))
    sampler.sample(_snapshot("open"), [P])

    kinds = [kind for kind, _ in sampler._queue]
    assert ["sample", "audit", "audit"] == kinds
    assert 3 == sampler.dropped


class _FixedClock(ManualClock):
    """A manual clock starting at ``start``."""

    def __init__(self, start: datetime) -> None:
        super().__init__(start)
