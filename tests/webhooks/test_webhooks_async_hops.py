"""The async receiver's batches with async handlers: few hops, and still atomic (issue 16).

On aiosqlite every call on the connection (cursor, execute, fetchall, close, commit) is
a function queued to the connection's own thread and a future awaited on the event loop.
A batch's ``BEGIN IMMEDIATE`` and its reads, decision and writes each run in one such hop
(``db._engine.aiosqlite_thread``, through aiosqlite's private ``Connection._execute``),
where SQLAlchemy's adapter spent three or four per statement (17 per batch). These tests
count the hops with the installed aiosqlite and SQLAlchemy, check the fallback when that
private API is gone, and check that a failing async handler leaves nothing of its event,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from tests.sync.conftest import HostTable

from idis.integrations._clock import ManualClock
from idis.integrations.db import _engine as engine_module
from idis.integrations.db._engine import async_session_factory, create_async_db_engine
from idis.integrations.sync._inbox import HandlerRegistry, apply_events_async
from idis.integrations.sync._models import SyncInbox
from idis.integrations.webhooks._receiver import AsyncWebhookReceiver

from ..sync.conftest import T0, make_event
from .conftest import NOW, P, event_body, settings_for, signed


class _CountingQueue:
    """aiosqlite's queue to its thread, counting what is queued (one item a hop)."""

    def __init__(self, queue: Any, hops: Counter[str]) -> None:
        self._queue = queue
        self._hops = hops

    def put_nowait(self, item: Any) -> None:
        function = item[1]
        named = getattr(function, "func", function)
        self._hops[getattr(named, "__qualname__", repr(named))] += 1
        self._queue.put_nowait(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def _count_hops(engine: Any, hops: Counter[str]) -> None:
    """Count the hops of every connection ``engine`` opens from now on."""

    def connected(dbapi_connection: Any, _record: Any) -> None:
        driver = dbapi_connection.driver_connection
        driver._tx = _CountingQueue(driver._tx, hops)

    event.listen(engine.sync_engine, "connect", connected)


async def _noop(session: AsyncSession, event: Any) -> None:
    return None


def _receiver(url: str, engine: Any, registry: HandlerRegistry) -> AsyncWebhookReceiver:
    return AsyncWebhookReceiver(
        settings_for(url), engine, registry=registry, providers=[P], clock=ManualClock(NOW)
    )


def _hops_per_batch(sqlite_url: str) -> tuple[int, Counter[str], list[Any]]:
    """Hops of the second delivery's batch (one delivery; the first warmed the pool up)."""
    registry = HandlerRegistry()
    registry.register_async("record.updated", _noop)
    hops: Counter[str] = Counter()
    batch: Counter[str] = Counter()

    async def run() -> list[Any]:
        engine = create_async_db_engine(sqlite_url)
        _count_hops(engine, hops)
        receiver = _receiver(sqlite_url, engine, registry)
        try:
            first = await receiver.handle(P, signed(event_body(1), msg="m1"), event_body(1))
            hops.clear()
            second = await receiver.handle(P, signed(event_body(2), msg="m2"), event_body(2))
            batch.update(hops)  # not the engine's disposal
            return [first, second]
        finally:
            await engine.dispose()

    results = asyncio.run(run())
    return sum(batch.values()), batch, results


def test_an_async_handler_batch_on_aiosqlite_takes_four_hops(sqlite_url: str) -> None:
    """BEGIN IMMEDIATE, the claim (reads, decision, writes), COMMIT and the pool's
    rollback-on-return: one hop each (17 through SQLAlchemy's adapter)."""
    total, hops, results = _hops_per_batch(sqlite_url)

    assert [(200, "accepted")] * 2 == [(r.status_code, r.outcome) for r in results]
    assert total <= 4, hops
    assert 1 == hops["_begin_immediate"], hops
    assert 1 == hops["_sqlite_claim.<locals>.work"], hops


def test_without_aiosqlites_private_call_the_batch_goes_through_the_adapter(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hop needs ``Connection._execute``; gone (another aiosqlite), the statements go
    through SQLAlchemy's adapter as before: more hops, the same answers."""
    monkeypatch.setattr(engine_module, "_AIOSQLITE_CALL", "_no_such_call")

    total, hops, results = _hops_per_batch(sqlite_url)

    assert [(200, "accepted")] * 2 == [(r.status_code, r.outcome) for r in results]
    assert total > 10, hops
    assert 0 == hops["_sqlite_claim.<locals>.work"], hops


def test_the_installed_aiosqlite_offers_the_one_hop_call(sqlite_url: str) -> None:
    """Pins the private API the hop relies on, with the installed versions: SQLAlchemy's
    adapter names aiosqlite's connection, which runs a function on its thread through
    ``_execute`` and holds an open ``sqlite3`` connection; with something watching
    execution, nothing skips SQLAlchemy."""
    import sqlite3

    import aiosqlite

    assert callable(getattr(aiosqlite.Connection, engine_module._AIOSQLITE_CALL, None))

    async def run() -> tuple[bool, bool, Any]:
        engine = create_async_db_engine(sqlite_url)
        try:
            async with engine.connect() as conn:
                unwatched = await conn.run_sync(
                    lambda c: engine_module.aiosqlite_thread(c) is not None
                )
                raw = await conn.get_raw_connection()
                driver = raw.dbapi_connection.driver_connection  # type: ignore[union-attr]

                def noop(_conn: Any, *_args: Any) -> None:
                    return None

                event.listen(engine.sync_engine, "before_cursor_execute", noop)
                watched = await conn.run_sync(
                    lambda c: engine_module.aiosqlite_thread(c) is not None
                )
                event.remove(engine.sync_engine, "before_cursor_execute", noop)
                return unwatched, watched, driver
        finally:
            await engine.dispose()

    unwatched, watched, driver = asyncio.run(run())

    assert isinstance(driver, aiosqlite.Connection)
    assert isinstance(driver._connection, sqlite3.Connection) or driver._connection is None
    assert unwatched
    assert not watched


def test_a_driver_error_in_the_hop_is_sqlalchemys(tmp_path: Path) -> None:
    """A statement that fails on aiosqlite's thread raises what SQLAlchemy's execute raises
    (here: no inbox table), with its SQL, and nothing is left half done."""
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    registry = HandlerRegistry()
    registry.register_async("record.updated", _noop)

    async def run() -> None:
        engine = create_async_db_engine(url)
        try:
            async with async_session_factory(engine)() as session, session.begin():
                await apply_events_async(
                    session, P, [make_event(1)], "webhook", registry=registry, now=T0
                )
        finally:
            await engine.dispose()

    with pytest.raises(OperationalError, match="no such table") as raised:
        asyncio.run(run())
    assert "sync_record_versions" in str(raised.value.statement)


# --------------------------------------------------------------------------- atomicity


@pytest.fixture
def db_host(engine: Engine) -> HostTable:
    """The host table on the test database (SQLite and PostgreSQL)."""
    return HostTable(engine)


def test_an_async_handler_that_raises_leaves_neither_its_inbox_row_nor_its_write(
    engine: Engine, db_url: str, db_host: HostTable
) -> None:
    """In a shared batch, an async handler writes through its session, then raises for one
    event: that event has no inbox row and no host row (the batch was rolled back whole and
    replayed one by one); the others are applied once, their writes kept."""
    failing = {"evt_3"}

    async def handler(session: AsyncSession, event: Any) -> None:
        await session.execute(
            text("INSERT INTO host_applied (event_id, record_id, version) VALUES (:e, :r, :v)"),
            {"e": event.id, "r": event.record_id, "v": event.version},
        )
        if event.id in failing:
            raise RuntimeError("this handler fails on purpose")

    registry = HandlerRegistry()
    registry.register_async("record.updated", handler)
    batches: list[int] = []

    async def run() -> list[Any]:
        async_engine = create_async_db_engine(db_url)
        receiver = _receiver(db_url, async_engine, registry)
        apply = receiver._apply_together

        async def recorded(jobs: list[Any]) -> None:
            batches.append(len(jobs))
            await apply(jobs)

        receiver._apply_together = recorded  # type: ignore[method-assign]
        try:
            return list(
                await asyncio.gather(
                    *(
                        receiver.handle(P, signed(event_body(n), msg=f"m{n}"), event_body(n))
                        for n in range(1, 6)
                    )
                )
            )
        finally:
            await async_engine.dispose()

    results = asyncio.run(run())

    by_event = {r.event_id: (r.status_code, r.outcome) for r in results}
    assert (500, "handler_error") == by_event.pop("evt_3")
    assert {(200, "accepted")} == set(by_event.values())
    assert max(batches) > 1, batches  # the failing event shared a batch first
    with Session(engine) as session:
        inbox = set(session.scalars(select(SyncInbox.event_id).where(SyncInbox.provider == P)))
    assert {"evt_1", "evt_2", "evt_4", "evt_5"} == inbox
    assert ["evt_1", "evt_2", "evt_4", "evt_5"] == sorted(row[0] for row in db_host.rows())
