"""The audit trail: who did what to which provider's data, when, and through which channel.

Every state change the runbook cares about writes one row: breaker and mode
transitions, token refreshes and rotations, each replayed event applied by
reconciliation, defects created and resolved, re-queued deliveries. Rows
never hold a secret: ``details`` passes through the same redaction as logs.
"""

from __future__ import annotations

import getpass
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Index, Select, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from ._redact import redact_text, redact_value
from ._timeparse import utcnow
from .db._base import Base, BigIntPK, JSONType, UTCDateTime

_Query = TypeVar("_Query", bound=Select[Any])

__all__ = [
    "AuditEvent",
    "AuditRecord",
    "audit_row",
    "cli_actor",
    "list_audit_events",
    "record_audit",
    "row_fields",
]


def cli_actor() -> str:
    """``cli:<login>``: the actor of the audit rows a person's command writes."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (some containers)
        return "cli:unknown"


class AuditEvent(Base):
    """One audited action."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_provider_occurred_at", "provider", "occurred_at"),
        Index("ix_audit_events_action_occurred_at", "action", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: When the action happened (UTC).
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: Provider the action concerns ("" for library-wide actions).
    provider: Mapped[str] = mapped_column(String(64), nullable=False, default="")
    #: Stable dotted action name, e.g. ``breaker.opened``, ``reconcile.event_applied``.
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Who or what did it: ``system``, ``cli:<user>``, ``worker:<id>``.
    actor: Mapped[str] = mapped_column(String(128), nullable=False, default="system")
    #: Kind of thing acted on (``record``, ``defect``, ``token``, ``outbox_message``...).
    subject_type: Mapped[str | None] = mapped_column(String(64))
    #: Id of the thing acted on.
    subject_id: Mapped[str | None] = mapped_column(String(255))
    #: Tenant, where the action concerns one.
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    #: Channel that brought the data: ``webhook``, ``poll``, ``replay``, ``manual``.
    source: Mapped[str | None] = mapped_column(String(32))
    #: ``ok``, ``failed``, ``skipped``...
    outcome: Mapped[str] = mapped_column(String(32), nullable=False, default="ok")
    #: Free-form, redacted details.
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    #: Correlation id tying rows of one run together (a reconcile run, a drill).
    correlation_id: Mapped[str | None] = mapped_column(String(64))
    #: Human message.
    message: Mapped[str | None] = mapped_column(Text)


def row_fields(view: Any, row: Any) -> dict[str, Any]:
    """The values of ``row``'s columns named like the dataclass ``view``'s fields (a
    ``details`` JSON column copied into a plain dict), to build a read-only view of it."""
    values = {f.name: getattr(row, f.name) for f in fields(view)}
    if "details" in values:
        values["details"] = dict(values["details"] or {})
    return values


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A read-only view of one audit row."""

    id: int
    occurred_at: datetime
    provider: str
    action: str
    actor: str
    subject_type: str | None
    subject_id: str | None
    tenant_id: str | None
    source: str | None
    outcome: str
    details: Mapping[str, Any]
    correlation_id: str | None
    message: str | None

    @classmethod
    def from_row(cls, row: AuditEvent) -> AuditRecord:
        """Build from an ORM row: each field from the column of its name."""
        return cls(**row_fields(cls, row))


def audit_row(
    action: str,
    *,
    provider: str = "",
    actor: str = "system",
    subject_type: str | None = None,
    subject_id: str | None = None,
    tenant_id: str | None = None,
    source: str | None = None,
    outcome: str = "ok",
    details: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
    message: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """Column values for one audit row, redacted; for bulk inserts (``insert(AuditEvent)``)."""
    return {
        "occurred_at": occurred_at or utcnow(),
        "provider": provider,
        "action": action,
        "actor": actor,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "tenant_id": tenant_id,
        "source": source,
        "outcome": outcome,
        "details": redact_value(dict(details or {}), "details"),
        "correlation_id": correlation_id,
        "message": redact_text(message) if message else None,
    }


def record_audit(session: Session, action: str, **fields: Any) -> AuditEvent:
    """Add one audit row to ``session`` (inside the caller's transaction) and return it.

    Takes the keyword arguments of :func:`audit_row`.
    """
    row = AuditEvent(**audit_row(action, **fields))
    session.add(row)
    return row


def list_audit_events(
    session: Session,
    *,
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    actions: Sequence[str] | None = None,
    action_prefix: str | None = None,
    limit: int | None = 1000,
) -> list[AuditRecord]:
    """Audit rows, oldest first, filtered by provider, time window and action."""
    query = _in_window(
        select(AuditEvent).order_by(AuditEvent.occurred_at, AuditEvent.id), provider, since, until
    )
    if actions:
        query = query.where(AuditEvent.action.in_(list(actions)))
    if action_prefix:
        query = query.where(AuditEvent.action.startswith(action_prefix))
    if limit is not None:
        query = query.limit(limit)
    return [AuditRecord.from_row(row) for row in session.scalars(query)]


def recorded_actions(
    session: Session,
    *,
    provider: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[str]:
    """The distinct actions of the audit rows in this window, sorted: what ``--action`` can
    match there."""
    query = select(AuditEvent.action).distinct().order_by(AuditEvent.action)
    return list(session.scalars(_in_window(query, provider, since, until)))


def _in_window(
    query: _Query, provider: str | None, since: datetime | None, until: datetime | None
) -> _Query:
    """``query`` restricted to one provider's rows in [since, until), where given."""
    if provider is not None:
        query = query.where(AuditEvent.provider == provider)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    return query
