"""The sync timeline and its gaps (RB-09 Verification 2: "no gaps in sync timeline").

The sync inbox records, per provider, the stretches of time each channel is
known to have covered (``sync.timeline``: webhooks confirmed by the sentinel,
completed poll windows, completed reconcile runs). A *gap* is a part of the
inspected window that no channel covered: events from then may be missing,
and ``reconcile --since <gap start>`` is how to fill it.

The most recent stretch is special: channels confirm coverage after the fact
(the sentinel every ``sentinel_interval``, for events older than a moment),
so the last minute or so is normally not confirmed *yet*. An uncovered
stretch that reaches the end of the window and began less than ``settle``
ago (default ``sentinel_interval + lag_threshold``) is reported as
``pending``, not as a gap; one that began earlier is a gap like any other
(nothing has confirmed anything for too long).

The oldest stretch is special too: before the provider's first recorded
coverage nothing was syncing it (the service did not exist yet, or had never
run for this provider), so no event from then can be "missed" and no
reconcile can fill it. A window that starts earlier starts at that first
coverage (``TimelineReport.requested_since`` keeps what was asked for).

:func:`gaps` and :func:`timeline` read that coverage and also export the total
uncovered time as the ``integration_sync_timeline_gap_seconds`` gauge.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .._clock import Clock, system_clock
from .._timeparse import format_duration, parse_since, utcnow
from ..config import Settings
from ..exceptions import ConfigError
from ..observability._metrics import get_metrics
from ..sync._models import SyncCoverage
from ..sync._timeline import CoveredInterval, coverage
from ._db import default_engine, sessions, transaction
from ._logic import Gap, compute_gaps

__all__ = ["TimelineReport", "default_settle", "gaps", "gaps_in", "timeline", "timeline_in"]


@dataclass(frozen=True, slots=True)
class TimelineReport:
    """Coverage and gaps of one provider's sync timeline over a window."""

    provider: str
    #: Start of the inspected window: the asked-for start, or the provider's first
    #: recorded coverage when that is later (nothing was synced before it).
    since: datetime
    until: datetime
    #: Covered stretches per channel, clipped to the window, sorted by start.
    intervals: list[CoveredInterval] = field(default_factory=list)
    #: Uncovered stretches, oldest first.
    gaps: list[Gap] = field(default_factory=list)
    #: The trailing stretch not confirmed *yet* (began less than ``settle`` ago), if any.
    pending: Gap | None = None
    #: The start that was asked for (earlier than ``since`` when it was clipped).
    requested_since: datetime | None = None

    @property
    def clipped(self) -> bool:
        """Whether the window was moved to the provider's first recorded coverage."""
        return self.requested_since is not None and self.requested_since < self.since

    @property
    def gap_seconds(self) -> float:
        """Total uncovered time, in seconds."""
        return sum(g.seconds for g in self.gaps)

    @property
    def no_gaps(self) -> bool:
        """Whether every moment of the window was covered by some channel."""
        return not self.gaps

    def statement(self) -> str:
        """One line for the operator (and RB-09's Verification checklist)."""
        window = f"{self.since.isoformat()} .. {self.until.isoformat()}"
        if self.clipped:
            window += "; nothing was synced before that first recorded coverage"
        if self.no_gaps:
            tail = (
                f"; the last {format_duration(self.pending.seconds)} not confirmed yet"
                if self.pending is not None
                else ""
            )
            return f"no gaps in sync timeline for {self.provider} ({window}{tail})"
        return (
            f"{len(self.gaps)} gap(s) in sync timeline for {self.provider} totalling "
            f"{format_duration(self.gap_seconds)} ({window}); fill them with "
            f'`idis-integrations reconcile --provider {self.provider} --since "'
            f'{self.gaps[0].start.isoformat()}"`'
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "provider": self.provider,
            "since": self.since.isoformat(),
            "requested_since": (self.requested_since or self.since).isoformat(),
            "until": self.until.isoformat(),
            "no_gaps": self.no_gaps,
            "gap_seconds": round(self.gap_seconds, 3),
            "pending_seconds": round(self.pending.seconds, 3) if self.pending else 0.0,
            "intervals": [
                {
                    "source": i.source,
                    "start": i.start.isoformat(),
                    "end": i.end.isoformat(),
                    "seconds": round((i.end - i.start).total_seconds(), 3),
                }
                for i in self.intervals
            ],
            "gaps": [
                {
                    "start": g.start.isoformat(),
                    "end": g.end.isoformat(),
                    "seconds": round(g.seconds, 3),
                }
                for g in self.gaps
            ],
        }


def _window(
    since: datetime | str, until: datetime | str | None, now: datetime
) -> tuple[datetime, datetime]:
    start = parse_since(since, name="since", now=lambda: now)
    end = now if until is None else parse_since(until, name="until", now=lambda: now)
    if end < start:
        raise ConfigError(
            f"until={end.isoformat()} is before since={start.isoformat()}: expected a window "
            "that ends after it starts",
            variable="until",
        )
    return start, end


def timeline_in(
    session: Session,
    provider: str,
    since: datetime,
    until: datetime,
    *,
    tolerance: timedelta = timedelta(0),
    settle: timedelta = timedelta(0),
    now: datetime | None = None,
) -> TimelineReport:
    """:func:`timeline` inside the caller's session (reads only); updates the gauge."""
    requested = since
    first = session.scalar(
        select(func.min(SyncCoverage.start_at)).where(SyncCoverage.provider == provider)
    )
    if first is not None and since < first:
        since = min(first, until)
    intervals = coverage(session, provider, since, until)
    found = compute_gaps(provider, intervals, since, until, tolerance=tolerance)
    pending = None
    current = now if now is not None else utcnow()
    if found and found[-1].end == until and found[-1].start >= current - settle:
        pending = found.pop()
    report = TimelineReport(provider, since, until, intervals, found, pending, requested)
    get_metrics().timeline_gap_seconds.labels(provider=provider).set(report.gap_seconds)
    return report


def gaps_in(
    session: Session,
    provider: str,
    since: datetime,
    until: datetime,
    *,
    tolerance: timedelta = timedelta(0),
    settle: timedelta = timedelta(0),
) -> list[Gap]:
    """:func:`gaps` inside the caller's session (reads only); updates the gauge."""
    return timeline_in(session, provider, since, until, tolerance=tolerance, settle=settle).gaps


def default_settle(settings: Settings) -> timedelta:
    """How recent an unconfirmed trailing stretch may be before it counts as a gap."""
    return settings.sync.sentinel_interval + settings.sync.lag_threshold


def timeline(
    provider: str,
    since: datetime | str,
    until: datetime | str | None = None,
    *,
    settings: Settings | None = None,
    engine: Engine | None = None,
    tolerance: timedelta = timedelta(0),
    settle: timedelta | None = None,
    clock: Clock = system_clock,
) -> TimelineReport:
    """The sync timeline of ``provider`` over ``[since, until]``: covered intervals and gaps.

    Args:
        provider: Provider name as configured.
        since: Start of the window (datetime, ``"2 hours ago"`` or ISO-8601).
        until: End of the window (default: now).
        settings: Library settings (default: from the environment).
        engine: Database engine (default: one for ``settings.database_url``).
        tolerance: Uncovered stretches this short or shorter are not gaps.
        settle: A trailing uncovered stretch that began less than this long ago is
            ``pending``, not a gap (default: ``sentinel_interval + lag_threshold``;
            ``timedelta(0)`` makes every uncovered moment a gap).
        clock: Time source (tests pass a manual clock).

    Raises:
        ConfigError: unknown provider, or a bad or inverted window.
        StorageError: the database is unreachable.
    """
    settings = settings if settings is not None else Settings.from_env()
    settings.provider(provider)
    now = clock.now()
    start, end = _window(since, until, now)
    allowance = default_settle(settings) if settle is None else settle
    with ExitStack() as stack:
        engine = engine if engine is not None else default_engine(settings, stack)
        with transaction(sessions(engine, write=False)) as session:
            return timeline_in(
                session, provider, start, end, tolerance=tolerance, settle=allowance, now=now
            )
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


def gaps(
    provider: str,
    since: datetime | str,
    until: datetime | str | None = None,
    *,
    settings: Settings | None = None,
    engine: Engine | None = None,
    tolerance: timedelta = timedelta(0),
    settle: timedelta | None = None,
    clock: Clock = system_clock,
) -> list[Gap]:
    """Stretches of ``[since, until]`` that no channel covered for ``provider``, oldest first.

    Also sets ``integration_sync_timeline_gap_seconds{provider}`` to their total.
    See :func:`timeline` for the arguments.
    """
    return timeline(
        provider,
        since,
        until,
        settings=settings,
        engine=engine,
        tolerance=tolerance,
        settle=settle,
        clock=clock,
    ).gaps
