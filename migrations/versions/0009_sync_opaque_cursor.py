"""sync: the poller's cursor is opaque text (the provider's token), not a feed seq

Revision ID: 0009_sync_opaque_cursor
Revises: 0008_sync_order_key
Create Date: 2026-12-06

``sync_cursors.after_seq`` (the generic feed's integer ``seq``) becomes
``position``: whatever the provider's API gives as its position (a feed seq,
a search watermark with a paging token, a SOQL keyset), stored and handed back
as text. Existing cursors carry over as the decimal text of their seq, which is
what the generic pack reads back. Downgrade keeps the positions that are
decimal integers and drops the others (the poller then starts from the
cursor's watermark).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_sync_opaque_cursor"
down_revision = "0008_sync_order_key"
branch_labels = None
depends_on = None

_TABLE = sa.table(
    "sync_cursors",
    sa.column("id", sa.BigInteger),
    sa.column("after_seq", sa.BigInteger),
    sa.column("position", sa.String(1024)),
)


def upgrade() -> None:
    with op.batch_alter_table("sync_cursors") as batch:
        batch.add_column(sa.Column("position", sa.String(1024), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_TABLE.c.id, _TABLE.c.after_seq).where(_TABLE.c.after_seq.is_not(None))
    ).all()
    if rows:
        conn.execute(
            _TABLE.update()
            .where(_TABLE.c.id == sa.bindparam("row_id"))
            .values(position=sa.bindparam("text")),
            [{"row_id": row_id, "text": str(seq)} for row_id, seq in rows],
        )
    with op.batch_alter_table("sync_cursors") as batch:
        batch.drop_column("after_seq")


def downgrade() -> None:
    with op.batch_alter_table("sync_cursors") as batch:
        batch.add_column(sa.Column("after_seq", sa.BigInteger(), nullable=True))
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(_TABLE.c.id, _TABLE.c.position).where(_TABLE.c.position.is_not(None))
    ).all()
    numeric = [
        {"row_id": row_id, "seq": int(text)}
        for row_id, text in rows
        if text.isascii() and text.isdigit() and len(text) < 19
    ]
    if numeric:
        conn.execute(
            _TABLE.update()
            .where(_TABLE.c.id == sa.bindparam("row_id"))
            .values(after_seq=sa.bindparam("seq")),
            numeric,
        )
    with op.batch_alter_table("sync_cursors") as batch:
        batch.drop_column("position")
