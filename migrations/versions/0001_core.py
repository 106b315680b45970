"""core: the audit trail

Revision ID: 0001_core
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0001_core"
down_revision = None
branch_labels = ("core",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("occurred_at", idb.UTCDateTime(), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("subject_type", sa.String(64)),
        sa.Column("subject_id", sa.String(255)),
        sa.Column("tenant_id", sa.String(128)),
        sa.Column("source", sa.String(32)),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("details", idb.JSONType, nullable=False),
        sa.Column("correlation_id", sa.String(64)),
        sa.Column("message", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_provider_occurred_at", "audit_events", ["provider", "occurred_at"]
    )
    op.create_index("ix_audit_events_action_occurred_at", "audit_events", ["action", "occurred_at"])


def downgrade() -> None:
    op.drop_table("audit_events")
