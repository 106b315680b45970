"""reconcile: run checkpoints

Revision ID: 0007_reconcile
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0007_reconcile"
down_revision = "0001_core"
branch_labels = ("reconcile",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconcile_checkpoints",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("since", idb.UTCDateTime(), nullable=False),
        sa.Column("cursor", sa.Text()),
        sa.Column("last_seq", sa.BigInteger()),
        sa.Column("last_occurred_at", idb.UTCDateTime()),
        sa.Column("first_failed_at", idb.UTCDateTime()),
        sa.Column("pages", sa.Integer(), nullable=False),
        sa.Column("fetched", sa.BigInteger(), nullable=False),
        sa.Column("already_applied", sa.BigInteger(), nullable=False),
        sa.Column("applied", sa.BigInteger(), nullable=False),
        sa.Column("superseded", sa.BigInteger(), nullable=False),
        sa.Column("ignored", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("started_at", idb.UTCDateTime(), nullable=False),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.Column("covered_until", idb.UTCDateTime()),
        sa.Column("finished_at", idb.UTCDateTime()),
        sa.Column("error", sa.Text()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconcile_checkpoints")),
        sa.UniqueConstraint("run_id", name=op.f("uq_reconcile_checkpoints_run_id")),
    )
    op.create_index(
        "ix_reconcile_checkpoints_provider_status",
        "reconcile_checkpoints",
        ["provider", "status"],
    )


def downgrade() -> None:
    op.drop_index("ix_reconcile_checkpoints_provider_status", table_name="reconcile_checkpoints")
    op.drop_table("reconcile_checkpoints")
