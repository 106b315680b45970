"""A worker whose lease lapsed settles late: its settle changes nothing (issue 11, fencing).

Worker A leases a message and stalls in the send (a GC pause, a partition)
until its lease has lapsed; worker B leases the message again and settles it.
Then A's send returns and A settles. Every lease bumps the message's lease
generation and every settle presents the one it leased under, so A's settle
finds a newer generation and is a no-op: B's outcome stands, and A counts it
as ``fenced``.

The clock is manual (lease times from the worker's clock) and the lease long
(1 minute), so no heartbeat fires on the real clock while A stalls: the lease
lapses only because the test moves the clock.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from idis.integrations._clock import ManualClock
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ProviderRejected
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.outbox._worker import AsyncOutboxWorker

from .conftest import outbox_settings, put_messages, table, unavailable

LEASE = timedelta(minutes=1)


def _rejected(message: OutboxMessage) -> ProviderRejected:
    return ProviderRejected(
        "crm_provider record: HTTP 422",
        provider=message.provider,
        endpoint="record",
        status_code=422,
    )


#: (B's outcome, A's late outcome): B's must stand whatever A says.
CASES = [
    ("retry", "delivered"),  # A's "delivered" must not hide B's failure (old code did)
    ("dead", "delivered"),
    ("delivered", "retry"),
    ("retry", "dead"),
]


def _outcome(kind: str, message: OutboxMessage) -> BaseException | None:
    if kind == "retry":
        return unavailable(message)
    if kind == "dead":
        return _rejected(message)
    return None


def _expected(kind: str) -> str:
    return {"retry": "pending", "dead": "dead", "delivered": "delivered"}[kind]


#: Generations before A's lease: 0, and one where A's and B's leases (2**20,
#: 2**20 + 1) no longer fit SQLite's packed (id, generation) key, so the
#: settle of a delivery takes the unpacked statement.
START_GENERATIONS = [0, 2**20 - 1]


@pytest.mark.parametrize("start", START_GENERATIONS)
@pytest.mark.parametrize(("b_outcome", "a_outcome"), CASES)
def test_a_late_settle_does_not_overwrite_the_new_holders_outcome(
    engine: Engine, clock: ManualClock, b_outcome: str, a_outcome: str, start: int
) -> None:
    """A's lease lapses, B re-leases and settles, A settles late: B's outcome stands."""
    put_messages(engine, 1, keys=1, clock=clock)
    with engine.begin() as conn:
        conn.execute(update(OutboxMessageRow).values(lease_generation=start))
    settings = outbox_settings(lease=LEASE, batch_size=1, concurrency=1)
    common: dict[str, Any] = {"providers": ["crm_provider"], "clock": clock}
    b_results: list[Any] = []
    seen: dict[str, OutboxMessage] = {}

    def b_send(message: OutboxMessage) -> None:
        seen["b"] = message
        error = _outcome(b_outcome, message)
        if error is not None:
            raise error

    def a_after_stall(message: OutboxMessage) -> None:
        seen["a"] = message
        error = _outcome(a_outcome, message)
        if error is not None:
            raise error

    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))

    async def b_send_async(message: OutboxMessage) -> None:
        b_send(message)

    async def scenario() -> Any:
        b = AsyncOutboxWorker(
            async_engine, settings, deliver=b_send_async, **{**common, "worker_id": "B"}
        )

        async def a_send(message: OutboxMessage) -> None:
            clock.advance(LEASE + timedelta(seconds=1))
            b_results.append(await b.run_once())
            a_after_stall(message)

        a = AsyncOutboxWorker(
            async_engine, settings, deliver=a_send, **{**common, "worker_id": "A"}
        )
        result = await a.run_once()
        assert 1 == a.stale_settles
        return result

    try:
        a_result = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    # B really re-leased it under a newer generation, and settled it.
    assert (start + 1, start + 2) == (seen["a"].lease_generation, seen["b"].lease_generation)
    assert [1] == [r.leased for r in b_results]
    assert [0] == [r.fenced for r in b_results]
    [row] = table(engine)
    assert _expected(b_outcome) == row.status, "A's late settle overwrote B's outcome"
    assert start + 2 == row.lease_generation
    assert 2 == row.attempts
    assert 1 == a_result.fenced
    if b_outcome == "retry":
        assert "503" in (row.last_error or "")
        assert row.lease_owner is None


def test_a_late_delivered_settle_sent_with_the_next_lease_is_fenced_and_counted(
    engine: Engine, clock: ManualClock
) -> None:
    """In ``run``, a delivered settle goes with the next cycle's lease (on psycopg in one
    round trip): when A's lease lapsed meanwhile and B settled the message, A's settle
    changes nothing there either, and A counts it (``fenced``, ``stale_settles``)."""
    put_messages(engine, 1, keys=1, clock=clock)
    settings = outbox_settings(lease=LEASE, batch_size=1, concurrency=1)
    common: dict[str, Any] = {"providers": ["crm_provider"], "clock": clock}
    b_results: list[Any] = []
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))

    async def b_send(message: OutboxMessage) -> None:
        raise unavailable(message)  # B's outcome (a retry later) must stand

    async def scenario() -> tuple[Any, int]:
        b = AsyncOutboxWorker(async_engine, settings, deliver=b_send, **common, worker_id="B")

        async def a_send(message: OutboxMessage) -> None:
            clock.advance(LEASE + timedelta(seconds=1))
            b_results.append(await b.run_once())

        a = AsyncOutboxWorker(async_engine, settings, deliver=a_send, **common, worker_id="A")
        result = await a.run(until_idle=True)
        return result, a.stale_settles

    try:
        a_result, stale = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert [1] == [r.leased for r in b_results]
    [row] = table(engine)
    assert ("pending", 2) == (row.status, row.lease_generation), "A's late settle overwrote B's"
    assert "503" in (row.last_error or "")
    assert (1, 1, 1) == (a_result.delivered, a_result.fenced, stale)
