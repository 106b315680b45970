"""Lapsed leases of deferred requests: counted, suspects alone, given up after a bound.

The real-process crash is tests/enrichment/test_enrichment_poison_crash.py; these
play the same rules on the manual clock, a worker that "dies" being a lease
nobody settles.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs
from tests.conftest import sample

from idis.integrations.db._engine import session_scope
from idis.integrations.enrichment import (
    EnrichmentResult,
    SubjectKey,
    _store,
    create_stale_defects,
)

PROVIDER = "enrichment_provider"


def _defer_all(env: Any, settings: Any, n: int) -> None:
    """Defer ``n`` subjects (c0 the oldest) during an outage."""
    env.outage(PROVIDER)
    enricher = env.enricher(settings, "async")
    for i in range(n):
        env.clock.advance(0.001)
        assert "deferred" == enricher.enrich(f"c{i}", tenant_id="t").status


def _lease(env: Any, settings: Any, owner: str, limit: int, **kwargs: Any) -> _store.LeaseResult:
    with session_scope(env.engine) as session:
        return _store.lease(
            session,
            PROVIDER,
            limit=limit,
            owner=owner,
            now=env.clock.now(),
            lease_for=settings.enrichment.lease,
            max_takeovers=settings.enrichment.max_takeovers,
            **kwargs,
        )


def _lapse(env: Any, settings: Any) -> None:
    env.clock.advance(settings.enrichment.lease + timedelta(seconds=1))


def _by_subject(env: Any) -> dict[str, Any]:
    return {r.subject_id: r for r in env.rows(env.Request)}


def test_a_lapsed_lease_is_counted_and_its_request_goes_behind_the_due_ones(env_db: Any) -> None:
    """Taken over in the lease's transaction: takeovers + 1, a suspect due now, not leased."""
    env = env_db
    settings = env.settings()
    _defer_all(env, settings, 3)
    env.recover(PROVIDER)
    assert ["c0"] == [r.key.subject_id for r in _lease(env, settings, "dead", 1).requests]
    _lapse(env, settings)
    now = env.clock.now()

    second = _lease(env, settings, "w2", 2)

    # The batch is what is left of the candidates (c0, c1): c1.
    assert (["c1"], True) == ([r.key.subject_id for r in second.requests], second.cut)
    assert [("c0", 1)] == [(r.key.subject_id, r.takeovers) for r in second.taken_over]
    assert [] == second.given_up
    c0 = _by_subject(env)["c0"]
    assert (1, 0, _store.SUSPECT) == (c0.takeovers, c0.attempts, c0.last_error)
    assert (None, None, "pending") == (c0.lease_owner, c0.lease_expires_at, c0.status)
    assert now == c0.next_attempt_at.replace(tzinfo=now.tzinfo)
    # Due again, behind c2: a lease of ten takes c2 and leaves the suspect out...
    third = _lease(env, settings, "w3", 10)
    assert (["c2"], True, []) == (
        [r.key.subject_id for r in third.requests],
        third.cut,
        third.taken_over,
    )
    # ... until it is the first due: then it is leased alone, even in a batch of ten.
    fourth = _lease(env, settings, "w4", 10)
    assert [("c0", 1)] == [(r.key.subject_id, r.takeovers) for r in fourth.requests]


def test_a_suspect_waits_behind_the_others_and_goes_alone(env: Any) -> None:
    """A batch holds no suspect unless it is the suspect alone; the rest goes in batches."""
    settings = env.settings()
    _defer_all(env, settings, 6)
    env.recover(PROVIDER)
    _lease(env, settings, "dead", 2)  # c0, c1
    _lapse(env, settings)
    taken = _lease(env, settings, "w", 10)
    assert ["c2", "c3", "c4", "c5"] == [r.key.subject_id for r in taken.requests]
    assert ["c0", "c1"] == [r.key.subject_id for r in taken.taken_over]
    with session_scope(env.engine) as session:
        _store.release(session, [r.id for r in taken.requests], owner="w", now=env.clock.now())

    # c2-c5 are older due than the suspects (due from their takeover): they go first,
    # together, and a lease that meets a suspect among them leaves it out.
    batch = _lease(env, settings, "w", 10)
    assert ["c2", "c3", "c4", "c5"] == [r.key.subject_id for r in batch.requests]
    assert batch.cut
    with session_scope(env.engine) as session:
        for request in batch.requests:
            _store.record_success(
                session,
                request.key,
                served_by=PROVIDER,
                data={"ok": True},
                fetched_at=env.clock.now(),
                now=env.clock.now(),
                actor="test",
            )
    assert ["c0"] == [r.key.subject_id for r in _lease(env, settings, "w", 10).requests]
    assert ["c1"] == [r.key.subject_id for r in _lease(env, settings, "w", 10).requests]


def test_the_worker_refreshes_suspects_alone_and_settling_clears_them(env: Any) -> None:
    """Suspects that live through their refresh are refreshed; takeovers are logged once."""
    settings = env.settings()
    _defer_all(env, settings, 5)
    env.recover(PROVIDER)
    _lease(env, settings, "dead", 3)
    _lapse(env, settings)
    worker = env.worker(settings, clock=env.clock)

    with capture_logs() as logs:
        stats = env.run(worker.drain())

    assert (5, 3, 0) == (stats.refreshed, stats.taken_over, stats.given_up)
    assert {"done"} == {r.status for r in env.rows(env.Request)}
    assert [1, 1, 1, 0, 0] == [r.takeovers for r in env.rows(env.Request)]
    assert 0 == env.count(env.Defect, status="OPEN")
    events = [e for e in logs if e["event"] == "idis.enrichment.leases_taken_over"]
    assert [(PROVIDER, 3)] == [(e["provider"], e["requests"]) for e in events]


def test_a_request_whose_workers_keep_dying_is_given_up_with_its_defect_open(
    env_db: Any, metrics: Any
) -> None:
    """At max_takeovers the lease gives it up: failed, a clear last_error, logged, counted."""
    env = env_db
    settings = env.settings(enrichment=replace(env.FAST, max_takeovers=3))
    _defer_all(env, settings, 1)
    env.recover(PROVIDER)
    for dead in ("dead-1", "dead-2", "dead-3"):
        # c0 first, then (taken over by this very lease) a suspect, leased alone.
        assert ["c0"] == [r.key.subject_id for r in _lease(env, settings, dead, 1).requests]
        _lapse(env, settings)
    assert 2 == _by_subject(env)["c0"].takeovers  # the third is the next lease's
    env.outage(PROVIDER)
    assert "deferred" == env.enricher(settings, "async").enrich("c1", tenant_id="t").status
    env.recover(PROVIDER)
    worker = env.worker(settings, clock=env.clock)

    with capture_logs() as logs:
        stats = env.run(worker.drain())

    c0, c1 = _by_subject(env)["c0"], _by_subject(env)["c1"]
    assert ("failed", 3) == (c0.status, c0.takeovers)
    assert _store.given_up_error(3) == c0.last_error
    assert "its refresh stopped the worker 3 times" in c0.last_error
    assert c0.completed_at is not None
    assert (None, None) == (c0.lease_owner, c0.lease_expires_at)
    assert "done" == c1.status
    assert (1, 1) == (stats.given_up, stats.refreshed)
    assert 1 == env.count(env.Defect, status="OPEN", subject_id="c0")
    assert 0 == env.count(env.Defect, status="OPEN", subject_id="c1")
    assert 1 == sample(
        metrics, "integration_enrichment_requests_total", provider=PROVIDER, result="given_up"
    )
    given_up = [e for e in logs if e["event"] == "idis.enrichment.refresh_given_up"]
    assert [("c0", 3, "error")] == [
        (e["subject_id"], e["takeovers"], e["log_level"]) for e in given_up
    ]
    cache = {r.subject_id: r for r in env.rows(env.Cache)}["c0"]
    assert (True, _store.given_up_error(3)) == (cache.stale, cache.last_error)

    # Once the cause is fixed, create-stale-defects queues it again (its defect is still OPEN).
    again = create_stale_defects(
        PROVIDER, "1 hour ago", settings=settings, engine=env.engine, now=env.clock.now()
    )
    assert (0, 1, 1) == (again.created, again.already_open, again.requests_enqueued)
    assert ["c0"] == [r.subject_id for r in env.rows(env.Request, status="pending")]


def test_an_outage_spends_no_takeover_and_retries_for_ever(env: Any) -> None:
    """Refreshes that fail on an outage settle their lease: nothing is taken over or given up."""
    settings = env.settings(enrichment=replace(env.FAST, max_takeovers=1))
    _defer_all(env, settings, 1)
    worker = env.worker(settings, clock=env.clock, seed=3)
    for _ in range(8):
        env.clock.advance(120)  # due again, past any lease, and the breaker due for a trial
        assert 1 == env.run(worker.run_once()).rescheduled

    request = env.rows(env.Request)[0]
    assert ("pending", 8, 0) == (request.status, request.attempts, request.takeovers)
    assert "enrichment_provider:server_error" == request.last_error
    assert (0, 0) == (worker.totals.taken_over, worker.totals.given_up)


def test_a_failed_pass_gives_its_own_leases_back_uncounted(env: Any) -> None:
    """A pass cut short (here: the task cancelled) leaves leases only this worker holds; its
    next lease gives them back before taking anything: they are not a dead worker's."""
    settings = env.settings()
    _defer_all(env, settings, 8)
    env.recover(PROVIDER)
    blocked = asyncio.Event()
    hanging = {True}

    async def hang(subject: SubjectKey, result: EnrichmentResult) -> None:
        if subject.subject_id == "c1" and hanging:
            blocked.set()
            await asyncio.Event().wait()  # until cancelled

    worker = env.worker(settings, clock=env.clock, on_refreshed=[hang])

    async def cancel_mid_batch() -> None:
        for _ in range(2):  # batches of 1 (c0), then 2 (c1, c2): cancelled in c1's callback
            task = asyncio.ensure_future(worker.run_once())
            waiter = asyncio.ensure_future(blocked.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if blocked.is_set():
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return
            await task

    env.run(cancel_mid_batch())
    held = [r.subject_id for r in env.rows(env.Request) if r.lease_owner == worker.worker_id]
    assert ["c2"] == held
    _lapse(env, settings)
    hanging.clear()  # the hang has served its purpose

    stats = env.run(worker.drain())

    assert (0, 0) == (stats.taken_over, stats.given_up)
    assert {0} == {r.takeovers for r in env.rows(env.Request)}
    assert {"done"} == {r.status for r in env.rows(env.Request)}


def test_a_slow_batch_hands_its_tail_back_before_its_lease_lapses(env: Any) -> None:
    """Refreshes start only while half the lease is left; the rest go back untried."""
    settings = env.settings()
    _defer_all(env, settings, 7)
    env.recover(PROVIDER)
    slow = {"c3"}

    def crawl(subject: SubjectKey, result: EnrichmentResult) -> None:
        if subject.subject_id in slow:
            env.clock.advance(settings.enrichment.lease.total_seconds() / 2)

    worker = env.worker(settings, clock=env.clock, on_refreshed=[crawl])
    passes = [env.run(worker.run_once()) for _ in range(3)]  # batches of 1, 2, 4

    assert [1, 2, 4] == [s.leased for s in passes]
    assert (1, 3, True) == (passes[2].refreshed, passes[2].released, passes[2].more_due)
    assert {None} == {r.lease_owner for r in env.rows(env.Request)}
    _lapse(env, settings)
    rest = env.run(worker.drain())
    assert (3, 0) == (rest.refreshed, rest.taken_over)
    assert {0} == {r.takeovers for r in env.rows(env.Request)}


def test_a_row_inserted_without_takeovers_gets_zero(env_db: Any) -> None:
    """The previous version inserts requests without the column: the server default fills it."""
    env = env_db
    now = env.clock.now()
    with session_scope(env.engine) as session:
        session.execute(
            text(
                "INSERT INTO enrichment_requests (provider, tenant_id, subject_type, subject_id,"
                " providers, status, attempts, next_attempt_at, created_at, updated_at)"
                " VALUES (:p, 't', 'claim', 'old', :chain, 'pending', 0, :now, :now, :now)"
            ),
            {"p": PROVIDER, "chain": f'["{PROVIDER}"]', "now": now},
        )
    assert 0 == env.rows(env.Request)[0].takeovers


def test_a_live_refresh_that_outlasts_the_lease_setting_is_not_taken_over(env: Any) -> None:
    """A refresh may legitimately run as long as its chain's call deadlines (a slow
    provider answering within its deadline). The lease must cover that, or a second
    worker takes the live refresh over, counts a takeover against it (and refreshes it
    twice at once): three slow-but-live refreshes would give the request up."""
    settings = env.settings(enrichment=replace(env.FAST, lease=timedelta(seconds=1)))
    deadline = settings.provider(PROVIDER).timeouts.deadline
    assert deadline > 2  # the refresh below stays well inside its call deadline
    _defer_all(env, settings, 1)
    env.recover(PROVIDER)
    env.sim.control.set_fault(PROVIDER, "latency", seconds=1.5)
    slow = env.worker(settings, clock=env.clock, seed=1)
    other = env.worker(settings, clock=env.clock, seed=2)

    async def side_by_side() -> tuple[Any, Any]:
        first = asyncio.ensure_future(slow.run_once())
        await asyncio.sleep(0.5)  # `slow` is waiting on the provider
        env.clock.advance(2)  # its refresh has now run longer than IDIS_ENRICHMENT_LEASE
        second = await other.run_once()
        return await first, second

    try:
        first, second = env.run(side_by_side())
    finally:
        env.sim.control.clear_faults(PROVIDER)

    assert (0, 0) == (second.leased, second.taken_over)
    assert 1 == first.refreshed
    (request,) = env.rows(env.Request)
    assert ("done", 0) == (request.status, request.takeovers)


def test_a_worker_closed_after_a_failed_pass_gives_its_leases_back(env: Any) -> None:
    """A failed pass leaves leases only this worker holds; if the worker is then stopped
    (SIGTERM during the pause, ``run-deferred --once`` failing), they must not be left to
    lapse into takeovers counted against their requests: closing gives them back."""
    settings = env.settings()
    _defer_all(env, settings, 8)
    env.recover(PROVIDER)
    blocked = asyncio.Event()

    async def hang(subject: SubjectKey, result: EnrichmentResult) -> None:
        if subject.subject_id == "c1":
            blocked.set()
            await asyncio.Event().wait()  # until cancelled

    worker = env.worker(settings, clock=env.clock, on_refreshed=[hang])

    async def fail_a_pass_then_close() -> None:
        assert 1 == (await worker.run_once()).refreshed  # c0 (slow start: a batch of 1)
        task = asyncio.ensure_future(worker.run_once())  # c1, c2: cancelled in c1's callback
        await blocked.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await worker.aclose()

    env.run(fail_a_pass_then_close())
    assert [] == [r.subject_id for r in env.rows(env.Request) if r.lease_owner is not None]
    _lapse(env, settings)
    stats = env.run(env.worker(settings, clock=env.clock).drain())
    assert (0, 0) == (stats.taken_over, stats.given_up)
    assert {0} == {r.takeovers for r in env.rows(env.Request)}
