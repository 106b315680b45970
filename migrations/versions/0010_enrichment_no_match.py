"""enrichment: remember a "no match" answer (enrichment_cache.no_match_at)

Revision ID: 0010_enrichment_no_match
Revises: 0006_enrichment
Create Date: 2026-12-06

Expand-only: one nullable column. Code of the previous version neither reads
nor writes it, so replicas of both versions can run during a rolling deploy;
the old code simply keeps asking the provider about subjects it does not know.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0010_enrichment_no_match"
down_revision = "0006_enrichment"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrichment_cache") as batch:
        batch.add_column(sa.Column("no_match_at", idb.UTCDateTime()))


def downgrade() -> None:
    with op.batch_alter_table("enrichment_cache") as batch:
        batch.drop_column("no_match_at")
