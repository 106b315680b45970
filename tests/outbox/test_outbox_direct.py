"""The lease and the delivered settle on the driver's own cursor (``_worker._Direct``).

While nothing watches SQLAlchemy's execution, the worker sends its two
statements per batch through the driver's cursor; with a cursor-execute
listener (tracing, a test's fault injection) they go through SQLAlchemy, where
the listener sees them. Either way the rows end the same, and a driver error
is the same ``StorageError``.
"""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from idis.integrations._clock import ManualClock
from idis.integrations.exceptions import StorageError
from idis.integrations.outbox._messages import OutboxMessage

from .conftest import Loop, Recorder, outbox_settings, put_messages, table, unavailable

#: What the lease and the delivered settle say, on either database.
LEASE = "LEASE_GENERATION=(OUTBOX_MESSAGES.LEASE_GENERATION +"
DELIVERED = "UPDATE OUTBOX_MESSAGES SET STATUS='DELIVERED'"


def _scenario(loop: Loop, engine: Engine) -> list[tuple[Any, ...]]:
    """Three cycles over keyed messages, some failing once; the rows by idempotency key.

    The same times and jitter on every run: a fresh manual clock, a seeded random source.
    """
    clock = ManualClock()
    put_messages(engine, 12, keys=4, clock=clock)
    failed: set[str] = set()

    def fail(message: OutboxMessage) -> Exception | None:
        seq = message.payload["json"]["data"]["seq"]
        if seq % 5 == 0 and message.idempotency_key not in failed:
            failed.add(message.idempotency_key)
            return unavailable(message)
        return None

    worker = loop.worker(
        engine,
        outbox_settings(),
        deliver=Recorder(fail=fail),
        providers=["crm_provider"],
        clock=clock,
        worker_id="w-direct",
        rng=random.Random(7),
        batch_size=3,
    )
    for _ in range(3):
        worker.run_once()
        clock.advance(2)
    return sorted(
        (
            r.idempotency_key,
            r.status,
            r.attempts,
            r.lease_generation,
            r.lease_owner,
            r.lease_expires_at,
            r.next_attempt_at,
            r.delivered_at,
            r.last_error,
        )
        for r in table(engine)
    )


def test_the_driver_path_and_sqlalchemys_leave_the_same_rows(loop: Loop, engine: Engine) -> None:
    direct = _scenario(loop, engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox_messages"))
    seen: list[str] = []

    def watch(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()).upper())

    event.listen(loop.async_engine(engine).sync_engine, "before_cursor_execute", watch)
    through_sqlalchemy = _scenario(loop, engine)

    assert any(LEASE in s for s in seen), "the listener saw the leases"
    assert any(s.startswith(DELIVERED) for s in seen), "and the delivered settles"
    assert {"delivered", "pending"} == {status for _key, status, *_rest in direct}
    assert any(attempts == 2 for _key, _status, attempts, *_rest in direct), "a retry"
    assert direct == through_sqlalchemy


def test_a_driver_error_is_a_storage_error_and_the_worker_recovers(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """The lease fails in the driver (its table is gone): the same error as through
    SQLAlchemy, and the next cycle, the table back, delivers."""
    put_messages(engine, 3, clock=clock)
    recorder = Recorder()
    worker = loop.worker(
        engine,
        outbox_settings(lease=timedelta(seconds=30)),
        deliver=recorder,
        providers=["crm_provider"],
        clock=clock,
    )
    worker.run_once()  # connected, nothing left
    put_messages(engine, 2, prefix="n", clock=clock)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE outbox_messages RENAME TO outbox_messages_away"))
    try:
        with pytest.raises(StorageError, match="outbox_messages"):
            worker.run_once()
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE outbox_messages_away RENAME TO outbox_messages"))
    result = worker.run_once()

    assert 2 == result.delivered
    assert 5 == len(recorder.delivered)
    assert {"delivered"} == {r.status for r in table(engine)}
    assert [1] * 5 == [r.attempts for r in table(engine)]


@pytest.mark.postgres
def test_a_settle_sent_with_the_next_lease_fails_with_it_and_is_written_again(
    loop: Loop, pg_url: str
) -> None:
    """``run`` sends a batch's delivered settle with the next lease (one round trip on
    psycopg): the database refusing the settle undoes the lease with it, and the
    worker recovers: every message delivered once, with one attempt."""
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE SEQUENCE refuse_once"))
            conn.execute(
                text(
                    "CREATE FUNCTION refuse_once() RETURNS trigger AS $$ BEGIN "
                    "IF nextval('refuse_once') = 1 THEN RAISE EXCEPTION 'settle refused'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER refuse_once BEFORE UPDATE ON outbox_messages FOR EACH ROW "
                    "WHEN (NEW.status = 'delivered') EXECUTE FUNCTION refuse_once()"
                )
            )
        put_messages(engine, 4)
        recorder = Recorder()
        worker = loop.worker(
            engine,
            outbox_settings(),
            deliver=recorder,
            providers=["crm_provider"],
            batch_size=2,
            worker_id="w-pair",
        )
        result = worker.run(until_idle=True)
        rows = table(engine)
        with engine.connect() as conn:
            refused = conn.execute(text("SELECT last_value FROM refuse_once")).scalar_one()
    finally:
        engine.dispose()

    assert refused > 1, "the first delivered settle was refused"
    assert result.delivered == 4
    assert sorted(recorder.delivered) == sorted(r.id for r in rows)
    assert {"delivered"} == {r.status for r in rows}
    assert [1] * 4 == [r.attempts for r in rows]


@pytest.mark.postgres
@pytest.mark.parametrize("failing", [0, 1])
def test_a_pipeline_error_names_the_statement_that_failed(pg_url: str, failing: int) -> None:
    """``on_driver_pipeline`` (the outbox's settle + lease, the inbox's lock + read): the
    error is SQLAlchemy's, naming the statement the server refused, first or second."""
    from sqlalchemy.exc import DBAPIError

    from idis.integrations.db._engine import create_db_engine, on_driver_pipeline

    bad = "SELECT 1 / 0 AS refused"
    statements = [(bad if i == failing else f"SELECT {i} AS fine", None) for i in range(2)]
    engine = create_db_engine(pg_url)
    try:
        with engine.begin() as conn, pytest.raises(DBAPIError) as info:
            on_driver_pipeline(conn, statements)
    finally:
        engine.dispose()

    assert bad == info.value.statement
    assert "division by zero" in str(info.value.orig)
