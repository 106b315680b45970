"""Alembic environment for idis-integrations' own tables.

Uses its own version table so it coexists with the host service's alembic
history in the same database.
"""

from __future__ import annotations

from alembic import context

from idis.integrations.db._engine import create_db_engine
from idis.integrations.db._migrate import VERSION_TABLE
from idis.integrations.db._models import metadata

config = context.config
url = config.attributes.get("idis_url") or config.get_main_option("sqlalchemy.url")
connection = config.attributes.get("connection")


def _run(conn: object) -> None:
    context.configure(
        connection=conn,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    engine = create_db_engine(str(url))
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()
