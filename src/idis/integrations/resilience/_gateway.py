"""The call pipeline: every provider call goes through a :class:`Gateway` or :class:`AsyncGateway`.

One logical call is one *flow* (:meth:`_Pipeline.call_flow`, see ``_flow.py``),
written once and driven by :func:`~idis.integrations._flow.drive` (``Gateway``)
or :func:`~idis.integrations._flow.adrive` (``AsyncGateway``)::

    deadline → provider pause (429 / Retry-After, shared by every caller in the process)
      → client-side token bucket → shared breaker state (Redis, at most every 0.5 s)
      → bulkhead slot (FIFO) → breaker admission
      → one attempt (per-attempt timeouts, clipped to the deadline) → classify
      → record the outcome in the breaker and the metrics
      → retry? only provider faults, only idempotent requests (by method, or marked
        ``idempotent=True`` by the caller) or ones carrying an idempotency key, after
        the ``Backoff`` derived from ``RetryPolicy`` (or the provider's Retry-After,
        capped), within the deadline and the retry budget

The flow yields the I/O it needs as effects: a wait (:class:`_Wait`), a
bulkhead slot when none is free (:class:`_Slot`), the HTTP request (the
:class:`_Call` itself), a shared-state exchange (:class:`_Share`). Each effect
runs itself blocking or under asyncio; the order of the steps, the
classification, the retry loop and the error handling exist only in the flow.

The error contract (issue 11): every ``ProviderError`` the gateway raises has
``sent`` set to the number of requests of the logical call that went out. When
at least one went out, the error raised is the last real attempt's (the 503,
the timeout, ...), even if a retry was then refused by an open breaker, a full
bulkhead, the retry budget or the deadline. ``CircuitOpen``, ``BulkheadFull``
and the deadline/pause refusals are raised only when nothing went out
(``sent == 0``), so a caller that counts delivery attempts (the outbox) counts
exactly the requests the provider saw, a failed half-open trial included.

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
from urllib.parse import quote

from .._clock import Clock, system_clock
from .._flow import Awaited, Effect, Flow, async_face, sync_face
from .._http import httpx
from ..config import ProviderSettings, Settings
from ..exceptions import (
    BulkheadFull,
    CircuitOpen,
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    UsageError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._breaker import STATE_VALUE, Breaker, BreakerTransition, TransitionHook
from ._bulkhead import AsyncBulkhead, ThreadBulkhead
from ._errors import (
    HTTPX_ERRORS,
    error_for_status,
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

__all__ = ["PRESET_ERROR_TYPES", "AsyncGateway", "Gateway", "HealthReport"]

AuthFactory = Callable[[ProviderSettings], "httpx.Auth | None"]
_log = get_logger()

#: ``integration_errors_total`` series created at 0 for every configured provider and
#: endpoint when a gateway is built, so that ``rate()`` sees the first error of each
#: (Prometheus needs a sample before the increase). The provider faults the RB-09
#: alert sums (it excludes only client_error); 5 types x endpoints keeps it bounded.
PRESET_ERROR_TYPES = ("timeout", "connection", "server_error", "rate_limited", "malformed_response")

#: What :meth:`_Pipeline.retry_wait` returns when a retry was due but the budget is spent.
BUDGET_EXHAUSTED = -1.0

#: Path values that would leave their path segment once httpx normalizes the URL
#: (RFC 3986 dot segments), or that name no resource at all.
_UNSAFE_PATH_VALUES = frozenset({"", ".", ".."})


#: Hex digits to the letters a-p: a request id is 64 random bits as 16 letters.
_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


def new_request_id() -> str:
    """A correlation id: 16 letters a-p (64 random bits).

    Letters, not hex digits: RB-09 Triage 2 greps the logs for ``rate limit\\|429``, and
    one hex id in about 290 contains "429", a false match on every line that logs it.
    """
    return os.urandom(8).hex().translate(_LETTERS)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Result of probing a provider's health endpoint."""

    provider: str
    ok: bool
    status_code: int | None
    latency: float | None
    detail: str


# --------------------------------------------------------------------------- effects


@dataclass(slots=True, eq=False)
class _Wait(Effect[None]):
    """Wait ``seconds`` (the face's sleep: the clock's by default)."""

    seconds: float

    def run(self, io: Any) -> None:
        io.sleep(self.seconds)

    async def arun(self, io: Any) -> None:
        await io.asleep(self.seconds)


@dataclass(slots=True, eq=False)
class _Slot(Awaited[bool]):
    """Queue for a bulkhead slot (only yielded when none is free); True once one is ours."""

    bulkhead: Any
    timeout: float

    def call(self, io: Any) -> Any:
        return self.bulkhead.acquire(self.timeout)


@dataclass(slots=True, eq=False)
class _Share(Effect[None]):
    """Exchange a breaker's state with the shared store (Redis).

    Blocking in the sync face. Under asyncio always through ``redis.asyncio``:
    awaited when the call needs the answer (a transition to publish, or no
    shared state read yet), else started in the background so no call waits.
    """

    breaker: Breaker
    urgent: bool

    def run(self, io: Any) -> None:
        self.breaker.share()

    async def arun(self, io: Any) -> None:
        if self.breaker.local_store:
            self.breaker.share()  # in this process: no I/O, nothing to wait for
            return
        work = self.breaker.start_ashare()
        if work is None:
            return  # another task's exchange is in flight
        if self.urgent:
            await work
        else:
            io.background(work)


# No generated repr: a call holds the caller's headers and body (secrets stay out of output).
@dataclass(slots=True, eq=False, repr=False)
class _Call(Awaited[httpx.Response]):
    """One logical call (all its attempts); yielded by the flow, it sends one attempt.

    Built once per call on the hot path, with positional arguments (cheaper).
    """

    provider: str
    endpoint: str
    method: str
    url: httpx.URL | str
    params: Any
    json: Any
    content: Any
    headers: dict[str, str] | None
    idempotency_key: str | None
    deadline: float
    parse_json: bool
    _request_id: str | None
    auth: Any
    #: The caller's word on whether repeating the request is safe (None: by method).
    idempotent: bool | None = None
    #: The caller reads a 404 as an answer ("no such record"), not a failure: it is
    #: logged at debug instead of as a warning (still raised, still counted).
    not_found_ok: bool = False
    #: Requests of this call that went out (attempts that reached the send step).
    sent: int = field(default=0, init=False)
    #: Per-attempt httpx timeouts, set before each send.
    timeout: Any = field(default=None, init=False)

    @property
    def request_id(self) -> str:
        """Correlation id; made on first use, since most calls never log one."""
        if self._request_id is None:
            self._request_id = new_request_id()
        return self._request_id

    def call(self, io: Any) -> Any:
        """``request`` on the face's client (``httpx.Client``, or awaited ``AsyncClient``)."""
        return io.client.request(
            self.method,
            self.url,
            params=self.params,
            json=self.json,
            content=self.content,
            headers=self.headers,
            timeout=self.timeout,
            auth=self.auth,
        )


@dataclass(slots=True, eq=False, repr=False)  # a base URL may carry credentials
class _Probe(Awaited[httpx.Response]):
    """One health-endpoint request (no retries, no breaker)."""

    url: str
    timeout: float

    def call(self, io: Any) -> Any:
        return io.client.get(self.url, timeout=self.timeout)


@dataclass(slots=True)
class _SyncIO:
    """What the effects need from :class:`Gateway`."""

    client: httpx.Client
    sleep: Callable[[float], None]


@dataclass(slots=True)
class _AsyncIO:
    """What the effects need from :class:`AsyncGateway`."""

    client: httpx.AsyncClient
    asleep: Callable[[float], Awaitable[None]]
    background: Callable[[Awaitable[Any]], None]


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Runtime:
    """Per-provider state: breakers, limiter, budget, pause, bulkhead."""

    settings: ProviderSettings
    breaker: Breaker
    endpoint_breakers: dict[str, Breaker]
    bucket: TokenBucket | None
    budget: RetryBudget
    timeout: httpx.Timeout
    bulkhead: Any
    auth: Any
    #: The provider's pack when it is not the generic one: it sees every refusal first
    #: (``map_error``), so a spent quota is never retried blindly.
    pack: Any = None
    #: The pack's response hook for this provider (:func:`_error_hook`); None: no mapping.
    map_error: Callable[[ProviderError], ProviderError] | None = None
    paused_until: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Parsed URL per endpoint without path parameters (parsing costs ~6 µs a call).
    urls: dict[str, httpx.URL] = field(default_factory=dict)


#: Errors that refuse an attempt before anything is sent.
_Refusal = ProviderError


class _Pipeline:
    """Everything both gateways share: configuration, the call flow, decisions, metrics, logs."""

    def __init__(
        self,
        settings: Settings,
        *,
        bulkhead: Callable[[int], Any],
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
        self._bulkhead = bulkhead
        if auth is None:
            from ..providers._pack import pack_auth

            # Credentials the settings carry (API_TOKEN, a pack's API key) are sent even
            # when the host passes no factory: without one, a configured key went unsent.
            auth = pack_auth(None)
        self._auth_factory = auth
        self._rng = random.Random(seed)  # noqa: S311  # jitter, not cryptography
        self._hooks: tuple[TransitionHook, ...] = (self._on_transition, *on_transition)
        if breaker_storage is None and settings.redis_url:
            from ._shared import RedisBreakerStores

            breaker_storage = RedisBreakerStores(settings.redis_url, clock=self.clock)
        self.storage = breaker_storage
        self._runtimes: dict[str, _Runtime] = {}
        self._runtimes_lock = threading.Lock()
        self._preset_error_series()

    def _preset_error_series(self) -> None:
        errors = self.metrics.errors
        for provider in self.settings.providers.values():
            for endpoint in provider.endpoints:
                for error_type in PRESET_ERROR_TYPES:
                    errors.labels(provider.name, endpoint, error_type)

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
        store = self.storage(provider.name, name) if self.storage else None
        breaker = Breaker(
            provider.name,
            name,
            provider.breaker,
            clock=self.clock,
            store=store,
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
        auth = self._auth_factory(provider) if self._auth_factory else None
        pack = _pack_of(provider)
        runtime = _Runtime(
            settings=provider,
            breaker=self._breaker(provider, provider.name),
            endpoint_breakers={},
            bucket=bucket,
            budget=RetryBudget(provider.retry),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
            bulkhead=self._bulkhead(provider.max_concurrency),
            auth=httpx.USE_CLIENT_DEFAULT if auth is None else auth,
            pack=pack,
            map_error=_error_hook(pack, provider, self.clock),
        )
        bulkhead = runtime.bulkhead
        # Occupancy is read at scrape time instead of two gauge updates per call.
        self.metrics.in_flight.labels(provider.name).set_function(lambda: bulkhead.in_flight)
        return runtime

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

    def breakers(self, runtime: _Runtime) -> list[Breaker]:
        return [runtime.breaker, *runtime.endpoint_breakers.values()]

    def child(self, runtime: _Runtime, metric: str, *labels: str) -> Any:
        return self.metrics.child(metric, runtime.settings.name, *labels)

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
        idempotent: bool | None = None,
        not_found_ok: bool = False,
    ) -> tuple[_Runtime, _Call]:
        runtime = self.runtime(provider)
        settings = runtime.settings
        url: httpx.URL | str
        if path_params:
            url = settings.base_url + self._path(settings, endpoint, path_params)
        else:
            found = runtime.urls.get(endpoint)
            if found is None:
                found = runtime.urls[endpoint] = httpx.URL(
                    settings.base_url + settings.endpoint_path(endpoint)
                )
            url = found
        request_id = None
        merged: dict[str, str] | None = dict(headers) if headers else None
        if self.request_id_header:
            request_id = new_request_id()
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
            runtime.auth,
            idempotent,
            not_found_ok,
        )

    @staticmethod
    def _path(settings: ProviderSettings, endpoint: str, path_params: Mapping[str, Any]) -> str:
        """The endpoint's path with each value percent-encoded into its own segment.

        ``quote(..., safe="")`` encodes ``/ ? # %``, so no value can add a segment,
        a query or a fragment; ``.`` and ``..`` are unreserved and would be
        collapsed by httpx (RFC 3986 dot segments) into a different path (issue
        17: ``{"id": ".."}`` turned ``PUT /api/v1/records/..`` into ``PUT /api/v1``
        with the bearer token), and an empty value names the collection instead
        of one record: those are refused before anything is sent.
        """
        template = settings.endpoint_path(endpoint)
        quoted: dict[str, str] = {}
        for name, value in path_params.items():
            text = None if value is None else str(value)
            if text is None or text in _UNSAFE_PATH_VALUES:
                raise UsageError(
                    f"endpoint {endpoint!r} of {settings.name} ({template}): path parameter "
                    f"{name!r}={value!r} would not name one resource; expected a non-empty "
                    "value other than '.' and '..'"
                )
            quoted[name] = quote(text, safe="")
        try:
            return template.format(**quoted)
        except (KeyError, IndexError) as exc:
            raise UsageError(
                f"endpoint {endpoint!r} of {settings.name} ({template}) needs path parameter {exc}"
            ) from None

    def call_flow(self, runtime: _Runtime, call: _Call) -> Flow[Any]:
        """One logical call, all its attempts: the only place the pipeline's steps are ordered."""
        clock = self.clock
        breaker = runtime.breaker
        bulkhead = runtime.bulkhead
        runtime.budget.record_call(clock.monotonic())
        failure: ProviderError | None = None  # the last real attempt's error
        while True:
            # -- before sending: any step may refuse the attempt; nothing has gone out for it.
            refusal: ProviderError | None = None
            try:
                wait = self.wait_before(runtime, call)
                if wait > 0:
                    yield _Wait(wait)
                if breaker.shared:
                    for due in self.call_shares(runtime, call):
                        yield _Share(due, urgent=due.share_urgent())
                if not bulkhead.try_acquire() and not (
                    yield _Slot(bulkhead, self.bulkhead_timeout(runtime, call))
                ):
                    raise self.bulkhead_full(runtime, call)
            except _Refusal as exc:
                refusal = exc
            else:
                try:
                    call.timeout = self.timeout_for(runtime, call)
                    admission = self.admit(runtime, call)
                except _Refusal as exc:
                    bulkhead.release()
                    refusal = exc
            if refusal is not None:
                raise self.refused(runtime, call, refusal, failure)

            # -- one attempt, holding a bulkhead slot and a breaker admission.
            started = time.perf_counter()
            call.sent += 1
            try:
                response = yield call
            except HTTPX_ERRORS as raw:
                bulkhead.release()
                translated = translate_httpx_error(raw, call.provider, call.endpoint)
                if not isinstance(translated, ProviderError):
                    self.abandon(runtime, admission)
                    raise translated from raw
                error: ProviderError | None = translated
                translated.__cause__ = raw
                translated.__suppress_context__ = True
                result = None
            except BaseException:
                bulkhead.release()
                self.abandon(runtime, admission)
                raise
            else:
                bulkhead.release()
                result, error = self.classify(runtime, call, response)
            self.record(runtime, call, admission, started, error)

            # -- settle: publish a transition, then succeed, give up, or wait and go again.
            if breaker.shared:
                for due in self.call_shares(runtime, call):
                    yield _Share(due, urgent=due.share_urgent())
            if error is None:
                self.finish(runtime, call, "success")
                return result
            error.sent = call.sent
            failure = error
            delay = self.retry_wait(runtime, call, error)
            if delay is None or delay < 0:
                outcome = "budget_exhausted" if delay is not None else self.outcome_for(error)
                self.finish(runtime, call, outcome)
                raise error
            yield _Wait(delay)

    def refused(
        self,
        runtime: _Runtime,
        call: _Call,
        refusal: ProviderError,
        failure: ProviderError | None,
    ) -> ProviderError:
        """The error that ends a call whose next attempt was refused before sending.

        Nothing went out: the refusal itself (``sent == 0``). Otherwise the last
        real attempt's error, so the caller sees what the provider did.
        """
        refusal.endpoint = call.endpoint
        self.count_error(runtime, call.endpoint, refusal.error_type)
        if failure is None:
            refusal.sent = 0
            self.finish(runtime, call, self.outcome_for(refusal))
            return refusal
        failure.sent = call.sent
        failure.add_note(f"not retried: {refusal}")
        self.finish(runtime, call, self.outcome_for(failure))
        return failure

    def wait_before(self, runtime: _Runtime, call: _Call) -> float:
        """Seconds to wait before the next attempt: provider pause, then the token bucket."""
        wait = 0.0
        if runtime.paused_until:
            wait = self.pause_wait(runtime, call)
        if runtime.bucket is not None:
            wait += self.bucket_wait(runtime, call)
        return wait

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
        wait = runtime.paused_until - self.clock.monotonic()
        if wait <= 0:
            return 0.0
        if wait >= self.remaining(call):
            raise RateLimited(
                f"{call.provider} {call.endpoint}: provider paused by rate limit (HTTP 429) for "
                f"{wait:.1f}s more, beyond the call's deadline",
                provider=call.provider,
                endpoint=call.endpoint,
                retry_after=wait,
            )
        return wait

    def bucket_wait(self, runtime: _Runtime, call: _Call) -> float:
        assert runtime.bucket is not None
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
        trial = runtime.breaker.admit()
        endpoint_breaker = self.endpoint_breaker(runtime, call.endpoint)
        endpoint_trial = False
        if endpoint_breaker is not None:
            try:
                endpoint_trial = endpoint_breaker.admit()
            except CircuitOpen:
                runtime.breaker.release(trial)
                raise
        return trial, endpoint_breaker, endpoint_trial

    def timeout_for(self, runtime: _Runtime, call: _Call) -> httpx.Timeout:
        """Per-attempt timeouts clipped to the deadline.

        A deadline spent while waiting (pause, limiter, bulkhead) is a timeout of
        the call but not a provider fault: nothing was sent, so no breaker hears of it.
        """
        remaining = self.remaining(call)
        if remaining <= 0:
            error = self.deadline_error(call, "waiting to start an attempt")
            _log.warning(
                "idis.gateway.timeout",
                msg=f"provider call timed out before it was sent: {error}",
                provider=call.provider,
                endpoint=call.endpoint,
                attempt=call.sent + 1,
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

    def classify(
        self, runtime: _Runtime, call: _Call, response: httpx.Response
    ) -> tuple[Any, ProviderError | None]:
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
            retry_after = parse_retry_after(
                header, now=self.clock.now(), cap=runtime.settings.retry.retry_after_cap
            )
        error = error_for_status(status, call.provider, call.endpoint, retry_after=retry_after)
        if isinstance(error, ProviderRejected | RateLimited):
            # A 429's body names the limit that applies (HubSpot's policyName):
            # provider packs read it, like a refusal's retention_seconds.
            error.details = rejection_details(response.content)
        if error is not None and runtime.map_error is not None:
            # The response hook: the pack classifies the refusal before the retry
            # decision (Salesforce's 403 REQUEST_LIMIT_EXCEEDED, HubSpot's DAILY 429 are
            # a QuotaExhausted: the provider is paused for its retry_after, no retry).
            error = runtime.map_error(error)
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
        # A spent quota is the provider saying "not now", not an outage: no breaker failure.
        if error is None or not error.provider_fault or isinstance(error, QuotaExhausted):
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
            what = "quota spent" if isinstance(error, QuotaExhausted) else "without Retry-After"
            _log.warning(
                "idis.gateway.rate_limited",
                msg=f"provider rate limit hit (HTTP {error.status_code}) {what}",
                provider=call.provider,
                endpoint=call.endpoint,
                status=error.status_code,
                request_id=call.request_id,
            )
        elif isinstance(error, ProviderTimeout):
            _log.warning(
                "idis.gateway.timeout",
                msg=f"provider call timed out: {error}",
                provider=call.provider,
                endpoint=call.endpoint,
                attempt=call.sent,
                request_id=call.request_id,
            )
        else:
            # A 404 the caller asked for as an answer (get_record: "no such record") is
            # not a failure to warn about: the caller decides whether absence matters.
            expected = call.not_found_ok and error.status_code == 404
            (_log.debug if expected else _log.warning)(
                "idis.gateway.call_failed",
                msg=str(error),
                provider=call.provider,
                endpoint=call.endpoint,
                error_type=error.error_type,
                status=error.status_code,
                attempt=call.sent,
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
            what = "quota spent" if isinstance(error, QuotaExhausted) else "Retry-After"
            _log.warning(
                "idis.gateway.rate_limited",
                msg=(
                    f"provider rate limit hit (HTTP {error.status_code}): pausing all calls to "
                    f"{call.provider} for {error.retry_after:g}s ({what})"
                ),
                provider=call.provider,
                endpoint=call.endpoint,
                status=error.status_code,
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

    def bulkhead_full(self, runtime: _Runtime, call: _Call) -> BulkheadFull:
        self.metrics.bulkhead_rejected.labels(call.provider).inc()
        return BulkheadFull(
            f"{call.provider}: {runtime.settings.max_concurrency} calls already in flight",
            provider=call.provider,
            endpoint=call.endpoint,
        )

    def bulkhead_timeout(self, runtime: _Runtime, call: _Call) -> float:
        return min(runtime.settings.bulkhead_wait, max(0.0, self.remaining(call)))

    def abandon(self, runtime: _Runtime, admission: tuple[bool, Breaker | None, bool]) -> None:
        """Release an attempt that was cancelled before the provider answered."""
        trial, endpoint_breaker, endpoint_trial = admission
        runtime.breaker.release(trial)
        if endpoint_breaker is not None:
            endpoint_breaker.release(endpoint_trial)

    def retry_wait(self, runtime: _Runtime, call: _Call, error: ProviderError) -> float | None:
        """Seconds to wait before retrying after ``error``; None (or ``BUDGET_EXHAUSTED``,
        a negative number) to give up now."""
        if not should_retry(
            error,
            method=call.method,
            idempotency_key=call.idempotency_key,
            idempotent=call.idempotent,
        ):
            return None
        policy = runtime.settings.retry
        if call.sent >= effective_attempts(policy):
            return None
        delay = retry_delay(policy, call.sent, error, self._rng)
        if delay >= self.remaining(call):
            return None  # waiting would outlast the deadline
        if not runtime.budget.try_spend(self.clock.monotonic()):
            self.metrics.retry_budget_exhausted.labels(call.provider).inc()
            self.count_error(runtime, call.endpoint, "retry_budget_exhausted")
            error.add_note(f"not retried: retry budget of {call.provider} exhausted")
            _log.warning(
                "idis.gateway.retry_budget_exhausted",
                msg=f"retry budget of {call.provider} spent: not retrying ({error})",
                provider=call.provider,
                endpoint=call.endpoint,
                request_id=call.request_id,
            )
            return BUDGET_EXHAUSTED
        self.child(runtime, "retries", call.endpoint, error.error_type).inc()
        _log.info(
            "idis.gateway.retry_scheduled",
            msg=f"retrying in {delay:.2f}s after {error.error_type}",
            provider=call.provider,
            endpoint=call.endpoint,
            attempt=call.sent,
            wait=round(delay, 3),
            request_id=call.request_id,
        )
        return delay

    def count_error(self, runtime: _Runtime, endpoint: str, error_type: str) -> None:
        self.child(runtime, "errors", endpoint, error_type).inc()

    def finish(self, runtime: _Runtime, call: _Call, outcome: str) -> None:
        self.child(runtime, "requests", call.endpoint, outcome).inc()

    @staticmethod
    def outcome_for(exc: ProviderError) -> str:
        if isinstance(exc, CircuitOpen):
            return "short_circuited"
        if isinstance(exc, BulkheadFull):
            return "bulkhead_full"
        return "rate_limited" if isinstance(exc, RateLimited) else "error"

    # ---------------------------------------------------------------- health

    def health_flow(self, provider: str) -> Flow[HealthReport]:
        """Probe the provider's health endpoint once (no retries, no breaker)."""
        settings = self.settings.provider(provider)
        if not settings.health_endpoint:
            return HealthReport(provider, True, None, None, "no health endpoint configured")
        url = settings.base_url + settings.health_endpoint
        started = time.perf_counter()
        try:
            response = yield _Probe(url, min(5.0, settings.timeouts.read))
        except HTTPX_ERRORS as raw:
            self.metrics.provider_up.labels(provider).set(0)
            error = translate_httpx_error(raw, provider, "health")
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

    def breaker(self, provider: str, endpoint: str | None = None) -> Breaker:
        runtime = self.runtime(provider)
        if endpoint is None:
            return runtime.breaker
        breaker = self.endpoint_breaker(runtime, endpoint)
        if breaker is None:
            raise UsageError(f"{provider} has no per-endpoint breakers (BREAKER_PER_ENDPOINT)")
        return breaker

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
        stats["in_flight"] = runtime.bulkhead.in_flight
        stats["shared"] = (
            "not shared"
            if not runtime.breaker.shared
            else ("synced" if runtime.breaker.synced else "not read yet")
        )
        stats["endpoints"] = {
            name: breaker.stats() for name, breaker in runtime.endpoint_breakers.items()
        }
        return stats

    def call_shares(self, runtime: _Runtime, call: _Call) -> list[Breaker]:
        """The breakers a call goes through whose shared state is due for an exchange."""
        now = self.clock.monotonic()
        found = [runtime.breaker] if runtime.breaker.share_due(now) else []
        endpoint_breaker = self.endpoint_breaker(runtime, call.endpoint)
        if endpoint_breaker is not None and endpoint_breaker.share_due(now):
            found.append(endpoint_breaker)
        return found

    def due_shares(self, provider: str) -> list[Breaker]:
        """Breakers of ``provider`` whose shared state should be exchanged now."""
        now = self.clock.monotonic()
        return [b for b in self.breakers(self.runtime(provider)) if b.share_due(now)]


def _pack_of(provider: ProviderSettings) -> Any:
    """The provider's pack, when it is not the generic one (whose errors need no mapping)."""
    if provider.api == "generic":
        return None
    from ..providers._pack import pack_for

    return pack_for(provider)


def _error_hook(
    pack: Any, provider: ProviderSettings, clock: Clock
) -> Callable[[ProviderError], ProviderError] | None:
    """The response hook of a provider: ``pack.error_hook(settings, clock)`` when the pack
    has one (its mapping needs the provider's settings or the time, as HubSpot's quota
    reset does), else ``pack.map_error``."""
    if pack is None:
        return None
    bind = getattr(pack, "error_hook", None)
    if bind is None:
        return pack.map_error  # type: ignore[no-any-return]
    return bind(provider, clock)  # type: ignore[no-any-return]


def _limits(settings: Settings) -> httpx.Limits:
    # A pool sized to the largest bulkhead: 64 fresh connections per burst was
    # several times slower than a pool capped per provider (issue 2's notes).
    size = max((p.max_concurrency for p in settings.providers.values()), default=16)
    return httpx.Limits(
        max_connections=size * max(1, len(settings.providers)),
        max_keepalive_connections=size * max(1, len(settings.providers)),
    )


# --------------------------------------------------------------------------- faces


class _Face:
    """What both faces share: the pipeline, the settings, and the sync accessors."""

    _p: _Pipeline

    def __init__(self, settings: Settings, bulkhead: Callable[[int], Any], **options: Any) -> None:
        self._p = _Pipeline(settings, bulkhead=bulkhead, **options)

    @property
    def settings(self) -> Settings:
        """The settings this gateway was built with."""
        return self._p.settings

    @property
    def clock(self) -> Clock:
        """The clock deadlines, breakers and pauses read."""
        return self._p.clock

    def _refresh(self, provider: str) -> None:
        """Exchange due shared breaker state before an accessor reads it (face-specific)."""
        raise NotImplementedError

    def _call(self, provider: str, endpoint: str, **options: Any) -> Flow[Any]:
        runtime, call = self._p.prepare(provider, endpoint, **options)
        return self._p.call_flow(runtime, call)

    def _request(
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
        idempotent: bool | None = None,
        not_found_ok: bool = False,
    ) -> Flow[httpx.Response]:
        """Call ``endpoint`` of ``provider``; return the (1xx-3xx) response.

        A failed attempt is retried only when repeating the request is safe: its
        method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) or it carries
        ``idempotency_key`` (sent as ``Idempotency-Key``). ``idempotent=True`` says a
        request whose method is not idempotent is safe to repeat anyway (a read sent
        as a POST, such as HubSpot's CRM search); ``idempotent=False`` says the
        opposite of a request whose method is (default None: decided by the method).
        ``not_found_ok=True`` says a 404 is an answer the caller handles ("no such
        record"): it is still raised as ``ProviderRejected`` and counted, but logged at
        debug, not as an ``idis.gateway.call_failed`` warning.

        Raises:
            UnknownProviderError: the provider is not configured.
            UsageError: a path parameter is missing, empty, ``.`` or ``..``.
            ProviderError: a subclass saying what failed, with ``sent`` set (see
                the module docstring).
        """
        return self._call(
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
            idempotent=idempotent,
            not_found_ok=not_found_ok,
        )

    def _get_json(
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
        idempotent: bool | None = None,
        not_found_ok: bool = False,
    ) -> Flow[Any]:
        """Like :meth:`request`, returning the decoded JSON body.

        A body that is not JSON is a provider fault (``MalformedResponse``):
        counted against the breaker and retried like a 5xx.
        """
        return self._call(
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
            idempotent=idempotent,
            not_found_ok=not_found_ok,
        )

    def _health(self, provider: str) -> Flow[HealthReport]:
        """Probe the provider's health endpoint once (no retries, no breaker)."""
        return self._p.health_flow(provider)

    def available(self, provider: str) -> bool:
        """False while the provider's breaker is open or a Retry-After pause holds."""
        self._refresh(provider)
        return self._p.available(provider)

    def breaker_state(self, provider: str, endpoint: str | None = None) -> str:
        """``closed``, ``half_open`` or ``open``."""
        self._refresh(provider)
        return self._p.breaker_state(provider, endpoint)

    def breaker(self, provider: str, endpoint: str | None = None) -> Breaker:
        """The provider's (or an endpoint's) breaker, for operators and tests."""
        return self._p.breaker(provider, endpoint)

    def snapshot(self, provider: str) -> dict[str, Any]:
        """Breaker state, recent error rate, pause and in-flight count (for ``status``)."""
        self._refresh(provider)
        return self._p.snapshot(provider)


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _clock_wait(clock: Clock, name: str, default: Any) -> Any:
    """The clock's ``sleep``/``asleep``; a real wait for clocks written before Clock had them."""
    return getattr(clock, name, default)


class Gateway(_Face):
    """Resilient provider calls for sync code (scripts, worker threads). Thread-safe.

    Example::

        gateway = Gateway(Settings.from_env())
        record = gateway.get_json("crm_provider", "record", path_params={"id": "42"})
        gateway.request("crm_provider", "record", method="PUT", path_params={"id": "42"},
                        json={"data": {...}}, idempotency_key="deal-42-v7")

    Args:
        settings: Library settings (providers and their policies).
        metrics: Metrics to record into (default: the process-wide set).
        clock: Time source for deadlines, breakers and pauses; waits go through
            its ``sleep`` (a ``ManualClock`` advances instead of sleeping).
        sleep: How to wait instead of ``clock.sleep`` (tests record waits with it).
        auth: Returns an ``httpx.Auth`` per provider (the OAuth module's factory, or
            ``pack_auth(oauth)`` so each pack decides). Default: each provider's pack
            with static credentials only (``API_TOKEN``, PDL's key); no OAuth.
        transport: An httpx transport (tests: ``httpx.MockTransport``).
        client: A ready ``httpx.Client`` to use instead of building one.
        breaker_storage: ``(provider, breaker) -> store`` sharing breaker state
            (see ``_shared.py``); default is Redis when ``settings.redis_url`` is
            set, else in-process.
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
        super().__init__(
            settings,
            ThreadBulkhead,
            metrics=metrics,
            clock=clock,
            auth=auth,
            breaker_storage=breaker_storage,
            on_transition=on_transition,
            seed=seed,
            request_id_header=request_id_header,
        )
        self._owns_client = client is None
        self._client = client or httpx.Client(
            transport=transport, limits=_limits(settings), follow_redirects=False
        )
        wait: Callable[[float], None] = sleep or _clock_wait(self._p.clock, "sleep", time.sleep)
        self._io = _SyncIO(self._client, wait)

    request = sync_face(_Face._request)
    get_json = sync_face(_Face._get_json)
    health = sync_face(_Face._health)

    def _refresh(self, provider: str) -> None:
        for breaker in self._p.due_shares(provider):
            breaker.share()

    def close(self) -> None:
        """Close the HTTP client (when the gateway created it) and the Redis client."""
        if self._owns_client:
            self._client.close()
        close = getattr(self._p.storage, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGateway(_Face):
    """Resilient provider calls for asyncio code. Safe to share between tasks of one loop.

    Same arguments and methods as :class:`Gateway`; ``request``, ``get_json``
    and ``health`` are coroutines, ``aclose`` closes it. Nothing in it blocks the
    event loop: shared breaker state goes through ``redis.asyncio``, and the
    periodic refresh of it runs in the background, so no call waits for Redis.
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
        super().__init__(
            settings,
            AsyncBulkhead,
            metrics=metrics,
            clock=clock,
            auth=auth,
            breaker_storage=breaker_storage,
            on_transition=on_transition,
            seed=seed,
            request_id_header=request_id_header,
        )
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            transport=transport, limits=_limits(settings), follow_redirects=False
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        wait: Callable[[float], Awaitable[None]] = sleep or _clock_wait(
            self._p.clock, "asleep", asyncio.sleep
        )
        self._io = _AsyncIO(self._client, wait, self._background)

    def _background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` as a task of this gateway (cancelled by :meth:`aclose`)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    request = async_face(_Face._request)
    get_json = async_face(_Face._get_json)
    health = async_face(_Face._health)

    def _refresh(self, provider: str) -> None:
        # Never awaited here (these accessors are sync): a due exchange with Redis
        # starts in the background when a loop runs, and the next read sees its result.
        for breaker in self._p.due_shares(provider):
            if breaker.local_store:
                breaker.share()  # in this process: no I/O
            elif _running_loop():
                work = breaker.start_ashare()
                if work is not None:
                    self._background(work)

    async def aclose(self) -> None:
        """Close the HTTP client (when the gateway created it), background work and Redis."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()
        aclose = getattr(self._p.storage, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
