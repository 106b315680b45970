"""The sync timeline: which stretches of time each channel is known to have covered.

A *coverage interval* ``[start, end]`` for a provider and a source says that
every change the provider made in that stretch reached the library through
that source. Who records what:

* ``webhook``: the sentinel (:mod:`idis.integrations.sync._sentinel`) confirms
  that every event in the provider's change feed up to time T arrived by
  webhook, and records ``[previous T, T]``.
* ``poll``: every completed poll window records ``[window start, poll time]``
  (the window start is the cursor's watermark minus ``poll_overlap``, or, when
  the feed no longer served every event after the cursor, the oldest event it
  still served).
* ``replay``: every completed reconcile run records ``[since, covered_until]``
  (the reconcile helper calls :func:`record_coverage`).

Intervals of one provider and source that overlap or touch are merged on
write, so the table stays small however often coverage is recorded. Gaps (the
parts of a window no source covered) are computed by the reconcile helper
from :func:`coverage`; ``idis-integrations timeline`` prints them.

Contract (stable; the reconcile helper builds on it)::

    record_coverage(session: Session, provider: str, source: str,
                    start: datetime, end: datetime) -> None
    coverage(session: Session, provider: str, since: datetime, until: datetime,
             *, sources: Sequence[str] | None = None) -> list[CoveredInterval]
    await record_coverage_async(session: AsyncSession, provider, source, start, end)
    await coverage_async(session: AsyncSession, provider, since, until, *, sources=None)

``CoveredInterval`` is a ``NamedTuple(start, end, source)``: ``i[0], i[1]`` are
the start and end, so it passes straight to
``reconcile.logic.compute_gaps``. Times are aware UTC datetimes; intervals
returned are clipped to ``[since, until]``, sorted by start, one list for all
sources (each source's intervals are disjoint; different sources may overlap).
``record_coverage`` adds to the caller's transaction and never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .._timeparse import utcnow
from ..exceptions import UsageError
from ._models import SyncCoverage

__all__ = [
    "SOURCES",
    "CoveredInterval",
    "coverage",
    "coverage_async",
    "record_coverage",
    "record_coverage_async",
]

#: The channels that can cover time.
SOURCES: tuple[str, ...] = ("webhook", "poll", "replay")


class CoveredInterval(NamedTuple):
    """A stretch of time one source covered: ``(start, end, source)``."""

    start: datetime
    end: datetime
    #: ``webhook``, ``poll`` or ``replay``.
    source: str


def _check(provider: str, source: str, start: datetime, end: datetime) -> None:
    if source not in SOURCES:
        raise UsageError(f"coverage source {source!r} is not one of {', '.join(SOURCES)}")
    if start.tzinfo is None or end.tzinfo is None:
        raise UsageError(f"coverage for {provider}: times must be aware UTC datetimes")
    if end < start:
        raise UsageError(
            f"coverage for {provider}: end {end.isoformat()} is before start {start.isoformat()}"
        )


def record_coverage(
    session: Session,
    provider: str,
    source: str,
    start: datetime,
    end: datetime,
    *,
    tolerance: timedelta = timedelta(0),
) -> None:
    """Record that ``source`` covered ``[start, end]`` for ``provider``.

    Overlapping or touching intervals of the same provider and source (closer
    than ``tolerance``) are merged into one row. Runs inside the caller's
    transaction; commit to make it durable.

    Args:
        session: The caller's session.
        provider: Provider name.
        source: ``webhook``, ``poll`` or ``replay``.
        start: Start of the covered stretch (aware UTC).
        end: End of the covered stretch (aware UTC, not before ``start``).
        tolerance: Join intervals separated by at most this much.

    Raises:
        UsageError: on an unknown source, naive times or ``end < start``.
    """
    _check(provider, source, start, end)
    touching = list(
        session.scalars(
            select(SyncCoverage)
            .where(
                SyncCoverage.provider == provider,
                SyncCoverage.source == source,
                SyncCoverage.end_at >= start - tolerance,
                SyncCoverage.start_at <= end + tolerance,
            )
            .order_by(SyncCoverage.start_at, SyncCoverage.id)
        )
    )
    now = utcnow()
    if not touching:
        session.add(
            SyncCoverage(
                provider=provider, source=source, start_at=start, end_at=end, recorded_at=now
            )
        )
        return
    keep = touching[0]
    keep.start_at = min([start, *(row.start_at for row in touching)])
    keep.end_at = max([end, *(row.end_at for row in touching)])
    keep.recorded_at = now
    extra = [row.id for row in touching[1:]]
    if extra:
        session.execute(delete(SyncCoverage).where(SyncCoverage.id.in_(extra)))


def coverage(
    session: Session,
    provider: str,
    since: datetime,
    until: datetime,
    *,
    sources: Sequence[str] | None = None,
) -> list[CoveredInterval]:
    """Covered intervals of ``provider`` overlapping ``[since, until]``, clipped and sorted.

    Args:
        session: A session.
        provider: Provider name.
        since: Start of the inspected window.
        until: End of the inspected window.
        sources: Only these sources (default: all).

    Returns:
        Intervals sorted by start (then source), each clipped to the window.
    """
    query = select(SyncCoverage.start_at, SyncCoverage.end_at, SyncCoverage.source).where(
        SyncCoverage.provider == provider,
        SyncCoverage.end_at >= since,
        SyncCoverage.start_at <= until,
    )
    if sources is not None:
        query = query.where(SyncCoverage.source.in_(list(sources)))
    rows = session.execute(query).all()
    clipped = [
        CoveredInterval(max(start, since), min(end, until), source)
        for start, end, source in rows
        if min(end, until) >= max(start, since)
    ]
    return sorted(clipped, key=lambda i: (i.start, i.source, i.end))


async def record_coverage_async(
    session: AsyncSession,
    provider: str,
    source: str,
    start: datetime,
    end: datetime,
    *,
    tolerance: timedelta = timedelta(0),
) -> None:
    """Async twin of :func:`record_coverage` (same arguments, an ``AsyncSession``)."""
    await session.run_sync(
        lambda s: record_coverage(s, provider, source, start, end, tolerance=tolerance)
    )


async def coverage_async(
    session: AsyncSession,
    provider: str,
    since: datetime,
    until: datetime,
    *,
    sources: Sequence[str] | None = None,
) -> list[CoveredInterval]:
    """Async twin of :func:`coverage`."""
    return await session.run_sync(lambda s: coverage(s, provider, since, until, sources=sources))
