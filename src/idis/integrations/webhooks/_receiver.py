"""The inbound webhook receiver: framework-free ``handle()`` and an ASGI app.

One request goes through: provider lookup → body size limit → the provider's
verification scheme (Standard Webhooks by default) → strict JSON → event →
:func:`~idis.integrations.sync._inbox.apply_event` in its own transaction. The
answer makes providers behave:

* **2xx** for accepted events and for duplicates, superseded versions and
  event types without a handler (all acknowledged, none applied twice);
* **4xx** for what the provider must not retry as is: bad or missing
  signature headers, stale timestamps, oversized or malformed bodies
  (see :data:`~idis.integrations.webhooks._verify.REASON_STATUS`), unknown provider;
* **5xx** only for our own transient faults (database down: 503; a host
  handler that raised: 500), so the provider retries and nothing is lost.

Every request is counted in ``integration_webhooks_received_total{provider,
outcome}``. Nothing secret is logged: no header values except ``webhook-id``,
no body. Signature failures (bad signature, stale timestamp) are also counted
in a one-minute window per provider; :meth:`WebhookReceiver.signature_failures`
feeds the mode controller, and crossing ``signature_failure_threshold`` is
persisted so the replica running the controller sees it too.

Mounting::

    receiver = WebhookReceiver(settings, engine)            # sync handlers
    app.mount("/webhooks", receiver.asgi_app())              # POST /webhooks/{provider}

    receiver = AsyncWebhookReceiver(settings, async_engine)  # async handlers
    app.mount("/webhooks", receiver.asgi_app())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .._clock import Clock, system_clock
from ..config import Settings
from ..exceptions import (
    ConfigError,
    StorageError,
    WebhookVerificationError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ..sync._events import event_from_payload, ordering_of
from ..sync._inbox import (
    ApplyOutcome,
    HandlerRegistry,
    apply_event_outcome,
    apply_event_outcome_async,
)
from ._verify import (
    REASON_STATUS,
    InboundRequest,
    StandardWebhooksScheme,
    VerificationScheme,
    check_body_size,
    normalize_headers,
    parse_json_strict,
)

__all__ = ["AsyncWebhookReceiver", "WebhookReceiver", "WebhookResult"]

_log = get_logger()

#: Rejections that count as signature failures for the mode controller.
SIGNATURE_FAILURE_REASONS = frozenset({"bad_signature", "stale_timestamp"})
_WINDOW = timedelta(minutes=1)

Headers = Mapping[str, str] | Iterable[tuple[bytes | str, bytes | str]]


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What the receiver answered, and why."""

    #: HTTP status to send.
    status_code: int
    #: Bounded outcome, also the metric label: ``accepted``, ``duplicate``,
    #: ``superseded``, ``ignored``, a rejection reason, ``unknown_provider``,
    #: ``unavailable`` or ``handler_error``.
    outcome: str
    #: The provider's event id, once the body was parsed.
    event_id: str | None = None
    #: The delivery's message id (``webhook-id``), once verified.
    message_id: str | None = None
    #: Human-readable detail (never a secret or the body).
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the provider should consider the delivery done (2xx)."""
        return 200 <= self.status_code < 300

    def body(self) -> bytes:
        """The JSON response body."""
        doc: dict[str, Any] = {"status": self.outcome}
        if self.event_id is not None:
            doc["event_id"] = self.event_id
        if self.detail is not None and not self.ok:
            doc["error"] = self.detail
        return json.dumps(doc).encode()


@dataclass(frozen=True, slots=True)
class _Verified:
    provider: str
    event: Any
    message_id: str | None
    now: datetime


class _SignatureWindow:
    """Signature failures per provider over the last minute (thread-safe)."""

    def __init__(self) -> None:
        self._times: dict[str, deque[datetime]] = {}
        self._lock = threading.Lock()

    def add(self, provider: str, now: datetime) -> int:
        with self._lock:
            times = self._times.setdefault(provider, deque())
            times.append(now)
            return self._trim(times, now)

    def count(self, provider: str, now: datetime) -> int:
        with self._lock:
            times = self._times.get(provider)
            return self._trim(times, now) if times else 0

    @staticmethod
    def _trim(times: deque[datetime], now: datetime) -> int:
        while times and times[0] <= now - _WINDOW:
            times.popleft()
        return len(times)


class _ReceiverBase:
    """Verification and bookkeeping shared by the sync and async receivers (no I/O)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: HandlerRegistry | None,
        schemes: Mapping[str, VerificationScheme] | None,
        providers: Iterable[str] | None,
        clock: Clock | None,
        metrics: Metrics | None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock: Clock = clock or system_clock
        self._metrics = metrics
        names = list(providers) if providers is not None else None
        given = dict(schemes or {})
        self.schemes: dict[str, VerificationScheme] = {}
        candidates = names if names is not None else list(settings.providers)
        for name in candidates:
            if name in given:
                self.schemes[name] = given[name]
                continue
            config = settings.provider(name)
            if not config.webhook_secrets:
                if names is not None:
                    # Asked for explicitly: refuse to start rather than 4xx every delivery.
                    env = f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS"
                    raise ConfigError(
                        f"provider {name!r} has no webhook secret: set {env}", variable=env
                    )
                continue
            self.schemes[name] = StandardWebhooksScheme(
                config.webhook_secrets,
                tolerance=settings.webhooks.tolerance,
                label=f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS",
            )
        for name, scheme in given.items():
            self.schemes.setdefault(name, scheme)
        self.max_body_bytes = settings.webhooks.max_body_bytes
        self.threshold = settings.sync.signature_failure_threshold
        self._signature_failures = _SignatureWindow()
        self._spike_noted: dict[str, datetime] = {}
        self._spike_lock = threading.Lock()
        self._spikes: deque[tuple[str, datetime]] = deque()

    @property
    def metrics(self) -> Metrics:
        """The metrics this component records into."""
        return self._metrics if self._metrics is not None else get_metrics()

    def signature_failures(self, provider: str, now: datetime | None = None) -> int:
        """Bad signatures and stale timestamps for ``provider`` in the last minute."""
        return self._signature_failures.count(provider, now or self.clock.now())

    def _verify(
        self, provider: str, headers: Headers, body: bytes, method: str, uri: str | None
    ) -> _Verified | WebhookResult:
        now = self.clock.now()
        scheme = self.schemes.get(provider)
        if scheme is None:
            return self._reject(provider, "unknown_provider", 404, "no such webhook provider")
        request = InboundRequest(
            method=method.upper(),
            uri=uri if uri is not None else f"/{provider}",
            headers=normalize_headers(headers),
            body=body,
        )
        message_id: str | None = None
        try:
            check_body_size(body, self.max_body_bytes)
            message_id = scheme.verify(request, now)
            payload = parse_json_strict(body)
            event = event_from_payload(payload, ordering=ordering_of(self.settings, provider))
        except WebhookVerificationError as exc:
            if exc.reason in SIGNATURE_FAILURE_REASONS:
                self._signature_failed(provider, now)
            status = REASON_STATUS.get(exc.reason, 400)
            return self._reject(provider, exc.reason, status, str(exc), message_id)
        return _Verified(provider, event, message_id, now)

    def _signature_failed(self, provider: str, now: datetime) -> None:
        count = self._signature_failures.add(provider, now)
        if count >= self.threshold:
            with self._spike_lock:
                last = self._spike_noted.get(provider)
                if last is None or now - last >= _WINDOW:
                    # Persisted at most once a minute per provider, so a flood of
                    # forged requests costs no more than one write a minute.
                    self._spike_noted[provider] = now
                    self._spikes.append((provider, now))

    def _take_spike(self) -> tuple[str, datetime] | None:
        try:
            return self._spikes.popleft()
        except IndexError:
            return None

    def _reject(
        self,
        provider: str,
        outcome: str,
        status: int,
        detail: str,
        message_id: str | None = None,
    ) -> WebhookResult:
        label = provider if provider in self.schemes else "unknown"
        self.metrics.webhooks_received.labels(provider=label, outcome=outcome).inc()
        _log.warning(
            "idis.webhooks.rejected",
            msg=f"webhook rejected: {detail}",
            provider=label,
            reason=outcome,
            status_code=status,
            webhook_id=message_id,
        )
        return WebhookResult(status, outcome, message_id=message_id, detail=detail)

    def _applied(self, verified: _Verified, outcome: ApplyOutcome) -> WebhookResult:
        provider = verified.provider
        label = "accepted" if outcome is ApplyOutcome.APPLIED else outcome.value
        self.metrics.webhooks_received.labels(provider=provider, outcome=label).inc()
        event_id = str(verified.event.id)
        _log.debug(
            "idis.webhooks.received",
            provider=provider,
            outcome=label,
            event_id=event_id,
            webhook_id=verified.message_id,
        )
        return WebhookResult(200, label, event_id=event_id, message_id=verified.message_id)

    def _failed(self, verified: _Verified, exc: BaseException) -> WebhookResult:
        provider = verified.provider
        event_id = str(verified.event.id)
        transient = isinstance(exc, OperationalError | StorageError) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated
        )
        outcome, status = ("unavailable", 503) if transient else ("handler_error", 500)
        self.metrics.webhooks_received.labels(provider=provider, outcome=outcome).inc()
        # The exception's type only: its text may quote the host's data.
        _log.error(
            "idis.webhooks.failed",
            msg="webhook not applied; the provider will retry",
            provider=provider,
            outcome=outcome,
            event_id=event_id,
            webhook_id=verified.message_id,
            error_type=type(exc).__name__,
        )
        return WebhookResult(
            status,
            outcome,
            event_id=event_id,
            message_id=verified.message_id,
            detail="temporarily unable to apply the event" if transient else "event not applied",
        )


def _as_sessionmaker(target: Engine | sessionmaker[Session] | Callable[[], Session]) -> Any:
    if isinstance(target, Engine):
        return sessionmaker(target, expire_on_commit=False)
    return target


class WebhookReceiver(_ReceiverBase):
    """Receives webhooks for every provider with a webhook secret; sync handlers.

    Args:
        settings: Library settings (providers' ``webhook_secrets``, ``webhooks``, ``sync``).
        sessions: An Engine or a session factory; each event gets its own transaction.
        registry: Handlers (default: the process-wide registry).
        schemes: Verification scheme per provider, overriding Standard Webhooks.
        providers: Serve only these providers (each must have a secret or a scheme).
        clock: Current time (injectable for tests).
        metrics: Metrics to count in (default: the process-wide set).

    Raises:
        ConfigError: when a provider named in ``providers`` has no secret or a
            secret is malformed.

    ``handle()`` is thread-safe; the ASGI app runs it in a worker thread.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: Engine | sessionmaker[Session] | Callable[[], Session],
        *,
        registry: HandlerRegistry | None = None,
        schemes: Mapping[str, VerificationScheme] | None = None,
        providers: Iterable[str] | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(
            settings,
            registry=registry,
            schemes=schemes,
            providers=providers,
            clock=clock,
            metrics=metrics,
        )
        self._sessions = _as_sessionmaker(sessions)
        bind = sessions if isinstance(sessions, Engine) else getattr(sessions, "kw", {}).get("bind")
        # SQLite has one writer: concurrent requests would otherwise poll its
        # lock with growing sleeps; a Python lock queues them fairly instead.
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock()
            if isinstance(bind, Engine) and bind.dialect.name == "sqlite"
            else contextlib.nullcontext()
        )

    def handle(
        self,
        provider: str,
        headers: Headers,
        body: bytes,
        *,
        method: str = "POST",
        uri: str | None = None,
    ) -> WebhookResult:
        """Verify and apply one webhook; never raises.

        Args:
            provider: Provider name (from the URL).
            headers: Request headers (mapping or ASGI byte pairs).
            body: The raw body.
            method: HTTP method (signed by some HMAC schemes).
            uri: Path and query as received (signed by some HMAC schemes).
        """
        try:
            verified = self._verify(provider, headers, body, method, uri)
            self._flush_spike()
            if isinstance(verified, WebhookResult):
                return verified
            try:
                with self._write_lock, self._sessions() as session, session.begin():
                    outcome = apply_event_outcome(
                        session,
                        verified.provider,
                        verified.event,
                        "webhook",
                        registry=self.registry,
                        now=verified.now,
                        # This transaction holds the one event: no savepoint needed.
                        atomic=False,
                    )
            except Exception as exc:  # noqa: BLE001  # any failure is answered, never raised
                return self._failed(verified, exc)
            return self._applied(verified, outcome)
        except Exception as exc:  # noqa: BLE001  # last resort: a bug must not crash the app
            _log.error("idis.webhooks.internal_error", error_type=type(exc).__name__)
            return WebhookResult(500, "internal_error", detail="internal error")

    def _flush_spike(self) -> None:
        spike = self._take_spike()
        if spike is None:
            return
        from ..sync._state import note_signature_spike

        try:
            with self._sessions() as session, session.begin():
                note_signature_spike(session, spike[0], spike[1])
        except Exception as exc:  # noqa: BLE001  # the in-process count still feeds the controller
            _log.warning("idis.webhooks.spike_not_saved", error_type=type(exc).__name__)

    def asgi_app(self, provider: str | None = None) -> Callable[..., Awaitable[None]]:
        """An ASGI app: ``POST /{provider}`` (or any path, for a fixed ``provider``).

        Runs :meth:`handle` in a worker thread so the event loop never blocks on the database.
        """
        import anyio.to_thread

        async def run(
            name: str, headers: Headers, body: bytes, method: str, uri: str
        ) -> WebhookResult:
            return await anyio.to_thread.run_sync(
                lambda: self.handle(name, headers, body, method=method, uri=uri)
            )

        return _make_asgi(self, run, provider)


class AsyncWebhookReceiver(_ReceiverBase):
    """The asyncio twin of :class:`WebhookReceiver` (``AsyncEngine``/``async_sessionmaker``).

    Async handlers are awaited; sync ones run through ``AsyncSession.run_sync``.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: AsyncEngine | async_sessionmaker[AsyncSession] | Callable[[], AsyncSession],
        *,
        registry: HandlerRegistry | None = None,
        schemes: Mapping[str, VerificationScheme] | None = None,
        providers: Iterable[str] | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(
            settings,
            registry=registry,
            schemes=schemes,
            providers=providers,
            clock=clock,
            metrics=metrics,
        )
        self._sessions: Any = (
            async_sessionmaker(sessions, expire_on_commit=False)
            if isinstance(sessions, AsyncEngine)
            else sessions
        )
        bind = (
            sessions
            if isinstance(sessions, AsyncEngine)
            else getattr(sessions, "kw", {}).get("bind")
        )
        # SQLite has one writer: queue this loop's requests instead of polling its lock.
        self._write_lock: asyncio.Lock | contextlib.nullcontext[None] = (
            asyncio.Lock()
            if isinstance(bind, AsyncEngine) and bind.dialect.name == "sqlite"
            else contextlib.nullcontext()
        )

    async def handle(
        self,
        provider: str,
        headers: Headers,
        body: bytes,
        *,
        method: str = "POST",
        uri: str | None = None,
    ) -> WebhookResult:
        """Async twin of :meth:`WebhookReceiver.handle`; never raises."""
        try:
            verified = self._verify(provider, headers, body, method, uri)
            await self._flush_spike()
            if isinstance(verified, WebhookResult):
                return verified
            try:
                async with self._write_lock, self._sessions() as session, session.begin():
                    outcome = await apply_event_outcome_async(
                        session,
                        verified.provider,
                        verified.event,
                        "webhook",
                        registry=self.registry,
                        now=verified.now,
                        # This transaction holds the one event: no savepoint needed.
                        atomic=False,
                    )
            except Exception as exc:  # noqa: BLE001  # any failure is answered, never raised
                return self._failed(verified, exc)
            return self._applied(verified, outcome)
        except Exception as exc:  # noqa: BLE001  # last resort: a bug must not crash the app
            _log.error("idis.webhooks.internal_error", error_type=type(exc).__name__)
            return WebhookResult(500, "internal_error", detail="internal error")

    async def _flush_spike(self) -> None:
        spike = self._take_spike()
        if spike is None:
            return
        from ..sync._state import note_signature_spike

        try:
            async with self._sessions() as session, session.begin():
                await session.run_sync(lambda s: note_signature_spike(s, spike[0], spike[1]))
        except Exception as exc:  # noqa: BLE001  # the in-process count still feeds the controller
            _log.warning("idis.webhooks.spike_not_saved", error_type=type(exc).__name__)

    def asgi_app(self, provider: str | None = None) -> Callable[..., Awaitable[None]]:
        """An ASGI app: ``POST /{provider}`` (or any path, for a fixed ``provider``)."""

        async def run(
            name: str, headers: Headers, body: bytes, method: str, uri: str
        ) -> WebhookResult:
            return await self.handle(name, headers, body, method=method, uri=uri)

        return _make_asgi(self, run, provider)


# --------------------------------------------------------------------------- ASGI

_Run = Callable[[str, Headers, bytes, str, str], Awaitable[WebhookResult]]


async def _send_result(send: Callable[..., Awaitable[None]], result: WebhookResult) -> None:
    body = result.body()
    await send(
        {
            "type": "http.response.start",
            "status": result.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _make_asgi(
    receiver: _ReceiverBase, run: _Run, fixed_provider: str | None
) -> Callable[..., Awaitable[None]]:
    limit = receiver.max_body_bytes

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[..., Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path = str(scope.get("path", ""))
        provider = fixed_provider or path.rstrip("/").rsplit("/", 1)[-1]
        if scope.get("method") != "POST":
            await _send_result(send, WebhookResult(405, "method_not_allowed", detail="POST only"))
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _send_result(send, receiver._reject(provider, "too_large", 413, "body too large"))
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                # Stop reading: the rest of an oversized body is never buffered.
                await _send_result(
                    send, receiver._reject(provider, "too_large", 413, "body too large")
                )
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        query = scope.get("query_string", b"")
        uri = path + ("?" + query.decode("latin-1") if query else "")
        result = await run(provider, headers, b"".join(chunks), "POST", uri)
        await _send_result(send, result)

    return app
