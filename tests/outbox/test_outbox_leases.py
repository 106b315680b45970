"""Leases hold while a send outlasts them, whatever the delivery path (issue 11 item 3).

Real clock here (a heartbeat is about time passing while a send blocks), but no
timed assertion: the slow send itself waits until the first lease is past its
expiry on the database's clock, then lets a rival worker try to lease. With the
heartbeat the rival finds nothing; without it, the rival sends the message too.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from idis.integrations._clock import ManualClock, SystemClock
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import StorageError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.outbox._worker import AsyncOutboxWorker

from ..conftest import sample
from .conftest import Loop, Recorder, outbox_settings, put_messages, statuses, table

LEASE = timedelta(seconds=1)


def _past_first_lease(engine: Engine, message: OutboxMessage) -> None:
    """Block (like a slow provider) until the message's first lease would have lapsed."""
    assert message.lease_expires_at is not None
    first = message.lease_expires_at
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    while datetime.now(UTC) < first + LEASE / 2:
        time.sleep(0.05)


@pytest.mark.parametrize(("batch_size", "concurrency"), [(1, 1), (5, 1), (1, 4)])
def test_a_send_longer_than_the_lease_keeps_it(
    engine: Engine, batch_size: int, concurrency: int
) -> None:
    """Batch of one, or concurrency 1: the heartbeat renews the lease while the only send runs."""
    put_messages(engine, 1, keys=1)
    settings = outbox_settings(lease=LEASE, batch_size=batch_size, concurrency=concurrency)
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))
    rival_attempts: list[int] = []
    rival_leased: list[int] = []

    async def rival_deliver(message: OutboxMessage) -> None:
        rival_attempts.append(message.id)

    async def scenario() -> int:
        rival = AsyncOutboxWorker(
            async_engine, settings, deliver=rival_deliver, providers=["crm_provider"]
        )

        async def slow(message: OutboxMessage) -> None:
            await asyncio.to_thread(_past_first_lease, engine, message)
            rival_leased.append((await rival.run_once()).leased)

        worker = AsyncOutboxWorker(async_engine, settings, deliver=slow, providers=["crm_provider"])
        return (await worker.run_once()).delivered

    try:
        delivered = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert (1, [0], []) == (delivered, rival_leased, rival_attempts)
    assert {"delivered": 1} == statuses(engine)
    assert 1 == table(engine)[0].attempts


def _lose_next_commit_ack(engine: Engine) -> list[bool]:
    """Make the next COMMIT succeed on the server and then fail on the client (a lost ack)."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    armed = [True]

    def commit(conn: Any) -> None:
        if armed[0]:
            armed[0] = False
            conn.connection.dbapi_connection.commit()  # the server commits ...
            # ... and the acknowledgement is lost on the way back.
            raise OperationalError("COMMIT", {}, ConnectionError("connection lost during COMMIT"))

    event.listen(engine, "commit", commit)
    return armed


def test_a_lease_whose_commit_ack_was_lost_is_not_stranded(
    engine: Engine, clock: ManualClock
) -> None:
    """COMMIT succeeded but failed to acknowledge: the next cycle delivers, no lease to wait out."""
    put_messages(engine, 6, keys=3, clock=clock)
    recorder = Recorder()
    settings = outbox_settings(lease=timedelta(minutes=5))
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))
    armed = _lose_next_commit_ack(async_engine.sync_engine)

    async def deliver(message: OutboxMessage) -> None:
        recorder(message)

    async def scenario() -> list[Any]:
        worker = AsyncOutboxWorker(
            async_engine, settings, deliver=deliver, providers=["crm_provider"], clock=clock
        )
        with pytest.raises(StorageError):
            await worker.run_once()
        return [await worker.run_once() for _ in range(3)]

    try:
        results = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert [False] == armed  # the lost acknowledgement really happened
    assert {"delivered": 6} == statuses(engine)  # the clock never moved: no lease lapsed
    assert [1] * 6 == [r.attempts for r in table(engine)]  # the unsent lease is not counted
    assert [3, 3, 0] == [r.delivered for r in results]


class _AheadClock(SystemClock):
    """The real clock, one hour fast: a worker host whose clock drifted."""

    def time(self) -> float:
        return super().time() + 3600

    def now(self) -> datetime:
        return super().now() + timedelta(hours=1)


def test_a_worker_whose_clock_runs_ahead_takes_no_live_lease(loop: Loop, engine: Engine) -> None:
    """Lease times come from the database's clock: a fast worker clock takes over nothing."""
    put_messages(engine, 1)
    settings = outbox_settings(lease=timedelta(minutes=5))
    ahead_recorder = Recorder()
    taken: list[int] = []
    ahead = loop.worker(
        engine,
        settings,
        deliver=ahead_recorder,
        providers=["crm_provider"],
        clock=_AheadClock(),
        lease_clock="database",
    )

    async def holder(message: OutboxMessage) -> None:
        taken.append((await ahead.worker.run_once()).leased)

    loop.worker(engine, settings, deliver=holder, providers=["crm_provider"]).run_once()

    assert ([0], []) == (taken, ahead_recorder.attempts)
    assert {"delivered": 1} == statuses(engine)


def _fail_renewals(engine: Engine) -> list[int]:
    """Make every lease renewal statement fail on the client (the database is unreachable)."""
    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    failed: list[int] = []

    def before(conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if (
            " ".join(statement.split())
            .upper()
            .startswith("UPDATE OUTBOX_MESSAGES SET LEASE_EXPIRES_AT")
        ):
            failed.append(1)
            raise OperationalError("renew", {}, ConnectionError("connection lost"))

    event.listen(engine, "before_cursor_execute", before)
    return failed


def test_a_lease_that_cannot_be_renewed_gives_the_rest_of_the_batch_back(
    loop: Loop, engine: Engine, clock: ManualClock, metrics: Metrics
) -> None:
    """Renewal fails mid-batch: the sent message settles, the unsent ones go back unattempted."""
    put_messages(engine, 3, clock=clock)
    failed = _fail_renewals(loop.async_engine(engine).sync_engine)
    recorder = Recorder()

    def slow(message: OutboxMessage) -> None:
        clock.advance(6)  # past half the 10 s lease: the next send renews first
        recorder(message)

    worker = loop.worker(
        engine,
        outbox_settings(lease=timedelta(seconds=10)),
        deliver=slow,
        providers=["crm_provider"],
        clock=clock,
        batch_size=3,
        concurrency=1,
    )
    with capture_logs() as logs:
        first = worker.run_once()
    rows = table(engine)
    warned = [e for e in logs if e["event"] == "idis.outbox.lease_renewal_failed"]

    assert failed, "the renewal really failed"
    assert (3, 1, 2) == (first.leased, first.delivered, first.released)
    assert [rows[0].id] == recorder.delivered
    assert ["delivered", "pending", "pending"] == [r.status for r in rows]
    assert [1, 0, 0] == [r.attempts for r in rows]  # given back: no attempt counted
    assert all(r.lease_owner is None for r in rows[1:])
    assert 2 == sample(
        metrics,
        "integration_outbox_deliveries_total",
        provider="crm_provider",
        kind="request",
        outcome="released",
    )
    assert warned, "the failed renewal is logged"
    assert "connection lost" in warned[0]["error"]
