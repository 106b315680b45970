"""enrichment: defects, enrichment cache, deferred enrichment requests

Revision ID: 0006_enrichment
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0006_enrichment"
down_revision = "0001_core"
branch_labels = ("enrichment",)
depends_on = None

_OPEN_ONLY = sa.text("status = 'OPEN'")
_PENDING_ONLY = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_table(
        "defects",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("defect_type", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("subject_type", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("resolution", sa.Text()),
        sa.Column("details", idb.JSONType, nullable=False),
        sa.Column("created_at", idb.UTCDateTime(), nullable=False),
        sa.Column("resolved_at", idb.UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_defects")),
        sa.CheckConstraint("status IN ('OPEN', 'RESOLVED')", name=op.f("ck_defects_status")),
    )
    # At most one OPEN defect per (type, provider, subject): creation is idempotent.
    op.create_index(
        "uq_defects_open_subject",
        "defects",
        ["defect_type", "provider", "tenant_id", "subject_type", "subject_id"],
        unique=True,
        postgresql_where=_OPEN_ONLY,
        sqlite_where=_OPEN_ONLY,
    )
    op.create_index(
        "ix_defects_defect_type_provider_created_at",
        "defects",
        ["defect_type", "provider", "created_at"],
    )
    op.create_index("ix_defects_tenant_id_status", "defects", ["tenant_id", "status"])

    op.create_table(
        "enrichment_cache",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("subject_type", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(255), nullable=False),
        sa.Column("served_by", sa.String(64)),
        sa.Column("data", idb.JSONType),
        sa.Column("fetched_at", idb.UTCDateTime()),
        sa.Column("stale", sa.Boolean(), nullable=False),
        sa.Column("stale_since", idb.UTCDateTime()),
        sa.Column("last_failure_at", idb.UTCDateTime()),
        sa.Column("last_error", sa.String(255)),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrichment_cache")),
        sa.UniqueConstraint(
            "provider",
            "tenant_id",
            "subject_type",
            "subject_id",
            name=op.f("uq_enrichment_cache_subject"),
        ),
    )
    op.create_index(
        "ix_enrichment_cache_provider_stale_last_failure_at",
        "enrichment_cache",
        ["provider", "stale", "last_failure_at"],
    )

    op.create_table(
        "enrichment_requests",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("subject_type", sa.String(64), nullable=False),
        sa.Column("subject_id", sa.String(255), nullable=False),
        sa.Column("providers", idb.JSONType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", idb.UTCDateTime(), nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", idb.UTCDateTime()),
        sa.Column("last_error", sa.Text()),
        sa.Column("served_by", sa.String(64)),
        sa.Column("created_at", idb.UTCDateTime(), nullable=False),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.Column("completed_at", idb.UTCDateTime()),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrichment_requests")),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'failed')", name=op.f("ck_enrichment_requests_status")
        ),
    )
    # One pending request per subject: a subject deferred many times refreshes once.
    op.create_index(
        "uq_enrichment_requests_pending_subject",
        "enrichment_requests",
        ["provider", "tenant_id", "subject_type", "subject_id"],
        unique=True,
        postgresql_where=_PENDING_ONLY,
        sqlite_where=_PENDING_ONLY,
    )
    op.create_index(
        "ix_enrichment_requests_status_provider_next_attempt_at",
        "enrichment_requests",
        ["status", "provider", "next_attempt_at"],
    )
    op.create_index(
        "ix_enrichment_requests_provider_created_at",
        "enrichment_requests",
        ["provider", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("enrichment_requests")
    op.drop_table("enrichment_cache")
    op.drop_table("defects")
