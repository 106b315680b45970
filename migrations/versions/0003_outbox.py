"""outbox: messages owed to providers, outbound webhook receivers

Revision ID: 0003_outbox
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0003_outbox"
down_revision = "0001_core"
branch_labels = ("outbox",)
depends_on = None

_PENDING_ONLY = sa.text("status = 'pending'")
_UNSETTLED = sa.text("status IN ('pending', 'dead')")
_DELIVERED_ONLY = sa.text("status = 'delivered'")
_PENDING_KEYED = sa.text("status = 'pending' AND ordering_key IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(128)),
        sa.Column("ordering_key", sa.String(255)),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("payload", idb.JSONType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer()),
        sa.Column("next_attempt_at", idb.UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", idb.UTCDateTime()),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_attempt_at", idb.UTCDateTime()),
        sa.Column("created_at", idb.UTCDateTime(), nullable=False),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.Column("delivered_at", idb.UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_outbox_messages_idempotency_key")),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'dead')",
            name=op.f("ck_outbox_messages_status"),
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Room on each page for HOT updates: a lease writes a second version of
        # its row on the same page without touching any index, and a batch
        # leases neighbouring rows, so a page needs room for a copy of all it
        # holds (see outbox/models.py).
        op.execute("ALTER TABLE outbox_messages SET (fillfactor = 45)")
    op.create_index(
        "ix_outbox_messages_due",
        "outbox_messages",
        ["provider", "id", "next_attempt_at"],
        postgresql_where=_PENDING_ONLY,
        sqlite_where=_PENDING_ONLY,
    )
    op.create_index(
        "ix_outbox_messages_ordering",
        "outbox_messages",
        ["provider", "ordering_key", "id"],
        postgresql_where=_PENDING_KEYED,
        sqlite_where=_PENDING_KEYED,
    )
    op.create_index(
        "ix_outbox_messages_unsettled",
        "outbox_messages",
        ["provider", "status"],
        postgresql_where=_UNSETTLED,
        sqlite_where=_UNSETTLED,
    )
    op.create_index(
        "ix_outbox_messages_delivered",
        "outbox_messages",
        ["provider", "delivered_at"],
        postgresql_where=_DELIVERED_ONLY,
        sqlite_where=_DELIVERED_ONLY,
    )

    op.create_table(
        "outbox_webhook_receivers",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("reason", sa.Text()),
        sa.Column("changed_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_webhook_receivers")),
        sa.UniqueConstraint(
            "provider", "endpoint", name=op.f("uq_outbox_webhook_receivers_provider_endpoint")
        ),
        sa.CheckConstraint(
            "status IN ('active', 'gone')", name=op.f("ck_outbox_webhook_receivers_status")
        ),
    )


def downgrade() -> None:
    op.drop_table("outbox_webhook_receivers")
    op.drop_table("outbox_messages")
