"""The pipeline's decisions, as pure code: no I/O, no sleeping, time passed in.

Both gateways (sync and async) drive these; nothing here knows which one is
calling. Each piece is small enough to test exhaustively with a manual clock.
"""

from __future__ import annotations

import functools
import math
import random
import threading
from collections import deque
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from .._backoff import Backoff, TestingMode, _testing, set_testing, testing_mode
from .._backoff import effective_attempts as _effective_attempts
from ..config import RetryPolicy
from ..exceptions import ProviderError

__all__ = [
    "IDEMPOTENT_METHODS",
    "RetryBudget",
    "SlidingWindow",
    "TestingMode",
    "TokenBucket",
    "backoff_cap",
    "effective_attempts",
    "full_jitter",
    "is_retry_safe",
    "parse_retry_after",
    "retry_backoff",
    "retry_delay",
    "set_testing",
    "should_retry",
    "testing_mode",
]

#: Methods RFC 9110 defines as idempotent; others need an idempotency key to be retried.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def is_retry_safe(method: str, idempotency_key: str | None, idempotent: bool | None = None) -> bool:
    """Whether a failed request may be sent again without risking a double effect.

    ``idempotent`` is the caller's word on this one request, overriding the method:
    True for a read sent as a POST (HubSpot's CRM search), False for a request that
    must never be repeated even though its method is idempotent. An idempotency key
    makes any request safe.
    """
    if idempotency_key:
        return True
    if idempotent is not None:
        return idempotent
    return method.upper() in IDEMPOTENT_METHODS


def should_retry(
    exc: ProviderError,
    *,
    method: str,
    idempotency_key: str | None,
    idempotent: bool | None = None,
) -> bool:
    """Whether ``exc`` on this request warrants another attempt (budget aside).

    Only provider faults are retried (timeouts, connection errors, 5xx, 429,
    malformed bodies); a 4xx we caused, an open breaker or a full bulkhead is not.
    And only requests safe to repeat (:func:`is_retry_safe`).
    """
    return (
        exc.retryable and exc.provider_fault and is_retry_safe(method, idempotency_key, idempotent)
    )


def effective_attempts(policy: RetryPolicy) -> int:
    """``policy.max_attempts``, capped while testing mode is on."""
    return _effective_attempts(policy.max_attempts)


@functools.lru_cache(maxsize=256)
def retry_backoff(policy: RetryPolicy) -> Backoff:
    """The :class:`~idis.integrations._backoff.Backoff` of a provider's retries (full jitter)."""
    # max_backoff is the ceiling even when configured below initial_backoff.
    return Backoff(
        initial=min(policy.initial_backoff, policy.max_backoff),
        maximum=policy.max_backoff,
        multiplier=policy.multiplier,
        jitter="full",
    )


def backoff_cap(policy: RetryPolicy, retry_number: int) -> float:
    """Upper bound of the delay before retry ``retry_number`` (1 for the first retry)."""
    return retry_backoff(policy).cap(retry_number)


def full_jitter(cap: float, rng: random.Random | None = None) -> float:
    """AWS "full jitter": uniform in [0, cap] (kept for callers outside the gateway)."""
    return (rng or random).uniform(0.0, cap)  # jitter, not cryptography


def parse_retry_after(value: str | None, *, now: datetime, cap: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP-date), capped.

    Returns None when the header is absent or unparseable; never negative.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if math.isnan(seconds):
        return None
    return max(0.0, min(seconds, cap))


def retry_delay(
    policy: RetryPolicy, retry_number: int, exc: ProviderError, rng: random.Random | None = None
) -> float:
    """Delay before retry ``retry_number``: Retry-After if the provider sent one, else backoff.

    Retry-After (a 429's or a 503's) wins over the backoff, capped at ``retry_after_cap``.
    """
    if _testing.enabled:
        return 0.0
    if exc.retry_after is not None:
        return min(exc.retry_after, policy.retry_after_cap)
    return retry_backoff(policy).delay(retry_number, rng)


class SlidingWindow:
    """Calls and failures over the last ``window`` seconds, in fixed buckets.

    Bucketed so that recording is O(1) and memory is bounded however busy the
    provider is. Not thread-safe by itself; callers hold their own lock.
    """

    __slots__ = ("_buckets", "_size", "_width")

    def __init__(self, window: float, buckets: int = 12) -> None:
        self._width = max(window / buckets, 1e-6)
        self._size = buckets
        self._buckets: deque[list[float]] = deque()  # [bucket_start, calls, failures]

    def _trim(self, now: float) -> None:
        horizon = now - self._width * self._size
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()

    def record(self, now: float, *, failed: bool, calls: int = 1) -> None:
        """Add ``calls`` calls at ``now`` (all failed, or all succeeded)."""
        start = now - (now % self._width)
        if not self._buckets or self._buckets[-1][0] != start:
            self._trim(now)
            self._buckets.append([start, 0.0, 0.0])
        bucket = self._buckets[-1]
        bucket[1] += calls
        if failed:
            bucket[2] += calls

    def totals(self, now: float) -> tuple[int, int]:
        """(calls, failures) within the window ending at ``now``."""
        self._trim(now)
        return (
            int(sum(b[1] for b in self._buckets)),
            int(sum(b[2] for b in self._buckets)),
        )

    def clear(self) -> None:
        """Forget everything."""
        self._buckets.clear()


class RetryBudget:
    """Retries may be at most ``budget_ratio`` of recent calls (plus a floor).

    During an outage every call fails; without a budget each caller retries
    ``max_attempts - 1`` times and the outage multiplies our traffic. Thread-safe.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._calls = SlidingWindow(policy.budget_window)
        self._retries = SlidingWindow(policy.budget_window)
        self._lock = threading.Lock()

    def record_call(self, now: float) -> None:
        """Count one first attempt."""
        with self._lock:
            self._calls.record(now, failed=False)

    def try_spend(self, now: float) -> bool:
        """Reserve one retry if the budget allows it."""
        with self._lock:
            calls, _ = self._calls.totals(now)
            retries, _ = self._retries.totals(now)
            allowed = max(self._policy.budget_min_retries, self._policy.budget_ratio * calls)
            if retries + 1 > allowed:
                return False
            self._retries.record(now, failed=False)
            return True


class TokenBucket:
    """Client-side rate limit: ``rate`` tokens a second, up to ``burst``. Thread-safe.

    :meth:`reserve` takes a token now or books the next free one and says how
    long to wait for it, so waiting callers are served in order without polling.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Take one token; return seconds to wait before using it (0 when available now)."""
        with self._lock:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self._rate

    def refund(self) -> None:
        """Give back a token reserved by a call that then did not happen."""
        with self._lock:
            self._tokens = min(self._burst, self._tokens + 1.0)
