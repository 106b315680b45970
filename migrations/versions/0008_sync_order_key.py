"""sync: per-record order keys in the version ledger; leader epoch and lease

Revision ID: 0008_sync_order_key
Revises: 0004_sync
Create Date: 2026-12-01

The ledger (``sync_record_versions``) kept one integer per record: the applied
event's version, or its feed ``seq`` when the provider sent no version. It now
keeps the event's order key ``(order_major, order_minor)`` (see
``idis.integrations.providers._order``). Existing rows carry over:

* an event that had a version: ``(version, '')``, the ``version`` rule;
* an event without one (the row held its seq): the ``modified`` rule, the only
  one such a provider can run under now: ``(occurred_at in microseconds,
  '<seq, 20 digits>:<event id>')``.

``sync_provider_state`` gains the leader epoch (fencing token) and the SQLite
leadership lease.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0008_sync_order_key"
down_revision = "0004_sync"
branch_labels = None
depends_on = None

_MINOR = sa.String(320).with_variant(sa.String(320, collation="C"), "postgresql")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BATCH = 1000


def _micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _carry_over_unversioned(conn: sa.Connection) -> None:
    """Rows whose event had no version: from its seq to the ``modified`` rule's key."""
    meta = sa.MetaData()
    versions = sa.Table(
        "sync_record_versions",
        meta,
        sa.Column("id", sa.BigInteger),
        sa.Column("provider", sa.String(64)),
        sa.Column("event_id", sa.String(255)),
        sa.Column("order_major", sa.BigInteger),
        sa.Column("order_minor", sa.String(320)),
    )
    inbox = sa.Table(
        "sync_inbox",
        meta,
        sa.Column("provider", sa.String(64)),
        sa.Column("event_id", sa.String(255)),
        sa.Column("seq", sa.BigInteger),
        sa.Column("version", sa.BigInteger),
        sa.Column("occurred_at", idb.UTCDateTime()),
    )
    query = (
        sa.select(versions.c.id, inbox.c.event_id, inbox.c.seq, inbox.c.occurred_at)
        .select_from(
            versions.join(
                inbox,
                sa.and_(
                    inbox.c.provider == versions.c.provider,
                    inbox.c.event_id == versions.c.event_id,
                ),
            )
        )
        .where(sa.or_(inbox.c.version.is_(None), inbox.c.version <= 0))
        .where(inbox.c.occurred_at.is_not(None))
        .order_by(versions.c.id)
    )
    last = 0
    while True:
        rows = conn.execute(query.where(versions.c.id > last).limit(_BATCH)).all()
        if not rows:
            return
        updates = [
            {
                "row_id": row_id,
                "major": _micros(occurred_at),
                "minor": (event_id if seq is None else f"{seq:020d}:{event_id}")[:320],
            }
            for row_id, event_id, seq, occurred_at in rows
        ]
        conn.execute(
            versions.update()
            .where(versions.c.id == sa.bindparam("row_id"))
            .values(order_major=sa.bindparam("major"), order_minor=sa.bindparam("minor")),
            updates,
        )
        last = rows[-1][0]


def upgrade() -> None:
    with op.batch_alter_table("sync_record_versions") as batch:
        batch.add_column(sa.Column("order_major", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("order_minor", _MINOR, nullable=False, server_default=""))
    op.execute("UPDATE sync_record_versions SET order_major = version")
    _carry_over_unversioned(op.get_bind())
    with op.batch_alter_table("sync_record_versions") as batch:
        batch.alter_column("order_major", existing_type=sa.BigInteger(), nullable=False)
        batch.drop_column("version")
    with op.batch_alter_table("sync_provider_state") as batch:
        batch.add_column(
            sa.Column("leader_epoch", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("lease_until", idb.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sync_provider_state") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("leader_epoch")
    with op.batch_alter_table("sync_record_versions") as batch:
        batch.add_column(sa.Column("version", sa.BigInteger(), nullable=True))
    # Back to one integer: the version, or the seq for rows ordered by time.
    op.execute(
        "UPDATE sync_record_versions SET version = COALESCE(("
        "SELECT CASE WHEN i.version > 0 THEN i.version ELSE i.seq END FROM sync_inbox i "
        "WHERE i.provider = sync_record_versions.provider "
        "AND i.event_id = sync_record_versions.event_id), order_major)"
    )
    with op.batch_alter_table("sync_record_versions") as batch:
        batch.alter_column("version", existing_type=sa.BigInteger(), nullable=False)
        batch.drop_column("order_minor")
        batch.drop_column("order_major")
