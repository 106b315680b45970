"""outbox: lease generation (fencing token) checked by every settle

Revision ID: 0009_outbox_lease_generation
Revises: 0003_outbox
Create Date: 2026-12-06

``outbox_messages.lease_generation`` counts the leases a message has had:
every lease bumps it, and every settle (delivered, retry, dead, give-back) is
conditioned on the generation the worker leased, so a worker whose lease
lapsed and was taken over changes nothing when it settles late.

Expand-only: existing rows carry over with generation 0 (the server default).
Code of the previous version neither reads nor writes the column, so replicas
of both versions can run during a rolling deploy (the old ones without fencing).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_outbox_lease_generation"
down_revision = "0003_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL with a constant default: PostgreSQL fills existing rows without
    # rewriting the table, and SQLite accepts it in a plain ADD COLUMN.
    op.add_column(
        "outbox_messages",
        sa.Column("lease_generation", sa.Integer(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("lease_generation")
