"""resilience: provider health samples

Revision ID: 0002_resilience
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0002_resilience"
down_revision = "0001_core"
branch_labels = ("resilience",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provider_health_samples",
        sa.Column("id", idb.BigIntPK, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("sampled_at", idb.UTCDateTime(), nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("breaker_state", sa.String(16), nullable=False),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("error_rate", sa.Float(), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("paused_for", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_health_samples")),
    )
    op.create_index(
        "ix_provider_health_samples_provider_sampled_at",
        "provider_health_samples",
        ["provider", "sampled_at"],
    )


def downgrade() -> None:
    op.drop_table("provider_health_samples")
