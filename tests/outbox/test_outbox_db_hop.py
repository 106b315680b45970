"""The outbox worker's transactions: one hop to a thread each, on a blocking twin of the engine.

``blocking_twin`` (db/_engine.py) gives the worker a pysqlite / blocking psycopg
engine on the async engine's database; a cycle's settle and lease then run in
one ``asyncio.to_thread`` call instead of a hop (aiosqlite) or an event-loop
wait (psycopg async) per statement. These tests pin what must hold for that to
be safe: same database, same ``BEGIN IMMEDIATE`` on SQLite, the async engine's
connection events (the fault injection of the other outbox tests relies on
them), the event loop free while a transaction waits, and the fallback to the
async engine where no twin can be made.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from idis.integrations.db._engine import blocking_twin, create_async_db_engine
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.outbox._worker import AsyncOutboxWorker, _AsyncDatabase, _ThreadDatabase

from .conftest import outbox_settings, put_messages, statuses


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_the_twin_sees_the_same_database_and_fires_the_async_engines_events(
    engine: Engine,
) -> None:
    """Rows written through the twin are the async engine's; listeners added later fire too."""
    put_messages(engine, 3)
    async_engine = create_async_db_engine(_url(engine))
    try:
        twin = blocking_twin(async_engine)
        assert twin is not None
        seen: list[tuple[str, str]] = []

        def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            seen.append((threading.current_thread().name, " ".join(statement.split())))

        # Added after the twin was made: still fires on the twin's connections.
        event.listen(async_engine.sync_engine, "before_cursor_execute", before)
        worker = threading.Thread(target=_count_rows, args=(twin, seen), name="twin-user")
        worker.start()
        worker.join()
        twin.dispose()
    finally:
        asyncio.run(async_engine.dispose())

    assert ("twin-user", "3 rows") in seen
    statements = [statement for thread, statement in seen if thread == "twin-user"]
    assert any("outbox_messages" in statement for statement in statements)
    if engine.dialect.name == "sqlite":
        # The write lock is taken up front, as on the async engine.
        assert statements[0] == "BEGIN IMMEDIATE"


def test_the_twin_runs_the_hosts_connect_and_checkout_listeners(engine: Engine) -> None:
    """A host that sets each connection up (here a session setting it reads back) gets the
    same setup on the twin's connections: a search_path set this way would otherwise be
    missing from the outbox's and the receiver's transactions."""
    async_engine = create_async_db_engine(_url(engine))
    seen: list[str] = []

    def connect(dbapi_connection: Any, _record: Any) -> None:
        seen.append("connect")
        cursor = dbapi_connection.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("PRAGMA cache_size = -4242")
        else:
            cursor.execute("SET application_name = 'host-setup'")
        cursor.close()

    def checkout(_dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        seen.append("checkout")

    event.listen(async_engine.sync_engine, "connect", connect)
    event.listen(async_engine.sync_engine, "checkout", checkout)
    setting = "PRAGMA cache_size" if engine.dialect.name == "sqlite" else "SHOW application_name"
    try:
        twin = blocking_twin(async_engine)
        assert twin is not None
        with twin.connect() as conn:
            got = conn.exec_driver_sql(setting).scalar()
        twin.dispose()
    finally:
        asyncio.run(async_engine.dispose())

    assert (-4242 if engine.dialect.name == "sqlite" else "host-setup") == got
    assert ["connect", "checkout"] == seen


def _count_rows(twin: Engine, seen: list[tuple[str, str]]) -> None:
    with twin.begin() as conn:
        count = conn.execute(select(OutboxMessageRow.id)).all()
    seen.append((threading.current_thread().name, f"{len(count)} rows"))


def test_the_postgresql_twin_decodes_json_as_the_async_driver_does(pg_engine: Engine) -> None:
    """jsonb and json come back as the same Python values (UTF-8, nesting, scalars)."""
    async_engine = create_async_db_engine(_url(pg_engine))
    query = text(
        """SELECT '{"a": ["é", 1, null, {"b": true}]}'::jsonb, '"ü"'::json, '[1.5]'::jsonb"""
    )

    async def through_async() -> Any:
        async with async_engine.connect() as conn:
            return tuple((await conn.execute(query)).one())

    try:
        expected = asyncio.run(through_async())
        twin = blocking_twin(async_engine)
        assert twin is not None
        with twin.connect() as conn:
            got = tuple(conn.execute(query).one())
        twin.dispose()
    finally:
        asyncio.run(async_engine.dispose())
    assert ({"a": ["é", 1, None, {"b": True}]}, "ü", [1.5]) == expected == got


def test_no_twin_for_an_in_memory_database_or_an_engine_made_elsewhere(sqlite_url: str) -> None:
    """A second connection to :memory: would see another database; unknown options stay unknown."""
    memory = create_async_db_engine("sqlite:///:memory:")
    elsewhere = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    settings = outbox_settings()
    try:
        assert blocking_twin(memory) is None
        assert blocking_twin(elsewhere) is None
        worker = AsyncOutboxWorker(elsewhere, settings, deliver=_noop, providers=["crm_provider"])
        assert isinstance(worker._db, _AsyncDatabase)
        own = create_async_db_engine(sqlite_url)
        assert isinstance(
            AsyncOutboxWorker(own, settings, deliver=_noop, providers=["crm_provider"])._db,
            _ThreadDatabase,
        )
        asyncio.run(own.dispose())
    finally:
        asyncio.run(memory.dispose())
        asyncio.run(elsewhere.dispose())


async def _noop(_message: OutboxMessage) -> None:
    return None


def test_a_worker_on_an_engine_without_a_twin_still_delivers(sqlite_url: str) -> None:
    """The fallback (each statement on the async engine) settles and leases like the twin."""
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(sqlite_url)
    put_messages(engine, 7, keys=3)
    elsewhere = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    delivered: list[int] = []

    async def deliver(message: OutboxMessage) -> None:
        delivered.append(message.id)

    async def scenario() -> int:
        worker = AsyncOutboxWorker(
            elsewhere, outbox_settings(), deliver=deliver, providers=["crm_provider"]
        )
        assert isinstance(worker._db, _AsyncDatabase)
        return (await worker.run(until_idle=True)).delivered

    try:
        assert 7 == asyncio.run(scenario())
    finally:
        asyncio.run(elsewhere.dispose())
    assert {"delivered": 7} == statuses(engine)
    assert sorted(delivered) == sorted(set(delivered))
    engine.dispose()


def test_a_cycle_waiting_for_the_sqlite_write_lock_leaves_the_event_loop_free(
    sqlite_url: str,
) -> None:
    """Another writer holds the lock: the loop keeps running, and releases it from a task.

    Were the cycle's transaction run on the event loop, the task below could
    never run, the lock would never be released, and the cycle would fail
    with "database is locked" after the busy timeout.
    """
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(sqlite_url)
    put_messages(engine, 4)
    engine.dispose()
    path = sqlite_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    async_engine = create_async_db_engine(sqlite_url)
    ticks: list[int] = []

    async def scenario() -> int:
        worker = AsyncOutboxWorker(
            async_engine,
            outbox_settings(lease=timedelta(minutes=5)),
            deliver=_noop,
            providers=["crm_provider"],
        )
        cycle = asyncio.create_task(worker.run_once())
        for tick in range(5):
            await asyncio.sleep(0.02)
            ticks.append(tick)
        assert not cycle.done()  # still waiting for the lock
        blocker.execute("COMMIT")
        return (await cycle).delivered

    try:
        assert 4 == asyncio.run(scenario())
    finally:
        blocker.close()
        asyncio.run(async_engine.dispose())
    assert [0, 1, 2, 3, 4] == ticks


def test_the_fallback_runs_a_one_off_cycle_and_drops_a_broken_held_connection(
    sqlite_url: str,
) -> None:
    """Without a twin: ``run_once`` (no held connection) delivers in a transaction of its own;
    a database error on the held connection drops it, and the next transaction opens a new
    one and works."""
    from sqlalchemy.exc import OperationalError

    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(sqlite_url)
    put_messages(engine, 3)
    elsewhere = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))

    def broken(conn: Any) -> None:
        conn.execute(text("SELECT * FROM no_such_table"))

    async def scenario() -> tuple[int, bool, bool, int]:
        worker = AsyncOutboxWorker(
            elsewhere, outbox_settings(), deliver=_noop, providers=["crm_provider"]
        )
        db = worker._db
        assert isinstance(db, _AsyncDatabase)
        delivered = (await worker.run_once()).delivered
        held_after_one_off = db._conn is not None
        with pytest.raises(OperationalError, match="no_such_table"):
            await db.run(broken, hold=True)
        dropped = db._conn is None
        one = await db.run(lambda conn: conn.execute(text("SELECT 1")).scalar_one(), hold=True)
        await db.release()
        await db.release()  # nothing held any more: nothing to close
        return delivered, held_after_one_off, dropped and db._conn is None, one

    try:
        assert (3, False, True, 1) == asyncio.run(scenario())
    finally:
        asyncio.run(elsewhere.dispose())
    assert {"delivered": 3} == statuses(engine)
    engine.dispose()


def test_no_twin_when_sqlalchemy_cannot_join_the_engines_events(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twin shares the async engine's events through SQLAlchemy's private dispatch join;
    a SQLAlchemy without it gets no twin (the worker runs on the async engine itself), not a
    twin whose connections would skip the host's listeners."""
    import sqlalchemy.event.base

    engine = create_async_db_engine(sqlite_url)
    try:
        monkeypatch.delattr(sqlalchemy.event.base._Dispatch, "_join")
        assert blocking_twin(engine) is None
        worker = AsyncOutboxWorker(
            engine, outbox_settings(), deliver=_noop, providers=["crm_provider"]
        )
        assert isinstance(worker._db, _AsyncDatabase)
    finally:
        asyncio.run(engine.dispose())
