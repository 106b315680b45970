"""Transactional enqueue: one INSERT in the caller's transaction, idempotent, sync and async."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from idis.integrations._audit import AuditEvent, record_audit
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ConfigError
from idis.integrations.outbox._enqueue import (
    enqueue,
    enqueue_async,
    enqueue_many,
    enqueue_many_async,
)
from idis.integrations.outbox._messages import NewMessage
from idis.integrations.outbox._models import OutboxMessageRow

from .conftest import table


def _message(key: str = "deal-42-v7", **kw: Any) -> NewMessage:
    return NewMessage.request(
        "crm_provider",
        "record",
        method="PUT",
        path_params={"id": "42"},
        json={"data": {"stage": "won"}},
        idempotency_key=key,
        ordering_key="42",
        **kw,
    )


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[str]]:
    """SQL statements the engine sends, as they go."""
    sent: list[str] = []

    def listen(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        sent.append(sql)

    event.listen(engine, "before_cursor_execute", listen)
    yield sent
    event.remove(engine, "before_cursor_execute", listen)


def test_enqueue_costs_one_insert_and_nothing_else(engine: Engine, statements: list[str]) -> None:
    """Inside an open transaction, enqueue sends exactly one statement: the INSERT."""
    with Session(engine) as session, session.begin():
        session.execute(select(func.count()).select_from(AuditEvent))  # transaction is open
        statements.clear()

        added = enqueue(session, _message())

        sent = list(statements)
    assert added is True
    assert 1 == len(sent)
    assert sent[0].lstrip().upper().startswith("INSERT INTO OUTBOX_MESSAGES")
    assert "ON CONFLICT (idempotency_key) DO NOTHING" in sent[0]


def test_message_commits_and_rolls_back_with_the_business_change(engine: Engine) -> None:
    """Rolled back with the caller's change it never existed; committed, it is pending."""
    with Session(engine) as session:
        session.begin()
        record_audit(session, "deal.won", subject_id="42")
        enqueue(session, _message("rolled-back"))
        session.rollback()
    with Session(engine) as session, session.begin():
        record_audit(session, "deal.won", subject_id="43")
        enqueue(session, _message("committed"))

    rows = table(engine)

    assert [("committed", "pending", 0)] == [
        (r.idempotency_key, r.status, r.attempts) for r in rows
    ]


def test_same_idempotency_key_twice_is_a_no_op(engine: Engine) -> None:
    """The second enqueue of a key returns False and leaves the first message as it was."""
    with Session(engine) as session, session.begin():
        first = enqueue(session, _message("k1"))
    with Session(engine) as session, session.begin():
        second = enqueue(
            session,
            NewMessage.request("crm_provider", "record", json={"other": 1}, idempotency_key="k1"),
        )

    rows = table(engine)

    assert (True, False) == (first, second)
    assert 1 == len(rows)
    assert {"data": {"stage": "won"}} == rows[0].payload["json"]


def test_enqueue_many_adds_new_keys_and_skips_known_ones(engine: Engine) -> None:
    """Batched enqueue reports how many were new; keys already queued are skipped."""
    with Session(engine) as session, session.begin():
        enqueue(session, _message("k-3"))
    batch = [_message(f"k-{i}") for i in range(1200)]
    with Session(engine) as session, session.begin():
        added = enqueue_many(session, batch)

    assert 1199 == added
    assert 1200 == len(table(engine))


def _async_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def test_async_session_enqueue_is_one_insert_and_idempotent(engine: Engine) -> None:
    """AsyncSession callers get the same single INSERT, the same rollback, the same no-op."""
    async_engine = create_async_db_engine(_async_url(engine))
    sent: list[str] = []

    def listen(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        sent.append(sql)

    event.listen(async_engine.sync_engine, "before_cursor_execute", listen)

    async def scenario() -> tuple[bool, bool, int]:
        async with AsyncSession(async_engine) as session:
            async with session.begin():
                await session.execute(select(func.count()).select_from(AuditEvent))
                sent.clear()
                first = await enqueue_async(session, _message("a1"))
                one = len(sent)
            async with session.begin():
                second = await enqueue_async(session, _message("a1"))
            async with session.begin():
                await enqueue_async(session, _message("a2"))
                await session.rollback()
            async with session.begin():
                added = await enqueue_many_async(session, [_message("a1"), _message("a3")])
        assert 1 == one
        return first, second, added

    try:
        first, second, added = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert (True, False, 1) == (first, second, added)
    assert ["a1", "a3"] == [r.idempotency_key for r in table(engine)]


def test_not_before_delays_delivery(engine: Engine) -> None:
    """``not_before`` becomes the message's first ``next_attempt_at``."""
    when = datetime.fromisoformat("2030-01-01T00:00:00+00:00")
    with Session(engine) as session, session.begin():
        enqueue(session, _message("later", not_before=when))

    (row,) = table(engine)

    assert when == row.next_attempt_at


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: NewMessage.request("", "record", idempotency_key="k"), "provider"),
        (lambda: NewMessage.request("crm", "record", idempotency_key="k" * 300), "idempotency_key"),
        (lambda: NewMessage.request("crm", "record", idempotency_key=" "), "idempotency_key"),
        (lambda: NewMessage.request("crm", "record", idempotency_key="k", method="BREW"), "BREW"),
        (lambda: NewMessage.request("crm", "record", idempotency_key="k", json={1j}), "payload"),
        (lambda: NewMessage.request("crm", "record", idempotency_key="k", max_retries=-1), "-1"),
        (
            lambda: NewMessage.request(
                "crm", "record", idempotency_key="k", not_before=datetime(2030, 1, 1)
            ),
            "naive",
        ),
        (
            lambda: NewMessage(provider="crm", idempotency_key="k", payload={}, kind="Bad Kind"),
            "Bad Kind",
        ),
        (lambda: NewMessage.webhook("crm", "deal.won", {"x": object()}, webhook_id="e1"), "data"),
    ],
)
def test_bad_messages_fail_naming_the_value(build: Any, named: str) -> None:
    """An invalid message fails at construction, naming what is wrong."""
    with pytest.raises(ConfigError) as caught:
        build()

    assert named in str(caught.value)


def test_enqueue_rejects_what_is_not_a_message(sqlite_url: str) -> None:
    """Passing a dict instead of a NewMessage fails naming the type, and inserts nothing."""
    from idis.integrations.db._engine import create_db_engine

    eng = create_db_engine(sqlite_url)
    try:
        with Session(eng) as session, session.begin(), pytest.raises(ConfigError) as caught:
            enqueue(session, {"provider": "crm_provider"})  # type: ignore[arg-type]
        count = Session(eng).scalar(select(func.count()).select_from(OutboxMessageRow))
    finally:
        eng.dispose()

    assert "dict" in str(caught.value)
    assert 0 == count


def test_public_names_resolve_to_the_functions_not_submodules() -> None:
    """``enqueue`` from the package is the function even after its submodule was imported."""
    import importlib

    import idis.integrations as top
    import idis.integrations.outbox as outbox

    importlib.import_module("idis.integrations.outbox._enqueue")
    missing = [name for name in outbox.__all__ if not hasattr(outbox, name)]

    assert callable(outbox.enqueue)
    assert outbox.enqueue is top.enqueue
    assert [] == missing
