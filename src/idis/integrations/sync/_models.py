"""Tables owned by sync: the inbox, per-record versions, poll cursors, mode state, coverage.

* ``sync_inbox``: one row per provider event ever handled, whatever channel
  brought it (webhook, poll, replay). The unique ``(provider, event_id)`` key is
  the dedupe: an event is applied at most once. ``webhook_at`` records that the
  webhook channel delivered the event (even after a poll or replay did), which is
  how the sentinel judges webhook health.
* ``sync_record_versions``: the newest version applied per record, so an older
  version arriving after a newer one is recorded but never applied over it.
* ``sync_cursors``: the poller's durable position per provider and stream.
* ``sync_provider_state``: the mode controller's persisted state per provider
  (mode, reason, operator override, webhook health, sentinel position).
* ``sync_coverage``: the sync timeline, intervals covered per provider and source.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..db._base import Base, BigIntPK, UTCDateTime

__all__ = [
    "SyncCoverage",
    "SyncCursor",
    "SyncInbox",
    "SyncProviderState",
    "SyncRecordVersion",
    "seq_of",
]


class SyncInbox(Base):
    """One provider event that reached the library, and what became of it."""

    __tablename__ = "sync_inbox"
    __table_args__ = (
        UniqueConstraint("provider", "event_id"),
        # Serves last_webhook_at(); no other index: each one costs every webhook a write.
        Index("ix_sync_inbox_provider_webhook_at", "provider", "webhook_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Provider name as configured.
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: The provider's event id (the dedupe key with ``provider``).
    event_id: Mapped[str] = mapped_column(String(255), nullable=False)
    #: Event type (``record.updated``...).
    event_type: Mapped[str] = mapped_column(String(128), nullable=False)
    #: Record the event is about.
    record_id: Mapped[str | None] = mapped_column(String(255))
    #: Tenant the record belongs to.
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    #: The provider's position of the event in its change feed.
    seq: Mapped[int | None] = mapped_column(BigInteger)
    #: The record's version after the event.
    version: Mapped[int | None] = mapped_column(BigInteger)
    #: When the provider says the change happened.
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Channel that brought the event first: ``webhook``, ``poll`` or ``replay``.
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    #: ``applied``, ``superseded`` (older than the applied version) or ``ignored`` (no handler).
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: When the event first reached the library.
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: When the webhook channel first delivered the event (None: never by webhook).
    webhook_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


#: The order key's tie-break: compared by code point, never by the database's collation
#: (``COLLATE "C"`` on PostgreSQL; SQLite's default ``BINARY`` already is), so SQL and
#: Python (``providers.OrderKey``) agree.
ORDER_MINOR = String(320).with_variant(String(320, collation="C"), "postgresql")


class SyncRecordVersion(Base):
    """The newest order key applied so far per record (the per-record ordering guard).

    An event is applied only when its key (``providers.order_key``) is greater
    than ``(order_major, order_minor)``; the row is then moved to its key.
    """

    __tablename__ = "sync_record_versions"
    __table_args__ = (UniqueConstraint("provider", "record_id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    record_id: Mapped[str] = mapped_column(String(255), nullable=False)
    #: ``OrderKey.major`` of the newest applied event (a version, or microseconds).
    order_major: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: ``OrderKey.minor`` of it (tie-break; empty for version-ordered providers).
    order_minor: Mapped[str] = mapped_column(ORDER_MINOR, nullable=False, server_default="")
    #: Event that brought that key (its inbox row has the version, tenant and type).
    event_id: Mapped[str] = mapped_column(String(255), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class SyncCursor(Base):
    """Where the poller stands in one provider stream."""

    __tablename__ = "sync_cursors"
    __table_args__ = (UniqueConstraint("provider", "stream"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Stream name (``changes`` for the provider's change feed).
    stream: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Where the next poll starts, as the provider's API states it (opaque text: the
    #: generic feed's seq, a search watermark and paging token...); None: start
    #: from the watermark.
    position: Mapped[str | None] = mapped_column(String(1024))
    #: Newest ``occurred_at`` fetched; the next window starts ``poll_overlap`` before it.
    watermark: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Why the cursor was last moved by something other than a poll (``failover``, ``operator``).
    moved_by: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)

    @property
    def after_seq(self) -> int | None:
        """The position as a generic-feed seq (None when it is not a decimal integer)."""
        return seq_of(self.position)


def seq_of(position: str | None) -> int | None:
    """A cursor position read as the generic feed's seq, or None when it is not one."""
    if position is None or not (position.isascii() and position.isdigit()) or len(position) > 18:
        return None
    return int(position)


class SyncProviderState(Base):
    """The mode controller's state for one provider, shared by every replica."""

    __tablename__ = "sync_provider_state"
    __table_args__ = (UniqueConstraint("provider"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: ``webhook`` or ``polling``.
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    #: Why the mode is what it is (bounded vocabulary, see ``sync.mode.Reason``).
    reason: Mapped[str] = mapped_column(String(32), nullable=False)
    #: When the mode last changed.
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: Operator override from ``sync mode --set``: ``webhook``, ``polling`` or None (automatic).
    override: Mapped[str | None] = mapped_column(String(16))
    #: Since when webhooks have looked healthy without interruption (None: not healthy).
    healthy_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Highest seq up to which every event is known to have arrived by webhook.
    confirmed_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: ``occurred_at`` of the event at ``confirmed_seq`` (or the check time on a quiet feed).
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Where the sentinel reads the change feed from next.
    sentinel_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: When the sentinel last ran.
    sentinel_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: ``occurred_at`` of the oldest change newer than the last one a webhook delivered
    #: (None: webhooks are caught up). Webhook lag is ``now - silent_since``.
    silent_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Webhook lag the sentinel last measured, in seconds.
    lag_seconds: Mapped[float | None] = mapped_column(Float)
    #: When the signature failure rate last crossed the threshold.
    signature_spike_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the poller last completed a poll.
    polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Replica that holds the poller lock (for ``status``), None when nobody does.
    leader: Mapped[str | None] = mapped_column(String(128))
    #: Fencing token: bumped each time a replica takes the leadership (or an operator
    #: overrides the mode). Cursor and mode writes are compare-and-set on it, so a
    #: deposed leader's late writes change nothing.
    leader_epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    #: SQLite leadership lease: the leader renews it every tick; another process may
    #: take over once it has passed (PostgreSQL leads by advisory lock instead).
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class SyncCoverage(Base):
    """One interval of the sync timeline: a channel saw every change between start and end."""

    __tablename__ = "sync_coverage"
    __table_args__ = (
        Index("ix_sync_coverage_provider_source_end_at", "provider", "source", "end_at"),
        Index("ix_sync_coverage_provider_start_at", "provider", "start_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: ``webhook``, ``poll`` or ``replay``.
    source: Mapped[str] = mapped_column(String(16), nullable=False)
    start_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    end_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: When the interval was last extended.
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
