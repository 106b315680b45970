"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from idis.integrations.db._engine import create_db_engine
from idis.integrations.db._migrate import (
    VERSION_TABLE,
    current_revisions,
    head_revisions,
    upgrade,
)
from idis.integrations.db._models import metadata


def _diff(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
            )
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_models(db_url: str) -> None:
    """An empty database upgraded to head has no difference from the models."""
    assert [] == _diff(db_url)
    assert head_revisions() == current_revisions(db_url)


def test_version_table_is_our_own(sqlite_url: str) -> None:
    """The library records its revision in its own table, not alembic_version."""
    engine = create_db_engine(sqlite_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()

    assert VERSION_TABLE in tables
    assert "alembic_version" not in tables


def test_upgrade_is_idempotent(sqlite_url: str) -> None:
    """Running db upgrade twice changes nothing."""
    first = current_revisions(sqlite_url)
    upgrade(sqlite_url)

    assert first == current_revisions(sqlite_url)


@pytest.mark.postgres
def test_drift_detector_detects_a_missing_table(pg_url: str) -> None:
    """The comparison is not vacuous: dropping a table shows up as a difference."""
    engine = create_db_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE audit_events")
    engine.dispose()

    diff = _diff(pg_url)

    assert any("audit_events" in repr(item) for item in diff)
