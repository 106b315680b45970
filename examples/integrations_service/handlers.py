"""Event handlers: a CRM record's change becomes the ``deals`` row's change.

The library's inbox calls these with the caller's session, inside the
transaction that also writes the event's inbox row, whichever channel brought
the event (webhook, poll, replay, ``verify-sync --repair``). So a handler never
commits, and applying an event twice is impossible by construction.

The service registers them on its own registry at start; the RB-09 scripts
(another process) load them through ``IDIS_HANDLERS``::

    cd examples
    export PYTHONPATH=. IDIS_HANDLERS=integrations_service.handlers:register
    python scripts/integrations/reconcile.py --provider crm_provider --since "2 hours ago"

Conflict rule: the CRM's state replaces the row's fields only when the event is
newer than the CRM version the row already reflects (``crm_version``: set by
events and by our own pushes) and the row has no unpushed local edit
(``crm_sync_status = 'SYNCED'``). A row that is PENDING or FAILED keeps the
local edit, which the outbox is still pushing. So the provider's webhook for
our own PUT (its echo), however late it arrives, never undoes a newer edit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from idis.integrations._timeparse import utcnow
from idis.integrations.enrichment._syncstatus import SYNC_SYNCED
from idis.integrations.sync._inbox import HandlerRegistry

from .models import Deal

__all__ = ["EVENT_TYPES", "deal_fields", "delete_deal", "register", "upsert_deal"]

#: Event types the service handles.
EVENT_TYPES = ("record.created", "record.updated", "record.deleted")

_NAME_MAX = 200
_STAGE_MAX = 32


def deal_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    """The deal columns present (and well-formed) in a CRM record's ``data``.

    A field that is missing or has the wrong type is left out, so an update keeps
    the row's value rather than storing garbage from a partial record.
    """
    fields: dict[str, Any] = {}
    name = data.get("name")
    if isinstance(name, str) and name.strip():
        fields["name"] = name[:_NAME_MAX]
    stage = data.get("stage")
    if isinstance(stage, str) and stage.strip():
        fields["stage"] = stage[:_STAGE_MAX]
    amount = data.get("amount")
    if isinstance(amount, int | float) and not isinstance(amount, bool):
        fields["amount"] = int(amount)
    return fields


def _insert_ignoring_conflict(session: Session, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT (id) DO NOTHING; True when the row was new."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(Deal)
        .values(values)
        .on_conflict_do_nothing(index_elements=[Deal.id])
        .returning(Deal.id)
    )
    # RETURNING, not rowcount: psycopg reports -1 for this statement, which read as
    # "created" and made every update of an existing deal a no-op on PostgreSQL.
    return session.execute(statement).first() is not None


def upsert_deal(session: Session, event: Any) -> None:
    """Create or update the deal from a ``record.created`` / ``record.updated`` event."""
    fields = deal_fields(event.data)
    now = utcnow()
    # Two channels may bring the first events of a new record at once: the
    # conflict-free insert lets exactly one of them create the row.
    created = _insert_ignoring_conflict(
        session,
        {
            "id": event.record_id,
            "tenant_id": event.tenant_id or "unknown",
            "name": fields.get("name", event.record_id),
            "stage": fields.get("stage"),
            "amount": fields.get("amount"),
            "revision": 0,
            "crm_version": event.version,
            "crm_sync_status": SYNC_SYNCED,
            "crm_synced_at": now,
            "updated_at": now,
        },
    )
    if created:
        return
    row = session.execute(
        select(Deal.crm_sync_status, Deal.crm_version)
        .where(Deal.id == event.record_id)
        .with_for_update()
    ).one_or_none()
    if row is None:  # deleted between the insert attempt and now
        return
    status, known = row
    if event.version is not None and known is not None and event.version <= known:
        return  # an echo of a push (or a change) the row already reflects
    values: dict[str, Any] = {"crm_version": event.version}
    if status == SYNC_SYNCED:
        values.update(fields, crm_synced_at=now, updated_at=now)
        if event.tenant_id:
            values["tenant_id"] = event.tenant_id
    session.execute(update(Deal).where(Deal.id == event.record_id).values(values))


def delete_deal(session: Session, event: Any) -> None:
    """Delete the deal on ``record.deleted``."""
    session.execute(delete(Deal).where(Deal.id == event.record_id))


def register(registry: HandlerRegistry) -> HandlerRegistry:
    """Register the deal handlers on ``registry`` (the ``IDIS_HANDLERS`` entry point).

    Returns:
        The same registry, for chaining.
    """
    registry.register("record.created", upsert_deal)
    registry.register("record.updated", upsert_deal)
    registry.register("record.deleted", delete_deal)
    return registry
