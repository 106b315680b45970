"""The call pipeline: every provider call goes through a :class:`Gateway` or :class:`AsyncGateway`.

One logical call::

    deadline → provider pause (429 / Retry-After, shared by every caller in the process)
      → client-side token bucket → bulkhead slot → breaker admission
      → one attempt (per-attempt timeouts, clipped to the deadline) → classify
      → record the outcome in the breaker and the metrics
      → retry? only provider faults, only idempotent requests or ones carrying an
        idempotency key, backoff with full jitter or Retry-After, within the
        deadline and the provider's retry budget

Every decision lives in :class:`_Pipeline` or in ``policy.py`` and ``breaker.py``;
the two gateways differ only in ``send``/``await send`` and ``sleep``/``await
sleep``. The first attempt runs without tenacity (its loop costs tens of
microseconds a call, more than the rest of the pipeline); once a retry is due,
the rest of the call is driven by tenacity ``Retrying``/``AsyncRetrying`` built
from one shared configuration.

Both gateways are safe to share: ``Gateway`` between threads, ``AsyncGateway``
between the tasks of one event loop.
"""

from __future__ import annotations

import asyncio
import json as _json
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tenacity

from .._clock import Clock, system_clock
from .._http import httpx
from ..config import ProviderSettings, Settings
from ..exceptions import (
    BulkheadFull,
    CircuitOpen,
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    RateLimited,
    RetryBudgetExhausted,
    UsageError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._breaker import STATE_VALUE, Breaker, BreakerTransition, TransitionHook
from ._errors import (
    HTTPX_ERRORS,
    error_for_status,
    map_httpx_errors,
    rejection_details,
    translate_httpx_error,
)
from ._policy import (
    RetryBudget,
    TokenBucket,
    effective_attempts,
    parse_retry_after,
    retry_delay,
    should_retry,
)

__all__ = ["AsyncGateway", "Gateway", "HealthReport"]

AuthFactory = Callable[[ProviderSettings], "httpx.Auth | None"]
_log = get_logger()


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Result of probing a provider's health endpoint."""

    provider: str
    ok: bool
    status_code: int | None
    latency: float | None
    detail: str


class _Call:
    """One logical call (all its attempts)."""

    __slots__ = (
        "_request_id",
        "attempts",
        "content",
        "deadline",
        "endpoint",
        "headers",
        "idempotency_key",
        "json",
        "method",
        "params",
        "parse_json",
        "provider",
        "url",
    )

    def __init__(  # noqa: PLR0917  # built once per call on the hot path; positional is cheaper
        self,
        provider: str,
        endpoint: str,
        method: str,
        url: str,
        params: Any,
        json: Any,
        content: Any,
        headers: dict[str, str] | None,
        idempotency_key: str | None,
        deadline: float,
        parse_json: bool,
        request_id: str | None,
    ) -> None:
        self.provider = provider
        self.endpoint = endpoint
        self.method = method
        self.url = url
        self.params = params
        self.json = json
        self.content = content
        self.headers = headers
        self.idempotency_key = idempotency_key
        self.deadline = deadline
        self.parse_json = parse_json
        self._request_id = request_id
        self.attempts = 0

    @property
    def request_id(self) -> str:
        """Correlation id; made on first use, since most calls never log one."""
        if self._request_id is None:
            self._request_id = os.urandom(8).hex()
        return self._request_id


@dataclass(slots=True)
class _Runtime:
    """Per-provider state: breakers, limiter, budget, pause, pre-bound metric children."""

    settings: ProviderSettings
    breaker: Breaker
    endpoint_breakers: dict[str, Breaker]
    bucket: TokenBucket | None
    budget: RetryBudget
    timeout: httpx.Timeout
    paused_until: float = 0.0
    #: Calls holding a bulkhead slot now; set by the gateway that owns the slots.
    in_flight: Callable[[], int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    children: dict[tuple[str, ...], Any] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)


class _Pipeline:
    """Everything both gateways share: configuration, decisions, metrics, logs."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None,
        clock: Clock | None,
        auth: AuthFactory | None,
        breaker_storage: Callable[[str, str], Any] | None,
        on_transition: Sequence[TransitionHook],
        seed: int | None,
        request_id_header: str | None = None,
    ) -> None:
        self.settings = settings
        #: Header carrying our request id to the provider (None: not sent).
        self.request_id_header = request_id_header
        self.metrics = metrics or get_metrics()
        self.clock = clock or system_clock
        self._auth_factory = auth
        self._rng = random.Random(seed)  # noqa: S311  # jitter, not cryptography
        self._hooks: tuple[TransitionHook, ...] = (self._on_transition, *on_transition)
        if breaker_storage is None and settings.redis_url:
            from ._shared import redis_breaker_storage

            breaker_storage = redis_breaker_storage(settings.redis_url, clock=self.clock)
        self._storage_factory = breaker_storage
        self._runtimes: dict[str, _Runtime] = {}
        self._runtimes_lock = threading.Lock()
        self._auths: dict[str, httpx.Auth | None] = {}

    # ------------------------------------------------------------- runtimes

    def runtime(self, provider: str) -> _Runtime:
        runtime = self._runtimes.get(provider)
        if runtime is not None:
            return runtime
        with self._runtimes_lock:
            runtime = self._runtimes.get(provider)
            if runtime is None:
                runtime = self._build_runtime(self.settings.provider(provider))
                self._runtimes[provider] = runtime
        return runtime

    def _breaker(self, provider: ProviderSettings, name: str) -> Breaker:
        storage = self._storage_factory(provider.name, name) if self._storage_factory else None
        breaker = Breaker(
            provider.name,
            name,
            provider.breaker,
            clock=self.clock,
            storage=storage,
            hooks=self._hooks,
        )
        self.metrics.breaker_state.labels(provider.name, name).set(STATE_VALUE[breaker.state])
        return breaker

    def _build_runtime(self, provider: ProviderSettings) -> _Runtime:
        t = provider.timeouts
        bucket = (
            TokenBucket(provider.rate_limit.rate, provider.rate_limit.burst, self.clock.monotonic())
            if provider.rate_limit.rate
            else None
        )
        return _Runtime(
            settings=provider,
            breaker=self._breaker(provider, provider.name),
            endpoint_breakers={},
            bucket=bucket,
            budget=RetryBudget(provider.retry),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        )

    def endpoint_breaker(self, runtime: _Runtime, endpoint: str) -> Breaker | None:
        if not runtime.settings.breaker.per_endpoint:
            return None
        breaker = runtime.endpoint_breakers.get(endpoint)
        if breaker is None:
            with runtime.lock:
                breaker = runtime.endpoint_breakers.get(endpoint)
                if breaker is None:
                    breaker = self._breaker(runtime.settings, endpoint)
                    runtime.endpoint_breakers[endpoint] = breaker
        return breaker

    def auth_for(self, provider: ProviderSettings) -> httpx.Auth | None:
        if self._auth_factory is None:
            return None
        if provider.name not in self._auths:
            self._auths[provider.name] = self._auth_factory(provider)
        return self._auths[provider.name]

    def child(self, runtime: _Runtime, metric: str, *labels: str) -> Any:
        key = (metric, *labels)
        found = runtime.children.get(key)
        if found is None:
            found = getattr(self.metrics, metric).labels(runtime.settings.name, *labels)
            runtime.children[key] = found
        return found

    # ---------------------------------------------------------------- calls

    def prepare(
        self,
        provider: str,
        endpoint: str,
        *,
        method: str,
        path_params: Mapping[str, Any] | None,
        params: Any,
        json: Any,
        content: Any,
        headers: Mapping[str, str] | None,
        idempotency_key: str | None,
        timeout: float | None,
        parse_json: bool,
    ) -> tuple[_Runtime, _Call]:
        runtime = self.runtime(provider)
        settings = runtime.settings
        if path_params:
            template = settings.endpoint_path(endpoint)
            try:
                path = template.format(**{k: _quote(v) for k, v in path_params.items()})
            except (KeyError, IndexError) as exc:
                raise UsageError(
                    f"endpoint {endpoint!r} of {provider} ({template}) needs path parameter {exc}"
                ) from None
            url = settings.base_url + path
        else:
            url = runtime.urls.get(endpoint) or ""
            if not url:
                url = settings.base_url + settings.endpoint_path(endpoint)
                runtime.urls[endpoint] = url
        request_id = None
        merged: dict[str, str] | None = dict(headers) if headers else None
        if self.request_id_header:
            request_id = os.urandom(8).hex()
            merged = merged or {}
            merged[self.request_id_header] = request_id
        if idempotency_key:
            merged = merged or {}
            merged["Idempotency-Key"] = idempotency_key
        deadline_s = settings.timeouts.deadline if timeout is None else timeout
        return runtime, _Call(
            provider,
            endpoint,
            method.upper(),
            url,
            params,
            json,
            content,
            merged,
            idempotency_key,
            self.clock.monotonic() + deadline_s,
            parse_json,
            request_id,
        )

    def remaining(self, call: _Call) -> float:
        return call.deadline - self.clock.monotonic()

    def deadline_error(self, call: _Call, waiting_for: str) -> ProviderTimeout:
        return ProviderTimeout(
            f"{call.provider} {call.endpoint}: deadline exceeded while {waiting_for}",
            provider=call.provider,
            endpoint=call.endpoint,
        )

    def pause_wait(self, runtime: _Runtime, call: _Call) -> float:
        """Seconds to wait for a provider pause (429/Retry-After); raises if past the deadline."""
        if not runtime.paused_until:
            return 0.0
        wait = runtime.paused_until - self.clock.monotonic()
        if wait <= 0:
            return 0.0
        if wait >= self.remaining(call):
            # The logical call's outcome is counted once, by finish().
            self.count_error(runtime, call.endpoint, "rate_limited")
            raise RateLimited(
                f"{call.provider} {call.endpoint}: provider paused by rate limit (HTTP 429) for "
                f"{wait:.1f}s more, beyond the call's deadline",
                provider=call.provider,
                endpoint=call.endpoint,
                retry_after=wait,
            )
        return wait

    def bucket_wait(self, runtime: _Runtime, call: _Call) -> float:
        if runtime.bucket is None:
            return 0.0
        wait = runtime.bucket.reserve(self.clock.monotonic())
        if wait <= 0:
            return 0.0
        if wait >= self.remaining(call):
            runtime.bucket.refund()
            raise RateLimited(
                f"{call.provider} {call.endpoint}: client-side rate limit would delay the call "
                f"{wait:.2f}s, beyond its deadline",
                provider=call.provider,
                endpoint=call.endpoint,
                retry_after=wait,
            )
        self.child(runtime, "rate_limited", call.endpoint, "client").inc()
        return wait

    def admit(self, runtime: _Runtime, call: _Call) -> tuple[bool, Breaker | None, bool]:
        """Breaker admission for the provider-wide and (optionally) the endpoint breaker."""
        try:
            trial = runtime.breaker.admit()
        except CircuitOpen as exc:
            self._short_circuited(runtime, call, exc)
            raise
        endpoint_breaker = self.endpoint_breaker(runtime, call.endpoint)
        endpoint_trial = False
        if endpoint_breaker is not None:
            try:
                endpoint_trial = endpoint_breaker.admit()
            except CircuitOpen as exc:
                runtime.breaker.release(trial)
                self._short_circuited(runtime, call, exc)
                raise
        return trial, endpoint_breaker, endpoint_trial

    def _short_circuited(self, runtime: _Runtime, call: _Call, exc: CircuitOpen) -> None:
        exc.endpoint = call.endpoint
        # The logical call's outcome is counted once, by finish().
        self.count_error(runtime, call.endpoint, "circuit_open")

    def timeout_for(self, runtime: _Runtime, call: _Call) -> httpx.Timeout:
        """Per-attempt timeouts clipped to the deadline; call it before breaker admission.

        A deadline spent while waiting (pause, limiter, bulkhead) is a timeout of
        the call but not a provider fault: nothing was sent, so no breaker hears of it.
        """
        remaining = self.remaining(call)
        if remaining <= 0:
            error = self.deadline_error(call, "waiting to start an attempt")
            self.count_error(runtime, call.endpoint, error.error_type)
            _log.warning(
                "idis.gateway.timeout",
                msg=f"provider call timed out before it was sent: {error}",
                provider=call.provider,
                endpoint=call.endpoint,
                attempt=call.attempts + 1,
                request_id=call.request_id,
            )
            raise error
        t = runtime.timeout
        # Clip only when the deadline is nearer than a configured timeout.
        longest = max(t.connect or 0, t.read or 0, t.write or 0, t.pool or 0)
        if remaining >= longest:
            return t
        return httpx.Timeout(
            connect=min(t.connect or remaining, remaining),
            read=min(t.read or remaining, remaining),
            write=min(t.write or remaining, remaining),
            pool=min(t.pool or remaining, remaining),
        )

    def classify(self, call: _Call, response: httpx.Response) -> tuple[Any, ProviderError | None]:
        """(decoded JSON or the response, error) for a received response."""
        status = response.status_code
        if status < 400:
            if not call.parse_json:
                return response, None
            try:
                return _json.loads(response.content), None
            except ValueError:
                return None, MalformedResponse(
                    f"{call.provider} {call.endpoint}: response body is not valid JSON "
                    f"(HTTP {status}, {len(response.content)} bytes)",
                    provider=call.provider,
                    endpoint=call.endpoint,
                    status_code=status,
                )
        retry_after = None
        header = response.headers.get("retry-after")
        if header is not None:
            runtime = self.runtime(call.provider)
            retry_after = parse_retry_after(
                header, now=self.clock.now(), cap=runtime.settings.retry.retry_after_cap
            )
        error = error_for_status(status, call.provider, call.endpoint, retry_after=retry_after)
        if isinstance(error, ProviderRejected):
            error.details = rejection_details(response.content)
        return None, error

    def record(
        self,
        runtime: _Runtime,
        call: _Call,
        admission: tuple[bool, Breaker | None, bool],
        started: float,
        error: ProviderError | None,
    ) -> None:
        """Feed one attempt's outcome to the breakers, the metrics and the logs."""
        trial, endpoint_breaker, endpoint_trial = admission
        self.child(runtime, "latency", call.endpoint).observe(time.perf_counter() - started)
        if error is None or not error.provider_fault:
            runtime.breaker.record_success(trial)
            if endpoint_breaker is not None:
                endpoint_breaker.record_success(endpoint_trial)
        else:
            runtime.breaker.record_failure(trial, error.error_type)
            if endpoint_breaker is not None:
                endpoint_breaker.record_failure(endpoint_trial, error.error_type)
        if error is None:
            return
        self.count_error(runtime, call.endpoint, error.error_type)
        if error.retry_after is not None:
            self.pause(runtime, call, error)
        elif isinstance(error, RateLimited):
            self.child(runtime, "rate_limited", call.endpoint, "provider").inc()
            _log.warning(
                "idis.gateway.rate_limited",
                msg="provider rate limit hit (HTTP 429) without Retry-After",
                provider=call.provider,
                endpoint=call.endpoint,
                status=429,
                request_id=call.request_id,
            )
        elif isinstance(error, ProviderTimeout):
            _log.warning(
                "idis.gateway.timeout",
                msg=f"provider call timed out: {error}",
                provider=call.provider,
                endpoint=call.endpoint,
                attempt=call.attempts,
                request_id=call.request_id,
            )
        else:
            _log.warning(
                "idis.gateway.call_failed",
                msg=str(error),
                provider=call.provider,
                endpoint=call.endpoint,
                error_type=error.error_type,
                status=error.status_code,
                attempt=call.attempts,
                request_id=call.request_id,
            )

    def pause(self, runtime: _Runtime, call: _Call, error: ProviderError) -> None:
        """Hold every caller of this provider for the Retry-After the provider asked for."""
        assert error.retry_after is not None
        until = self.clock.monotonic() + error.retry_after
        with runtime.lock:
            runtime.paused_until = max(runtime.paused_until, until)
        if isinstance(error, RateLimited):
            self.child(runtime, "rate_limited", call.endpoint, "provider").inc()
            _log.warning(
                "idis.gateway.rate_limited",
                msg=(
                    f"provider rate limit hit (HTTP 429): pausing all calls to {call.provider} "
                    f"for {error.retry_after:g}s (Retry-After)"
                ),
                provider=call.provider,
                endpoint=call.endpoint,
                status=429,
                retry_after=error.retry_after,
                request_id=call.request_id,
            )
        else:
            _log.warning(
                "idis.gateway.retry_after",
                msg=(
                    f"provider asked us to back off (HTTP {error.status_code}, Retry-After "
                    f"{error.retry_after:g}s): pausing all calls to {call.provider}"
                ),
                provider=call.provider,
                endpoint=call.endpoint,
                status=error.status_code,
                retry_after=error.retry_after,
                request_id=call.request_id,
            )

    def bind_bulkhead(
        self, runtime: _Runtime, sem: threading.Semaphore | asyncio.Semaphore
    ) -> None:
        """Export the bulkhead's occupancy, read at scrape time instead of per call."""
        size = runtime.settings.max_concurrency

        def in_flight() -> int:
            # Both semaphore kinds keep their free slots in _value; reading it at
            # scrape time saves two gauge updates on every call.
            return size - int(sem._value)

        runtime.in_flight = in_flight
        self.child(runtime, "in_flight").set_function(in_flight)

    def bulkhead_full(self, runtime: _Runtime, call: _Call) -> BulkheadFull:
        self.count_error(runtime, call.endpoint, "bulkhead_full")
        self.metrics.bulkhead_rejected.labels(call.provider).inc()
        return BulkheadFull(
            f"{call.provider}: {runtime.settings.max_concurrency} calls already in flight",
            provider=call.provider,
            endpoint=call.endpoint,
        )

    def bulkhead_timeout(self, runtime: _Runtime, call: _Call) -> float:
        return min(runtime.settings.bulkhead_wait, max(0.0, self.remaining(call)))

    def begin(
        self, runtime: _Runtime, call: _Call
    ) -> tuple[tuple[bool, Breaker | None, bool], float]:
        """Admit one attempt (breakers) and start its clock; caller holds a bulkhead slot."""
        admission = self.admit(runtime, call)
        call.attempts += 1
        return admission, time.perf_counter()

    def abandon(self, admission: tuple[bool, Breaker | None, bool], runtime: _Runtime) -> None:
        """Release an attempt that was cancelled before the provider answered."""
        trial, endpoint_breaker, endpoint_trial = admission
        runtime.breaker.release(trial)
        if endpoint_breaker is not None:
            endpoint_breaker.release(endpoint_trial)

    def conclude(
        self,
        runtime: _Runtime,
        call: _Call,
        admission: tuple[bool, Breaker | None, bool],
        started: float,
        response: httpx.Response,
    ) -> Any:
        """Classify a response, record it, and return the result or raise its error."""
        result, error = self.classify(call, response)
        self.record(runtime, call, admission, started, error)
        if error is not None:
            raise error
        return result

    def health_url(self, provider: str) -> tuple[str | None, float]:
        settings = self.settings.provider(provider)
        if not settings.health_endpoint:
            return None, 0.0
        return settings.base_url + settings.health_endpoint, min(5.0, settings.timeouts.read)

    def health_report(
        self,
        provider: str,
        started: float,
        response: httpx.Response | None,
        error: Exception | None,
    ) -> HealthReport:
        if response is None:
            self.metrics.provider_up.labels(provider).set(0)
            return HealthReport(provider, False, None, None, str(error))
        ok = response.status_code < 400
        self.metrics.provider_up.labels(provider).set(1 if ok else 0)
        return HealthReport(
            provider,
            ok,
            response.status_code,
            time.perf_counter() - started,
            f"HTTP {response.status_code}",
        )

    def count_error(self, runtime: _Runtime, endpoint: str, error_type: str) -> None:
        self.child(runtime, "errors", endpoint, error_type).inc()

    def finish(self, runtime: _Runtime, call: _Call, outcome: str) -> None:
        self.child(runtime, "requests", call.endpoint, outcome).inc()

    # -------------------------------------------------------------- retries

    def retry_config(self, runtime: _Runtime, call: _Call, first: ProviderError) -> dict[str, Any]:
        """tenacity configuration for the rest of a call whose first attempt failed.

        The wrapped function re-raises ``first`` on tenacity's first attempt, so
        tenacity's own bookkeeping (attempt numbers, waits, stop) covers the
        whole call, and the first attempt still ran without tenacity's overhead.
        """
        policy = runtime.settings.retry

        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, ProviderError) and should_retry(
                exc, method=call.method, idempotency_key=call.idempotency_key
            )

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, ProviderError)
            delay = retry_delay(policy, state.attempt_number, exc, self._rng)
            return max(0.0, min(delay, self.remaining(call)))

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= effective_attempts(policy):
                return True
            return self.remaining(call) - state.upcoming_sleep <= 0

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            assert isinstance(exc, ProviderError)
            if not runtime.budget.try_spend(self.clock.monotonic()):
                self.metrics.retry_budget_exhausted.labels(call.provider).inc()
                self.count_error(runtime, call.endpoint, "retry_budget_exhausted")
                _log.warning(
                    "idis.gateway.retry_budget_exhausted",
                    msg=f"retry budget of {call.provider} spent: not retrying ({exc})",
                    provider=call.provider,
                    endpoint=call.endpoint,
                    request_id=call.request_id,
                )
                raise RetryBudgetExhausted(
                    f"{call.provider} {call.endpoint}: retry budget exhausted after {exc}",
                    provider=call.provider,
                    endpoint=call.endpoint,
                    status_code=exc.status_code,
                ) from exc
            self.child(runtime, "retries", call.endpoint, exc.error_type).inc()
            _log.info(
                "idis.gateway.retry_scheduled",
                msg=f"retrying in {state.upcoming_sleep:.2f}s after {exc.error_type}",
                provider=call.provider,
                endpoint=call.endpoint,
                attempt=state.attempt_number,
                wait=round(state.upcoming_sleep, 3),
                request_id=call.request_id,
            )

        return {
            "retry": tenacity.retry_if_exception(retryable),
            "wait": wait,
            "stop": stop,
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def outcome_for(self, exc: ProviderError) -> str:
        if isinstance(exc, CircuitOpen):
            return "short_circuited"
        if isinstance(exc, RetryBudgetExhausted):
            return "budget_exhausted"
        if isinstance(exc, BulkheadFull):
            return "bulkhead_full"
        return "rate_limited" if isinstance(exc, RateLimited) else "error"

    # ----------------------------------------------------- breaker events

    def _on_transition(self, event: BreakerTransition) -> None:
        self.metrics.breaker_state.labels(event.provider, event.breaker).set(
            STATE_VALUE[event.to_state]
        )
        self.metrics.breaker_transitions.labels(event.provider, event.breaker, event.to_state).inc()
        log = _log.warning if event.to_state != "closed" else _log.info
        log(
            f"idis.breaker.{event.to_state}",
            msg=(
                f"circuit breaker {event.breaker} of {event.provider}: {event.from_state} -> "
                f"{event.to_state} ({event.reason})"
            ),
            provider=event.provider,
            breaker=event.breaker,
            from_state=event.from_state,
            to_state=event.to_state,
            reason=event.reason,
            observed=event.observed,
        )

    # -------------------------------------------------------------- queries

    def available(self, provider: str) -> bool:
        runtime = self.runtime(provider)
        if runtime.paused_until > self.clock.monotonic():
            return False
        return runtime.breaker.would_admit()

    def breaker_state(self, provider: str, endpoint: str | None = None) -> str:
        runtime = self.runtime(provider)
        if endpoint is not None:
            breaker = self.endpoint_breaker(runtime, endpoint)
            if breaker is not None:
                return breaker.state
        return runtime.breaker.state

    def snapshot(self, provider: str) -> dict[str, Any]:
        runtime = self.runtime(provider)
        stats: dict[str, Any] = dict(runtime.breaker.stats())
        stats["paused_for"] = round(max(0.0, runtime.paused_until - self.clock.monotonic()), 3)
        stats["in_flight"] = runtime.in_flight() if runtime.in_flight else 0
        stats["endpoints"] = {
            name: breaker.stats() for name, breaker in runtime.endpoint_breakers.items()
        }
        return stats

    def breaker(self, provider: str, endpoint: str | None = None) -> Breaker:
        runtime = self.runtime(provider)
        if endpoint is None:
            return runtime.breaker
        breaker = self.endpoint_breaker(runtime, endpoint)
        if breaker is None:
            raise UsageError(f"{provider} has no per-endpoint breakers (BREAKER_PER_ENDPOINT)")
        return breaker


def _quote(value: Any) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="")


def _limits(settings: Settings) -> httpx.Limits:
    # A pool sized to the largest bulkhead: 64 fresh connections per burst was
    # several times slower than a pool capped per provider (issue 2's notes).
    size = max((p.max_concurrency for p in settings.providers.values()), default=16)
    return httpx.Limits(
        max_connections=size * max(1, len(settings.providers)),
        max_keepalive_connections=size * max(1, len(settings.providers)),
    )


class Gateway:
    """Resilient provider calls for sync code (scripts, worker threads). Thread-safe.

    Example::

        gateway = Gateway(Settings.from_env())
        record = gateway.get_json("crm_provider", "record", path_params={"id": "42"})
        gateway.request("crm_provider", "record", method="PUT", path_params={"id": "42"},
                        json={"data": {...}}, idempotency_key="deal-42-v7")

    Args:
        settings: Library settings (providers and their policies).
        metrics: Metrics to record into (default: the process-wide set).
        clock: Time source for deadlines, breakers and pauses.
        sleep: How to wait (default ``time.sleep``); tests pass a fake.
        auth: Returns an ``httpx.Auth`` per provider (the OAuth module's factory).
        transport: An httpx transport (tests: ``httpx.MockTransport``).
        client: A ready ``httpx.Client`` to use instead of building one.
        breaker_storage: ``(provider, breaker) -> pybreaker storage``; default is
            Redis when ``settings.redis_url`` is set, else in-process.
        on_transition: Extra hooks called on every breaker state change.
        seed: Seed for backoff jitter (reproducible tests).
        request_id_header: Send each call's request id to the provider in this
            header (e.g. ``X-Request-ID``); off by default, it costs a header per call.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] | None = None,
        auth: AuthFactory | None = None,
        transport: httpx.BaseTransport | None = None,
        client: httpx.Client | None = None,
        breaker_storage: Callable[[str, str], Any] | None = None,
        on_transition: Sequence[TransitionHook] = (),
        seed: int | None = None,
        request_id_header: str | None = None,
    ) -> None:
        self._p = _Pipeline(
            settings,
            request_id_header=request_id_header,
            metrics=metrics,
            clock=clock,
            auth=auth,
            breaker_storage=breaker_storage,
            on_transition=on_transition,
            seed=seed,
        )
        self._sleep = sleep or time.sleep
        self._owns_client = client is None
        self._client = client or httpx.Client(
            transport=transport, limits=_limits(settings), follow_redirects=False
        )
        self._semaphores: dict[str, threading.BoundedSemaphore] = {}
        self._sem_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        """The settings this gateway was built with."""
        return self._p.settings

    @property
    def clock(self) -> Clock:
        """The clock deadlines, breakers and pauses read."""
        return self._p.clock

    def _semaphore(self, runtime: _Runtime) -> threading.BoundedSemaphore:
        name = runtime.settings.name
        sem = self._semaphores.get(name)
        if sem is None:
            with self._sem_lock:
                sem = self._semaphores.get(name)
                if sem is None:
                    sem = threading.BoundedSemaphore(runtime.settings.max_concurrency)
                    self._p.bind_bulkhead(runtime, sem)
                    self._semaphores[name] = sem
        return sem

    def request(
        self,
        provider: str,
        endpoint: str,
        *,
        method: str = "GET",
        path_params: Mapping[str, Any] | None = None,
        params: Any = None,
        json: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Call ``endpoint`` of ``provider``; return the (1xx-3xx) response.

        Raises:
            UnknownProviderError: the provider is not configured.
            ProviderError: a subclass saying what failed (see ``exceptions.py``).
        """
        result = self._run(
            provider,
            endpoint,
            method=method,
            path_params=path_params,
            params=params,
            json=json,
            content=content,
            headers=headers,
            idempotency_key=idempotency_key,
            timeout=timeout,
            parse_json=False,
        )
        assert isinstance(result, httpx.Response)
        return result

    def get_json(
        self,
        provider: str,
        endpoint: str,
        *,
        method: str = "GET",
        path_params: Mapping[str, Any] | None = None,
        params: Any = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like :meth:`request`, returning the decoded JSON body.

        A body that is not JSON is a provider fault (``MalformedResponse``):
        counted against the breaker and retried like a 5xx.
        """
        return self._run(
            provider,
            endpoint,
            method=method,
            path_params=path_params,
            params=params,
            json=json,
            content=None,
            headers=headers,
            idempotency_key=idempotency_key,
            timeout=timeout,
            parse_json=True,
        )

    def _run(self, provider: str, endpoint: str, **kwargs: Any) -> Any:
        p = self._p
        runtime, call = p.prepare(provider, endpoint, **kwargs)
        runtime.budget.record_call(p.clock.monotonic())
        try:
            result = self._attempt(runtime, call)
        except ProviderError as first:
            if not should_retry(first, method=call.method, idempotency_key=call.idempotency_key):
                p.finish(runtime, call, p.outcome_for(first))
                raise
            result = self._retry(runtime, call, first)
        p.finish(runtime, call, "success")
        return result

    def _retry(self, runtime: _Runtime, call: _Call, first: ProviderError) -> Any:
        pending: list[ProviderError] = [first]

        def attempt() -> Any:
            if pending:
                raise pending.pop()
            return self._attempt(runtime, call)

        retrying = tenacity.Retrying(
            sleep=self._sleep, **self._p.retry_config(runtime, call, first)
        )
        try:
            return retrying(attempt)
        except ProviderError as exc:
            self._p.finish(runtime, call, self._p.outcome_for(exc))
            raise

    def _attempt(self, runtime: _Runtime, call: _Call) -> Any:
        p = self._p
        wait = p.pause_wait(runtime, call) + p.bucket_wait(runtime, call)
        if wait > 0:
            self._sleep(wait)
        sem = self._semaphore(runtime)
        if not sem.acquire(timeout=p.bulkhead_timeout(runtime, call)):
            raise p.bulkhead_full(runtime, call)
        try:
            timeout = p.timeout_for(runtime, call)
            admission, started = p.begin(runtime, call)
            try:
                response = self._client.request(
                    call.method,
                    call.url,
                    params=call.params,
                    json=call.json,
                    content=call.content,
                    headers=call.headers,
                    timeout=timeout,
                    auth=p.auth_for(runtime.settings) or httpx.USE_CLIENT_DEFAULT,
                )
            except HTTPX_ERRORS as raw:
                # Inline rather than map_httpx_errors(): a context manager per
                # call is measurable on the healthy path.
                error = translate_httpx_error(raw, call.provider, call.endpoint)
                if isinstance(error, ProviderError):
                    p.record(runtime, call, admission, started, error)
                else:
                    p.abandon(admission, runtime)
                raise error from raw
            except BaseException:
                p.abandon(admission, runtime)
                raise
            return p.conclude(runtime, call, admission, started, response)
        finally:
            sem.release()

    def available(self, provider: str) -> bool:
        """False while the provider's breaker is open or a Retry-After pause holds."""
        return self._p.available(provider)

    def breaker_state(self, provider: str, endpoint: str | None = None) -> str:
        """``closed``, ``half_open`` or ``open``."""
        return self._p.breaker_state(provider, endpoint)

    def breaker(self, provider: str, endpoint: str | None = None) -> Breaker:
        """The provider's (or an endpoint's) breaker, for operators and tests."""
        return self._p.breaker(provider, endpoint)

    def snapshot(self, provider: str) -> dict[str, Any]:
        """Breaker state, recent error rate, pause and in-flight count (for ``status``)."""
        return self._p.snapshot(provider)

    def health(self, provider: str) -> HealthReport:
        """Probe the provider's health endpoint once (no retries, no breaker)."""
        url, timeout = self._p.health_url(provider)
        if url is None:
            return HealthReport(provider, True, None, None, "no health endpoint configured")
        started = time.perf_counter()
        try:
            with map_httpx_errors(provider, "health"):
                response = self._client.get(url, timeout=timeout)
        except ProviderError as exc:
            return self._p.health_report(provider, started, None, exc)
        return self._p.health_report(provider, started, response, None)

    def close(self) -> None:
        """Close the HTTP client (when the gateway created it)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGateway:
    """Resilient provider calls for asyncio code. Safe to share between tasks of one loop.

    Same arguments and methods as :class:`Gateway`; ``request``, ``get_json``
    and ``health`` are coroutines, ``aclose`` closes it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        auth: AuthFactory | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        client: httpx.AsyncClient | None = None,
        breaker_storage: Callable[[str, str], Any] | None = None,
        on_transition: Sequence[TransitionHook] = (),
        seed: int | None = None,
        request_id_header: str | None = None,
    ) -> None:
        self._p = _Pipeline(
            settings,
            request_id_header=request_id_header,
            metrics=metrics,
            clock=clock,
            auth=auth,
            breaker_storage=breaker_storage,
            on_transition=on_transition,
            seed=seed,
        )
        self._sleep = sleep or asyncio.sleep
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            transport=transport, limits=_limits(settings), follow_redirects=False
        )
        self._semaphores: dict[str, asyncio.Semaphore] = {}

    @property
    def settings(self) -> Settings:
        """The settings this gateway was built with."""
        return self._p.settings

    @property
    def clock(self) -> Clock:
        """The clock deadlines, breakers and pauses read."""
        return self._p.clock

    def _semaphore(self, runtime: _Runtime) -> asyncio.Semaphore:
        name = runtime.settings.name
        sem = self._semaphores.get(name)
        if sem is None:
            sem = self._semaphores[name] = asyncio.Semaphore(runtime.settings.max_concurrency)
            self._p.bind_bulkhead(runtime, sem)
        return sem

    async def request(
        self,
        provider: str,
        endpoint: str,
        *,
        method: str = "GET",
        path_params: Mapping[str, Any] | None = None,
        params: Any = None,
        json: Any = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Async twin of :meth:`Gateway.request`."""
        result = await self._run(
            provider,
            endpoint,
            method=method,
            path_params=path_params,
            params=params,
            json=json,
            content=content,
            headers=headers,
            idempotency_key=idempotency_key,
            timeout=timeout,
            parse_json=False,
        )
        assert isinstance(result, httpx.Response)
        return result

    async def get_json(
        self,
        provider: str,
        endpoint: str,
        *,
        method: str = "GET",
        path_params: Mapping[str, Any] | None = None,
        params: Any = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Async twin of :meth:`Gateway.get_json`."""
        return await self._run(
            provider,
            endpoint,
            method=method,
            path_params=path_params,
            params=params,
            json=json,
            content=None,
            headers=headers,
            idempotency_key=idempotency_key,
            timeout=timeout,
            parse_json=True,
        )

    async def _run(self, provider: str, endpoint: str, **kwargs: Any) -> Any:
        p = self._p
        runtime, call = p.prepare(provider, endpoint, **kwargs)
        runtime.budget.record_call(p.clock.monotonic())
        try:
            result = await self._attempt(runtime, call)
        except ProviderError as first:
            if not should_retry(first, method=call.method, idempotency_key=call.idempotency_key):
                p.finish(runtime, call, p.outcome_for(first))
                raise
            result = await self._retry(runtime, call, first)
        p.finish(runtime, call, "success")
        return result

    async def _retry(self, runtime: _Runtime, call: _Call, first: ProviderError) -> Any:
        pending: list[ProviderError] = [first]

        async def attempt() -> Any:
            if pending:
                raise pending.pop()
            return await self._attempt(runtime, call)

        retrying = tenacity.AsyncRetrying(
            sleep=self._sleep, **self._p.retry_config(runtime, call, first)
        )
        try:
            return await retrying(attempt)
        except ProviderError as exc:
            self._p.finish(runtime, call, self._p.outcome_for(exc))
            raise

    async def _acquire(self, runtime: _Runtime, call: _Call, sem: asyncio.Semaphore) -> None:
        if not sem.locked():
            await sem.acquire()
            return
        try:
            await asyncio.wait_for(sem.acquire(), self._p.bulkhead_timeout(runtime, call))
        except TimeoutError:
            raise self._p.bulkhead_full(runtime, call) from None

    async def _attempt(self, runtime: _Runtime, call: _Call) -> Any:
        p = self._p
        wait = p.pause_wait(runtime, call) + p.bucket_wait(runtime, call)
        if wait > 0:
            await self._sleep(wait)
        sem = self._semaphore(runtime)
        await self._acquire(runtime, call, sem)
        try:
            timeout = p.timeout_for(runtime, call)
            admission, started = p.begin(runtime, call)
            try:
                response = await self._client.request(
                    call.method,
                    call.url,
                    params=call.params,
                    json=call.json,
                    content=call.content,
                    headers=call.headers,
                    timeout=timeout,
                    auth=p.auth_for(runtime.settings) or httpx.USE_CLIENT_DEFAULT,
                )
            except HTTPX_ERRORS as raw:
                # Inline rather than map_httpx_errors(): a context manager per
                # call is measurable on the healthy path.
                error = translate_httpx_error(raw, call.provider, call.endpoint)
                if isinstance(error, ProviderError):
                    p.record(runtime, call, admission, started, error)
                else:
                    p.abandon(admission, runtime)
                raise error from raw
            except BaseException:
                p.abandon(admission, runtime)
                raise
            return p.conclude(runtime, call, admission, started, response)
        finally:
            sem.release()

    def available(self, provider: str) -> bool:
        """False while the provider's breaker is open or a Retry-After pause holds."""
        return self._p.available(provider)

    def breaker_state(self, provider: str, endpoint: str | None = None) -> str:
        """``closed``, ``half_open`` or ``open``."""
        return self._p.breaker_state(provider, endpoint)

    def breaker(self, provider: str, endpoint: str | None = None) -> Breaker:
        """The provider's (or an endpoint's) breaker, for operators and tests."""
        return self._p.breaker(provider, endpoint)

    def snapshot(self, provider: str) -> dict[str, Any]:
        """Breaker state, recent error rate, pause and in-flight count (for ``status``)."""
        return self._p.snapshot(provider)

    async def health(self, provider: str) -> HealthReport:
        """Probe the provider's health endpoint once (no retries, no breaker)."""
        url, timeout = self._p.health_url(provider)
        if url is None:
            return HealthReport(provider, True, None, None, "no health endpoint configured")
        started = time.perf_counter()
        try:
            with map_httpx_errors(provider, "health"):
                response = await self._client.get(url, timeout=timeout)
        except ProviderError as exc:
            return self._p.health_report(provider, started, None, exc)
        return self._p.health_report(provider, started, response, None)

    async def aclose(self) -> None:
        """Close the HTTP client (when the gateway created it)."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
