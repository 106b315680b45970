"""sync: inbox, record versions, poll cursors, mode state, sync timeline

Revision ID: 0004_sync
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0004_sync"
down_revision = "0001_core"
branch_labels = ("sync",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_inbox",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(128), nullable=False),
        sa.Column("record_id", sa.String(255)),
        sa.Column("tenant_id", sa.String(128)),
        sa.Column("seq", sa.BigInteger()),
        sa.Column("version", sa.BigInteger()),
        sa.Column("occurred_at", idb.UTCDateTime()),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("received_at", idb.UTCDateTime(), nullable=False),
        sa.Column("webhook_at", idb.UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_inbox")),
        sa.UniqueConstraint("provider", "event_id", name=op.f("uq_sync_inbox_provider_event_id")),
    )
    op.create_index("ix_sync_inbox_provider_webhook_at", "sync_inbox", ["provider", "webhook_at"])
    op.create_table(
        "sync_record_versions",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("record_id", sa.String(255), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_record_versions")),
        sa.UniqueConstraint(
            "provider", "record_id", name=op.f("uq_sync_record_versions_provider_record_id")
        ),
    )
    op.create_table(
        "sync_cursors",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("after_seq", sa.BigInteger()),
        sa.Column("watermark", idb.UTCDateTime()),
        sa.Column("moved_by", sa.String(32)),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_cursors")),
        sa.UniqueConstraint("provider", "stream", name=op.f("uq_sync_cursors_provider_stream")),
    )
    op.create_table(
        "sync_provider_state",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("changed_at", idb.UTCDateTime(), nullable=False),
        sa.Column("override", sa.String(16)),
        sa.Column("healthy_since", idb.UTCDateTime()),
        sa.Column("confirmed_seq", sa.BigInteger()),
        sa.Column("confirmed_at", idb.UTCDateTime()),
        sa.Column("sentinel_seq", sa.BigInteger()),
        sa.Column("sentinel_at", idb.UTCDateTime()),
        sa.Column("silent_since", idb.UTCDateTime()),
        sa.Column("lag_seconds", sa.Float()),
        sa.Column("signature_spike_at", idb.UTCDateTime()),
        sa.Column("polled_at", idb.UTCDateTime()),
        sa.Column("leader", sa.String(128)),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_provider_state")),
        sa.UniqueConstraint("provider", name=op.f("uq_sync_provider_state_provider")),
    )
    op.create_table(
        "sync_coverage",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("start_at", idb.UTCDateTime(), nullable=False),
        sa.Column("end_at", idb.UTCDateTime(), nullable=False),
        sa.Column("recorded_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_coverage")),
    )
    op.create_index(
        "ix_sync_coverage_provider_source_end_at",
        "sync_coverage",
        ["provider", "source", "end_at"],
    )
    op.create_index("ix_sync_coverage_provider_start_at", "sync_coverage", ["provider", "start_at"])


def downgrade() -> None:
    op.drop_index("ix_sync_coverage_provider_start_at", table_name="sync_coverage")
    op.drop_index("ix_sync_coverage_provider_source_end_at", table_name="sync_coverage")
    op.drop_table("sync_coverage")
    op.drop_table("sync_provider_state")
    op.drop_table("sync_cursors")
    op.drop_table("sync_record_versions")
    op.drop_index("ix_sync_inbox_provider_webhook_at", table_name="sync_inbox")
    op.drop_table("sync_inbox")
