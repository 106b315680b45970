"""Tables owned by the outbox: the messages we owe providers, and webhook receivers' state.

``outbox_messages`` holds one row per delivery we owe a provider: a provider
call (``kind="request"``) or an outbound webhook (``kind="webhook"``). Rows are
written inside the caller's own transaction, leased by workers, and end
``delivered`` or ``dead``; they are kept (for idempotency and for ``status``)
until :func:`~idis.integrations.outbox.purge_delivered` removes old delivered ones.

Stored statuses are ``pending``, ``delivered`` and ``dead``. A message is *in
flight* while it is pending under an unexpired lease (``lease_owner``,
``lease_expires_at``): leasing then changes no indexed column, so on
PostgreSQL it is a HOT update that writes no index entry (``fillfactor`` keeps
room on each page for it), and a lapsed lease needs no reclaiming: the
message is simply leasable again. Summaries, metrics and ``outbox status``
report ``in_flight`` as a state of its own.

The indexes are shaped for the worker's hot statements (see ``queries.py``):

* ``ix_outbox_messages_due``: partial on ``status = 'pending'``, on
  ``(provider, id, next_attempt_at)``: leasing walks one provider's pending
  messages oldest first and checks "due?" inside the index, never touching
  delivered or dead rows, nor the heap of a message still backing off;
* ``ix_outbox_messages_ordering``: partial on pending rows with an ordering
  key, so "is there an earlier pending message for this key?" is one probe;
* ``ix_outbox_messages_unsettled``: partial on pending and dead rows by
  ``(provider, status)``: queue counts and re-queues read only that part;
* ``ix_outbox_messages_delivered``: partial on delivered rows by
  ``(provider, delivered_at)``: delivered counts and purges.

A status change is never a HOT update, so it writes an entry in every index
whose predicate the new row meets: settling a delivery writes three (primary
key, idempotency key, delivered). No index covers a column a lease writes.

``outbox_webhook_receivers`` records receivers that answered 410 Gone; the
worker stops delivering to them until ``queue-webhook-retries`` re-activates them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from ..db._base import Base, BigIntPK, JSONType, UTCDateTime

__all__ = [
    "DEAD",
    "DELIVERED",
    "FILLFACTOR",
    "IN_FLIGHT",
    "PENDING",
    "RECEIVER_ACTIVE",
    "RECEIVER_GONE",
    "REPORTED_STATES",
    "STATUSES",
    "OutboxMessageRow",
    "WebhookReceiverRow",
]

#: Owed: new, backing off after a failure, or (under an unexpired lease) in flight.
PENDING = "pending"
#: Not stored: a pending message under an unexpired lease. Summaries and metrics report it.
IN_FLIGHT = "in_flight"
#: The provider accepted it.
DELIVERED = "delivered"
#: Given up on: retries exhausted, rejected by the provider, or its receiver is gone.
DEAD = "dead"
#: Every stored ``outbox_messages.status``.
STATUSES = (PENDING, DELIVERED, DEAD)
#: The states reported to operators (``in_flight`` derived from the lease).
REPORTED_STATES = (PENDING, IN_FLIGHT, DELIVERED, DEAD)
#: How full PostgreSQL packs a page (percent). A batch leases neighbouring rows,
#: and each lease writes a second version of its row on the same page (HOT):
#: the page needs room for a copy of everything it holds, so at most 50.
FILLFACTOR = 45

#: ``outbox_webhook_receivers.status``: deliveries allowed.
RECEIVER_ACTIVE = "active"
#: The receiver answered 410 Gone: deliveries to it stop.
RECEIVER_GONE = "gone"


def _partial(name: str, where: str, *columns: str) -> Index:
    """A partial index, with the same predicate on PostgreSQL and SQLite."""
    predicate = text(where)
    return Index(name, *columns, postgresql_where=predicate, sqlite_where=predicate)


class OutboxMessageRow(Base):
    """One delivery owed to a provider."""

    __tablename__ = "outbox_messages"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'dead')", name="status"),
        UniqueConstraint("idempotency_key"),
        _partial(
            "ix_outbox_messages_due", "status = 'pending'", "provider", "id", "next_attempt_at"
        ),
        _partial(
            "ix_outbox_messages_ordering",
            "status = 'pending' AND ordering_key IS NOT NULL",
            "provider",
            "ordering_key",
            "id",
        ),
        _partial(
            "ix_outbox_messages_unsettled", "status IN ('pending', 'dead')", "provider", "status"
        ),
        _partial(
            "ix_outbox_messages_delivered", "status = 'delivered'", "provider", "delivered_at"
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Provider the message is delivered to (a configured provider name).
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: How it is delivered: ``request`` (a provider call) or ``webhook``.
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    #: Tenant the message concerns, if any.
    tenant_id: Mapped[str | None] = mapped_column(String(128))
    #: Messages sharing (provider, ordering_key) are delivered one at a time, in id order.
    ordering_key: Mapped[str | None] = mapped_column(String(255))
    #: Unique; sent as ``Idempotency-Key`` so the provider applies the message once.
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False)
    #: What to send (kind-specific JSON).
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False)
    #: ``pending``, ``delivered`` or ``dead`` (in flight: pending under an unexpired lease).
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: Delivery attempts started (an attempt that never reached the provider is given back).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: Retries allowed after the first attempt; NULL means the worker's configured default.
    max_retries: Mapped[int | None] = mapped_column(Integer)
    #: Not leased before this time (backoff).
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: Worker holding (or, after a crash, last holding) the lease; cleared when settled.
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    #: When the lease lapses and another worker may take the message.
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Leases taken so far (the fencing token): every lease bumps it, and a
    #: settle applies only under the generation its worker leased.
    lease_generation: Mapped[int] = mapped_column(
        Integer, nullable=False, default=0, server_default=text("0")
    )
    #: Last failure: error type, status code and a redacted message; never a secret.
    last_error: Mapped[str | None] = mapped_column(Text)
    #: When the last attempt started.
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: When the provider accepted it.
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookReceiverRow(Base):
    """State of one outbound webhook receiver: a provider's webhook endpoint."""

    __tablename__ = "outbox_webhook_receivers"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'gone')", name="status"),
        UniqueConstraint("provider", "endpoint"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Provider the receiver belongs to.
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    #: Logical endpoint name (``ProviderSettings.endpoints``), ``webhooks`` by default.
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    #: ``active`` or ``gone``.
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    #: HTTP status that changed the state (410), if any.
    status_code: Mapped[int | None] = mapped_column(Integer)
    #: Why the state changed.
    reason: Mapped[str | None] = mapped_column(Text)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
