"""Migration 0009: integer poll cursors carry over as opaque text, and back."""

from __future__ import annotations

from alembic import command
from sqlalchemy import text

from idis.integrations.db._engine import create_db_engine
from idis.integrations.db._migrate import alembic_config, upgrade


def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]
    finally:
        engine.dispose()


def _execute(url: str, statement: str) -> None:
    engine = create_db_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def test_integer_cursors_become_text_and_come_back(db_url: str) -> None:
    """A seq cursor written before 0009 is its decimal text after; a downgrade restores it."""
    command.downgrade(alembic_config(db_url), "0008_sync_order_key")
    _execute(
        db_url,
        "INSERT INTO sync_cursors (provider, stream, after_seq, watermark, moved_by, updated_at) "
        "VALUES ('crm', 'changes', 9000000000042, NULL, NULL, CURRENT_TIMESTAMP), "
        "('docs', 'changes', NULL, CURRENT_TIMESTAMP, 'failover', CURRENT_TIMESTAMP)",
    )

    upgrade(db_url)
    after_upgrade = _rows(db_url, "SELECT provider, position FROM sync_cursors ORDER BY provider")
    _execute(
        db_url,
        "INSERT INTO sync_cursors (provider, stream, position, updated_at) "
        "VALUES ('hubspot', 'changes', 'hs1:1764000000000:0:', CURRENT_TIMESTAMP)",
    )
    command.downgrade(alembic_config(db_url), "0008_sync_order_key")
    after_downgrade = _rows(
        db_url, "SELECT provider, after_seq FROM sync_cursors ORDER BY provider"
    )

    assert [("crm", "9000000000042"), ("docs", None)] == after_upgrade
    assert [("crm", 9000000000042), ("docs", None), ("hubspot", None)] == after_downgrade
