"""The pipeline against the provider simulator over real HTTP on 127.0.0.1.

Faults are switched on through the simulator's control API; "no request reached
the provider" is read from the simulator's own request counters. Time is a
manual clock (breaker resets, pauses) and waits are asserted as requested
values, never measured.
"""

from __future__ import annotations

from typing import Any

import pytest

from idis.integrations.config import BreakerPolicy, RetryPolicy, TimeoutPolicy
from idis.integrations.exceptions import (
    CircuitOpen,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from idis.integrations.resilience import CLOSED, OPEN
from idis.integrations.testing import simulator_settings

P = "crm_provider"
ERRORS = "integration_errors_total"


def settings(sim: Any, **overrides: Any) -> Any:
    """Settings with one simulator provider; overrides apply to it."""
    overrides.setdefault("retry", RetryPolicy(max_attempts=1))
    return simulator_settings(sim.url, providers=(P,), **overrides)


def provider_requests(sim: Any, endpoint: str = "records") -> int:
    """Requests the simulator received on one endpoint of the provider."""
    return int(sim.control.stats(P)["requests"].get(endpoint, 0))


def test_5xx_storm_opens_the_breaker_at_the_threshold_then_fails_fast(
    sim: Any, make_harness: Any, read_metric: Any
) -> None:
    """Five 503s open the breaker (not four); afterwards calls fail fast and reach no provider."""
    h = make_harness(settings(sim, breaker=BreakerPolicy(failure_threshold=5, minimum_calls=1000)))
    sim.control.set_fault(P, "error", endpoint="records", status=503)
    states = []
    for _ in range(5):
        with pytest.raises(ProviderUnavailable):
            h.get_json(P, "records")
        states.append(h.gateway.breaker_state(P))

    for _ in range(10):
        with pytest.raises(CircuitOpen):
            h.get_json(P, "records")

    assert [CLOSED] * 4 + [OPEN] == states
    assert 5 == provider_requests(sim)
    assert 5.0 == read_metric(ERRORS, provider=P, endpoint="records", error_type="server_error")
    assert 10.0 == read_metric(ERRORS, provider=P, endpoint="records", error_type="circuit_open")


def test_half_open_trial_closes_the_breaker_after_recovery(sim: Any, make_harness: Any) -> None:
    """Once the provider recovers and reset_timeout passes, one trial call closes the breaker."""
    h = make_harness(
        settings(
            sim,
            breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=30.0),
        )
    )
    sim.control.set_fault(P, "error", endpoint="records", status=502)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            h.get_json(P, "records")
    sim.control.clear_faults(P)
    with pytest.raises(CircuitOpen):
        h.get_json(P, "records")
    still_open_requests = provider_requests(sim)
    h.clock.advance(30)

    page = h.get_json(P, "records")
    after = [h.get_json(P, "records") for _ in range(3)]

    assert 2 == still_open_requests
    assert {"items": [], "next_cursor": None} == page
    assert 3 == len(after)
    assert CLOSED == h.gateway.breaker_state(P)
    assert 6 == provider_requests(sim)


def test_failed_trial_keeps_the_breaker_open(sim: Any, make_harness: Any) -> None:
    """A trial call during a continuing outage re-opens the breaker; no second trial is sent."""
    h = make_harness(
        settings(
            sim,
            breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=30.0),
        )
    )
    sim.control.outage(P)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            h.get_json(P, "records")
    h.clock.advance(30)

    with pytest.raises(ProviderUnavailable):
        h.get_json(P, "records")
    with pytest.raises(CircuitOpen):
        h.get_json(P, "records")

    assert OPEN == h.gateway.breaker_state(P)
    assert 3 == provider_requests(sim)


def test_40_percent_random_failures_at_low_traffic_open_the_breaker(
    sim: Any, make_harness: Any
) -> None:
    """At two calls a minute, 40% random 503s trip the failure-rate rule (never 10 in a row)."""
    policy = BreakerPolicy(
        failure_threshold=10, failure_rate=0.3, minimum_calls=10, window=600.0, reset_timeout=300
    )
    transitions: list[Any] = []
    h = make_harness(settings(sim, breaker=policy), on_transition=[transitions.append])
    sim.control.set_fault(P, "error", endpoint="records", status=503, ratio=0.4)
    outcomes: list[str] = []
    for _ in range(60):
        try:
            h.get_json(P, "records")
            outcomes.append("S")
        except ProviderUnavailable:
            outcomes.append("F")
        if h.gateway.breaker_state(P) == OPEN:
            break
        h.clock.advance(30)

    with pytest.raises(CircuitOpen):
        h.get_json(P, "records")
    [opened] = transitions
    assert "F" == outcomes[-1]
    assert len(outcomes) >= policy.minimum_calls
    assert "F" * 10 not in "".join(outcomes)
    assert opened.reason.startswith("failure rate ")
    assert len(outcomes) == provider_requests(sim)
    assert outcomes.count("F") == sim.control.stats(P)["responses"]["records:503"]


def test_errors_total_counts_each_failure_with_its_type(
    sim: Any, make_harness: Any, metrics: Any
) -> None:
    """Every failure kind lands in integration_errors_total{provider,endpoint,error_type}."""
    h = make_harness(
        settings(
            sim,
            timeouts=TimeoutPolicy(connect=1.0, read=1.0, write=1.0, pool=1.0, deadline=10.0),
            breaker=BreakerPolicy(failure_threshold=100, minimum_calls=1000),
        )
    )
    faults: list[tuple[dict[str, Any], type[ProviderError]]] = [
        ({"kind": "error", "status": 500}, ProviderUnavailable),
        ({"kind": "timeout", "seconds": 3.0}, ProviderTimeout),
        ({"kind": "drop"}, ProviderConnectionError),
        ({"kind": "malformed"}, MalformedResponse),
        ({"kind": "rate_limit", "retry_after": 0}, RateLimited),
    ]
    for fault, expected in faults:
        sim.control.set_fault(P, endpoint="records", count=1, **fault)
        with pytest.raises(expected):
            h.get_json(P, "records")
    with pytest.raises(ProviderRejected):
        h.get_json(P, "record", path_params={"id": "no-such-record"})

    samples = {
        (s.labels["endpoint"], s.labels["error_type"]): s.value
        for family in metrics.registry.collect()
        if family.name == "integration_errors"
        for s in family.samples
        if s.name == ERRORS and s.labels["provider"] == P and s.value
    }
    assert {
        ("records", "server_error"): 1.0,
        ("records", "timeout"): 1.0,
        ("records", "connection"): 1.0,
        ("records", "malformed_response"): 1.0,
        ("records", "rate_limited"): 1.0,
        ("record", "client_error"): 1.0,
    } == samples


def test_429_retry_after_2_holds_every_caller_and_logs_rate_limit(
    sim: Any, make_harness: Any, logs: Any, read_metric: Any
) -> None:
    """After a 429 with Retry-After: 2, the next attempt of every caller waits out the pause."""
    h = make_harness(settings(sim), advance=False)
    sim.control.set_fault(P, "rate_limit", endpoint="records", retry_after=2, count=1)
    with pytest.raises(RateLimited) as info:
        h.get_json(P, "records")
    held = h.gateway.available(P)
    h.clock.advance(0.5)

    pages = h.concurrently(3, "get_json", P, "records")

    assert 2.0 == info.value.retry_after
    assert False is held
    assert [1.5, 1.5, 1.5] == h.sleeps
    assert [{"items": [], "next_cursor": None}] * 3 == pages
    assert {"records:429": 1, "records:200": 3} == sim.control.stats(P)["responses"]
    assert 1.0 == read_metric(
        "integration_rate_limited_total", provider=P, endpoint="records", source="provider"
    )
    lines = logs.grep("rate limit", "429")
    assert 1 == len(lines)
    assert P in lines[0]
    assert "rate limit" in lines[0].lower()
    assert "429" in lines[0]


def test_429_caller_retries_after_exactly_retry_after(sim: Any, make_harness: Any) -> None:
    """The caller that got the 429 sleeps the 2 s it was asked for, then succeeds."""
    h = make_harness(settings(sim, retry=RetryPolicy(max_attempts=3, retry_after_cap=5.0)))
    sim.control.set_fault(P, "rate_limit", endpoint="records", retry_after=2, count=1)

    page = h.get_json(P, "records")

    assert {"items": [], "next_cursor": None} == page
    assert [2.0] == h.sleeps
    assert 2 == provider_requests(sim)


def test_timeout_is_logged_and_counted_as_a_timeout(
    sim: Any, make_harness: Any, logs: Any, read_metric: Any
) -> None:
    """A hanging provider raises ProviderTimeout, counted as timeout and logged as 'timed out'."""
    h = make_harness(
        settings(
            sim,
            timeouts=TimeoutPolicy(connect=1.0, read=0.2, write=1.0, pool=1.0, deadline=10.0),
        )
    )
    sim.control.set_fault(P, "timeout", endpoint="records", seconds=3.0, count=1)

    with pytest.raises(ProviderTimeout, match="read timeout"):
        h.get_json(P, "records")

    assert 1.0 == read_metric(ERRORS, provider=P, endpoint="records", error_type="timeout")
    [event] = logs.events("idis.gateway.timeout")
    assert "timed out" in event["msg"]
    assert (P, "records") == (event["provider"], event["endpoint"])
    assert [] == logs.grep("rate limit")


def test_post_without_idempotency_key_is_never_retried_over_http(
    sim: Any, make_harness: Any
) -> None:
    """A POST failing with 503 is sent once; the same POST with a key is retried until it works."""
    h = make_harness(settings(sim, retry=RetryPolicy(max_attempts=3, budget_min_retries=100)))
    sim.control.set_fault(P, "error", endpoint="webhooks_inbound", status=503, count=2)

    with pytest.raises(ProviderUnavailable):
        h.request(P, "webhooks", method="POST", json={"type": "ping"})
    once = provider_requests(sim, "webhooks_inbound")
    with pytest.raises(ProviderRejected):  # the fault is spent; the receiver rejects our
        h.request(  # unsigned body, which proves the third attempt reached it
            P, "webhooks", method="POST", json={"type": "ping"}, idempotency_key="wh-1"
        )

    assert 1 == once
    assert 3 == provider_requests(sim, "webhooks_inbound")


def test_put_with_idempotency_key_is_applied_once_across_retries(
    sim: Any, make_harness: Any
) -> None:
    """A PUT retried after a dropped connection carries its key; the provider applies it once."""
    h = make_harness(settings(sim, retry=RetryPolicy(max_attempts=3, budget_min_retries=100)))
    sim.control.set_fault(P, "drop", endpoint="record", count=1)

    record = h.get_json(
        P,
        "record",
        method="PUT",
        path_params={"id": "r-1"},
        json={"tenant_id": "t1", "data": {"name": "Acme"}},
        idempotency_key="put-r-1-v1",
    )

    stats = sim.control.stats(P)
    assert ("r-1", {"name": "Acme"}) == (record["id"], record["data"])
    assert 2 == stats["requests"]["record"]
    assert {"put-r-1-v1": 1} == stats["idempotency"]["applications"]
