"""The table owned by reconciliation: one checkpoint row per reconcile run.

A run's row holds where its replay stands (the provider's opaque cursor) and
its running counts. It is updated in the same transaction as each page's inbox
and audit rows, so a run killed at any instant resumes exactly after the last
page it committed, and the counts never disagree with the data.

The per-record ledger ("which version of each record has the host applied")
is the sync inbox's ``sync_record_versions``; reconciliation reads it rather
than keeping a second copy.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..db._base import Base, BigIntPK, UTCDateTime

__all__ = ["ReconcileCheckpoint"]


class ReconcileCheckpoint(Base):
    """Progress of one reconcile run through a provider's replay."""

    __tablename__ = "reconcile_checkpoints"
    __table_args__ = (
        UniqueConstraint("run_id"),
        Index("ix_reconcile_checkpoints_provider_status", "provider", "status"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Correlation id of the run; also on every audit row the run writes.
    run_id: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Provider name as configured.
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: ``running`` (in progress, or crashed: resumable), ``completed`` or ``abandoned``.
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: Start of the replayed window.
    since: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: The provider's cursor after the last committed page (None: start of the window).
    cursor: Mapped[str | None] = mapped_column(Text)
    #: Sequence number of the last event of the last committed page.
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    #: ``occurred_at`` of that event.
    last_occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: ``occurred_at`` of the oldest event whose handler failed (coverage stops there).
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Pages committed.
    pages: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: Events fetched from the replay API.
    fetched: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: Events skipped because webhook, poll or an earlier replay had them.
    already_applied: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: Events applied through the host's handlers by this run.
    applied: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: Events older than a version of their record already applied (recorded, not applied).
    superseded: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: Events of a type no handler takes (recorded, not applied).
    ignored: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: Events whose handler failed (not recorded; the next run retries them).
    failed: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    #: When the run started.
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: When the run last committed a page.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: Upper end of the window the run covered (set when it completes).
    covered_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the run finished.
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: The last error that interrupted the run (redacted; no secrets).
    error: Mapped[str | None] = mapped_column(Text)
