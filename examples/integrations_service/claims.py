"""Claim enrichment: the library's answer, copied onto the ``claims`` row.

``POST /claims/{id}/enrich`` asks the library's :class:`~idis.integrations.enrichment.AsyncEnricher`
and writes what it answered onto the claim (:func:`apply_result`, :func:`mark_failed`).

When a deferred enrichment is refreshed later, the library's deferred worker
calls back (``on_refreshed``) once the refresh has committed; :func:`claim_refresher`
is that callback and copies the fresh data onto the claim, so the service never
polls for refreshes. A refresh committed while no callback could run (the
service crashed between the commit and the callback, or an operator ran
``idis-integrations enrichment run-deferred`` while the service was down) is
picked up once at start by :func:`refresh_stale_claims`, from the library's cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy import and_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from idis.integrations.enrichment import EnrichmentResult, SubjectKey
from idis.integrations.enrichment._models import EnrichmentCacheEntry
from idis.integrations.observability._logs import get_logger

from .models import Claim

__all__ = [
    "SUBJECT_TYPE",
    "apply_result",
    "claim_refresher",
    "mark_failed",
    "refresh_stale_claims",
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


def claim_refresher(
    sessions: async_sessionmaker[AsyncSession],
) -> Callable[[SubjectKey, EnrichmentResult], Awaitable[None]]:
    """The deferred worker's ``on_refreshed`` callback: copy a fresh refresh onto its claim.

    Only a claim still enriched from the same primary provider is touched, and
    only with data newer than what it holds, so a refresh that lands after a
    newer direct ``POST /claims/{id}/enrich`` never rolls the claim back.
    """

    async def refreshed(subject: SubjectKey, result: EnrichmentResult) -> None:
        if subject.subject_type != SUBJECT_TYPE or result.data is None:
            return
        async with sessions.begin() as session:
            claim = await session.get(Claim, subject.subject_id, with_for_update=True)
            if (
                claim is None
                or claim.tenant_id != subject.tenant_id
                or claim.enrichment_provider != subject.provider
            ):
                return
            newer = (
                claim.enriched_at is None
                or result.fetched_at is None
                or claim.enriched_at <= result.fetched_at
            )
            if not newer:
                return
            apply_result(claim, result)
        _log.info(
            "idis.example.claim_refreshed",
            msg="deferred enrichment refreshed; copied onto the claim",
            claim_id=subject.subject_id,
            tenant_id=subject.tenant_id,
            provider=result.provider,
        )

    return refreshed


async def refresh_stale_claims(
    session: AsyncSession, claim_ids: Sequence[str] | None = None
) -> int:
    """Copy fresh data from the library's enrichment cache onto stale claims (catch-up).

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
