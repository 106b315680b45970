"""The deferred worker (async only): gating, slow start, backoff, leases, rejections, replicas,
stopping, and the ``on_refreshed`` callback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_async_db_engine, session_scope
from idis.integrations.enrichment import (
    NO_MATCH_RESOLUTION,
    AsyncDeferredEnrichmentWorker,
    EnrichmentResult,
    SubjectKey,
    _store,
    run_deferred,
)
from idis.integrations.exceptions import UsageError
from idis.integrations.simulator._app import enrichment_for

PROVIDER = "enrichment_provider"


def _defer_all(env: Any, settings: Any, n: int, prefix: str = "c") -> None:
    """Defer ``n`` subjects through the async enricher, on the worker's own gateway."""
    env.outage(PROVIDER)
    enricher = env.enricher(settings, "async")
    for i in range(n):
        assert "deferred" == enricher.enrich(f"{prefix}{i}", tenant_id="t").status


def _enrich_calls(env: Any) -> int:
    return int(env.sim.control.stats(PROVIDER)["requests"].get("enrich", 0))


def test_waiting_for_an_open_breaker_sends_nothing_and_burns_nothing(env: Any) -> None:
    """While the breaker is open the worker skips the provider: no calls, no attempts counted."""
    settings = env.settings()
    _defer_all(env, settings, 6)  # the 5th failure opens the breaker
    calls = _enrich_calls(env)
    worker = env.worker(settings, clock=env.clock)

    stats = [env.run(worker.run_once()) for _ in range(5)]

    assert [1] * 5 == [s.gated for s in stats]
    assert calls == _enrich_calls(env)
    assert {0} == {r.attempts for r in env.rows(env.Request)}


def test_recovery_slow_starts_the_backlog(env: Any) -> None:
    """After recovery batches grow 1, 2, 4, 8 instead of releasing the whole backlog at once."""
    settings = env.settings()
    _defer_all(env, settings, 20)
    env.recover(PROVIDER)
    worker = env.worker(settings, clock=env.clock)

    leased = []
    while env.count(env.Request, status="pending"):
        leased.append(env.run(worker.run_once()).leased)

    assert [1, 2, 4, 8, 5] == leased
    assert 20 == worker.totals.refreshed
    assert 20 == worker.totals.defects_resolved


def test_failed_refresh_backs_off_with_jitter_and_stops_the_batch(env: Any) -> None:
    """A trial call that fails reschedules that request with backoff; the rest are not called."""
    settings = env.settings()
    _defer_all(env, settings, 6)  # the 5th failure opens the breaker
    env.clock.advance(60)  # breaker due for a trial, but the provider is still down
    worker = env.worker(settings, clock=env.clock, seed=11)
    calls = _enrich_calls(env)
    now = env.clock.now()

    first = env.run(worker.run_once())
    second = env.run(worker.run_once())

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


def test_backoff_caps_double_per_attempt_up_to_the_maximum(env: Any) -> None:
    """Each failed refresh of one request waits within a cap that doubles up to the maximum."""
    settings = env.settings()
    _defer_all(env, settings, 1)
    worker = env.worker(settings, clock=env.clock, seed=5)
    waits = []
    for _ in range(6):
        env.clock.advance(120)  # due again, and the breaker due for a trial
        before = env.clock.now()
        assert 1 == env.run(worker.run_once()).rescheduled
        waits.append((env.rows(env.Request)[0].next_attempt_at - before).total_seconds())

    # FAST: retry_backoff=1s, retry_max_backoff=8s; delays drawn in [cap/2, cap].
    caps = [1, 2, 4, 8, 8, 8]
    assert all(cap / 2 <= wait <= cap for wait, cap in zip(waits, caps, strict=True)), waits
    assert 6 == env.rows(env.Request)[0].attempts


@pytest.mark.parametrize("cached", [False, True], ids=["never-enriched", "cached-copy"])
def test_a_no_match_on_refresh_fails_the_request_and_settles_only_a_subject_without_data(
    env: Any, cached: bool
) -> None:
    """A 404 on refresh ends the request as failed.

    A subject never enriched has nothing stale to show: its defect is resolved as
    "no match". A subject with a cached copy keeps its defect OPEN for a human
    (whether to drop data the provider no longer knows is not the library's call).
    """
    settings = env.settings()
    if cached:
        assert "enriched" == env.enricher(settings, "async").enrich("c0", tenant_id="t").status
        env.outage(PROVIDER)
        stale = env.enricher(settings, "async").enrich("c0", tenant_id="t")
        assert ("cached_stale", True) == (stale.status, stale.deferred)
    else:
        _defer_all(env, settings, 1)
    env.recover(PROVIDER)
    env.sim.control.set_fault(PROVIDER, "error", endpoint="enrich", status=404)
    worker = env.worker(settings, clock=env.clock)

    stats = env.run(worker.run_once())

    assert (1, 0 if cached else 1) == (stats.failed, stats.defects_resolved)
    assert ["failed"] == [r.status for r in env.rows(env.Request)]
    defects = [(d.status, d.resolution) for d in env.rows(env.Defect)]
    if cached:
        assert [("OPEN", None)] == defects
        assert [True] == [c.stale for c in env.rows(env.Cache)]
    else:
        assert [("RESOLVED", NO_MATCH_RESOLUTION)] == defects
        assert [False] == [c.stale for c in env.rows(env.Cache)]


@pytest.mark.parametrize(
    ("primary", "fallback", "verdict", "request_status"),
    [
        # A no-match next to an unavailable provider is an outage: retry later.
        (404, 503, "rescheduled", "pending"),
        (503, 404, "rescheduled", "pending"),
        (404, 404, "failed", "failed"),
        (429, 200, "refreshed", "done"),
    ],
)
def test_a_mixed_chain_on_refresh_is_an_outage_unless_every_provider_answered(
    env: Any, primary: int, fallback: int, verdict: str, request_status: str
) -> None:
    """The worker reads a refresh's chain as the enricher does: 404 is an answer, 503 is not."""
    settings = env.settings(fallbacks={PROVIDER: ("backup_enrich",)})
    env.outage(PROVIDER)
    env.outage("backup_enrich")
    enricher = env.enricher(settings, "async")
    assert "deferred" == enricher.enrich("m1", tenant_id="t").status
    env.recover(PROVIDER)
    env.recover("backup_enrich")
    _answer(env, PROVIDER, primary)
    _answer(env, "backup_enrich", fallback)
    worker = env.worker(settings, clock=env.clock)

    stats = env.run(worker.run_once())

    assert 1 == getattr(stats, verdict)
    assert [request_status] == [r.status for r in env.rows(env.Request)]
    # A never-enriched subject that every provider answered "no match" is settled too.
    settled = verdict in {"refreshed", "failed"}
    assert (0 if settled else 1) == env.count(env.Defect, status="OPEN")


def _answer(env: Any, provider: str, status: int) -> None:
    """Make ``provider``'s enrich endpoint answer ``status`` (200: healthy)."""
    if status == 429:
        env.sim.control.set_fault(provider, "rate_limit", endpoint="enrich", retry_after=30)
    elif status != 200:
        env.sim.control.set_fault(provider, "error", endpoint="enrich", status=status)


def test_a_crashed_workers_lease_expires_and_another_worker_finishes(env: Any) -> None:
    """Requests leased by a worker that died come back once the lease lapses."""
    settings = env.settings()
    _defer_all(env, settings, 2)
    env.recover(PROVIDER)
    with session_scope(env.engine) as session:
        taken = _store.lease(
            session,
            PROVIDER,
            limit=10,
            owner="dead-worker",
            now=env.clock.now(),
            lease_for=settings.enrichment.lease,
        ).requests
    worker = env.worker(settings, clock=env.clock)

    during = env.run(worker.run_once())
    env.clock.advance(settings.enrichment.lease + timedelta(seconds=1))
    after = env.run(worker.drain())

    assert 2 == len(taken)
    assert 0 == during.leased
    assert 2 == after.refreshed
    assert 0 == env.count(env.Defect, status="OPEN")


def test_drain_stops_at_max_passes(env: Any) -> None:
    """drain(max_passes=N) makes at most N passes, even with work left."""
    settings = env.settings()
    _defer_all(env, settings, 10)
    env.recover(PROVIDER)
    worker = env.worker(settings, clock=env.clock)

    stats = env.run(worker.drain(max_passes=2))

    assert (2, 3) == (stats.passes, stats.refreshed)  # slow start: 1, then 2
    assert 7 == env.count(env.Request, status="pending")


def test_run_deferred_once_drains_and_returns(env: Any) -> None:
    """run_deferred(once=True) refreshes everything refreshable now, then returns its counts."""
    settings = env.settings()
    _defer_all(env, settings, 3)
    env.recover(PROVIDER)

    stats = run_deferred(settings, once=True)

    assert (3, 3) == (stats.refreshed, stats.defects_resolved)
    assert 0 == env.count(env.Request, status="pending")


def test_worker_survives_a_database_outage(env: Any) -> None:
    """A pass that cannot reach the database is logged and retried; the task keeps running."""
    settings = env.settings()

    async def scenario() -> AsyncDeferredEnrichmentWorker:
        # Nothing listens on port 9 (see test_enrichment_recovery for why not a SQLite file).
        broken = create_async_db_engine("postgresql://postgres@127.0.0.1:9/idis")
        worker = env.worker(settings, engine=broken)
        task = worker.start()
        assert task is worker.start()  # already running: the same task
        try:
            for _ in range(500):
                if worker.totals.errors >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            await worker.stop()
            await broken.dispose()
        assert task.done()
        return worker

    with capture_logs() as logs:
        worker = env.run(scenario())

    assert worker.totals.errors >= 3
    assert worker.totals.errors == worker.totals.passes
    assert {"StorageError"} == {
        e["error_type"] for e in logs if e["event"] == "idis.enrichment.worker_error"
    }


def test_requests_of_providers_no_longer_configured_wait_untouched(env: Any) -> None:
    """A request filed under, or naming only, unknown providers is skipped, never failed."""
    settings = env.settings()
    now = env.clock.now()
    with session_scope(env.engine) as session:
        _store.ensure_requests(
            session,
            [
                (SubjectKey("gone_provider", "t", "claim", "g1"), ["gone_provider"]),
                (SubjectKey(PROVIDER, "t", "claim", "g2"), ["gone_provider"]),
            ],
            now=now,
        )
    worker = env.worker(settings, clock=env.clock)

    stats = env.run(worker.run_once())

    # The unknown provider is gated as a whole; the other request is leased, then handed back.
    assert (1, 1, 1, 0) == (stats.gated, stats.leased, stats.released, stats.refreshed)
    assert [("pending", 0, None)] * 2 == [
        (r.status, r.attempts, r.lease_owner) for r in env.rows(env.Request)
    ]
    assert 0 == _enrich_calls(env)


def test_stop_finishes_the_request_in_hand_and_gives_the_rest_back(env: Any) -> None:
    """Stopping mid-batch refreshes the request in hand and releases the rest, unattempted."""
    settings = env.settings()
    _defer_all(env, settings, 7)
    env.recover(PROVIDER)
    worker = env.worker(settings, clock=env.clock)
    warm_up = [env.run(worker.run_once()).refreshed for _ in range(2)]  # batches of 1, then 2

    @worker.on_refreshed
    def stop_after_first(subject: SubjectKey, result: EnrichmentResult) -> None:
        worker.request_stop()

    stats = env.run(worker.run_once())

    assert [1, 2] == warm_up
    assert (4, 1, 3) == (stats.leased, stats.refreshed, stats.released)
    assert 3 == env.count(env.Request, status="pending", attempts=0, lease_owner=None)


def test_stop_skips_the_providers_not_reached_yet(env: Any) -> None:
    """A stop requested during one provider's batch leaves the next provider's requests alone."""
    settings = env.settings()
    with session_scope(env.engine) as session:
        _store.ensure_requests(
            session,
            [
                (SubjectKey("backup_enrich", "t", "claim", "b1"), ["backup_enrich"]),
                (SubjectKey(PROVIDER, "t", "claim", "e1"), [PROVIDER]),
            ],
            now=env.clock.now(),
        )
    worker = env.worker(settings, clock=env.clock)
    worker.on_refreshed(lambda subject, result: worker.request_stop())

    stats = env.run(worker.run_once())

    assert (1, 1) == (stats.leased, stats.refreshed)
    assert [("b1", "done"), ("e1", "pending")] == [
        (r.subject_id, r.status) for r in env.rows(env.Request)
    ]


@pytest.mark.postgres
def test_two_workers_share_a_backlog_without_double_refreshes(env_pg: Any) -> None:
    """Two workers (SKIP LOCKED) drain one backlog together; each subject is fetched once."""
    env = env_pg
    settings = env.settings()
    _defer_all(env, settings, 40)
    env.recover(PROVIDER)
    calls = _enrich_calls(env)
    # One refresh first: its half-open trial closes the breaker, which both workers share.
    trial = env.run(env.worker(settings).run_once())
    workers = [env.worker(settings, worker_id=f"w{i}") for i in range(2)]

    async def together() -> list[Any]:
        return list(await asyncio.gather(*(w.drain() for w in workers)))

    env.run(together())
    leftover = env.run(env.worker(settings).drain())

    refreshed = trial.refreshed + sum(w.totals.refreshed for w in workers) + leftover.refreshed
    assert 40 == refreshed
    assert 40 == _enrich_calls(env) - calls
    assert 40 == env.count(env.Request, status="done")
    assert all(w.totals.refreshed > 0 for w in workers)


def test_old_finished_requests_can_be_purged(env: Any) -> None:
    """Housekeeping deletes done requests older than the cutoff and keeps pending ones."""
    settings = env.settings()
    _defer_all(env, settings, 2)
    env.recover(PROVIDER)
    env.run(env.worker(settings, clock=env.clock).drain())
    _defer_all(env, settings, 1, prefix="new")

    with session_scope(env.engine) as session:
        purged = _store.purge_finished(session, utcnow() + timedelta(days=1))

    assert 2 == purged
    assert ["pending"] == [r.status for r in env.rows(env.Request)]


# --------------------------------------------------------------------------- on_refreshed


def test_refreshed_callbacks_get_the_subject_and_the_fresh_result(env: Any) -> None:
    """Sync and async callbacks are called after each refresh committed, with subject and data."""
    settings = env.settings(fallbacks={PROVIDER: ("backup_enrich",)})
    env.outage("backup_enrich")
    _defer_all(env, settings, 2)
    env.recover("backup_enrich")  # the fallback serves; the primary stays down
    seen: list[tuple[str, SubjectKey, str, str | None, Any, bool]] = []

    def plain(subject: SubjectKey, result: EnrichmentResult) -> None:
        # Called after the commit: the subject's defect is already resolved.
        open_now = env.count(env.Defect, status="OPEN", subject_id=subject.subject_id)
        seen.append(("plain", subject, result.status, result.provider, result.data, open_now))

    worker = env.worker(settings, clock=env.clock, on_refreshed=[plain])

    @worker.on_refreshed
    async def coroutine(subject: SubjectKey, result: EnrichmentResult) -> None:
        await asyncio.sleep(0)
        seen.append(("async", subject, result.status, result.provider, result.data, False))

    stats = env.run(worker.drain())

    assert 2 == stats.refreshed
    expected = []
    for i in range(2):
        subject = SubjectKey(PROVIDER, "t", "claim", f"c{i}")
        for name in ("plain", "async"):
            row = (name, subject, "served_from_fallback", "backup_enrich", enrichment_for(f"c{i}"))
            expected.append((*row, False))
    assert expected == seen


def test_a_raising_callback_is_logged_without_its_text_and_loses_no_refresh(env: Any) -> None:
    """A callback that raises is logged (type only) and counted; every refresh stays committed."""
    settings = env.settings()
    _defer_all(env, settings, 3)
    env.recover(PROVIDER)
    after: list[str] = []

    async def broken(subject: SubjectKey, result: EnrichmentResult) -> None:
        raise RuntimeError("password=hunter2 in the host's message")

    def next_one(subject: SubjectKey, result: EnrichmentResult) -> None:
        after.append(subject.subject_id)

    worker = env.worker(settings, clock=env.clock, on_refreshed=[broken, next_one])
    with capture_logs() as logs:
        stats = env.run(worker.drain())

    failures = [e for e in logs if e["event"] == "idis.enrichment.refreshed_callback_failed"]
    assert (3, 3) == (stats.refreshed, stats.callback_errors)
    assert ["c0", "c1", "c2"] == sorted(after)
    assert 3 == env.count(env.Request, status="done")
    assert 0 == env.count(env.Defect, status="OPEN")
    assert {("RuntimeError", "error")} == {(e["error_type"], e["log_level"]) for e in failures}
    assert "hunter2" not in repr(logs)
    assert all("broken" in e["callback"] for e in failures)


def test_a_callback_must_be_callable(env: Any) -> None:
    """Registering something that is not callable fails at once, naming its type."""
    worker = env.worker(env.settings())

    with pytest.raises(UsageError, match=r"expects a callable \(subject, result\), got str"):
        worker.on_refreshed("not a function")  # type: ignore[arg-type]


def test_run_deferred_passes_refreshed_callbacks(env: Any) -> None:
    """run_deferred(on_refreshed=...) calls the callbacks too (scripts can use them)."""
    settings = env.settings()
    _defer_all(env, settings, 2)
    env.recover(PROVIDER)
    seen: list[str] = []

    stats = run_deferred(
        settings, once=True, on_refreshed=[lambda subject, _result: seen.append(subject.subject_id)]
    )

    assert 2 == stats.refreshed
    assert ["c0", "c1"] == sorted(seen)


# --------------------------------------------------------------------------- SIGTERM


def test_run_deferred_stops_gracefully_on_sigterm(env: Any, tmp_path: Path) -> None:
    """``enrichment run-deferred`` (asyncio.run) ends on SIGTERM with exit 0 and its counts."""
    settings = env.settings()
    _defer_all(env, settings, 2)
    env.recover(PROVIDER)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "ENRICHMENT_"))},
        "IDIS_DATABASE_URL": env.db_url,
        "IDIS_SIMULATOR_URL": env.sim.url,
        "IDIS_ENRICHMENT_POLL_INTERVAL": "50ms",
        "IDIS_LOG_LEVEL": "warning",
    }
    # Output goes to a file: a process blocked on a full pipe would look like a hang.
    output = tmp_path / "run-deferred.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "idis.integrations", "enrichment", "run-deferred", "--json"],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(3000):
            if env.count(env.Request, status="done") == 2 or process.poll() is not None:
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.read_text()

    assert 0 == process.returncode, text
    assert 2 == env.count(env.Request, status="done")
    assert '"refreshed": 2' in text
