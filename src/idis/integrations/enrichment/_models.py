"""Tables owned by enrichment: defects, the per-subject cache, and deferred requests.

``defects`` is the table RB-09 runs SQL against verbatim (Recovery 4), so its
column names and values are part of the contract: ``defect_type``
('STALE_ENRICHMENT'), ``provider``, ``status`` ('OPEN', 'RESOLVED'),
``resolution`` and ``created_at`` (``timestamptz`` on PostgreSQL). At most one
defect per (type, provider, subject) is OPEN at a time: a partial unique index
(``WHERE status = 'OPEN'``, on PostgreSQL and SQLite alike) makes creation
idempotent under concurrency, with ``INSERT ... ON CONFLICT DO NOTHING``.

``enrichment_cache`` holds, per subject and primary provider, the last good
result (which provider served it, when) and whether the subject is stale now.

``enrichment_requests`` holds deferred enrichments. At most one request per
subject is pending (another partial unique index), so a subject that fails a
hundred times during an outage is refreshed once after it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from ..db._base import Base, BigIntPK, JSONType, UTCDateTime

__all__ = [
    "DEFECT_OPEN",
    "DEFECT_RESOLVED",
    "NO_MATCH_RESOLUTION",
    "RECOVERY_RESOLUTION",
    "REQUEST_DONE",
    "REQUEST_FAILED",
    "REQUEST_PENDING",
    "STALE_ENRICHMENT",
    "SUBJECT_COLUMNS",
    "Defect",
    "EnrichmentCacheEntry",
    "EnrichmentRequest",
]

#: ``defects.defect_type`` for a subject whose enrichment could not be refreshed (RB-09).
STALE_ENRICHMENT = "STALE_ENRICHMENT"
#: ``defects.status`` values RB-09's SQL uses.
DEFECT_OPEN = "OPEN"
DEFECT_RESOLVED = "RESOLVED"
#: The resolution RB-09 Recovery 4 writes; the library writes the same words.
RECOVERY_RESOLUTION = "Data refreshed after provider recovery"
#: The resolution of a subject that was never enriched and that every provider, asked
#: again after the outage, answered "no match": nothing stale is left to show.
NO_MATCH_RESOLUTION = "No match at the provider after recovery"
#: ``enrichment_requests.status`` values.
REQUEST_PENDING = "pending"
REQUEST_DONE = "done"
REQUEST_FAILED = "failed"

_OPEN_ONLY = text("status = 'OPEN'")
_PENDING_ONLY = text("status = 'pending'")
#: The columns naming one subject under its primary provider (``SubjectKey``'s fields).
SUBJECT_COLUMNS = ("provider", "tenant_id", "subject_type", "subject_id")


class Defect(Base):
    """A data-quality defect users can see, e.g. a claim whose enrichment is stale.

    ``status`` is the source of truth: RB-09's ``UPDATE`` sets ``status`` and
    ``resolution`` but not ``resolved_at``, so a RESOLVED defect may have no
    ``resolved_at``. The library sets ``resolved_at`` whenever it resolves one.
    """

    __tablename__ = "defects"
    __table_args__ = (
        CheckConstraint("status IN ('OPEN', 'RESOLVED')", name="status"),
        Index(
            "uq_defects_open_subject",
            "defect_type",
            *SUBJECT_COLUMNS,
            unique=True,
            postgresql_where=_OPEN_ONLY,
            sqlite_where=_OPEN_ONLY,
        ),
        # RB-09 Recovery 4 and the --since windows filter on these three.
        Index(
            "ix_defects_defect_type_provider_created_at", "defect_type", "provider", "created_at"
        ),
        Index("ix_defects_tenant_id_status", "tenant_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: ``STALE_ENRICHMENT``.
    defect_type: Mapped[str] = mapped_column(String(32), nullable=False)
    #: Provider whose data is affected (the primary of the enrichment's provider list).
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Tenant the subject belongs to.
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    #: Kind of subject (``claim``).
    subject_type: Mapped[str] = mapped_column(String(64), nullable=False)
    #: The subject's id.
    subject_id: Mapped[str] = mapped_column(String(255), nullable=False)
    #: ``OPEN`` or ``RESOLVED``.
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=DEFECT_OPEN)
    #: Why it was resolved, e.g. ``Data refreshed after provider recovery``.
    resolution: Mapped[str | None] = mapped_column(Text)
    #: What went stale and why (no secrets): origin, error type, cached age.
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    #: When the defect was opened.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: When the library resolved it (NULL if resolved by hand-written SQL).
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EnrichmentCacheEntry(Base):
    """One subject's last good enrichment and its staleness, per primary provider."""

    __tablename__ = "enrichment_cache"
    __table_args__ = (
        UniqueConstraint(*SUBJECT_COLUMNS, name="uq_enrichment_cache_subject"),
        Index(
            "ix_enrichment_cache_provider_stale_last_failure_at",
            "provider",
            "stale",
            "last_failure_at",
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Primary provider the enrichment was asked of (the key, whoever served it).
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    subject_type: Mapped[str] = mapped_column(String(64), nullable=False)
    subject_id: Mapped[str] = mapped_column(String(255), nullable=False)
    #: Provider that served the cached data (the primary or a fallback).
    served_by: Mapped[str | None] = mapped_column(String(64))
    #: The last good result (NULL while the subject was never enriched).
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: When the cached data was fetched.
    fetched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Whether the last enrichment attempt failed (the data, if any, is old).
    stale: Mapped[bool] = mapped_column(nullable=False, default=False)
    #: When the subject went stale (first failure after the last success).
    stale_since: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When enrichment last failed for this subject.
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Bounded description of the last failure (error types per provider; no secrets).
    last_error: Mapped[str | None] = mapped_column(String(255))
    #: When every provider of the chain last answered "no match" (404/410); cleared by
    #: a success. Within ``IDIS_ENRICHMENT_NO_MATCH_TTL`` the answer is given again
    #: without asking (a no-match is an answer about the subject, not a failure).
    no_match_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class EnrichmentRequest(Base):
    """A deferred enrichment, run by the deferred worker once a provider is back."""

    __tablename__ = "enrichment_requests"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'done', 'failed')", name="status"),
        Index(
            "uq_enrichment_requests_pending_subject",
            *SUBJECT_COLUMNS,
            unique=True,
            postgresql_where=_PENDING_ONLY,
            sqlite_where=_PENDING_ONLY,
        ),
        Index(
            "ix_enrichment_requests_status_provider_next_attempt_at",
            "status",
            "provider",
            "next_attempt_at",
        ),
        Index("ix_enrichment_requests_provider_created_at", "provider", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Primary provider (the head of ``providers``).
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False)
    subject_type: Mapped[str] = mapped_column(String(64), nullable=False)
    subject_id: Mapped[str] = mapped_column(String(255), nullable=False)
    #: The ordered provider list to try when the request runs.
    providers: Mapped[list[str]] = mapped_column(JSONType, nullable=False, default=list)
    #: ``pending`` (waiting or leased), ``done`` or ``failed`` (the provider rejected it).
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=REQUEST_PENDING)
    #: Refresh attempts actually made (waiting for a provider to recover makes none).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: Leases of it taken over after they lapsed: each time, the worker holding it
    #: stopped without settling it (killed, crashed). At ``IDIS_ENRICHMENT_MAX_TAKEOVERS``
    #: the request is given up (``failed``), so one that kills its worker cannot
    #: crash-loop it for ever (migration 0011_enrichment_takeovers).
    takeovers: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default=text("0")
    )
    #: Earliest time the next attempt may run (backoff with jitter).
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: Worker holding the lease, if any.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    #: When the lease lapses and another worker may take the request.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Bounded description of the last failure (no secrets).
    last_error: Mapped[str | None] = mapped_column(Text)
    #: Provider that finally served it.
    served_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
