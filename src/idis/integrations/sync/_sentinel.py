"""The sentinel: a light, read-only look at the change feed that tells whether webhooks keep up.

Every ``sentinel_interval`` the leader reads the provider's change feed from
the sentinel's position (usually one short page: the changes since the last
check) and asks the inbox which of those events arrived by webhook. The pure
:func:`assess` turns that into a :class:`SentinelReport`:

* **lag**: the age of the oldest change newer than the last change a webhook
  delivered (``silent_since``). Webhooks that fall silent while the provider
  keeps changing make it grow; it is what fails over to polling, and what
  must stay under ``lag_threshold`` for the return.
* **late events**: changes older than ``lag_threshold`` that no channel has
  applied. In webhook mode they are lost webhooks (holes): the driver applies
  them itself (source ``poll``) so a single lost delivery never loses data.
* **known prefix**: the stretch of the feed whose every event is in the
  inbox. In webhook mode it is the webhook coverage the timeline records, and
  the position the poller starts from on failover.

The sentinel's read position only moves past events that are settled
(delivered by webhook, or older than ``lag_threshold``), so an event still in
flight is looked at again next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.orm import Session

from ..providers._order import MissingOrder, order_key
from ._inbox import current_keys, inbox_rows, webhook_reports

#: How far a provider's clock may run ahead of ours when a webhook is matched to a change.
WEBHOOK_SKEW = timedelta(minutes=5)

__all__ = [
    "AsyncChangeFeed",
    "FeedBatch",
    "SentinelReport",
    "assess",
    "feed_position",
    "fetch_changes_async",
    "inbox_status",
    "known_prefix",
]


class AsyncChangeFeed(Protocol):
    """The part of ``AsyncProviderClient`` the sentinel and the poller use."""

    async def changes(
        self, *, after: int | str | None = None, since: datetime | None = None, limit: int = 100
    ) -> Any:
        """One page: ``.events``, ``.next_after``, ``.has_more`` (and ``.next_cursor``, the
        position as opaque text, which the poller stores)."""


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Events read from the change feed in one go."""

    events: list[Any]
    #: The feed's position after the last page read.
    next_after: int | None
    #: Whether the feed was read to its end (False: the page cap stopped us).
    complete: bool


def feed_position(event: Any) -> int | None:
    """The event's integer place in its feed, or None for an API without one.

    Only the generic feed numbers its changes (``seq`` from 1). A pack whose
    positions are opaque (a HubSpot search watermark, a Drive page token) sends
    ``seq=0``: the sentinel then reads such a feed by time, never from a seq.
    """
    seq = getattr(event, "seq", None)
    return seq if isinstance(seq, int) and seq > 0 else None


async def fetch_changes_async(
    feed: AsyncChangeFeed,
    *,
    after: int | None,
    since: datetime | None,
    page_size: int,
    max_pages: int,
) -> FeedBatch:
    """Read up to ``max_pages`` pages of the change feed from ``after`` (or ``since``).

    Pages follow the feed's own next position: its integer ``next_after``, else
    its opaque ``next_cursor`` (a Drive page token, a HubSpot paging token),
    which is used only to read on within this batch.
    """
    events: list[Any] = []
    next_after = after
    position: int | str | None = after
    for _ in range(max_pages):
        page = await feed.changes(
            after=position, since=since if position is None else None, limit=page_size
        )
        events.extend(page.events)
        if page.next_after is not None:
            next_after = page.next_after
        elif page.events and feed_position(page.events[-1]) is not None:
            next_after = page.events[-1].seq
        if not page.has_more or not page.events:
            return FeedBatch(events, next_after, True)
        position = next_after if page.next_after is not None else page.next_cursor
        if position is None:
            # More pages, but no way to ask for them: no verdict beyond this one.
            break
    return FeedBatch(events, next_after, False)


def inbox_status(
    session: Session, provider: str, events: Sequence[Any]
) -> tuple[set[str], set[str]]:
    """Which ``events`` the host has (any channel), and which of those a webhook delivered.

    By event id first. An API whose webhooks and change feed name one change
    differently (HubSpot: a webhook per changed property, a search result per
    record, both with ids the pack derives) is judged by record: an event is
    known when the record's applied order key is at least the event's, and
    delivered by webhook when a webhook reported a change of the record at
    least as recent (by ``occurred_at``; whichever channel applied it first).
    """
    rows = inbox_rows(session, provider, [e.id for e in events])
    known = set(rows)
    by_webhook = {event_id for event_id, webhook in rows.items() if webhook}
    rest = [e for e in events if e.id not in rows and getattr(e, "record_id", None)]
    if not rest:
        return known, by_webhook
    ledger = current_keys(session, provider, sorted({e.record_id for e in rest}))
    # A webhook arrives after the change it reports; the margin absorbs clock skew.
    floor = min(e.occurred_at for e in rest) - WEBHOOK_SKEW
    reported = webhook_reports(session, provider, floor)
    for event in rest:
        current = ledger.get(event.record_id)
        try:
            key = order_key(event)
        except MissingOrder:
            continue
        if current is not None and current >= key:
            known.add(event.id)
        newest = reported.get(event.record_id)
        if newest is not None and newest >= event.occurred_at:
            by_webhook.add(event.id)
            known.add(event.id)
    return known, by_webhook


@dataclass(frozen=True, slots=True)
class SentinelReport:
    """What one sentinel check found."""

    checked_at: datetime
    #: Events read.
    seen: int
    #: Of which a webhook delivered.
    delivered: int
    #: Oldest change newer than the last webhook-delivered one (None: caught up).
    silent_since: datetime | None
    #: ``checked_at - silent_since``; None when it could not be judged this time.
    lag: timedelta | None
    #: Events older than the lag threshold that no channel has applied.
    late_unknown: tuple[Any, ...]
    #: Where the next check reads from.
    next_seq: int | None


def assess(
    events: Sequence[Any],
    *,
    by_webhook: set[str],
    known: set[str],
    now: datetime,
    lag_threshold: timedelta,
    start_seq: int | None,
    silent_since: datetime | None,
    next_after: int | None,
    complete: bool,
) -> SentinelReport:
    """Judge one batch of the change feed (pure).

    Args:
        events: Events read from ``start_seq``, in feed order.
        by_webhook: Ids of those a webhook delivered.
        known: Ids of those in the inbox (any channel).
        now: The check time.
        lag_threshold: Age beyond which an undelivered change is late.
        start_seq: Where the batch was read from.
        silent_since: The previous check's value (carried while still silent).
        next_after: The feed's position after the batch.
        complete: Whether the batch reaches the end of the feed.
    """
    last_delivered = -1
    for index, event in enumerate(events):
        if event.id in by_webhook:
            last_delivered = index
    lag: timedelta | None
    silent = None if last_delivered >= 0 else silent_since
    trailing = events[last_delivered + 1 :]
    if last_delivered >= 0 and not complete:
        # Delivered events may follow beyond the page cap: no verdict this time.
        lag = None
    else:
        if trailing:
            first = trailing[0].occurred_at
            silent = first if silent is None else min(silent, first)
        lag = max(now - silent, timedelta(0)) if silent is not None else timedelta(0)
    late = tuple(e for e in events if e.id not in known and now - e.occurred_at > lag_threshold)
    position = start_seq
    settled_all = True
    for event in events:
        if event.id not in by_webhook and now - event.occurred_at <= lag_threshold:
            settled_all = False
            break
        position = feed_position(event) or position
    if settled_all and complete and next_after is not None:
        position = next_after if position is None else max(position, next_after)
    return SentinelReport(
        checked_at=now,
        seen=len(events),
        delivered=sum(1 for e in events if e.id in by_webhook),
        silent_since=silent,
        lag=lag,
        late_unknown=late,
        next_seq=position,
    )


def known_prefix(
    events: Sequence[Any],
    known: set[str],
    *,
    start_seq: int | None,
    now: datetime,
    next_after: int | None,
    complete: bool,
) -> tuple[int | None, datetime | None]:
    """How far every change is in the inbox: ``(seq, until)`` (pure).

    ``until`` is the time before which every change is known: the first missing
    event's ``occurred_at``, or ``now`` when the whole feed is known.
    """
    seq = start_seq
    for event in events:
        if event.id not in known:
            return seq, event.occurred_at
        seq = feed_position(event) or seq
    if complete:
        if next_after is not None:
            seq = next_after if seq is None else max(seq, next_after)
        return seq, now
    return seq, (events[-1].occurred_at if events else None)
