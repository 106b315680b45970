"""Claim enrichment: the library's answer, copied onto the ``claims`` row.

``POST /claims/{id}/enrich`` asks the library's :class:`~idis.integrations.enrichment.AsyncEnricher`
and writes what it answered onto the claim (:func:`apply_result`, :func:`mark_failed`).

When a deferred enrichment is refreshed later, the library's deferred worker
writes the fresh data to its own ``enrichment_cache`` table and resolves the
claim's defects; it has no hook to tell the host. So the service copies fresh
cache entries onto its stale claims itself (:func:`refresh_stale_claims`): in a
background loop, and for one claim on every read, so ``GET /claims/{id}`` is
never behind the library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from idis.integrations.enrichment import EnrichmentResult
from idis.integrations.enrichment._models import EnrichmentCacheEntry
from idis.integrations.observability._logs import get_logger

from .models import Claim

__all__ = [
    "SUBJECT_TYPE",
    "apply_result",
    "mark_failed",
    "refresh_stale_claims",
    "run_claim_refresher",
]

_log = get_logger()

#: ``subject_type`` of claims in the library's enrichment tables and defects.
SUBJECT_TYPE = "claim"


def apply_result(claim: Claim, result: EnrichmentResult) -> None:
    """Record an enrichment answer on the claim (fresh, cached-and-stale, or deferred)."""
    claim.enrichment_provider = result.primary
    claim.enrichment_stale = result.stale
    if result.data is not None:
        claim.enrichment = dict(result.data)
        claim.enriched_at = result.fetched_at


def mark_failed(claim: Claim, primary: str) -> None:
    """Record a failed enrichment: the claim's data (if any) is stale now."""
    claim.enrichment_provider = primary
    claim.enrichment_stale = True


async def refresh_stale_claims(
    session: AsyncSession, claim_ids: Sequence[str] | None = None
) -> int:
    """Copy fresh data from the library's enrichment cache onto stale claims.

    Args:
        session: A session in an open transaction.
        claim_ids: Only these claims (default: every stale claim).

    Returns:
        How many claims were refreshed.
    """
    cache = EnrichmentCacheEntry
    query = (
        select(Claim, cache.data, cache.fetched_at)
        .join(
            cache,
            and_(
                cache.provider == Claim.enrichment_provider,
                cache.tenant_id == Claim.tenant_id,
                cache.subject_type == SUBJECT_TYPE,
                cache.subject_id == Claim.id,
            ),
        )
        .where(
            Claim.enrichment_stale.is_(True),
            cache.stale.is_(False),
            cache.data.is_not(None),
        )
    )
    if claim_ids is not None:
        query = query.where(Claim.id.in_(list(claim_ids)))
    refreshed = 0
    for claim, data, fetched_at in (await session.execute(query)).all():
        claim.enrichment = dict(data)
        claim.enriched_at = fetched_at
        claim.enrichment_stale = False
        refreshed += 1
    return refreshed


async def run_claim_refresher(
    sessions: async_sessionmaker[AsyncSession], interval: timedelta
) -> None:
    """Refresh stale claims from the cache every ``interval`` until cancelled."""
    while True:
        try:
            async with sessions.begin() as session:
                count = await refresh_stale_claims(session)
            if count:
                _log.info(
                    "idis.example.claims_refreshed",
                    msg=f"{count} stale claim(s) refreshed from the enrichment cache",
                    claims=count,
                )
        except Exception as exc:  # noqa: BLE001  # the loop must survive a database hiccup
            _log.warning("idis.example.claims_refresh_failed", error_type=type(exc).__name__)
        await asyncio.sleep(interval.total_seconds())
