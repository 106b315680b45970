"""Concurrent calls through one breaker run concurrently: no lock is held across the I/O.

pybreaker's own ``call()``/``calling()`` hold the breaker lock for the whole
protected call. These tests make every call wait inside the provider until all
of them are inside at once: if anything serialized them, the first call would
wait forever and the guard would fail the test (a hang guard, not a timing).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from idis.integrations._http import httpx
from idis.integrations.config import BreakerPolicy, RetryPolicy
from idis.integrations.exceptions import ProviderUnavailable
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock

N = 64
#: Only reached when the calls are serialized (the failure this test exists to catch).
HANG_GUARD = 30.0


def test_64_async_calls_are_in_flight_through_one_breaker_at_once(helpers: Any) -> None:
    """64 tasks all reach the provider before any is answered, through one provider breaker."""
    provider = helpers.provider_settings(max_concurrency=N, retry=RetryPolicy(max_attempts=1))
    settings = helpers.settings_for(provider)

    async def scenario() -> tuple[list[Any], int, str]:
        in_flight = 0
        peak = 0
        everyone_in = asyncio.Event()

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            if in_flight == N:
                everyone_in.set()
            await everyone_in.wait()
            in_flight -= 1
            return httpx.Response(200, json={"ok": True})

        gateway = AsyncGateway(
            settings, clock=ManualClock(), transport=httpx.MockTransport(handler)
        )
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(gateway.get_json("crm", "records") for _ in range(N))),
                HANG_GUARD,
            )
            return results, peak, gateway.breaker_state("crm")
        finally:
            await gateway.aclose()

    results, peak, state = asyncio.run(scenario())

    assert [{"ok": True}] * N == results
    assert N == peak
    assert "closed" == state


def test_64_threads_are_in_flight_through_one_breaker_at_once(helpers: Any) -> None:
    """64 threads all reach the provider before any is answered (sync gateway, one breaker)."""
    provider = helpers.provider_settings(max_concurrency=N, retry=RetryPolicy(max_attempts=1))
    barrier = threading.Barrier(N, timeout=HANG_GUARD)

    def handler(request: httpx.Request) -> httpx.Response:
        barrier.wait()  # raises BrokenBarrierError if the 64 never meet
        return httpx.Response(200, json={"ok": True})

    with (
        Gateway(
            helpers.settings_for(provider),
            clock=ManualClock(),
            transport=httpx.MockTransport(handler),
        ) as gateway,
        ThreadPoolExecutor(max_workers=N) as pool,
    ):
        futures = [pool.submit(gateway.get_json, "crm", "records") for _ in range(N)]
        results = [f.result() for f in futures]

    assert [{"ok": True}] * N == results
    assert False is barrier.broken


def test_bulkhead_caps_calls_in_flight(helpers: Any) -> None:
    """With max_concurrency=8, 64 queued async calls never have more than 8 in flight."""
    provider = helpers.provider_settings(
        max_concurrency=8, bulkhead_wait=HANG_GUARD, retry=RetryPolicy(max_attempts=1)
    )

    async def scenario() -> tuple[int, int]:
        in_flight = 0
        peak = 0
        done = 0

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal in_flight, peak, done
            in_flight += 1
            peak = max(peak, in_flight)
            for _ in range(3):  # stay in flight across a few loop turns
                await asyncio.sleep(0)
            in_flight -= 1
            done += 1
            return httpx.Response(200, json={})

        gateway = AsyncGateway(
            helpers.settings_for(provider),
            clock=ManualClock(),
            transport=httpx.MockTransport(handler),
        )
        try:
            await asyncio.gather(*(gateway.get_json("crm", "records") for _ in range(N)))
        finally:
            await gateway.aclose()
        return peak, done

    peak, done = asyncio.run(scenario())

    assert 8 == peak
    assert N == done


def test_cancelled_trial_call_gives_its_slot_back(helpers: Any, read_metric: Any) -> None:
    """A half-open trial cancelled mid-flight frees its slot, so the next caller can close it."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(
            failure_threshold=1, minimum_calls=1000, reset_timeout=10.0, half_open_max_calls=1
        ),
    )
    clock = ManualClock()

    async def scenario() -> tuple[str, Any]:
        entered = asyncio.Event()
        calls = 0

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls == 1:
                return httpx.Response(500)
            if calls == 2:
                entered.set()
                await asyncio.Event().wait()  # hangs until cancelled
            return httpx.Response(200, json={"ok": True})

        gateway = AsyncGateway(
            helpers.settings_for(provider), clock=clock, transport=httpx.MockTransport(handler)
        )
        try:
            with contextlib.suppress(ProviderUnavailable):
                await gateway.get_json("crm", "records")
            clock.advance(10)
            trial = asyncio.create_task(gateway.get_json("crm", "records"))
            await entered.wait()
            trial.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trial
            result = await gateway.get_json("crm", "records")
            return gateway.breaker_state("crm"), result
        finally:
            await gateway.aclose()

    state, result = asyncio.run(scenario())

    assert ("closed", {"ok": True}) == (state, result)
    assert 0.0 == read_metric("integration_in_flight_requests", provider="crm")
