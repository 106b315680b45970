"""Against the real simulator: deferral during an outage, fallbacks, cache, and self-healing.

Every enricher test runs through both faces (``mode``: :class:`Enricher` and
:class:`AsyncEnricher`); the deferred worker is the async one either way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from tests.conftest import sample

from idis.integrations.enrichment import RECOVERY_RESOLUTION, create_stale_defects
from idis.integrations.exceptions import ProviderError, ProviderRejected, StorageError
from idis.integrations.simulator._app import enrichment_for

PROVIDER = "enrichment_provider"
UNREACHABLE = "postgresql://postgres@127.0.0.1:9/idis"


async def wait_until(condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Poll ``condition`` until true; fail the test (not time it) if it never becomes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached: the background worker made no progress")
        await asyncio.sleep(0.02)


def test_outage_defers_every_call_then_worker_refreshes_all(
    env_db: Any, metrics: Any, mode: str
) -> None:
    """N calls in an outage give N deferred results and N open defects; recovery resolves all."""
    env = env_db
    settings = env.settings()
    subjects = [f"claim-{i}" for i in range(12)]
    env.outage(PROVIDER)

    enricher = env.enricher(settings, mode)
    results = [enricher.enrich(s, tenant_id=f"t{i % 3}") for i, s in enumerate(subjects)]

    assert ["deferred"] * 12 == [r.status for r in results]
    assert all(r.stale and r.deferred and r.data is None and r.provider is None for r in results)
    assert 12 == env.count(env.Defect, status="OPEN", defect_type="STALE_ENRICHMENT")
    assert 12 == env.count(env.Request, status="pending")
    assert 12 == sample(metrics, "integration_enrichment_deferred_pending", provider=PROVIDER)
    assert 12 == sample(
        metrics, "integration_defects_open", provider=PROVIDER, defect_type="STALE_ENRICHMENT"
    )
    assert 12 == sample(
        metrics, "integration_enrichment_requests_total", provider=PROVIDER, result="deferred"
    )

    # The worker's clock is the real one: the manual clock (breakers) moves only on recover().
    worker = env.worker(settings, seed=3)

    async def recovery() -> int:
        worker.start()
        try:
            # While the provider is down the worker waits without calling it or burning attempts.
            await wait_until(lambda: worker.totals.gated >= 3)
            calls = int(env.sim.control.stats(PROVIDER)["requests"].get("enrich", 0))
            env.recover(PROVIDER)
            await wait_until(lambda: env.count(env.Defect, status="OPEN") == 0)
            return calls
        finally:
            await worker.stop()

    calls_during_outage = env.run(recovery())

    defects = env.rows(env.Defect)
    assert 12 == len(defects)
    assert {("RESOLVED", RECOVERY_RESOLUTION)} == {(d.status, d.resolution) for d in defects}
    assert all(d.resolved_at is not None for d in defects)
    assert 12 == env.count(env.Request, status="done")
    assert {0} == {r.attempts for r in env.rows(env.Request)}
    cache = {row.subject_id: row for row in env.rows(env.Cache)}
    assert {s: enrichment_for(s) for s in subjects} == {s: cache[s].data for s in subjects}
    assert not any(row.stale for row in cache.values())
    # Each subject was fetched once after recovery: no retry storm, no duplicates.
    after = env.sim.control.stats(PROVIDER)["requests"]["enrich"] - calls_during_outage
    assert 12 == after
    assert 0 == sample(metrics, "integration_enrichment_deferred_pending", provider=PROVIDER)
    assert 0 == sample(
        metrics, "integration_defects_open", provider=PROVIDER, defect_type="STALE_ENRICHMENT"
    )
    resolved_audits = [a for a in _audit(env) if a.action == "defect.resolved"]
    assert 12 == len(resolved_audits)


def _audit(env: Any) -> list[Any]:
    from idis.integrations._audit import AuditEvent

    return env.rows(AuditEvent)


def test_fallback_serves_while_primary_is_down(env: Any, mode: str) -> None:
    """With the primary down, the next provider in the chain serves and the result says which."""
    settings = env.settings(fallbacks={PROVIDER: ("backup_enrich",)})
    env.outage(PROVIDER)

    result = env.enricher(settings, mode).enrich("claim-7", tenant_id="t1")

    assert "served_from_fallback" == result.status
    assert "backup_enrich" == result.provider
    assert PROVIDER == result.primary
    assert enrichment_for("claim-7") == result.data
    assert not result.stale
    assert [(PROVIDER, "failed"), ("backup_enrich", "served")] == [
        (a.provider, a.outcome) for a in result.attempts
    ]
    assert 0 == env.count(env.Defect)
    assert "backup_enrich" == env.rows(env.Cache)[0].served_by


def test_explicit_provider_list_overrides_the_configured_chain(env: Any, mode: str) -> None:
    """``providers=`` picks the order; the first is the primary defects are filed under."""
    settings = env.settings()
    env.outage("backup_enrich")

    enricher = env.enricher(settings, mode)
    result = enricher.enrich("c1", tenant_id="t1", providers=["backup_enrich", PROVIDER])

    assert ("served_from_fallback", PROVIDER, "backup_enrich") == (
        result.status,
        result.provider,
        result.primary,
    )


@pytest.mark.parametrize("defer", [True, False])
def test_cached_copy_is_served_stale_with_its_age(env: Any, defer: bool, mode: str) -> None:
    """With every provider down, the last good result is served marked stale, with its age."""
    settings = env.settings(
        enrichment=replace(env.FAST, defer_on_error=defer),
        fallbacks={PROVIDER: ("backup_enrich",)},
    )
    enricher = env.enricher(settings, mode)
    first = enricher.enrich("claim-9", tenant_id="t1")
    env.outage(PROVIDER)
    env.outage("backup_enrich")
    env.clock.advance(90)
    result = enricher.enrich("claim-9", tenant_id="t1")

    assert "enriched" == first.status
    assert "cached_stale" == result.status
    assert timedelta(seconds=90) == result.age
    assert first.data == result.data
    assert PROVIDER == result.provider
    assert result.stale
    assert defer == result.deferred
    assert (1 if defer else 0) == env.count(env.Defect, status="OPEN")
    assert (1 if defer else 0) == env.count(env.Request, status="pending")
    assert (result.defect_id is not None) == defer
    cache = env.rows(env.Cache)[0]
    assert cache.stale
    assert "enrichment_provider:server_error, backup_enrich:server_error" == cache.last_error


def test_defer_off_raises_records_staleness_and_create_stale_defects_heals(
    env: Any, mode: str
) -> None:
    """With deferral off the error propagates, but the stale subject is recorded; RB-09's
    create-stale-defects then opens its defect and queues a refresh that resolves it."""
    settings = env.settings(enrichment=replace(env.FAST, defer_on_error=False))
    env.outage(PROVIDER)
    with pytest.raises(ProviderError) as raised:
        env.enricher(settings, mode).enrich("claim-1", tenant_id="t1")

    assert PROVIDER == raised.value.provider
    assert 0 == env.count(env.Defect)
    assert [("claim-1", True)] == [(r.subject_id, r.stale) for r in env.rows(env.Cache)]

    created = create_stale_defects(PROVIDER, "1 hour ago", settings=settings, engine=env.engine)
    env.recover(PROVIDER)
    stats = env.run(env.worker(settings, seed=1).drain())

    assert (1, 1) == (created.created, created.requests_enqueued)
    assert 1 == stats.refreshed
    assert [("RESOLVED", RECOVERY_RESOLUTION)] == [
        (d.status, d.resolution) for d in env.rows(env.Defect)
    ]


def test_rejected_by_every_provider_raises_and_defers_nothing(env: Any, mode: str) -> None:
    """A 404 from every provider is not an outage: it raises even with deferral on.

    No defect, no request; the cache row only remembers the no-match (not stale).
    """
    settings = env.settings()
    env.sim.control.set_fault(PROVIDER, "error", endpoint="enrich", status=404)

    with pytest.raises(ProviderRejected):
        env.enricher(settings, mode).enrich("claim-404", tenant_id="t1")

    assert (0, 0, 0) == (
        env.count(env.Defect),
        env.count(env.Request),
        env.count(env.Cache, stale=True),
    )


def test_database_outage_still_returns_fresh_data_but_cannot_defer(env: Any, mode: str) -> None:
    """Served data is returned even if caching it fails; a deferral that cannot be stored raises."""
    settings = env.settings()
    # Nothing listens on port 9: connecting is refused at once. (A SQLite file in a missing
    # folder would do for the sync face, but aiosqlite's failed connect leaves a worker thread
    # that may report to the test's event loop after it closed.)
    enricher = env.enricher(settings, mode, url=UNREACHABLE)

    served = enricher.enrich("claim-1", tenant_id="t1")
    env.outage(PROVIDER)
    with pytest.raises(StorageError):
        enricher.enrich("claim-2", tenant_id="t1")

    assert ("enriched", enrichment_for("claim-1")) == (served.status, served.data)
