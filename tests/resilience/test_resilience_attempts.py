"""``ProviderError.sent``: how many requests of a call went out, on every error, both faces.

The outbox counts a delivery attempt only when ``sent >= 1`` (issue 11, the
poison message): a call refused before anything went out must say 0, and a
call whose retry was refused after a real attempt must report that attempt's
error, not the refusal.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest

from idis.integrations._http import httpx
from idis.integrations.config import BreakerPolicy, RetryPolicy, TimeoutPolicy
from idis.integrations.exceptions import (
    BulkheadFull,
    CircuitOpen,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock

REQUESTS = "integration_requests_total"


def statuses(*codes: int) -> Callable[[httpx.Request], httpx.Response]:
    """A handler answering ``codes`` in order; the last one repeats."""
    counter = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(codes[min(next(counter), len(codes) - 1)], json={})

    return handler


def test_every_attempt_that_went_out_is_counted(make_harness: Any, helpers: Any) -> None:
    """Three 503s: the last one is raised with sent=3."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), statuses(503))

    with pytest.raises(ProviderUnavailable) as info:
        h.get_json("crm", "records")

    assert (3, 3) == (info.value.sent, len(h.requests))


def test_a_rejected_request_went_out_once(make_harness: Any, helpers: Any) -> None:
    """A 4xx is not retried and says the request went out."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), statuses(422))

    with pytest.raises(ProviderRejected) as info:
        h.request("crm", "records", method="POST", json={})

    assert 1 == info.value.sent


def test_an_open_breaker_refuses_with_nothing_sent(make_harness: Any, helpers: Any) -> None:
    """A call the open breaker refuses raises CircuitOpen with sent=0."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000),
    )
    h = make_harness(helpers.settings_for(provider), statuses(503))
    with pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")

    with pytest.raises(CircuitOpen) as info:
        h.get_json("crm", "records")

    assert (0, 1) == (info.value.sent, len(h.requests))


def test_a_breaker_opening_mid_call_reports_the_provider_error(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """Issue 11: the retry after the attempt that opened the breaker is refused, and the call
    ends with that attempt's 503 (sent=1), not with CircuitOpen (which meant 'never sent')."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=3, budget_min_retries=100),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000, reset_timeout=30.0),
    )
    h = make_harness(helpers.settings_for(provider), statuses(503))

    with pytest.raises(ProviderUnavailable) as info:
        h.get_json("crm", "records")

    assert (503, 1, 1) == (info.value.status_code, info.value.sent, len(h.requests))
    assert any("circuit breaker" in note for note in info.value.__notes__)
    assert 1.0 == read_metric(REQUESTS, provider="crm", endpoint="records", outcome="error")
    assert 0.0 == read_metric(
        REQUESTS, provider="crm", endpoint="records", outcome="short_circuited"
    )


def test_a_failed_half_open_trial_counts_as_sent(make_harness: Any, helpers: Any) -> None:
    """The trial call of a half-open breaker that fails is an attempt that went out."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=3, budget_min_retries=100),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000, reset_timeout=30.0),
    )
    h = make_harness(helpers.settings_for(provider), statuses(503))
    with pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")
    h.clock.advance(30)

    with pytest.raises(ProviderUnavailable) as trial:
        h.request("crm", "records", method="PUT", json={}, idempotency_key="m-1")

    assert (1, 2) == (trial.value.sent, len(h.requests))
    assert "open" == h.gateway.breaker_state("crm")


def test_a_deadline_spent_before_the_retry_reports_the_provider_error(
    mode: str, helpers: Any, metrics: Any
) -> None:
    """A caller that oversleeps its backoff past the deadline still reports the 503 it got."""
    clock = ManualClock()
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=3, initial_backoff=1.0, budget_min_retries=100),
        timeouts=TimeoutPolicy(deadline=5.0),
    )

    def oversleep(seconds: float) -> None:
        clock.advance(seconds + 10)  # a loaded machine wakes the caller late

    async def aoversleep(seconds: float) -> None:
        oversleep(seconds)

    error = _call_once(
        mode,
        helpers.settings_for(provider),
        statuses(503),
        clock=clock,
        metrics=metrics,
        sleep=oversleep if mode == "sync" else aoversleep,
    )

    assert isinstance(error, ProviderUnavailable)
    assert 1 == error.sent
    assert any("deadline exceeded" in note for note in error.__notes__)


def test_a_full_bulkhead_on_the_retry_reports_the_provider_error(
    mode: str, helpers: Any, metrics: Any
) -> None:
    """When another call takes the only slot during our backoff, we raise our 503 (sent=1)."""
    clock = ManualClock()
    provider = helpers.provider_settings(max_concurrency=1, bulkhead_wait=0.0)
    other_inside = threading.Event()
    release_other = threading.Event()
    holder: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/records/other":
            other_inside.set()
            release_other.wait(30)  # a hang guard, released below
            return httpx.Response(200, json={})
        return httpx.Response(503, json={})

    async def ahandler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/records/other":
            other_inside.set()
            while not release_other.is_set():
                await asyncio.sleep(0)
            return httpx.Response(200, json={})
        return httpx.Response(503, json={})

    def sleep(seconds: float) -> None:
        # Our backoff: another caller takes the only slot and stays in the provider.
        gateway = holder[0]
        thread = threading.Thread(
            target=gateway.get_json, args=("crm", "record"), kwargs={"path_params": {"id": "other"}}
        )
        thread.start()
        holder.append(thread)
        assert other_inside.wait(30)

    async def asleep(seconds: float) -> None:
        gateway = holder[0]
        holder.append(
            asyncio.ensure_future(gateway.get_json("crm", "record", path_params={"id": "other"}))
        )
        while not other_inside.is_set():
            await asyncio.sleep(0)

    settings = helpers.settings_for(provider)
    error: BaseException | None = None
    if mode == "sync":
        gateway = Gateway(
            settings,
            clock=clock,
            sleep=sleep,
            metrics=metrics,
            transport=httpx.MockTransport(handler),
        )
        holder.append(gateway)
        try:
            gateway.get_json("crm", "records")
        except ProviderError as exc:
            error = exc
        release_other.set()
        holder[1].join(30)
        gateway.close()
    else:

        async def scenario() -> BaseException | None:
            gateway = AsyncGateway(
                settings,
                clock=clock,
                sleep=asleep,
                metrics=metrics,
                transport=httpx.MockTransport(ahandler),
            )
            holder.append(gateway)
            caught = None
            try:
                await gateway.get_json("crm", "records")
            except ProviderError as exc:
                caught = exc
            release_other.set()
            await holder[1]
            await gateway.aclose()
            return caught

        error = asyncio.run(scenario())

    assert isinstance(error, ProviderUnavailable)
    assert 1 == error.sent
    assert any("calls already in flight" in note for note in error.__notes__)


def test_a_full_bulkhead_with_nothing_sent_says_so(make_harness: Any, helpers: Any) -> None:
    """BulkheadFull is raised only when none of the call's requests went out."""
    provider = helpers.provider_settings(max_concurrency=1, bulkhead_wait=0.0)
    caught: list[BaseException] = []
    holder: list[Any] = []

    def handler(request: httpx.Request) -> Any:
        if request.url.path == "/records":
            if holder[0].mode == "sync":
                try:
                    holder[0].gateway.get_json("crm", "record", path_params={"id": "1"})
                except BulkheadFull as exc:
                    caught.append(exc)
                return httpx.Response(200, json={})

            async def inner() -> httpx.Response:
                try:
                    await holder[0].gateway.get_json("crm", "record", path_params={"id": "1"})
                except BulkheadFull as exc:
                    caught.append(exc)
                return httpx.Response(200, json={})

            return inner()
        return httpx.Response(200, json={})

    h = make_harness(helpers.settings_for(provider), handler)
    holder.append(h)

    h.get_json("crm", "records")

    assert 1 == len(caught)
    assert isinstance(caught[0], BulkheadFull)
    assert 0 == caught[0].sent


def test_a_pause_beyond_the_deadline_refuses_with_nothing_sent(
    make_harness: Any, helpers: Any
) -> None:
    """A caller arriving during a Retry-After pause longer than its deadline sends nothing."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        lambda r: httpx.Response(429, headers={"Retry-After": "20"}),
    )
    with pytest.raises(RateLimited) as first:
        h.get_json("crm", "records", timeout=5.0)

    with pytest.raises(RateLimited) as second:
        h.get_json("crm", "records", timeout=5.0)

    assert (1, 0) == (first.value.sent, second.value.sent)


def _call_once(
    mode: str, settings: Any, handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> BaseException | None:
    """One get_json through a fresh gateway of ``mode``; the error it raised, if any."""
    transport = httpx.MockTransport(handler)
    if mode == "sync":
        with Gateway(settings, transport=transport, **kwargs) as gateway:
            try:
                gateway.get_json("crm", "records")
            except ProviderError as exc:
                return exc
        return None

    async def scenario() -> BaseException | None:
        async with AsyncGateway(settings, transport=transport, **kwargs) as gateway:
            try:
                await gateway.get_json("crm", "records")
            except ProviderError as exc:
                return exc
        return None

    return asyncio.run(scenario())


def test_a_timeout_reports_its_cause_and_attempts(make_harness: Any, helpers: Any) -> None:
    """Transport errors keep the httpx error as their cause, and count their attempts."""
    provider = helpers.provider_settings(retry=RetryPolicy(max_attempts=2, budget_min_retries=100))

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    h = make_harness(helpers.settings_for(provider), handler)

    with pytest.raises(ProviderTimeout) as info:
        h.get_json("crm", "records")

    assert 2 == info.value.sent
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
