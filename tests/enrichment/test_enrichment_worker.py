"""The deferred worker: gating, slow start, backoff with jitter, leases, rejections, replicas."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_db_engine, session_scope
from idis.integrations.enrichment import DeferredEnrichmentWorker, Enricher, _store, run_deferred

PROVIDER = "enrichment_provider"


def _defer_all(env: Any, settings: Any, gateway: Any, n: int, prefix: str = "c") -> None:
    env.outage(PROVIDER)
    with Enricher(settings, gateway, engine=env.engine, clock=env.clock) as enricher:
        for i in range(n):
            assert "deferred" == enricher.enrich(f"{prefix}{i}", tenant_id="t").status


def _enrich_calls(env: Any) -> int:
    return int(env.sim.control.stats(PROVIDER)["requests"].get("enrich", 0))


def test_waiting_for_an_open_breaker_sends_nothing_and_burns_nothing(env: Any) -> None:
    """While the breaker is open the worker skips the provider: no calls, no attempts counted."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 6)  # the 5th failure opens the breaker
    calls = _enrich_calls(env)
    worker = DeferredEnrichmentWorker(settings, gateway, engine=env.engine, clock=env.clock)

    stats = [worker.run_once() for _ in range(5)]

    assert [1] * 5 == [s.gated for s in stats]
    assert calls == _enrich_calls(env)
    assert {0} == {r.attempts for r in env.rows(env.Request)}


def test_recovery_slow_starts_the_backlog(env: Any) -> None:
    """After recovery batches grow 1, 2, 4, 8 instead of releasing the whole backlog at once."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 20)
    env.recover(PROVIDER)
    worker = DeferredEnrichmentWorker(settings, gateway, engine=env.engine, clock=env.clock)

    leased = []
    while env.count(env.Request, status="pending"):
        leased.append(worker.run_once().leased)

    assert [1, 2, 4, 8, 5] == leased
    assert 20 == worker.totals.refreshed
    assert 20 == worker.totals.defects_resolved


def test_failed_refresh_backs_off_with_jitter_and_stops_the_batch(env: Any) -> None:
    """A trial call that fails reschedules that request with backoff; the rest are not called."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 6)  # the 5th failure opens the breaker
    env.clock.advance(60)  # breaker due for a trial, but the provider is still down
    worker = DeferredEnrichmentWorker(
        settings, gateway, engine=env.engine, clock=env.clock, seed=11
    )
    calls = _enrich_calls(env)
    now = env.clock.now()

    first = worker.run_once()
    second = worker.run_once()

    assert (1, 1) == (first.leased, first.rescheduled)
    assert calls + 1 == _enrich_calls(env)
    assert 0 == second.leased  # the breaker opened again on the trial's failure
    failed = [r for r in env.rows(env.Request) if r.attempts]
    assert 1 == len(failed)
    # retry_backoff=1s: the first retry waits uniformly in [0.5 s, 1 s].
    wait = failed[0].next_attempt_at - now
    assert timedelta(seconds=0.5) <= wait <= timedelta(seconds=1)
    assert "enrichment_provider:server_error" == failed[0].last_error
    assert None is failed[0].lease_owner
    assert 6 == env.count(env.Defect, status="OPEN")


def test_rejected_refresh_fails_the_request_and_keeps_the_defect(env: Any) -> None:
    """A 404 on refresh ends the request as failed; its defect stays OPEN for a human."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 1)
    env.recover(PROVIDER)
    env.sim.control.set_fault(PROVIDER, "error", endpoint="enrich", status=404)
    worker = DeferredEnrichmentWorker(settings, gateway, engine=env.engine, clock=env.clock)

    stats = worker.run_once()

    assert 1 == stats.failed
    assert ["failed"] == [r.status for r in env.rows(env.Request)]
    assert 1 == env.count(env.Defect, status="OPEN")


def test_a_crashed_workers_lease_expires_and_another_worker_finishes(env: Any) -> None:
    """Requests leased by a worker that died come back once the lease lapses."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 2)
    env.recover(PROVIDER)
    with session_scope(env.engine) as session:
        taken = _store.lease(
            session,
            PROVIDER,
            limit=10,
            owner="dead-worker",
            now=env.clock.now(),
            lease_for=settings.enrichment.lease,
        )
    worker = DeferredEnrichmentWorker(settings, gateway, engine=env.engine, clock=env.clock)

    during = worker.run_once()
    env.clock.advance(settings.enrichment.lease + timedelta(seconds=1))
    after = worker.drain()

    assert 2 == len(taken)
    assert 0 == during.leased
    assert 2 == after.refreshed
    assert 0 == env.count(env.Defect, status="OPEN")


def test_run_deferred_once_drains_and_returns(env: Any) -> None:
    """run_deferred(once=True) refreshes everything refreshable now, then returns its counts."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 3)
    env.recover(PROVIDER)

    stats = run_deferred(settings, once=True, gateway=gateway, engine=env.engine)

    assert (3, 3) == (stats.refreshed, stats.defects_resolved)
    assert 0 == env.count(env.Request, status="pending")


def test_worker_survives_a_database_outage(env: Any, tmp_path: Any) -> None:
    """A pass that cannot reach the database is logged and retried; the thread keeps running."""
    settings = env.settings()
    broken = create_db_engine(f"sqlite:///{tmp_path}/missing/dir/db.sqlite3")
    worker = DeferredEnrichmentWorker(settings, env.gateway(settings), engine=broken)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: worker.run(stop))
    thread.start()
    try:
        for _ in range(500):
            if worker.totals.errors >= 3:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join()
        broken.dispose()

    assert worker.totals.errors >= 3
    assert worker.totals.errors == worker.totals.passes


@pytest.mark.postgres
def test_two_workers_share_a_backlog_without_double_refreshes(env_pg: Any) -> None:
    """Two workers (SKIP LOCKED) drain one backlog together; each subject is fetched once."""
    env = env_pg
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 40)
    env.recover(PROVIDER)
    calls = _enrich_calls(env)
    workers = [
        DeferredEnrichmentWorker(settings, gateway, engine=env.engine, worker_id=f"w{i}")
        for i in range(2)
    ]
    threads = [threading.Thread(target=w.drain) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    leftover = run_deferred(settings, once=True, gateway=gateway, engine=env.engine)

    refreshed = sum(w.totals.refreshed for w in workers) + leftover.refreshed
    assert 40 == refreshed
    assert 40 == _enrich_calls(env) - calls
    assert 40 == env.count(env.Request, status="done")


def test_old_finished_requests_can_be_purged(env: Any) -> None:
    """Housekeeping deletes done requests older than the cutoff and keeps pending ones."""
    settings = env.settings()
    gateway = env.gateway(settings)
    _defer_all(env, settings, gateway, 2)
    env.recover(PROVIDER)
    run_deferred(settings, once=True, gateway=gateway, engine=env.engine)
    _defer_all(env, settings, gateway, 1, prefix="new")

    with session_scope(env.engine) as session:
        purged = _store.purge_finished(session, utcnow() + timedelta(days=1))

    assert 2 == purged
    assert ["pending"] == [r.status for r in env.rows(env.Request)]
