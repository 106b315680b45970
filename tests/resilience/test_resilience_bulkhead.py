"""The bulkhead admits callers in arrival order (FIFO), threads and tasks alike.

Each test queues callers one at a time, waiting until the bulkhead reports the
previous one queued, so arrival order is known without any timing; then slots
are released one by one and the order of admission is recorded.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from idis.integrations._http import httpx
from idis.integrations.config import RetryPolicy
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock
from idis.integrations.resilience._bulkhead import AsyncBulkhead, ThreadBulkhead

HANG_GUARD = 30.0


def _wait_until(condition: Any) -> None:
    event = threading.Event()
    for _ in range(int(HANG_GUARD / 0.001)):  # a hang guard, not a timing
        if condition():
            return
        event.wait(0.001)
    pytest.fail("condition never became true")


def test_thread_bulkhead_admits_waiters_in_arrival_order() -> None:
    """Ten threads queued behind a full bulkhead get the slot in the order they queued."""
    bulkhead = ThreadBulkhead(1)
    assert bulkhead.try_acquire()
    admitted: list[int] = []
    done = threading.Event()

    def waiter(n: int) -> None:
        assert bulkhead.acquire(HANG_GUARD)
        admitted.append(n)
        done.set()

    threads = []
    for n in range(10):
        thread = threading.Thread(target=waiter, args=(n,))
        thread.start()
        threads.append(thread)
        _wait_until(lambda n=n: bulkhead.waiting == n + 1)

    for n in range(10):
        done.clear()
        bulkhead.release()
        _wait_until(lambda n=n: len(admitted) == n + 1)
    bulkhead.release()
    for thread in threads:
        thread.join(HANG_GUARD)

    assert list(range(10)) == admitted
    assert (0, 0) == (bulkhead.in_flight, bulkhead.waiting)


def test_thread_bulkhead_never_lets_a_newcomer_barge_past_a_waiter() -> None:
    """A slot freed while someone waits goes to the waiter, not to a caller trying right then."""
    bulkhead = ThreadBulkhead(1)
    assert bulkhead.try_acquire()
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(bulkhead.acquire(HANG_GUARD)))
    thread.start()
    _wait_until(lambda: bulkhead.waiting == 1)

    bulkhead.release()
    barged = bulkhead.try_acquire()
    thread.join(HANG_GUARD)

    assert (False, [True]) == (barged, got)
    assert 1 == bulkhead.in_flight


def test_thread_bulkhead_timeout_gives_up_its_place() -> None:
    """A waiter that times out leaves the queue; the slot goes to the next one."""
    bulkhead = ThreadBulkhead(1)
    assert bulkhead.try_acquire()

    timed_out = bulkhead.acquire(0.0)
    assert bulkhead.waiting == 0
    bulkhead.release()

    assert (False, True) == (timed_out, bulkhead.try_acquire())


def test_async_bulkhead_admits_waiters_in_arrival_order() -> None:
    """Ten tasks queued behind a full bulkhead get the slot in the order they queued."""

    async def scenario() -> tuple[list[int], int]:
        bulkhead = AsyncBulkhead(1)
        assert bulkhead.try_acquire()
        admitted: list[int] = []

        async def waiter(n: int) -> None:
            assert await bulkhead.acquire(HANG_GUARD)
            admitted.append(n)

        tasks = []
        for n in range(10):
            tasks.append(asyncio.create_task(waiter(n)))
            await asyncio.sleep(0)
        # A newcomer arriving as slots free never gets ahead of the queue.
        barged = []
        for _ in range(10):
            bulkhead.release()
            barged.append(bulkhead.try_acquire())
            await asyncio.sleep(0)
        bulkhead.release()
        await asyncio.gather(*tasks)
        return admitted, barged.count(True)

    admitted, barged = asyncio.run(scenario())

    assert list(range(10)) == admitted
    assert 0 == barged


def test_async_bulkhead_cancelled_waiter_leaves_the_queue() -> None:
    """A cancelled waiter neither keeps its place nor swallows a slot."""

    async def scenario() -> tuple[int, int, bool]:
        bulkhead = AsyncBulkhead(1)
        assert bulkhead.try_acquire()
        first = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        second = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        bulkhead.release()
        got = await second
        return bulkhead.in_flight, bulkhead.waiting, got

    assert (1, 0, True) == asyncio.run(scenario())


def test_gateway_serves_64_async_callers_in_arrival_order(helpers: Any) -> None:
    """Through the async gateway, 64 callers on 4 slots reach the provider in arrival order."""
    provider = helpers.provider_settings(
        max_concurrency=4, bulkhead_wait=HANG_GUARD, retry=RetryPolicy(max_attempts=1)
    )

    async def scenario() -> list[str]:
        gate = asyncio.Event()
        arrived: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            arrived.append(request.url.path.rsplit("/", 1)[-1])
            await gate.wait()
            return httpx.Response(200, json={})

        gateway = AsyncGateway(
            helpers.settings_for(provider),
            clock=ManualClock(),
            transport=httpx.MockTransport(handler),
        )
        try:
            tasks = []
            for n in range(64):
                tasks.append(
                    asyncio.create_task(
                        gateway.get_json("crm", "record", path_params={"id": f"{n:02d}"})
                    )
                )
                await asyncio.sleep(0)
            gate.set()
            await asyncio.gather(*tasks)
        finally:
            await gateway.aclose()
        return arrived

    arrived = asyncio.run(scenario())

    assert [f"{n:02d}" for n in range(64)] == arrived


def test_gateway_serves_queued_threads_in_arrival_order(helpers: Any) -> None:
    """Through the sync gateway, threads queued for the only slot are served in arrival order."""
    provider = helpers.provider_settings(
        max_concurrency=1, bulkhead_wait=HANG_GUARD, retry=RetryPolicy(max_attempts=1)
    )
    gate = threading.Event()
    arrived: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        arrived.append(request.url.path.rsplit("/", 1)[-1])
        if len(arrived) == 1:
            gate.wait(HANG_GUARD)
        return httpx.Response(200, json={})

    with Gateway(
        helpers.settings_for(provider), clock=ManualClock(), transport=httpx.MockTransport(handler)
    ) as gateway:
        bulkhead = gateway._p.runtime("crm").bulkhead
        threads = []
        for n in range(12):
            thread = threading.Thread(
                target=gateway.get_json,
                args=("crm", "record"),
                kwargs={"path_params": {"id": f"{n:02d}"}},
            )
            thread.start()
            threads.append(thread)
            if n == 0:
                _wait_until(lambda: len(arrived) == 1)
            else:
                _wait_until(lambda n=n: bulkhead.waiting == n)
        gate.set()
        for thread in threads:
            thread.join(HANG_GUARD)

    assert [f"{n:02d}" for n in range(12)] == arrived


def test_a_thread_coming_back_for_more_waits_behind_the_queue(helpers: Any) -> None:
    """A caller that frees the only slot and calls again at once is served after the waiter.

    threading.Semaphore let it barge: the releasing thread keeps the GIL and
    takes the slot back before the woken waiter runs, so a busy caller could
    starve the others (issue 16's 1 s p99 with 64 threads).
    """
    provider = helpers.provider_settings(
        max_concurrency=1, bulkhead_wait=HANG_GUARD, retry=RetryPolicy(max_attempts=1)
    )
    arrived: list[str] = []
    holder: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        arrived.append(name)
        if name == "a1":
            _wait_until(lambda: holder[0].waiting == 1)  # B is queued behind us
        return httpx.Response(200, json={})

    with Gateway(
        helpers.settings_for(provider), clock=ManualClock(), transport=httpx.MockTransport(handler)
    ) as gateway:
        holder.append(gateway._p.runtime("crm").bulkhead)
        b = threading.Thread(
            target=gateway.get_json, args=("crm", "record"), kwargs={"path_params": {"id": "b"}}
        )

        def start_b_once_a_is_inside(request: httpx.Request) -> None:
            if request.url.path.endswith("/a1"):
                b.start()

        gateway._client.event_hooks["request"] = [start_b_once_a_is_inside]
        gateway.get_json("crm", "record", path_params={"id": "a1"})
        gateway.get_json("crm", "record", path_params={"id": "a2"})
        b.join(HANG_GUARD)

    assert ["a1", "b", "a2"] == arrived


def test_a_task_coming_back_for_more_waits_behind_the_queue(helpers: Any) -> None:
    """Async twin: a task that frees the only slot and calls again is served after the waiter."""
    provider = helpers.provider_settings(
        max_concurrency=1, bulkhead_wait=HANG_GUARD, retry=RetryPolicy(max_attempts=1)
    )

    async def scenario() -> list[str]:
        arrived: list[str] = []
        b_started = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            name = request.url.path.rsplit("/", 1)[-1]
            arrived.append(name)
            if name == "a1":
                await b_started.wait()
                for _ in range(5):  # let B reach the bulkhead queue
                    await asyncio.sleep(0)
            return httpx.Response(200, json={})

        gateway = AsyncGateway(
            helpers.settings_for(provider),
            clock=ManualClock(),
            transport=httpx.MockTransport(handler),
        )

        async def b() -> None:
            b_started.set()
            await gateway.get_json("crm", "record", path_params={"id": "b"})

        try:
            first = asyncio.create_task(gateway.get_json("crm", "record", path_params={"id": "a1"}))
            await asyncio.sleep(0)
            other = asyncio.create_task(b())
            await first
            await gateway.get_json("crm", "record", path_params={"id": "a2"})
            await other
        finally:
            await gateway.aclose()
        return arrived

    assert ["a1", "b", "a2"] == asyncio.run(scenario())


def test_async_bulkhead_free_slot_is_taken_without_queueing() -> None:
    """acquire() on a bulkhead with a free slot takes it at once: nobody is queued."""

    async def scenario() -> tuple[bool, int, int]:
        bulkhead = AsyncBulkhead(2)
        got = await bulkhead.acquire(HANG_GUARD)
        return got, bulkhead.in_flight, bulkhead.waiting

    assert (True, 1, 0) == asyncio.run(scenario())


def test_async_bulkhead_slot_handed_to_a_cancelled_waiter_passes_on() -> None:
    """A slot handed over to a waiter that is cancelled in the same loop turn, before it
    resumed, goes to the next waiter instead of being lost."""

    async def scenario() -> tuple[bool, int, int]:
        bulkhead = AsyncBulkhead(1)
        assert bulkhead.try_acquire()
        first = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        second = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        await asyncio.sleep(0)
        bulkhead.release()  # hands the slot to ``first``...
        first.cancel()  # ...which is cancelled before it runs again
        await asyncio.gather(first, return_exceptions=True)
        got = await second
        return got, bulkhead.in_flight, bulkhead.waiting

    assert (True, 1, 0) == asyncio.run(scenario())


def test_async_bulkhead_release_skips_a_waiter_cancelled_in_the_same_turn() -> None:
    """A release in the same loop turn as a waiter's cancellation (its ticket is done but
    still queued) skips that ticket and hands the slot to the next waiter."""

    async def scenario() -> tuple[bool, bool, int, int]:
        bulkhead = AsyncBulkhead(1)
        assert bulkhead.try_acquire()
        first = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        second = asyncio.create_task(bulkhead.acquire(HANG_GUARD))
        await asyncio.sleep(0)
        first.cancel()  # cancels ``first``'s ticket at once...
        still_queued = bulkhead.waiting == 2  # ...but its handler leaves the queue later
        bulkhead.release()
        await asyncio.gather(first, return_exceptions=True)
        got = await second
        return still_queued, got, bulkhead.in_flight, bulkhead.waiting

    assert (True, True, 1, 0) == asyncio.run(scenario())
