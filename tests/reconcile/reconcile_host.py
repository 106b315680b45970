"""A stand-in for the host service's handlers, importable by a CLI subprocess.

``IDIS_HANDLERS=reconcile_host:register`` (with this directory on PYTHONPATH)
registers one handler for every event type that writes a row per application
into ``rc_host_applied`` inside the inbox's transaction, so a test can count
applications, including across a killed process.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from idis.integrations.sync._inbox import HandlerRegistry

TABLE = "rc_host_applied"


def ddl(dialect: str) -> str:
    """The host table's DDL for ``dialect``."""
    key = "BIGSERIAL PRIMARY KEY" if dialect == "postgresql" else "INTEGER PRIMARY KEY"
    return (
        f"CREATE TABLE IF NOT EXISTS {TABLE} (id {key}, event_id VARCHAR(255) NOT NULL, "
        "event_type VARCHAR(64), record_id VARCHAR(255), version BIGINT)"
    )


def create_table(engine: Engine) -> None:
    """Create the host table if missing."""
    with engine.begin() as conn:
        conn.execute(text(ddl(engine.dialect.name)))


def apply(session: Session, event: Any) -> None:
    """The handler: one row per application."""
    session.execute(
        text(
            f"INSERT INTO {TABLE} (event_id, event_type, record_id, version) "
            "VALUES (:e, :t, :r, :v)"
        ),
        {"e": event.id, "t": event.type, "r": event.record_id, "v": event.version},
    )


def register(registry: HandlerRegistry) -> None:
    """``IDIS_HANDLERS`` entry point: create the table, register the handler."""
    from idis.integrations.config import Settings
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(Settings.from_env().database_url)
    try:
        create_table(engine)
    finally:
        engine.dispose()
    registry.register("*", apply, replace=True)


def applied(engine: Engine) -> list[tuple[str, str]]:
    """``(event_id, event_type)`` of every application, in order."""
    with engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.execute(text(f"SELECT event_id, event_type FROM {TABLE} ORDER BY id"))
        ]


#: Appears in the leaky handler's error; registered as a secret by the test's settings.
LEAKED_SECRET = "sk_live_reconcile_secret_4242"  # a fake, for the leak test
LEAKED_TOKEN = "eyJhbGciOiJIUzI1NiJ9.reconcile.leak"  # same


def register_flaky(registry: HandlerRegistry) -> None:
    """``IDIS_HANDLERS`` entry: like :func:`register`, but rec_2's events always fail."""
    register(registry)

    def flaky(session: Session, event: Any) -> None:
        if event.record_id == "rec_2":
            raise RuntimeError("host rejected rec_2: stage 'zz' unknown")
        apply(session, event)

    registry.register("*", flaky, replace=True)


def register_leaky(registry: HandlerRegistry) -> None:
    """``IDIS_HANDLERS`` entry: rec_1's handler fails with secrets in its message."""
    register(registry)

    def leaky(session: Session, event: Any) -> None:
        if event.record_id == "rec_1":
            raise RuntimeError(
                f"auth failed: key {LEAKED_SECRET} refused, sent Bearer {LEAKED_TOKEN}"
            )
        apply(session, event)

    registry.register("*", leaky, replace=True)
