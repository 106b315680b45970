"""enrichment: count lapsed leases taken over (enrichment_requests.takeovers)

Revision ID: 0011_enrichment_takeovers
Revises: 0010_enrichment_no_match
Create Date: 2026-12-07

``enrichment_requests.takeovers`` counts the leases of a deferred request that
lapsed and were taken over: each time, the worker refreshing it stopped without
settling it (killed, crashed). A request whose refresh keeps killing its worker
is given up at ``IDIS_ENRICHMENT_MAX_TAKEOVERS`` instead of crash-looping the
worker for ever with every other stale subject of its provider behind it.

Expand-only: existing rows carry over with 0 (the server default), and rows the
previous version inserts without naming the column get it too. Code of the
previous version neither reads nor writes the column, so replicas of both
versions can run during a rolling deploy (the old ones take lapsed leases over
without counting them, as they always did).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_enrichment_takeovers"
down_revision = "0010_enrichment_no_match"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL with a constant default: PostgreSQL fills existing rows without
    # rewriting the table, and SQLite accepts it in a plain ADD COLUMN.
    op.add_column(
        "enrichment_requests",
        sa.Column("takeovers", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("enrichment_requests") as batch:
        batch.drop_column("takeovers")
