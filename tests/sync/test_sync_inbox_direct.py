"""The inbox's statements on the driver's cursor write exactly what SQLAlchemy's execute writes.

A batch's statements run on the DB-API cursor when nothing watches SQLAlchemy's
execution (see ``_inbox._driver``); a ``before_cursor_execute`` listener sends them
through SQLAlchemy instead. The same script of batches, through each path under
its own provider on the same database, must leave the same inbox and ledger rows
and give the same outcomes (SQLite and PostgreSQL), on the blocking drivers and,
through ``AsyncSession``, on the asyncio ones (whose cursors are SQLAlchemy's adapters).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from idis.integrations.db._engine import async_session_factory, create_async_db_engine
from idis.integrations.providers import ProviderEvent
from idis.integrations.sync import _inbox as inbox_module
from idis.integrations.sync._inbox import HandlerRegistry, apply_events, apply_events_async
from idis.integrations.sync._models import SyncInbox, SyncRecordVersion

from .conftest import T0, make_event


def _registry() -> HandlerRegistry:
    registry = HandlerRegistry()
    registry.register("record.updated", lambda session, event: None)
    registry.register("record.created", lambda session, event: None)
    return registry


def _script() -> list[tuple[str, list[Any]]]:
    """Batches covering every outcome and every write of a batch."""
    bare = ProviderEvent(
        id="evt_bare",
        seq=None,
        type="record.updated",
        record_id=None,
        tenant_id=None,
        version=None,
        occurred_at=None,
        data={},
    )
    return [
        # New records, one event repeated inside the batch, a type without a handler.
        (
            "webhook",
            [
                make_event(1),
                make_event(2),
                make_event(1),
                make_event(3, type_="record.archived"),
                bare,
            ],
        ),
        # An older version (superseded), a newer one (applied), a redelivery (duplicate).
        (
            "webhook",
            [
                make_event(10, record_id="rec_1", version=1, at=T0 - timedelta(days=1)),
                make_event(11, record_id="rec_2", version=2, at=T0 + timedelta(hours=1)),
                make_event(2),
            ],
        ),
        # Polled first, then delivered by webhook: webhook_at stamped on the poll's row.
        ("poll", [make_event(20), make_event(21, record_id="rec_20", version=2)]),
        ("webhook", [make_event(20), make_event(21, record_id="rec_20", version=2)]),
        # Two versions of one record in a batch, out of order.
        (
            "replay",
            [
                make_event(31, record_id="rec_30", version=3, at=T0 + timedelta(hours=3)),
                make_event(30, record_id="rec_30", version=2, at=T0 + timedelta(hours=2)),
            ],
        ),
        # More rows than one multi-row INSERT holds on SQLite's direct path.
        ("webhook", [make_event(100 + n, record_id=f"rec_big_{n % 90}") for n in range(150)]),
        ("webhook", [make_event(100 + n, record_id=f"rec_big_{n % 90}") for n in range(150)]),
    ]


def _noop(*_args: Any) -> None:
    return None


def _apply(engine: Engine, provider: str, *, direct: bool) -> list[list[Any]]:
    registry = _registry()
    if not direct:
        # Something watches execution: the statements go through SQLAlchemy.
        event.listen(engine, "before_cursor_execute", _noop)
    try:
        outcomes = []
        for number, (source, events) in enumerate(_script()):
            with Session(engine) as session, session.begin():
                connection = session.connection()
                assert (inbox_module._driver(connection) is not None) is direct
                result = apply_events(
                    session,
                    provider,
                    events,
                    source,
                    registry=registry,
                    now=T0 + timedelta(minutes=number),
                )
            outcomes.append(list(result.outcomes))
        return outcomes
    finally:
        if not direct:
            event.remove(engine, "before_cursor_execute", _noop)


def _rows(engine: Engine, provider: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    inbox = SyncInbox.__table__.c
    ledger = SyncRecordVersion.__table__.c
    with Session(engine) as session:
        inbox_rows = session.execute(
            select(*(c for c in inbox if c.name not in ("id", "provider")))
            .where(inbox.provider == provider)
            .order_by(inbox.event_id)
        ).all()
        ledger_rows = session.execute(
            select(*(c for c in ledger if c.name not in ("id", "provider")))
            .where(ledger.provider == provider)
            .order_by(ledger.record_id)
        ).all()
    return [tuple(r) for r in inbox_rows], [tuple(r) for r in ledger_rows]


def test_the_direct_path_writes_the_rows_sqlalchemy_writes(engine: Engine) -> None:
    """Same outcomes, same inbox rows (times included), same ledger, on either path."""
    direct = _apply(engine, "direct_provider", direct=True)
    through = _apply(engine, "orm_provider", direct=False)

    assert through == direct
    direct_rows = _rows(engine, "direct_provider")
    assert _rows(engine, "orm_provider") == direct_rows
    inbox, ledger = direct_rows
    assert 4 + 2 + 2 + 2 + 150 == len(inbox)  # every distinct event once
    assert not [row for row in ledger if row[3] == ""]  # no placeholder left behind
    # The poll's rows carry the webhook's stamp after the redelivery.
    stamped = {row[0]: row[-1] for row in inbox}
    assert stamped["evt_20"] is not None
    assert stamped["evt_21"] is not None


def _apply_async(url: str, provider: str, *, direct: bool) -> list[list[Any]]:
    async def run() -> list[list[Any]]:
        engine = create_async_db_engine(url)
        if not direct:
            event.listen(engine.sync_engine, "before_cursor_execute", _noop)
        registry = _registry()
        sessions = async_session_factory(engine)
        outcomes = []
        try:
            for number, (source, events) in enumerate(_script()):
                async with sessions() as session, session.begin():
                    connection = await session.connection()
                    on_driver = await connection.run_sync(
                        lambda c: inbox_module._driver(c) is not None
                    )
                    assert on_driver is direct
                    result = await apply_events_async(
                        session,
                        provider,
                        events,
                        source,
                        registry=registry,
                        now=T0 + timedelta(minutes=number),
                    )
                outcomes.append(list(result.outcomes))
        finally:
            await engine.dispose()
        return outcomes

    return asyncio.run(run())


def test_the_direct_path_on_asyncio_drivers_writes_the_same_rows(engine: Engine) -> None:
    """aiosqlite and psycopg's async connection: the same outcomes and rows as the
    blocking driver through SQLAlchemy."""
    url = engine.url.render_as_string(hide_password=False)
    direct = _apply_async(url, "async_direct", direct=True)
    through = _apply_async(url, "async_orm", direct=False)
    reference = _apply(engine, "orm_provider", direct=False)

    assert reference == direct == through
    assert _rows(engine, "orm_provider") == _rows(engine, "async_direct")
    assert _rows(engine, "orm_provider") == _rows(engine, "async_orm")


def test_psycopg_async_sends_the_lock_and_the_read_in_one_pipeline(
    pg_url: str, monkeypatch: Any
) -> None:
    """On psycopg's async connection a batch's ledger lock and inbox read go in one pipeline
    (one round trip with the transaction's BEGIN), as on the blocking connection; nothing
    watching execution, so the statements are on the driver. The outcomes are the inbox's."""
    import psycopg

    from idis.integrations.sync._inbox import ApplyOutcome

    entered: list[int] = []
    pipeline = psycopg.AsyncConnection.pipeline

    def counting(self: Any) -> Any:
        entered.append(1)
        return pipeline(self)

    monkeypatch.setattr(psycopg.AsyncConnection, "pipeline", counting)

    async def run() -> list[list[Any]]:
        engine = create_async_db_engine(pg_url)
        sessions = async_session_factory(engine)
        outcomes = []
        try:
            for batch in ([make_event(1), make_event(2)], [make_event(2), make_event(3)]):
                async with sessions() as session, session.begin():
                    result = await apply_events_async(
                        session, "pipelined", batch, "webhook", registry=_registry(), now=T0
                    )
                outcomes.append(list(result.outcomes))
        finally:
            await engine.dispose()
        return outcomes

    outcomes = asyncio.run(run())

    assert [1, 1] == entered
    applied, duplicate = ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE
    assert [[applied, applied], [duplicate, applied]] == outcomes
