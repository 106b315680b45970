"""The worker on real databases: leasing, per-key FIFO, backoff, dead letters, lease expiry, stop.

Every test drives a real ``AsyncOutboxWorker`` (the only outbox worker) on the
test's event loop (``loop``, ``DrivenWorker`` in conftest).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from idis.integrations._clock import ManualClock
from idis.integrations.config import Secret
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import CircuitOpen, ProviderUnavailable, UnknownProviderError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.outbox._worker import AsyncOutboxWorker

from ..conftest import sample
from .conftest import (
    DrivenWorker,
    Loop,
    Recorder,
    outbox_settings,
    put_messages,
    statuses,
    table,
    unavailable,
)


def _worker(
    loop: Loop, engine: Engine, deliver: object, clock: ManualClock, **kw: object
) -> DrivenWorker:
    settings = kw.pop("settings", None) or outbox_settings()
    return loop.worker(
        engine,
        settings,  # type: ignore[arg-type]
        deliver=deliver,
        providers=["crm_provider"],
        clock=clock,
        rng=random.Random(5),
        **kw,
    )


def _drain(
    worker: DrivenWorker, clock: ManualClock, *, step: float = 5.0, cycles: int = 2000
) -> None:
    for _ in range(cycles):
        if worker.run_once().leased == 0:
            if not any(row.status == "pending" for row in table(worker.engine)):
                return
            clock.advance(step)
    raise AssertionError("the outbox did not drain")


def test_worker_delivers_every_message_once(
    loop: Loop, engine: Engine, clock: ManualClock, metrics: Metrics
) -> None:
    """Every queued message is delivered once and marked delivered; counters match."""
    put_messages(engine, 120, clock=clock)
    recorder = Recorder()

    result = _worker(loop, engine, recorder, clock, batch_size=50).run(until_idle=True)

    assert 120 == result.delivered
    assert sorted(recorder.delivered) == [r.id for r in table(engine)]
    assert {"delivered": 120} == statuses(engine)
    assert 120 == sample(
        metrics,
        "integration_outbox_deliveries_total",
        provider="crm_provider",
        kind="request",
        outcome="delivered",
    )


def test_per_key_fifo_holds_while_messages_fail_and_retry(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """Under random failures a later message of a key never goes before the earlier is delivered."""
    put_messages(engine, 300, keys=12, clock=clock)
    rng = random.Random(11)
    recorder = Recorder(fail=lambda m: unavailable(m) if rng.random() < 0.4 else None)
    recorder.expect(engine)
    worker = _worker(loop, engine, recorder, clock, settings=outbox_settings(max_retries=50))

    _drain(worker, clock)

    assert [] == recorder.order_violations
    assert {"delivered": 300} == statuses(engine)
    assert len(recorder.attempts) > 300  # failures really happened
    per_key: dict[str, list[int]] = {}
    for message_id in recorder.delivered:
        per_key.setdefault(f"k{message_id % 12}", []).append(message_id)
    assert all(ids == sorted(ids) for ids in per_key.values())


def test_failed_message_waits_out_its_backoff(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """A failed message is not leased again before its jittered backoff has passed."""
    put_messages(engine, 1, clock=clock)
    recorder = Recorder(fail=lambda m: unavailable(m) if m.attempts == 1 else None)
    worker = _worker(
        loop,
        engine,
        recorder,
        clock,
        settings=outbox_settings(initial_backoff=timedelta(seconds=8)),
    )

    first = worker.run_once()
    (row,) = table(engine)
    wait = row.next_attempt_at - clock.now()
    early = worker.run_once()
    clock.advance(wait.total_seconds() + 0.001)
    late = worker.run_once()

    assert (1, 1) == (first.leased, first.retried)
    assert timedelta(0) <= wait <= timedelta(seconds=8)
    assert 0 == early.leased
    assert (1, 1) == (late.leased, late.delivered)
    assert "ProviderUnavailable (HTTP 503)" in (row.last_error or "")


def test_retries_run_out_then_dead_letter(
    loop: Loop, engine: Engine, clock: ManualClock, metrics: Metrics
) -> None:
    """A message failing every time is attempted 1 + max_retries times, then dead-lettered."""
    put_messages(engine, 1, clock=clock, max_retries=3)
    secret = Secret("tok_" + "s" * 24)
    recorder = Recorder(
        fail=lambda m: ProviderUnavailable(
            f"bad token {secret.get_secret_value()}", status_code=502
        )
    )

    _drain(_worker(loop, engine, recorder, clock), clock, step=120)

    (row,) = table(engine)
    assert ("dead", 4, 4) == (row.status, row.attempts, len(recorder.attempts))
    assert secret.get_secret_value() not in (row.last_error or "")
    assert 1 == sample(
        metrics, "integration_outbox_dead_letters_total", provider="crm_provider", kind="request"
    )


def test_a_dead_letter_does_not_block_its_key(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """Once the head of a key is dead-lettered, the key's later messages are delivered."""
    put_messages(engine, 3, keys=1, clock=clock)
    poison = table(engine)[0].id
    recorder = Recorder(
        fail=lambda m: ProviderUnavailable("422?", status_code=503) if m.id == poison else None
    )

    _drain(
        _worker(loop, engine, recorder, clock, settings=outbox_settings(max_retries=1)),
        clock,
        step=60,
    )

    assert ["dead", "delivered", "delivered"] == [r.status for r in table(engine)]
    assert poison not in recorder.delivered


def test_a_crashed_workers_leases_come_back_after_expiry(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """Messages leased by a worker that died mid-batch are delivered by another after the lease."""
    put_messages(engine, 40, keys=4, clock=clock)

    class Crash(BaseException):
        pass

    def die_on_third(message: OutboxMessage, seen: list[int] = []) -> None:  # noqa: B006
        seen.append(message.id)
        if len(seen) == 3:
            raise Crash  # not an Exception: escapes like a process dying mid-batch

    crashing = _worker(
        loop, engine, die_on_third, clock, lease=timedelta(seconds=30), batch_size=10, concurrency=1
    )
    with pytest.raises(Crash):
        crashing.run_once()
    leased = [r for r in table(engine) if r.lease_owner == crashing.worker_id]
    recorder = Recorder()
    recorder.expect(engine)
    survivor = _worker(loop, engine, recorder, clock, lease=timedelta(seconds=30))

    before_expiry = survivor.run_once()
    clock.advance(31)
    after_expiry = survivor.run_once()
    _drain(survivor, clock)

    assert 4 == len(leased)  # one head per key
    assert 4 == after_expiry.reclaimed
    assert 0 == before_expiry.leased - before_expiry.delivered  # did not take the leased ones
    assert all(r.id not in recorder.delivered[: before_expiry.delivered] for r in leased)
    assert {"delivered": 40} == statuses(engine)
    assert [] == recorder.order_violations
    assert all(r.attempts == 2 for r in table(engine) if r.id in {x.id for x in leased})


def test_a_message_whose_workers_keep_dying_ends_dead_unsent(
    loop: Loop, engine: Engine, clock: ManualClock, metrics: Metrics
) -> None:
    """Attempts lost with crashed workers stay counted: once spent, the message dies unsent."""
    put_messages(engine, 1, clock=clock, max_retries=1)

    class Crash(BaseException):
        pass

    def crash(_message: OutboxMessage) -> None:
        raise Crash

    for _ in range(2):  # two attempts allowed (1 + max_retries), both lost
        with pytest.raises(Crash):
            _worker(loop, engine, crash, clock, concurrency=1).run_once()
        clock.advance(31)
    recorder = Recorder()
    result = _worker(loop, engine, recorder, clock).run_once()

    (row,) = table(engine)
    assert ("dead", 0) == (row.status, len(recorder.attempts))
    assert (1, 1) == (result.reclaimed, result.dead)
    assert "retries spent" in (row.last_error or "")
    assert 1 == sample(
        metrics, "integration_outbox_dead_letters_total", provider="crm_provider", kind="request"
    )


@pytest.mark.parametrize(("concurrency", "step"), [(1, 4.0), (3, 1.5)])
def test_a_long_batch_renews_its_leases(
    loop: Loop, engine: Engine, clock: ManualClock, concurrency: int, step: float
) -> None:
    """A batch outliving its lease renews it: another worker cannot take its messages meanwhile."""
    put_messages(engine, 12, clock=clock)
    rival = _worker(loop, engine, Recorder(), clock, lease=timedelta(seconds=10))
    stolen: list[int] = []

    async def slow(message: OutboxMessage) -> None:
        # Each send takes `step` seconds; the batch takes far longer than the
        # 10 s lease, and another worker keeps trying to lease meanwhile.
        clock.advance(step)
        stolen.append((await rival.worker.run_once()).leased)

    worker = _worker(
        loop,
        engine,
        slow,
        clock,
        lease=timedelta(seconds=10),
        batch_size=12,
        concurrency=concurrency,
    )
    result = worker.run_once()

    assert clock.now() - table(engine)[0].created_at > timedelta(seconds=12)
    assert 12 == result.delivered
    assert [0] * 12 == stolen
    assert {"delivered": 12} == statuses(engine)


def test_unavailable_provider_is_not_leased_and_burns_nothing(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """While the breaker is open nothing is leased; a failure that opens it is given back."""
    put_messages(engine, 5, clock=clock, max_retries=0)
    state = {"available": True}

    def fail_and_open(message: OutboxMessage) -> None:
        state["available"] = False  # this failure opened the provider's breaker
        raise unavailable(message)

    worker = _worker(
        loop, engine, fail_and_open, clock, availability=lambda _p: state["available"], batch_size=1
    )

    first = worker.run_once()
    while_open = worker.run_once()
    rows = table(engine)

    assert (1, 1, 0) == (first.leased, first.deferred, first.dead)
    assert 0 == while_open.leased
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)


def test_short_circuited_calls_wait_for_the_breaker(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """CircuitOpen from the gateway defers the message until the breaker admits trials."""
    put_messages(engine, 1, clock=clock, max_retries=0)
    worker = _worker(
        loop, engine, lambda m: (_ for _ in ()).throw(CircuitOpen("open", retry_in=20.0)), clock
    )

    result = worker.run_once()
    (row,) = table(engine)

    assert (1, 0) == (result.deferred, row.attempts)
    assert clock.now() + timedelta(seconds=20) == row.next_attempt_at


def test_stop_finishes_the_current_delivery_and_releases_the_rest(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """Stopping mid-batch settles the delivery in progress and gives the rest back at once."""
    put_messages(engine, 10, clock=clock)
    delivered: list[int] = []

    def deliver_then_stop(message: OutboxMessage) -> None:
        worker.stop()
        delivered.append(message.id)

    worker = _worker(loop, engine, deliver_then_stop, clock, batch_size=10, concurrency=1)

    result = worker.run()
    rows = table(engine)

    assert (1, 9) == (result.delivered, result.released)
    assert 1 == sum(r.status == "delivered" for r in rows)
    released = [r for r in rows if r.status == "pending"]
    assert 9 == len(released)
    assert all(r.attempts == 0 and r.lease_owner is None for r in released)


def test_a_batch_is_delivered_concurrently_one_message_per_key(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """With concurrency 4, four of a batch are in flight at once, and never two of one key."""
    put_messages(engine, 40, keys=8, clock=clock)
    in_flight: set[str] = set()
    same_key_overlaps: list[int] = []
    peak = {"all": 0}
    gate = asyncio.Barrier(4)

    async def deliver(message: OutboxMessage) -> None:
        if message.ordering_key in in_flight:
            same_key_overlaps.append(message.id)
        in_flight.add(message.ordering_key or "")
        peak["all"] = max(peak["all"], len(in_flight))
        if message.id <= 4:
            async with asyncio.timeout(10):
                await gate.wait()  # the first four only finish together: proof they overlapped
        await asyncio.sleep(0)  # let the other sends of the window start
        in_flight.discard(message.ordering_key or "")

    _drain(_worker(loop, engine, deliver, clock, batch_size=8, concurrency=4), clock)

    assert 4 == peak["all"]
    assert [] == same_key_overlaps
    assert {"delivered": 40} == statuses(engine)


def test_two_workers_side_by_side_never_share_a_message(engine: Engine) -> None:
    """Two workers, each on its own thread and event loop, share the work; none delivers twice."""
    put_messages(engine, 600, keys=40)
    recorder = Recorder()
    recorder.expect(engine)
    settings = outbox_settings(batch_size=20)
    shares: list[list[int]] = [[], []]
    # Each worker's first send waits for the other's: both hold a batch at once.
    both_started = threading.Barrier(2, timeout=30)
    first = [threading.Event(), threading.Event()]
    share_lock = threading.Lock()
    url = engine.url.render_as_string(hide_password=False)

    def deliver_as(n: int) -> Callable[[OutboxMessage], Awaitable[None]]:
        async def deliver(message: OutboxMessage) -> None:
            with share_lock:
                wait, _ = not first[n].is_set(), first[n].set()
            if wait:
                await asyncio.to_thread(both_started.wait)
            recorder(message)
            with share_lock:
                shares[n].append(message.id)

        return deliver

    async def work(n: int, rounds: int) -> None:
        async_engine = create_async_db_engine(url)
        try:
            worker = AsyncOutboxWorker(
                async_engine, settings, deliver=deliver_as(n), providers=["crm_provider"]
            )
            for _ in range(rounds):
                await worker.run(until_idle=True)
        finally:
            await async_engine.dispose()

    threads = [threading.Thread(target=asyncio.run, args=(work(n, 1),)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # A worker may go idle while the other still holds a key's head.
    asyncio.run(work(0, 3))

    assert 600 == len(recorder.delivered)
    assert 600 == len(set(recorder.delivered))
    assert all(shares), "both workers must have delivered"
    assert set() == set(shares[0]) & set(shares[1])
    assert [] == recorder.order_violations
    assert {"delivered": 600} == statuses(engine)


def test_async_worker_drains_in_order(engine: Engine, clock: ManualClock) -> None:
    """The asyncio worker runs the same decisions: delivered once each, FIFO per key."""
    put_messages(engine, 80, keys=8, clock=clock)
    recorder = Recorder(
        fail=lambda m: unavailable(m) if m.attempts == 1 and m.id % 3 == 0 else None
    )
    recorder.expect(engine)
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))

    async def deliver(message: OutboxMessage) -> None:
        recorder(message)

    async def scenario() -> None:
        worker = AsyncOutboxWorker(
            async_engine,
            outbox_settings(),
            deliver=deliver,
            providers=["crm_provider"],
            clock=clock,
            rng=random.Random(2),
        )
        for _ in range(500):
            if (await worker.run_once()).leased == 0:
                if statuses(engine) == {"delivered": 80}:
                    return
                clock.advance(5)
        raise AssertionError("did not drain")

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert [] == recorder.order_violations
    assert sorted(recorder.delivered) == [r.id for r in table(engine)]  # each once, none twice


def test_async_worker_task_stops_on_request(engine: Engine) -> None:
    """An AsyncOutboxWorker started as a task delivers, and returns when stopped."""
    put_messages(engine, 30)
    seen: list[int] = []
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))

    async def deliver(message: OutboxMessage) -> None:
        seen.append(message.id)

    async def scenario() -> int:
        worker = AsyncOutboxWorker(
            async_engine,
            outbox_settings(poll_interval=timedelta(milliseconds=10)),
            deliver=deliver,
            providers=["crm_provider"],
        )
        task = worker.start()
        for _ in range(500):
            if len(seen) == 30:
                break
            await asyncio.sleep(0.01)
        worker.stop()
        return (await asyncio.wait_for(task, 10)).delivered

    try:
        delivered = asyncio.run(scenario())
    finally:
        asyncio.run(async_engine.dispose())

    assert 30 == delivered
    assert {"delivered": 30} == statuses(engine)


def test_worker_refuses_an_unknown_provider(loop: Loop, sqlite_engine: Engine) -> None:
    """A worker asked to serve an undeclared provider fails at construction, naming it."""
    with pytest.raises(UnknownProviderError) as caught:
        loop.worker(sqlite_engine, outbox_settings(), deliver=print, providers=["nope"])

    assert "'nope'" in str(caught.value)
