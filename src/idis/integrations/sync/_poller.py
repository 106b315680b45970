"""The incremental poller: a durable cursor per provider and stream, overlapping windows.

Each poll reads the provider's change feed from the cursor to its end and
applies every event through the inbox (source ``poll``), one transaction per
page together with the cursor's new position, so a poller killed at any point
resumes after the last page it committed and applies nothing twice.

Where a poll starts: at the cursor's position when it has one. The position is
opaque text, whatever the provider's API hands back as "the next page starts
here" (``ChangesPage.next_cursor``): the generic feed's ``seq`` as text, a
HubSpot search watermark with its paging token, a Salesforce SOQL keyset. It is
stored and handed back as is (``changes(after=position)``). The generic feed's
``seq`` is its commit order, so a change the provider commits late (with an
``occurred_at`` long past) still comes after the cursor and is read; a time
window would skip it once it is older than the overlap. Only a cursor without a
position (a provider never polled, or moved by failover to a time) starts by
time, ``poll_overlap`` before its watermark, and the inbox makes the re-read
events no-ops. A complete poll records ``poll`` coverage on
the sync timeline from the cursor's watermark to the moment the poll began.

Each page is applied as one batch (``apply_events_async``: the inbox's one
flow), in a transaction that first fences on the leader's epoch
(:func:`~idis.integrations.sync._state.fence`), so a poller deposed mid-poll
writes nothing.

The cursor is also where failover points the poller: on a switch to polling
it is set to the last position the webhook channel is known to have covered
(:func:`idis.integrations.sync._state.carry_out`), so the first window covers the
time between the last good webhook and the switch.

Who polls: see :mod:`.leader` (one replica per provider) and :mod:`.service`
(when and how often: ``CRM_POLL_INTERVAL``). ``idis-integrations sync poll``
runs it by hand (``asyncio.run``). The poller is a background worker: async only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from .._clock import Clock, system_clock
from ..config import Settings
from ..exceptions import AuthError, ProviderError, UsageError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._inbox import ApplyOutcome, HandlerRegistry, apply_events_async
from ._mode import ModePolicy
from ._models import seq_of
from ._sentinel import AsyncChangeFeed
from ._state import (
    CHANGES_STREAM,
    NOTIFICATIONS_STREAM,
    claim_cursor,
    fence,
    get_cursor,
    load_state,
    move_cursor,
)
from ._timeline import record_coverage

__all__ = [
    "PollResult",
    "Poller",
    "advance_cursor",
    "error_type",
    "feed_gap",
    "window_start",
]

_log = get_logger()


class _Overtaken(Exception):
    """A page's transaction found the stream's cursor moved by another poll: roll it back."""


@dataclass(frozen=True, slots=True)
class PollResult:
    """What one poll did."""

    provider: str
    #: Events read from the feed (overlap re-reads included).
    fetched: int
    #: Events applied now.
    applied: int
    #: Events the inbox already had (overlap, webhooks, replay).
    duplicates: int
    #: Older versions skipped, and types without a handler.
    superseded: int
    ignored: int
    pages: int
    #: Whether the feed was read to its end.
    complete: bool
    #: Start of the window (the cursor's watermark; minus the overlap for a time window).
    window_start: datetime | None
    #: When the poll began (coverage ends here).
    started_at: datetime
    #: The cursor's position afterwards (opaque text).
    position: str | None
    #: Set when the feed no longer served some events after the cursor's position
    #: (they aged out of its retention): when the oldest event it still served
    #: happened. Coverage starts there, so the sync timeline shows the stretch
    #: before it as a gap for reconcile to fill. None: nothing was missing.
    feed_gap_until: datetime | None = None

    @property
    def after_seq(self) -> int | None:
        """The position as a generic-feed seq (None when it is not one)."""
        return seq_of(self.position)


def error_type(exc: ProviderError | AuthError) -> str:
    """A bounded name for a provider or token failure (``timeout``, ``auth``...)."""
    return exc.error_type if isinstance(exc, ProviderError) else "auth"


def window_start(
    position: str | None,
    watermark: datetime | None,
    *,
    now: datetime,
    overlap: timedelta,
) -> tuple[str | None, datetime | None]:
    """Where a poll starts: ``(after, since)`` for the first feed request (pure).

    The provider's position wins: the poll starts there (for the generic feed,
    its commit order, so a change committed late is never skipped); with only a
    watermark the window reaches ``overlap`` back before it (by time); a
    provider never polled starts ``overlap`` before now.
    """
    if position is not None:
        return position, None
    if watermark is not None:
        return None, watermark - overlap
    return None, now - overlap


def advance_cursor(
    position: str | None,
    watermark: datetime | None,
    events: Sequence[Any],
    next_cursor: str | None,
) -> tuple[str | None, datetime | None]:
    """The cursor after a page (pure).

    A generic-feed position (a seq) never moves backwards: the highest of the
    old one, the events' seqs and the page's ``next_cursor``. Any other
    position is the provider's to define: the page's ``next_cursor`` replaces
    it (kept when the page gives none). The watermark never moves backwards.
    """
    times = [e.occurred_at for e in events]
    if watermark is not None:
        times.append(watermark)
    mark = max(times) if times else None
    numeric = [p for p in (position, next_cursor) if p is not None]
    if all(seq_of(p) is not None for p in numeric):
        seqs = [seq_of(p) for p in numeric]
        seqs += [e.seq for e in events if isinstance(e.seq, int) and e.seq > 0]
        found = [s for s in seqs if s is not None]
        return (str(max(found)) if found else None), mark
    return (next_cursor if next_cursor is not None else position), mark


def feed_gap(position: str | None, page: Any) -> tuple[bool, datetime | None]:
    """Whether a feed page skips events after ``position``, and where coverage resumes (pure).

    A generic feed states the oldest ``seq`` it still serves (``oldest_seq``). A
    position before it means the events in between are gone from the feed: the
    poll cannot have applied them, so it must not claim their time. Returns
    ``(missing, resume)``: ``resume`` is when the oldest event still served
    happened (None when the page has none to tell). Feeds that state nothing,
    and opaque positions, never report a gap.
    """
    after = seq_of(position)
    oldest = getattr(page, "oldest_seq", None)
    if after is None or not isinstance(oldest, int) or oldest <= after + 1:
        return False, None
    served = [e.occurred_at for e in page.events if getattr(e, "seq", None) == oldest]
    return True, (served[0] if served else None)


def _next_cursor(page: Any) -> str | None:
    """A page's next position as text: ``next_cursor``, or (a host's own feed) ``next_after``."""
    found = getattr(page, "next_cursor", None)
    if isinstance(found, str):
        return found
    after = getattr(page, "next_after", None)
    return None if after is None else str(after)


class Poller:
    """Polls one provider's change feed (a background worker's part: async only).

    Args:
        feed: ``AsyncProviderClient`` (anything with ``async changes(after=, since=, limit=)``).
        sessions: ``AsyncEngine`` or async session factory of the library's database.
        settings: Library settings (``sync.poll_overlap``, ``sync.page_size``).
        provider: Provider name.
        registry: Handlers (default: the process-wide registry).
        clock: Time source.
        metrics: Metrics (default: process-wide).
        max_pages: Most pages one poll reads before returning (it resumes next time).
        source: The channel the events are applied as: ``poll``, or ``webhook`` for a
            fetch a data-less push notification triggered (Google Drive): the events
            then carry the webhook stamp and coverage, as the sentinel expects of the
            webhook channel.
    """

    def __init__(
        self,
        feed: AsyncChangeFeed,
        sessions: AsyncEngine | async_sessionmaker[AsyncSession] | Callable[[], AsyncSession],
        settings: Settings,
        provider: str,
        *,
        registry: HandlerRegistry | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        max_pages: int = 1000,
        source: str = "poll",
    ) -> None:
        settings.provider(provider)
        if source not in ("poll", "webhook"):
            raise UsageError(f"Poller source={source!r}: expected 'poll' or 'webhook'")
        self.source = source
        # A notification channel keeps its own place in the feed: were it to share the
        # poller's, whichever read a change first would hide it from the other, and the
        # sentinel could not tell whether notifications keep up while polling runs.
        self.stream = CHANGES_STREAM if source == "poll" else NOTIFICATIONS_STREAM
        self.feed = feed
        self._sessions: Any = (
            async_sessionmaker(sessions, expire_on_commit=False)
            if isinstance(sessions, AsyncEngine)
            else sessions
        )
        self.settings = settings
        self.provider = provider
        self.registry = registry
        self.clock: Clock = clock or system_clock
        self._metrics = metrics
        self.page_size = settings.sync.page_size
        self.overlap = settings.sync.poll_overlap
        self.max_pages = max_pages
        self.policy = ModePolicy.from_settings(settings.sync)

    @property
    def metrics(self) -> Metrics:
        """The metrics this component records into."""
        return self._metrics if self._metrics is not None else get_metrics()

    def _start(
        self, session: Session, now: datetime
    ) -> tuple[str | None, datetime | None, str | None]:
        """Where to read from (position, or time), and the stored position (to claim)."""
        cursor = get_cursor(session, self.provider, self.stream)
        if cursor is None:
            return (*window_start(None, None, now=now, overlap=self.overlap), None)
        position = stored = cursor.position
        accepts = getattr(self.feed, "accepts_cursor", None)
        if position is not None and callable(accepts) and not accepts(position):
            # Not this API's cursor: a feed seq that failover (the sentinel's
            # confirmed position) or an earlier API left. Start by time from the
            # watermark instead, which failover set to the covered moment.
            _log.info(
                "idis.sync.cursor_not_this_api",
                msg="the stored cursor is not this API's; polling from the watermark",
                provider=self.provider,
            )
            position = None
        return (*window_start(position, cursor.watermark, now=now, overlap=self.overlap), stored)

    def _coverage_start(self, session: Session, since: datetime | None) -> datetime | None:
        if since is not None:
            return since
        cursor = get_cursor(session, self.provider, self.stream)
        return cursor.watermark if cursor is not None else None

    def _save_page(
        self, session: Session, events: Sequence[Any], next_cursor: str | None, now: datetime
    ) -> str | None:
        cursor = get_cursor(session, self.provider, self.stream)
        after, mark = advance_cursor(
            cursor.position if cursor else None,
            cursor.watermark if cursor else None,
            events,
            next_cursor,
        )
        move_cursor(
            session,
            self.provider,
            position=after,
            watermark=mark,
            now=now,
            moved_by=None,
            stream=self.stream,
        )
        return after

    def _finish(
        self, session: Session, window: datetime | None, started: datetime, epoch: int | None
    ) -> None:
        if epoch is not None:
            fence(session, self.provider, epoch)
        if window is not None and window <= started:
            record_coverage(session, self.provider, self.source, window, started)
        # The feed was read to its end as of ``started``: the next poll's coverage
        # starts there (its window, by feed position, holds everything after).
        cursor = get_cursor(session, self.provider, self.stream)
        if cursor is not None and (cursor.watermark is None or cursor.watermark < started):
            cursor.watermark = started
            cursor.updated_at = started
        if self.source == "poll":
            row = load_state(session, self.provider, self.policy, started)
            row.polled_at = started
            row.updated_at = started

    async def poll_once(self, *, epoch: int | None = None) -> PollResult:
        """Read the feed from the cursor to its end (or ``max_pages``), applying every event.

        Args:
            epoch: The leadership epoch this poll runs under (``LeaderLock.acquire``):
                every page's cursor write is compare-and-set on it. None: unfenced
                (only for a caller that knows nobody else polls).

        Raises:
            ProviderError: when the provider fails; pages already applied stay committed.
            AuthError: when no token could be obtained for the provider.
            Fenced: another replica (or an operator) took over; nothing more was written.
        """
        started = self.clock.now()
        async with self._sessions() as session, session.begin():
            after, since, expected = await session.run_sync(lambda s: self._start(s, started))
            window = await session.run_sync(lambda s: self._coverage_start(s, since))
        tally: Counter[ApplyOutcome] = Counter()
        fetched = pages = 0
        complete = False
        claim = True
        gap_until: datetime | None = None
        position = after
        try:
            while pages < self.max_pages:
                page = await self.feed.changes(
                    after=after, since=since if after is None else None, limit=self.page_size
                )
                if pages == 0:
                    missing, resume = feed_gap(after, page)
                    if missing:
                        # Coverage may only start where the feed still holds everything.
                        claim = resume is not None
                        window = gap_until = resume
                        self._feed_gap(after, page, resume)
                pages += 1
                fetched += len(page.events)
                if window is None and page.events:
                    window = min(e.occurred_at for e in page.events)
                try:
                    position = await self._commit_page(page, epoch, tally, expected)
                except _Overtaken:
                    self._overtaken(expected)
                    break
                expected = position
                if not page.has_more or not page.events:
                    complete = True
                    break
                after = position
        except (ProviderError, AuthError) as exc:
            self._failed(exc)
            raise
        if complete:
            end = (window or started) if claim else None
            async with self._sessions() as session, session.begin():
                await session.run_sync(lambda s: self._finish(s, end, started, epoch))
        result = PollResult(
            provider=self.provider,
            fetched=fetched,
            applied=tally[ApplyOutcome.APPLIED],
            duplicates=tally[ApplyOutcome.DUPLICATE],
            superseded=tally[ApplyOutcome.SUPERSEDED],
            ignored=tally[ApplyOutcome.IGNORED],
            pages=pages,
            complete=complete,
            window_start=window,
            started_at=started,
            position=position,
            feed_gap_until=gap_until,
        )
        self._polled(result)
        return result

    def _overtaken(self, expected: str | None) -> None:
        _log.info(
            "idis.sync.poll_overtaken",
            msg=(
                "another poll of this stream moved its cursor: this one stops, its last "
                "page not applied (the other read on from where this one started)"
            ),
            provider=self.provider,
            stream=self.stream,
            position=expected,
        )

    def _feed_gap(self, after: str | None, page: Any, resume: datetime | None) -> None:
        _log.warning(
            "idis.sync.feed_gap",
            msg=(
                "the change feed no longer serves every event after the cursor; the sync "
                "timeline shows the stretch before its oldest event as a gap: reconcile it"
            ),
            provider=self.provider,
            position=after,
            oldest_seq=page.oldest_seq,
            resume=resume.isoformat() if resume else None,
        )

    async def _commit_page(
        self, page: Any, epoch: int | None, tally: Counter[ApplyOutcome], expected: str | None
    ) -> str | None:
        """One page in one transaction: fence, claim the cursor, apply the batch, move it.

        Raises:
            _Overtaken: another poll of this stream moved the cursor since ``expected``.
        """
        now = self.clock.now()
        async with self._sessions() as session, session.begin():
            if epoch is not None:
                # First: the state row, then the cursor, then the inbox's ledger and rows.
                await session.run_sync(lambda s: fence(s, self.provider, epoch))
            if not await session.run_sync(
                lambda s: claim_cursor(s, self.provider, self.stream, expected, now)
            ):
                raise _Overtaken
            result = await apply_events_async(
                session, self.provider, page.events, self.source, registry=self.registry, now=now
            )
            position: str | None = await session.run_sync(
                lambda s: self._save_page(s, page.events, _next_cursor(page), now)
            )
        tally.update(o for o in result.outcomes if o is not None)
        return position

    def _polled(self, result: PollResult) -> None:
        self.metrics.polls.labels(provider=self.provider, outcome="ok").inc()
        _log.info(
            "idis.sync.polled",
            provider=self.provider,
            fetched=result.fetched,
            applied=result.applied,
            duplicates=result.duplicates,
            pages=result.pages,
            complete=result.complete,
            position=result.position,
        )

    def _failed(self, exc: ProviderError | AuthError) -> None:
        kind = error_type(exc)
        self.metrics.polls.labels(provider=self.provider, outcome="error").inc()
        _log.warning(
            "idis.sync.poll_failed",
            msg=f"poll failed ({kind}); the cursor keeps its last committed page",
            provider=self.provider,
            error_type=kind,
        )
