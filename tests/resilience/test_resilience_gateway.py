"""The gateway over httpx.MockTransport: retries, idempotency, 4xx, 429 pauses, deadline, budget,
bulkhead, malformed bodies, breaker integration and metrics, for the sync and the async gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Callable
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from idis.integrations._http import httpx
from idis.integrations.config import (
    BreakerPolicy,
    RateLimitPolicy,
    RetryPolicy,
    TimeoutPolicy,
)
from idis.integrations.exceptions import (
    BulkheadFull,
    CircuitOpen,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UnknownProviderError,
    UsageError,
)
from idis.integrations.resilience import CLOSED, OPEN, ManualClock
from idis.integrations.resilience._policy import backoff_cap, set_testing

ERRORS = "integration_errors_total"
REQUESTS = "integration_requests_total"


def ok(payload: Any = None) -> httpx.Response:
    """A 200 JSON response."""
    return httpx.Response(200, json={"ok": True} if payload is None else payload)


def sequence(*responses: Any) -> Callable[[httpx.Request], httpx.Response]:
    """A handler answering with ``responses`` in order (an exception instance is raised);
    the last one repeats."""
    items = list(responses)
    counter = itertools.count()

    def handler(request: httpx.Request) -> httpx.Response:
        item = items[min(next(counter), len(items) - 1)]
        if isinstance(item, Exception):
            raise item
        if isinstance(item, int):
            return httpx.Response(item, json={"error": item})
        assert isinstance(item, httpx.Response)
        return item

    return handler


# --------------------------------------------------------------------------- retries


def test_get_retried_on_5xx_with_capped_full_jitter(make_harness: Any, helpers: Any) -> None:
    """A GET failing 503 twice is retried and succeeds; each backoff is within its cap."""
    provider = helpers.provider_settings()
    h = make_harness(helpers.settings_for(provider), sequence(503, 502, ok({"n": 1})))

    result = h.get_json("crm", "records")

    assert {"n": 1} == result
    assert 3 == len(h.requests)
    assert 2 == len(h.sleeps)
    for retry_number, slept in enumerate(h.sleeps, start=1):
        assert 0.0 <= slept <= backoff_cap(provider.retry, retry_number)


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout"),
        (httpx.ConnectTimeout("connect timed out"), "timeout"),
        (httpx.ConnectError("connection refused"), "connection"),
        (httpx.RemoteProtocolError("server disconnected"), "connection"),
    ],
    ids=["read-timeout", "connect-timeout", "refused", "dropped"],
)
def test_get_retried_on_timeouts_and_connection_errors(
    make_harness: Any, helpers: Any, read_metric: Any, failure: Exception, error_type: str
) -> None:
    """Timeouts and connection failures are retried, and each failed attempt is counted by type."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(failure, ok()))

    result = h.get_json("crm", "records")

    assert {"ok": True} == result
    assert 2 == len(h.requests)
    assert 1.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type=error_type)
    assert 1.0 == read_metric(
        "integration_retries_total", provider="crm", endpoint="records", error_type=error_type
    )
    assert 1.0 == read_metric(REQUESTS, provider="crm", endpoint="records", outcome="success")


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_max_attempts_is_respected(make_harness: Any, helpers: Any, max_attempts: int) -> None:
    """A provider that always fails gets exactly max_attempts requests, then the last error."""
    retry = RetryPolicy(
        max_attempts=max_attempts, initial_backoff=0.1, max_backoff=1.0, budget_min_retries=100
    )
    provider = helpers.provider_settings(retry=retry)
    h = make_harness(helpers.settings_for(provider), sequence(503))

    with pytest.raises(ProviderUnavailable, match=r"crm records: server error \(HTTP 503\)"):
        h.get_json("crm", "records")

    assert max_attempts == len(h.requests)
    assert max_attempts - 1 == len(h.sleeps)
    assert all(0.0 <= s <= backoff_cap(retry, n) for n, s in enumerate(h.sleeps, start=1))


def test_backoff_caps_grow_exponentially_up_to_max_backoff(make_harness: Any, helpers: Any) -> None:
    """Over many retries no sleep exceeds its exponential cap or max_backoff."""
    retry = RetryPolicy(
        max_attempts=12, initial_backoff=0.05, max_backoff=0.4, budget_min_retries=100
    )
    provider = helpers.provider_settings(retry=retry)
    h = make_harness(helpers.settings_for(provider), sequence(500))

    with pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")

    caps = [backoff_cap(retry, n) for n in range(1, 12)]
    assert [0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4] == pytest.approx(caps)
    assert 11 == len(h.sleeps)
    assert all(0.0 <= s <= cap for s, cap in zip(h.sleeps, caps, strict=True))


@pytest.mark.parametrize(
    "failure",
    [503, httpx.ReadTimeout("read timed out"), httpx.RemoteProtocolError("dropped")],
    ids=["503", "timeout", "dropped"],
)
@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_non_idempotent_request_without_key_is_never_retried(
    make_harness: Any, helpers: Any, failure: Any, method: str
) -> None:
    """A POST/PATCH without an idempotency key reaches the provider exactly once, whatever fails."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(failure, ok()))

    with pytest.raises(ProviderError):
        h.request("crm", "records", method=method, json={"name": "Acme"})

    assert 1 == len(h.requests)
    assert [] == h.sleeps
    assert "idempotency-key" not in h.requests[0].headers


def test_post_with_idempotency_key_is_retried_with_the_header(
    make_harness: Any, helpers: Any
) -> None:
    """With an idempotency key a POST is retried, and every attempt carries the same key."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(503, httpx.ReadTimeout("slow"), httpx.Response(201, json={"id": "r1"})),
    )

    response = h.request(
        "crm", "records", method="POST", json={"name": "Acme"}, idempotency_key="deal-42-v7"
    )

    assert 201 == response.status_code
    assert ["deal-42-v7"] * 3 == [r.headers["idempotency-key"] for r in h.requests]
    assert [b'{"name":"Acme"}'] * 3 == [r.content for r in h.requests]


def test_every_attempt_of_a_call_shares_one_request_id(make_harness: Any, helpers: Any) -> None:
    """Retries of one call carry the same X-Request-ID; another call gets another one."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(503, ok()),
        request_id_header="X-Request-ID",
    )

    h.get_json("crm", "records")
    h.get_json("crm", "records")

    ids = [r.headers["x-request-id"] for r in h.requests]
    assert ids[0] == ids[1]
    assert ids[1] != ids[2]


def test_request_ids_are_letters_so_rb09s_429_grep_never_matches_them(
    make_harness: Any, helpers: Any
) -> None:
    """RB-09 Triage 2 greps the logs for "rate limit\\|429": one 16-hex-digit id in about 290
    contained "429". The ids are 64 random bits written as the letters a-p."""
    from idis.integrations.resilience._gateway import new_request_id

    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(*[ok()] * 40),
        request_id_header="X-Request-ID",
    )
    for _ in range(40):
        h.get_json("crm", "records")
    sent = [r.headers["x-request-id"] for r in h.requests]
    made = [new_request_id() for _ in range(20_000)]

    assert all(re.fullmatch(r"[a-p]{16}", i) for i in sent + made)
    assert len(set(sent)) == 40
    assert len(set(made)) == 20_000
    # Every letter turns up in every position: still 4 random bits a character.
    assert all(len({i[k] for i in made}) == 16 for k in range(16))


# --------------------------------------------------------------------------- 4xx


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_4xx_is_rejected_not_retried_and_does_not_trip_the_breaker(
    make_harness: Any, helpers: Any, read_metric: Any, status: int
) -> None:
    """Our 4xx raises ProviderRejected at once and never counts against the breaker."""
    provider = helpers.provider_settings(
        breaker=BreakerPolicy(failure_threshold=2, failure_rate=0.5, minimum_calls=2)
    )
    h = make_harness(helpers.settings_for(provider), sequence(status))

    for _ in range(6):
        with pytest.raises(ProviderRejected) as info:
            h.get_json("crm", "records")

    assert status == info.value.status_code
    assert 6 == len(h.requests)
    assert [] == h.sleeps
    assert CLOSED == h.gateway.breaker_state("crm")
    assert 6.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="client_error")


def test_a_404_the_caller_reads_as_absent_is_logged_at_debug_others_warn(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """``not_found_ok=True`` (get_record: "no such record"): the 404 is still raised and
    counted, but logged at debug; without it, and for any other status, it is a warning."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(404, 404, 403))

    for status, quiet in ((404, True), (404, False), (403, True)):
        with pytest.raises(ProviderRejected) as info:
            h.get_json("crm", "records", not_found_ok=quiet)
        assert status == info.value.status_code

    levels = [(e["status"], e["level"]) for e in logs.events("idis.gateway.call_failed")]
    assert [(404, "debug"), (404, "warning"), (403, "warning")] == levels
    assert 3.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="client_error")


# --------------------------------------------------------------------------- 429


def test_429_retry_after_seconds_is_waited_exactly(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """A 429 with Retry-After: 2 makes the next attempt wait 2 s, and is logged as a rate limit."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(httpx.Response(429, headers={"Retry-After": "2"}), ok()),
    )

    result = h.get_json("crm", "records")

    assert {"ok": True} == result
    assert [2.0] == h.sleeps
    assert 1.0 == read_metric(
        "integration_rate_limited_total", provider="crm", endpoint="records", source="provider"
    )
    assert 1.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="rate_limited")
    # RB-09's `grep -i "rate limit\|429"` finds the line (and maybe a request id with 429 in it).
    lines = [line for line in logs.grep("rate limit", "429") if "gateway.rate_limited" in line]
    assert 1 == len(lines)
    assert "rate limit" in lines[0].lower()
    assert "429" in lines[0]
    [event] = logs.events("idis.gateway.rate_limited")
    assert (2.0, "crm", "records") == (event["retry_after"], event["provider"], event["endpoint"])


def test_429_retry_after_http_date(make_harness: Any, helpers: Any) -> None:
    """A Retry-After HTTP-date 5 s ahead of the (injected) clock means a 5 s wait."""
    clock = ManualClock()
    when = format_datetime(clock.now() + timedelta(seconds=5), usegmt=True)
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(httpx.Response(429, headers={"Retry-After": when}), ok()),
        clock=clock,
    )

    h.get_json("crm", "records")

    assert [5.0] == h.sleeps


def test_429_retry_after_is_capped(make_harness: Any, helpers: Any) -> None:
    """A Retry-After of an hour is cut to retry_after_cap."""
    retry = RetryPolicy(retry_after_cap=7.0, budget_min_retries=100)
    h = make_harness(
        helpers.settings_for(helpers.provider_settings(retry=retry)),
        sequence(httpx.Response(429, headers={"Retry-After": "3600"}), ok()),
    )

    h.get_json("crm", "records")

    assert [7.0] == h.sleeps


def test_429_pauses_the_provider_for_every_caller(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """After caller A's 429 (Retry-After 2), caller B waits out the rest of the pause first."""
    arrivals: list[float] = []
    clock = ManualClock()
    responses = sequence(httpx.Response(429, headers={"Retry-After": "2"}), ok())

    def handler(request: httpx.Request) -> httpx.Response:
        arrivals.append(clock.monotonic())
        return responses(request)

    h = make_harness(helpers.settings_for(helpers.provider_settings()), handler, clock=clock)
    paused_at = clock.monotonic()
    with pytest.raises(RateLimited) as info:  # a POST without a key: A is not retried
        h.request("crm", "records", method="POST", json={})
    available_during = h.gateway.available("crm")
    clock.advance(0.5)

    h.get_json("crm", "records")

    assert 2.0 == info.value.retry_after
    assert False is available_during
    assert [1.5] == h.sleeps
    assert [paused_at, paused_at + 2.0] == arrivals
    assert True is h.gateway.available("crm")
    assert 0.0 == read_metric(
        "integration_rate_limited_total", provider="crm", endpoint="records", source="client"
    )


def test_503_with_retry_after_also_pauses(make_harness: Any, helpers: Any, logs: Any) -> None:
    """A 503 carrying Retry-After holds the retry (backoff, then the rest of the pause) for 3 s."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(httpx.Response(503, headers={"Retry-After": "3"}), ok()),
    )
    start = h.clock.monotonic()

    h.get_json("crm", "records")

    assert 3.0 == pytest.approx(sum(h.sleeps))
    assert 3.0 == pytest.approx(h.clock.monotonic() - start)
    assert 1 == len(logs.events("idis.gateway.retry_after"))


def test_pause_beyond_the_deadline_fails_at_once(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """A caller whose deadline ends before the pause does gets RateLimited without sleeping."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(httpx.Response(429, headers={"Retry-After": "20"}), ok()),
    )
    with pytest.raises(RateLimited):
        h.get_json("crm", "records", timeout=5.0)

    with pytest.raises(RateLimited, match=r"paused by rate limit \(HTTP 429\)"):
        h.get_json("crm", "records", timeout=5.0)

    assert 1 == len(h.requests)
    assert [] == h.sleeps
    assert 2.0 == read_metric(REQUESTS, provider="crm", endpoint="records", outcome="rate_limited")


# --------------------------------------------------------------------------- deadline


def test_deadline_clips_retries(make_harness: Any, helpers: Any) -> None:
    """A 1 s deadline stops retries long before max_attempts, never sleeping past it."""
    retry = RetryPolicy(
        max_attempts=50, initial_backoff=0.3, max_backoff=0.3, budget_min_retries=100
    )
    provider = helpers.provider_settings(retry=retry, timeouts=TimeoutPolicy(deadline=1.0))
    h = make_harness(helpers.settings_for(provider), sequence(503))

    with pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")

    assert sum(h.sleeps) < 1.0
    assert 2 <= len(h.requests) < 50


def test_per_call_timeout_overrides_the_deadline_and_clips_attempt_timeouts(
    make_harness: Any, helpers: Any
) -> None:
    """A call's timeout= is its deadline: attempt timeouts shrink to what is left of it."""
    seen: list[dict[str, float]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return ok()

    provider = helpers.provider_settings(
        timeouts=TimeoutPolicy(connect=3.0, read=10.0, write=10.0, pool=5.0)
    )
    h = make_harness(helpers.settings_for(provider), handler)

    h.get_json("crm", "records")
    h.get_json("crm", "records", timeout=2.0)

    assert {"connect": 3.0, "read": 10.0, "write": 10.0, "pool": 5.0} == seen[0]
    assert {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0} == seen[1]


def test_retry_after_longer_than_the_deadline_is_not_slept(make_harness: Any, helpers: Any) -> None:
    """A 429 asking for 10 s within a 3 s deadline ends the call instead of sleeping."""
    provider = helpers.provider_settings(timeouts=TimeoutPolicy(deadline=3.0))
    h = make_harness(
        helpers.settings_for(provider),
        sequence(httpx.Response(429, headers={"Retry-After": "10"}), ok()),
    )

    with pytest.raises(RateLimited):
        h.get_json("crm", "records")

    assert 1 == len(h.requests)
    assert [] == h.sleeps


# --------------------------------------------------------------------------- budget


def test_retry_budget_exhausted_ends_with_the_last_error_and_its_own_counters(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """Once the budget is spent the call ends with the provider's last error, counted apart."""
    retry = RetryPolicy(max_attempts=4, budget_ratio=0.1, budget_min_retries=1, budget_window=60.0)
    h = make_harness(helpers.settings_for(helpers.provider_settings(retry=retry)), sequence(503))

    with pytest.raises(ProviderUnavailable) as info:
        h.get_json("crm", "records")

    assert 2 == len(h.requests)
    assert (503, 2) == (info.value.status_code, info.value.sent)
    assert any("retry budget of crm exhausted" in note for note in info.value.__notes__)
    assert 1.0 == read_metric("integration_retry_budget_exhausted_total", provider="crm")
    assert 1.0 == read_metric(
        ERRORS, provider="crm", endpoint="records", error_type="retry_budget_exhausted"
    )
    assert 1.0 == read_metric(
        REQUESTS, provider="crm", endpoint="records", outcome="budget_exhausted"
    )
    assert 1 == len(logs.events("idis.gateway.retry_budget_exhausted"))


def test_retry_budget_limits_amplification_during_an_outage(
    make_harness: Any, helpers: Any
) -> None:
    """During an outage 50 calls send at most 50 + 20% retries, not 50 x max_attempts."""
    retry = RetryPolicy(
        max_attempts=5, budget_ratio=0.2, budget_min_retries=0, budget_window=3600.0
    )
    h = make_harness(helpers.settings_for(helpers.provider_settings(retry=retry)), sequence(503))

    for _ in range(50):
        with pytest.raises(ProviderUnavailable):
            h.get_json("crm", "records")

    assert 50 < len(h.requests) <= 60


# --------------------------------------------------------------------------- bulkhead


def test_bulkhead_full(mode: str, make_harness: Any, helpers: Any, read_metric: Any) -> None:
    """With max_concurrency=1 a second call while one is in flight fails with BulkheadFull."""
    caught: list[Exception] = []
    provider = helpers.provider_settings(max_concurrency=1, bulkhead_wait=0.0)
    harness: list[Any] = []

    def inner_sync() -> httpx.Response:
        try:
            harness[0].gateway.get_json("crm", "record", path_params={"id": "1"})
        except BulkheadFull as exc:
            caught.append(exc)
        return ok()

    async def inner_async() -> httpx.Response:
        try:
            await harness[0].gateway.get_json("crm", "record", path_params={"id": "1"})
        except BulkheadFull as exc:
            caught.append(exc)
        return ok()

    def handler(request: httpx.Request) -> Any:
        # The outer call holds the only slot while the handler runs; call again from inside.
        if request.url.path == "/records":
            return inner_sync() if mode == "sync" else inner_async()
        return ok()

    harness.append(make_harness(helpers.settings_for(provider), handler))

    harness[0].get_json("crm", "records")
    after = harness[0].get_json("crm", "record", path_params={"id": "1"})

    assert 1 == len(caught)
    assert "crm: 1 calls already in flight" == str(caught[0])
    assert {"ok": True} == after
    assert ["/records", "/records/1"] == [r.url.path for r in harness[0].requests]
    assert 1.0 == read_metric("integration_bulkhead_rejected_total", provider="crm")
    assert 1.0 == read_metric(ERRORS, provider="crm", endpoint="record", error_type="bulkhead_full")


# --------------------------------------------------------------------------- bodies


def test_malformed_json_is_a_provider_fault(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """A 200 that is not JSON is MalformedResponse: retried and counted against the breaker."""
    provider = helpers.provider_settings(
        breaker=BreakerPolicy(failure_threshold=3, minimum_calls=1000)
    )
    h = make_harness(
        helpers.settings_for(provider),
        sequence(httpx.Response(200, content=b'{"items": [{"id": ')),
    )

    with pytest.raises(MalformedResponse, match=r"not valid JSON \(HTTP 200, 18 bytes\)"):
        h.get_json("crm", "records")

    assert 3 == len(h.requests)
    assert 3.0 == read_metric(
        ERRORS, provider="crm", endpoint="records", error_type="malformed_response"
    )
    assert OPEN == h.gateway.breaker_state("crm")


def test_request_returns_the_response_without_parsing(make_harness: Any, helpers: Any) -> None:
    """request() hands back the raw 2xx response; a non-JSON body is fine there."""
    h = make_harness(
        helpers.settings_for(helpers.provider_settings()),
        sequence(httpx.Response(200, content=b"plain text")),
    )

    response = h.request("crm", "records")

    assert b"plain text" == response.content


# --------------------------------------------------------------------------- breaker


def test_breaker_opens_then_short_circuits_without_requests(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """At the threshold the breaker opens; later calls fail fast and reach no provider."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=3, minimum_calls=1000, reset_timeout=30.0),
    )
    h = make_harness(helpers.settings_for(provider), sequence(500))
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            h.get_json("crm", "records")

    for _ in range(4):
        with pytest.raises(CircuitOpen, match=r"is open; next trial call in 30\.0s") as info:
            h.get_json("crm", "records")

    assert 3 == len(h.requests)
    assert ("crm", "records") == (info.value.provider, info.value.endpoint)
    assert False is h.gateway.available("crm")
    assert 3.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="server_error")
    assert 4.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="circuit_open")
    assert 4.0 == read_metric(
        REQUESTS, provider="crm", endpoint="records", outcome="short_circuited"
    )
    assert 3.0 == read_metric(REQUESTS, provider="crm", endpoint="records", outcome="error")
    assert 2.0 == read_metric("integration_circuit_breaker_state", provider="crm", breaker="crm")
    assert 1.0 == read_metric(
        "integration_circuit_breaker_transitions_total",
        provider="crm",
        breaker="crm",
        to_state="open",
    )
    [opened] = logs.events("idis.breaker.open")
    assert "closed -> open (3 consecutive failures (last: server_error))" in opened["msg"]
    assert "warning" == opened["level"]


def test_half_open_trial_through_the_gateway_closes_the_breaker(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """After reset_timeout one trial call goes through; its success closes the breaker."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=30.0),
    )
    h = make_harness(helpers.settings_for(provider), sequence(500, 500, ok()))
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            h.get_json("crm", "records")
    h.clock.advance(30)

    result = h.get_json("crm", "records")

    assert {"ok": True} == result
    assert CLOSED == h.gateway.breaker_state("crm")
    assert 0.0 == read_metric("integration_circuit_breaker_state", provider="crm", breaker="crm")
    assert ["idis.breaker.open", "idis.breaker.half_open", "idis.breaker.closed"] == [
        e["event"] for e in logs.events() if e["event"].startswith("idis.breaker.")
    ]


def test_failed_trial_reopens_through_the_gateway(make_harness: Any, helpers: Any) -> None:
    """A failed half-open trial re-opens the breaker and is reported as the provider's error."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=3, budget_min_retries=100),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000, reset_timeout=30.0),
    )
    h = make_harness(helpers.settings_for(provider), sequence(500))
    with pytest.raises(ProviderUnavailable):  # the retry after the first failure is refused
        h.get_json("crm", "records")
    h.clock.advance(30)

    with pytest.raises(ProviderUnavailable) as trial:
        h.get_json("crm", "records")
    with pytest.raises(CircuitOpen) as after:
        h.get_json("crm", "records")

    assert 2 == len(h.requests)
    assert (500, 1) == (trial.value.status_code, trial.value.sent)
    assert 0 == after.value.sent
    assert OPEN == h.gateway.breaker_state("crm")


def test_per_endpoint_breaker_isolates_a_failing_endpoint(make_harness: Any, helpers: Any) -> None:
    """With per-endpoint breakers a failing endpoint opens its own breaker, not the provider's."""
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=3, minimum_calls=1000, per_endpoint=True),
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500) if request.url.path == "/records" else ok()

    h = make_harness(helpers.settings_for(provider), handler)
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            h.get_json("crm", "records")
        h.get_json("crm", "record", path_params={"id": "1"})

    with pytest.raises(CircuitOpen):
        h.get_json("crm", "records")
    other = h.get_json("crm", "record", path_params={"id": "2"})

    assert OPEN == h.gateway.breaker_state("crm", "records")
    assert CLOSED == h.gateway.breaker_state("crm", "record")
    assert CLOSED == h.gateway.breaker_state("crm")
    assert {"ok": True} == other


# --------------------------------------------------------------------------- misc


def test_timeout_is_logged_and_counted_as_a_timeout(
    make_harness: Any, helpers: Any, read_metric: Any, logs: Any
) -> None:
    """A read timeout raises ProviderTimeout, counts error_type=timeout and logs 'timed out'."""
    provider = helpers.provider_settings(retry=RetryPolicy(max_attempts=1))
    h = make_harness(helpers.settings_for(provider), sequence(httpx.ReadTimeout("timed out")))

    with pytest.raises(ProviderTimeout, match="crm records: read timeout"):
        h.get_json("crm", "records")

    assert 1.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="timeout")
    [event] = logs.events("idis.gateway.timeout")
    assert "timed out" in event["msg"]
    assert ("crm", "records", "warning") == (event["provider"], event["endpoint"], event["level"])


def test_path_parameters_are_quoted(make_harness: Any, helpers: Any) -> None:
    """Path parameters are percent-encoded, so an id cannot change the path."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(ok()))

    h.get_json("crm", "record", path_params={"id": "a/../b c"})

    assert "/records/a%2F..%2Fb%20c" == h.requests[0].url.raw_path.decode()


def test_missing_path_parameter_is_a_usage_error(make_harness: Any, helpers: Any) -> None:
    """A template parameter the caller did not pass is named in a UsageError; nothing is sent."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(ok()))

    with pytest.raises(UsageError, match=r"endpoint 'record' of crm \(/records/\{id\}\) needs"):
        h.get_json("crm", "record", path_params={"ident": "1"})

    assert [] == h.requests


def test_unknown_provider_is_named(make_harness: Any, helpers: Any) -> None:
    """Calling an undeclared provider raises UnknownProviderError listing the declared ones."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(ok()))

    with pytest.raises(UnknownProviderError, match="unknown provider 'crmm': expected one of crm"):
        h.get_json("crmm", "records")


def test_client_side_rate_limit_paces_calls(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """A 1/s token bucket with burst 1 makes the second immediate call wait 1 s."""
    provider = helpers.provider_settings(rate_limit=RateLimitPolicy(rate=1.0, burst=1))
    h = make_harness(helpers.settings_for(provider), sequence(ok()))

    h.get_json("crm", "records")
    h.get_json("crm", "records")

    assert [1.0] == pytest.approx(h.sleeps)
    assert 1.0 == read_metric(
        "integration_rate_limited_total", provider="crm", endpoint="records", source="client"
    )


def test_health_probe(make_harness: Any, helpers: Any, read_metric: Any) -> None:
    """health() reads the configured endpoint: 2xx is up, 5xx is down, recorded in provider_up."""
    provider = helpers.provider_settings(health_endpoint="/health")
    h = make_harness(helpers.settings_for(provider), sequence(ok({"status": "ok"}), 503))

    up = h.call("health", "crm")
    down = h.call("health", "crm")

    assert (True, 200) == (up.ok, up.status_code)
    assert (False, 503, "HTTP 503") == (down.ok, down.status_code, down.detail)
    assert 0.0 == read_metric("integration_provider_up", provider="crm")
    assert ["/health", "/health"] == [r.url.path for r in h.requests]


def test_snapshot_reports_state_rate_and_pause(make_harness: Any, helpers: Any) -> None:
    """snapshot() gives status what it shows: state, window error rate, pause, in-flight."""
    provider = helpers.provider_settings(retry=RetryPolicy(max_attempts=1))
    h = make_harness(
        helpers.settings_for(provider),
        sequence(ok(), httpx.Response(429, headers={"Retry-After": "4"})),
    )
    h.get_json("crm", "records")
    with pytest.raises(RateLimited):
        h.get_json("crm", "records")

    snap = h.gateway.snapshot("crm")

    assert (CLOSED, 2, 1, 0.5, 4.0, 0) == (
        snap["state"],
        snap["window_calls"],
        snap["window_failures"],
        snap["error_rate"],
        snap["paused_for"],
        snap["in_flight"],
    )


def test_testing_mode_caps_attempts_and_skips_backoff(make_harness: Any, helpers: Any) -> None:
    """set_testing(attempts=2) makes a failing call try twice with no backoff, then restores."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(503))

    with set_testing(attempts=2), pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")
    during = (len(h.requests), list(h.sleeps))
    with pytest.raises(ProviderUnavailable):
        h.get_json("crm", "records")

    assert (2, [0.0]) == during
    assert 5 == len(h.requests)


def test_connection_error_message_hides_the_url(make_harness: Any, helpers: Any) -> None:
    """Transport errors name provider and endpoint, never the query string they were sent with."""
    provider = helpers.provider_settings(retry=RetryPolicy(max_attempts=1))
    h = make_harness(
        helpers.settings_for(provider), sequence(httpx.ConnectError("refused: crm.test"))
    )

    with pytest.raises(ProviderConnectionError) as info:
        h.get_json("crm", "records", params={"api_key": "k-123456789"})

    assert "crm records: ConnectError" == str(info.value)


def test_deadline_passed_before_sending_does_not_count_against_the_breaker(
    mode: str, helpers: Any, metrics: Any, read_metric: Any
) -> None:
    """A caller that overslept its deadline during a pause fails without touching the breaker."""
    from idis.integrations.resilience import AsyncGateway, Gateway

    clock = ManualClock()
    sent: list[httpx.Request] = []
    responses = sequence(httpx.Response(429, headers={"Retry-After": "2"}), ok())

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return responses(request)

    def oversleep(seconds: float) -> None:
        clock.advance(seconds + 5)  # a loaded machine wakes the caller late

    async def aoversleep(seconds: float) -> None:
        oversleep(seconds)

    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000),
    )
    kwargs: dict[str, Any] = {
        "clock": clock,
        "metrics": metrics,
        "transport": httpx.MockTransport(handler),
    }
    gateway: Any
    if mode == "sync":
        gateway = Gateway(helpers.settings_for(provider), sleep=oversleep, **kwargs)
        call: Callable[..., Any] = gateway.get_json
    else:
        gateway = AsyncGateway(helpers.settings_for(provider), sleep=aoversleep, **kwargs)

        def call(*args: Any, **kw: Any) -> Any:
            return asyncio.run(gateway.get_json(*args, **kw))

    try:
        with pytest.raises(RateLimited):  # the 429 itself counts: the provider answered it
            call("crm", "records", timeout=1.0)
        gateway.breaker("crm").force(CLOSED, "test reset")

        with pytest.raises(ProviderTimeout, match="deadline exceeded"):
            call("crm", "records", timeout=3.0)

        assert 1 == len(sent)
        assert CLOSED == gateway.breaker_state("crm")
        assert 0 == gateway.breaker("crm").stats()["consecutive_failures"]
        assert 1.0 == read_metric(ERRORS, provider="crm", endpoint="records", error_type="timeout")
    finally:
        if mode == "sync":
            gateway.close()
        else:
            asyncio.run(gateway.aclose())


def test_no_request_id_header_unless_asked(make_harness: Any, helpers: Any) -> None:
    """By default no request-id header is sent (it costs a header on every call)."""
    h = make_harness(helpers.settings_for(helpers.provider_settings()), sequence(ok()))

    h.get_json("crm", "records")

    assert "x-request-id" not in h.requests[0].headers


def test_error_series_exist_at_zero_from_the_start(mode: str, helpers: Any, metrics: Any) -> None:
    """Issue 15: every configured provider and endpoint has its provider-fault error series at 0
    as soon as a gateway exists, so rate() sees the first error; nothing else is created."""
    from idis.integrations.resilience import AsyncGateway, Gateway
    from idis.integrations.resilience._gateway import PRESET_ERROR_TYPES

    other = helpers.provider_settings("docs", endpoints={"files": "/files"})
    settings = helpers.settings_for(helpers.provider_settings(), other)
    gateway = (Gateway if mode == "sync" else AsyncGateway)(settings, metrics=metrics)

    series = {
        (s.labels["provider"], s.labels["endpoint"], s.labels["error_type"]): s.value
        for family in metrics.registry.collect()
        if family.name == "integration_errors"
        for s in family.samples
        if s.name == ERRORS
    }
    expected = {
        (provider, endpoint, error_type): 0.0
        for provider, endpoints in (("crm", ("records", "record", "health")), ("docs", ("files",)))
        for endpoint in endpoints
        for error_type in PRESET_ERROR_TYPES
    }
    assert expected == series
    assert "client_error" not in PRESET_ERROR_TYPES
    if mode == "sync":
        gateway.close()
    else:
        asyncio.run(gateway.aclose())


def test_health_probe_without_endpoint_or_reachable_provider(
    make_harness: Any, helpers: Any, read_metric: Any
) -> None:
    """No health endpoint: reported as such, nothing sent; an unreachable one: down, with why."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    plain = make_harness(helpers.settings_for(helpers.provider_settings()), refuse)
    probed = make_harness(
        helpers.settings_for(helpers.provider_settings("docs", health_endpoint="/health")), refuse
    )

    none = plain.call("health", "crm")
    down = probed.call("health", "docs")

    assert (True, "no health endpoint configured", []) == (none.ok, none.detail, plain.requests)
    assert (False, "docs health: ConnectError") == (down.ok, down.detail)
    assert 0.0 == read_metric("integration_provider_up", provider="docs")


def test_a_caller_waiting_for_a_slot_gives_up_after_bulkhead_wait(
    mode: str, helpers: Any, metrics: Any, read_metric: Any
) -> None:
    """With the only slot held, a second caller waits bulkhead_wait, then fails, nothing sent."""
    from idis.integrations.resilience import AsyncGateway, Gateway

    provider = helpers.provider_settings(max_concurrency=1, bulkhead_wait=0.05)
    caught: list[BaseException] = []

    if mode == "sync":
        holder: list[Any] = []

        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/records":
                try:
                    holder[0].get_json("crm", "record", path_params={"id": "1"})
                except BulkheadFull as exc:
                    caught.append(exc)
            return ok()

        with Gateway(
            helpers.settings_for(provider), metrics=metrics, transport=httpx.MockTransport(handler)
        ) as gateway:
            holder.append(gateway)
            gateway.get_json("crm", "records")
    else:

        async def scenario() -> None:
            inside = asyncio.Event()
            leave = asyncio.Event()

            async def handler(request: httpx.Request) -> httpx.Response:
                if request.url.path == "/records":
                    inside.set()
                    await leave.wait()
                return ok()

            async with AsyncGateway(
                helpers.settings_for(provider),
                metrics=metrics,
                transport=httpx.MockTransport(handler),
            ) as gateway:
                first = asyncio.create_task(gateway.get_json("crm", "records"))
                await inside.wait()
                try:
                    await gateway.get_json("crm", "record", path_params={"id": "1"})
                except BulkheadFull as exc:
                    caught.append(exc)
                leave.set()
                await first

        asyncio.run(scenario())

    [error] = caught
    assert isinstance(error, BulkheadFull)
    assert 0 == error.sent
    assert 1.0 == read_metric("integration_bulkhead_rejected_total", provider="crm")
