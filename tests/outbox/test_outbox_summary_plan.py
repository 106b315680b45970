"""The status read of the first pending message takes the due index, whatever the statistics say.

A backlog analysed while it was all pending, then mostly delivered, made PostgreSQL
answer "the first pending message by id" by walking the primary key through every
delivered row (95 ms at 40,000 delivered: the p99 of ``status`` while workers
drained). These tests reproduce those statistics and read the plan.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from idis.integrations.db._engine import create_db_engine
from idis.integrations.outbox._admin import first_pending_statement, outbox_summary
from idis.integrations.outbox._enqueue import enqueue_many
from idis.integrations.outbox._messages import NewMessage
from idis.integrations.outbox._queries import lease_statement

START = datetime(2026, 1, 1, tzinfo=UTC)


def _backlog(engine: Engine, count: int, delivered: int) -> None:
    """``count`` messages, ids in creation order; statistics taken, then the first delivered."""
    with Session(engine) as session, session.begin():
        for i in range(count):
            enqueue_many(
                session,
                [
                    NewMessage.request(
                        "crm",
                        "record",
                        method="PUT",
                        path_params={"id": f"r{i}"},
                        idempotency_key=f"k{i}",
                    )
                ],
                now=START + timedelta(seconds=i),
            )
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("COMMIT"))
            conn.execute(text("ANALYZE outbox_messages"))
        else:
            conn.execute(text("ANALYZE"))
        conn.commit()
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE outbox_messages SET status = 'delivered', delivered_at = created_at "
                "WHERE id IN (SELECT id FROM outbox_messages ORDER BY id LIMIT :n)"
            ),
            {"n": delivered},
        )


def _plan(engine: Engine, stmt: Any, params: dict[str, Any]) -> str:
    """The database's plan for ``stmt`` with ``params`` (EXPLAIN; nothing runs)."""
    compiled = stmt.compile(dialect=engine.dialect)
    values = compiled.construct_params(params)
    explain = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
    args: Any = values
    if compiled.positiontup is not None:  # SQLite's qmark style
        args = tuple(values[name] for name in compiled.positiontup)
    with engine.connect() as conn:
        return "\n".join(str(row) for row in conn.exec_driver_sql(f"{explain} {compiled}", args))


def test_the_first_pending_probe_uses_the_due_index_after_a_drain(db_url: str) -> None:
    engine = create_db_engine(db_url)
    try:
        _backlog(engine, count=3000, delivered=2500)
        plan = _plan(engine, first_pending_statement(engine.dialect.name), {"p_provider": "crm"})
        assert "ix_outbox_messages_due" in plan, plan
        assert "pk_outbox_messages" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # SQLite: no sort of the backlog
        with Session(engine) as session:
            (row,) = outbox_summary(session, providers=["crm"], detail=False, now=START)
        assert row.pending == 500
        # The 2,501st message, created 2,500 seconds after the first.
        assert row.oldest_pending_at == START + timedelta(seconds=2500)
    finally:
        engine.dispose()


def test_a_lease_finds_the_head_of_the_queue_through_the_due_index_after_a_drain(
    db_url: str,
) -> None:
    engine = create_db_engine(db_url)
    try:
        _backlog(engine, count=3000, delivered=2500)
        dialect = engine.dialect.name
        lease = lease_statement(dialect)
        params = {
            "p_provider": "crm",
            "p_now": START + timedelta(days=1),
            "p_limit": 100,
            "p_owner": "w",
            "p_expires": START + timedelta(days=2),
        }
        plan = _plan(engine, lease, params)
        # The floor's probe (alias "lowest") reads the due index, never the primary key.
        probe = [line for line in plan.splitlines() if "lowest" in line]
        assert probe, plan
        assert all("ix_outbox_messages_due" in line for line in probe), plan
    finally:
        engine.dispose()
