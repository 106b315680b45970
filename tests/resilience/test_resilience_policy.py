"""The pipeline's pure decisions: backoff, jitter, Retry-After, retry safety, budget, limiter."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idis.integrations.config import RetryPolicy
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
    RetryBudgetExhausted,
)
from idis.integrations.resilience._policy import (
    RetryBudget,
    SlidingWindow,
    TokenBucket,
    backoff_cap,
    full_jitter,
    is_retry_safe,
    parse_retry_after,
    retry_delay,
    should_retry,
)

NOW = datetime(2026, 1, 19, 12, 0, tzinfo=UTC)

policies = st.builds(
    RetryPolicy,
    initial_backoff=st.floats(min_value=0.0, max_value=100.0),
    max_backoff=st.floats(min_value=0.0, max_value=1000.0),
    multiplier=st.floats(min_value=1.0, max_value=10.0),
)


@given(policy=policies, retry_number=st.integers(min_value=-5, max_value=10_000))
def test_backoff_cap_never_exceeds_max_backoff(policy: RetryPolicy, retry_number: int) -> None:
    """The backoff cap is finite, non-negative and never above max_backoff, however many retries."""
    cap = backoff_cap(policy, retry_number)

    assert math.isfinite(cap)
    assert 0.0 <= cap <= policy.max_backoff


@given(
    initial=st.floats(min_value=0.001, max_value=1.0),
    multiplier=st.floats(min_value=1.0, max_value=4.0),
    retry_number=st.integers(min_value=1, max_value=40),
)
def test_backoff_cap_grows_exponentially_until_the_max(
    initial: float, multiplier: float, retry_number: int
) -> None:
    """Retry n has cap initial * multiplier**(n-1), clipped to max_backoff."""
    policy = RetryPolicy(initial_backoff=initial, multiplier=multiplier, max_backoff=30.0)

    expected = min(30.0, initial * multiplier ** (retry_number - 1))

    assert expected == pytest.approx(backoff_cap(policy, retry_number))


@given(cap=st.floats(min_value=0.0, max_value=1e6), seed=st.integers(0, 2**32))
def test_full_jitter_stays_within_zero_and_cap(cap: float, seed: int) -> None:
    """Full jitter draws a delay in [0, cap]."""
    delay = full_jitter(cap, random.Random(seed))

    assert 0.0 <= delay <= cap


def test_full_jitter_spreads_over_the_whole_range() -> None:
    """Jitter is not a constant: 200 draws cover both the low and the high quarter of [0, cap]."""
    rng = random.Random(3)

    draws = [full_jitter(1.0, rng) for _ in range(200)]

    assert any(d < 0.25 for d in draws)
    assert any(d > 0.75 for d in draws)


@given(
    policy=policies,
    retry_number=st.integers(min_value=1, max_value=50),
    seed=st.integers(0, 2**32),
)
def test_retry_delay_without_retry_after_is_jittered_backoff(
    policy: RetryPolicy, retry_number: int, seed: int
) -> None:
    """A 5xx without Retry-After waits a full-jitter delay within the backoff cap."""
    exc = ProviderUnavailable("x", provider="p", endpoint="e", status_code=503)

    delay = retry_delay(policy, retry_number, exc, random.Random(seed))

    assert 0.0 <= delay <= backoff_cap(policy, retry_number)


def test_retry_delay_honours_retry_after_up_to_the_cap() -> None:
    """A 429 with Retry-After waits exactly that long, but never longer than retry_after_cap."""
    policy = RetryPolicy(retry_after_cap=10.0)

    short = retry_delay(policy, 1, RateLimited("x", retry_after=2.0))
    long = retry_delay(policy, 1, RateLimited("x", retry_after=600.0))

    assert 2.0 == short
    assert 10.0 == long


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("-3", 0.0),
        ("3600", 60.0),
        ("inf", 60.0),
        ("", None),
        ("soon", None),
        ("nan", None),
        (None, None),
    ],
)
def test_parse_retry_after_delta_seconds(header: str | None, expected: float | None) -> None:
    """Delta-seconds parse, clip to [0, cap]; blank, garbage and NaN mean no header."""
    assert expected == parse_retry_after(header, now=NOW, cap=60.0)


def test_parse_retry_after_http_date() -> None:
    """An HTTP-date means the seconds until then; past dates mean 0; far ones are capped."""
    in_30s = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    past = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    in_2h = format_datetime(NOW + timedelta(hours=2), usegmt=True)

    assert 30.0 == parse_retry_after(in_30s, now=NOW, cap=60.0)
    assert 0.0 == parse_retry_after(past, now=NOW, cap=60.0)
    assert 60.0 == parse_retry_after(in_2h, now=NOW, cap=60.0)


def test_parse_retry_after_rfc850_and_asctime_dates() -> None:
    """The obsolete HTTP-date forms RFC 9110 says recipients must accept also parse."""
    assert 45.0 == parse_retry_after("Monday, 19-Jan-26 12:00:45 GMT", now=NOW, cap=60.0)
    assert 45.0 == parse_retry_after("Mon Jan 19 12:00:45 2026", now=NOW, cap=60.0)


@pytest.mark.parametrize(
    ("method", "key", "expected"),
    [
        ("GET", None, True),
        ("get", None, True),
        ("HEAD", None, True),
        ("PUT", None, True),
        ("DELETE", None, True),
        ("POST", None, False),
        ("PATCH", None, False),
        ("POST", "", False),
        ("POST", "order-42", True),
        ("PATCH", "order-42", True),
    ],
)
def test_is_retry_safe(method: str, key: str | None, expected: bool) -> None:
    """Idempotent methods may be resent; POST/PATCH only with an idempotency key."""
    assert expected == is_retry_safe(method, key)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ProviderTimeout("x"), True),
        (ProviderConnectionError("x"), True),
        (ProviderUnavailable("x", status_code=503), True),
        (RateLimited("x"), True),
        (MalformedResponse("x"), True),
        (ProviderRejected("x", status_code=400), False),
        (CircuitOpen("x"), False),
        (BulkheadFull("x"), False),
        (RetryBudgetExhausted("x"), False),
    ],
)
def test_should_retry_only_provider_faults(exc: ProviderError, expected: bool) -> None:
    """Only provider faults are retried; our 4xx, an open breaker, a full bulkhead are not."""
    assert expected == should_retry(exc, method="GET", idempotency_key=None)
    assert False is should_retry(exc, method="POST", idempotency_key=None)


def test_sliding_window_forgets_calls_older_than_the_window() -> None:
    """Calls leave the window once it has moved past them."""
    window = SlidingWindow(60.0)
    window.record(1000.0, failed=True)
    window.record(1030.0, failed=False)

    assert (2, 1) == window.totals(1030.0)
    assert (1, 0) == window.totals(1075.0)
    assert (0, 0) == window.totals(1100.0)


def test_retry_budget_allows_the_floor_then_a_fraction_of_calls() -> None:
    """With few calls only budget_min_retries retries pass; with many, budget_ratio of them."""
    budget = RetryBudget(RetryPolicy(budget_ratio=0.2, budget_min_retries=2, budget_window=10.0))
    for _ in range(5):
        budget.record_call(100.0)

    floor = [budget.try_spend(100.0) for _ in range(3)]
    for _ in range(45):
        budget.record_call(100.5)
    ratio = [budget.try_spend(100.5) for _ in range(9)]

    assert [True, True, False] == floor
    assert [True] * 8 + [False] == ratio  # 20% of 50 calls = 10 retries, 2 already spent


def test_retry_budget_refills_as_the_window_slides() -> None:
    """Retries spent more than a window ago no longer count against the budget."""
    budget = RetryBudget(RetryPolicy(budget_ratio=0.1, budget_min_retries=1, budget_window=10.0))
    budget.record_call(0.0)

    assert True is budget.try_spend(0.0)
    assert False is budget.try_spend(5.0)
    assert True is budget.try_spend(20.0)


def test_token_bucket_allows_burst_then_paces_at_rate() -> None:
    """A full bucket serves ``burst`` calls at once, then one every 1/rate seconds, in order."""
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)

    waits = [bucket.reserve(0.0) for _ in range(5)]

    assert [0.0, 0.0, 0.0, 0.5, 1.0] == pytest.approx(waits)


def test_token_bucket_rejects_nonsense_rates() -> None:
    """A bucket with no rate or no capacity is a configuration error naming the values."""
    with pytest.raises(ValueError, match=r"rate > 0 and burst >= 1, got 0, 5"):
        TokenBucket(rate=0, burst=5, now=0.0)


@settings(max_examples=200)
@given(
    rate=st.floats(min_value=0.1, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=80),
)
def test_token_bucket_never_exceeds_burst_plus_rate_times_t(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Over any interval [a, b], calls served in it are at most burst + rate * (b - a)."""
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now = 0.0
    served: list[float] = []
    for gap in gaps:
        now += gap
        served.append(now + bucket.reserve(now))
    served.sort()

    for i in range(len(served)):
        for j in range(i, len(served)):
            count = j - i + 1
            assert count <= burst + rate * (served[j] - served[i]) + 1e-6
