"""The Starlette app: webhooks, metrics, health, status, deals and claims.

::

    POST /webhooks/{provider}     the library's receiver (Standard Webhooks; inbox; handlers)
    GET  /metrics                 Prometheus text (integration_errors_total, ...)
    GET  /healthz                 200 while the database answers and every loop runs, else 503
    GET  /status[?probe=true]     idis.integrations.ops._status.collect_status as JSON
                                  (probing providers: operators only, rate-limited)
    POST /deals                   create/update a deal; its CRM push is enqueued in the same
                                  transaction (crm_sync_status PENDING until delivered)
    GET  /deals[?tenant_id=T]     the latest deals of the caller's tenants
    GET  /deals/{id}
    POST /claims                  create a claim
    GET  /claims/{id}
    POST /claims/{id}/enrich      enrich through the library (fallbacks, cache, deferral)

Configured from the environment only (the library's variables, plus the few
``IDIS_SERVICE_*`` ones in :mod:`.config`); :func:`create_app` takes the
settings explicitly for tests and embedding. Every route but /healthz,
/webhooks and a public /metrics needs an authenticated caller and shows only
its tenants' records (:mod:`.security`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import IO, Any

import anyio
import anyio.to_thread
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from idis.integrations._timeparse import utcnow
from idis.integrations.config import Settings
from idis.integrations.db._engine import aread_only
from idis.integrations.enrichment._syncstatus import SYNC_FAILED, SYNC_PENDING
from idis.integrations.exceptions import (
    AuthError,
    ConfigError,
    ProviderError,
    ProviderRejected,
    StorageError,
    UsageError,
)
from idis.integrations.observability._logs import configure_logging, get_logger
from idis.integrations.observability._metrics import Metrics, get_metrics, metrics_app
from idis.integrations.ops._status import FACT_SOURCES, collect_status
from idis.integrations.outbox import enqueue_async

from .claims import SUBJECT_TYPE, apply_result, mark_failed
from .config import ServiceSettings
from .delivery import push_message
from .models import Claim, Deal
from .runtime import Runtime
from .security import (
    Authenticate,
    BadRequest,
    BearerTokens,
    Guard,
    Principal,
    RequestTooLarge,
    allow_everyone,
    principal_of,
    read_json,
)

__all__ = ["create_app"]

_log = get_logger()
_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Ids end up in provider URLs (PUT /records/{id}): no empty, "." or ".." segment (issue 17).
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LIST_LIMIT = 100
#: Longest /status may take (collect_status probes providers and reads the database).
STATUS_TIMEOUT = 20.0


# --------------------------------------------------------------------------- helpers


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response; datetimes become ISO-8601 text."""
    body = json.dumps(data, default=_json_default, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


def _error(code: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, code)


async def _body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    # Capped while streaming and depth-limited: see security.read_json.
    return await read_json(request, _runtime(request).service.max_body_bytes, optional=optional)


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(unknown)}: expected only {', '.join(sorted(allowed))}"
        )


def _text(body: Mapping[str, Any], name: str, limit: int, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required: expected a string of 1-{limit} characters")
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise BadRequest(
            f"{name}={value!r} is invalid: expected a non-blank string of at most "
            f"{limit} characters"
        )
    if value != value.strip():
        raise BadRequest(f"{name}={value!r} is invalid: expected no surrounding spaces")
    return value


def _identifier(body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadRequest(
            f"{name}={value!r} is invalid: expected 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def _amount(body: Mapping[str, Any]) -> int | None:
    value = body.get("amount")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"amount={value!r} is invalid: expected a whole number >= 0")
    return value


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _tenant_allowed(principal: Principal, tenant_id: str) -> None:
    if not principal.can_see(tenant_id):
        raise Forbidden(f"tenant_id={tenant_id!r} is not one of your tenants")


class Forbidden(Exception):
    """The caller is authenticated but may not do this (403)."""


class _ProbeGate:
    """At most one provider-probing ``/status`` per interval: each probe calls every provider."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0

    def wait(self) -> float:
        """0 and book the slot if a probe may run now, else the seconds until it may."""
        now = time.monotonic()
        if now < self._next:
            return self._next - now
        self._next = now + self.interval
        return 0.0


def _register_fact_sources() -> None:
    # The CLI registers these when its modules load; this process never loads
    # the CLI, so /status adds the sync mode and outbox facts itself.
    from idis.integrations.outbox._admin import status_facts as outbox_facts
    from idis.integrations.sync._state import status_facts as sync_facts

    for source in (sync_facts, outbox_facts):
        if source not in FACT_SOURCES:
            FACT_SOURCES.append(source)


# --------------------------------------------------------------------------- endpoints


async def healthz(request: Request) -> Response:
    """Liveness and readiness: the database answers and every background loop runs."""
    runtime = _runtime(request)
    if not runtime.started:
        return json_response({"status": "starting"}, 503)
    loops = runtime.health()
    try:
        # Read-only: a probe that queued behind the outbox's writes would call a busy
        # database dead.
        async with aread_only(runtime.engine).connect() as conn:
            await conn.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # noqa: BLE001  # any failure is "the database is not ok"
        database = f"unreachable: {type(exc).__name__}"
    healthy = database == "ok" and all(state == "running" for state in loops.values())
    return json_response(
        {"status": "ok" if healthy else "degraded", "database": database, "loops": loops},
        200 if healthy else 503,
    )


async def status(request: Request) -> Response:
    """``idis-integrations status`` as JSON: breakers, error rates, health, sync and outbox."""
    runtime = _runtime(request)
    principal = principal_of(request)
    asked = request.query_params.get("probe")
    # Operators probe by default; anyone else only reads what was recorded.
    probe = principal.operator if asked is None else asked.lower() not in ("0", "false", "no")
    if probe and not principal.operator:
        raise Forbidden("probe=true calls every provider: it needs the operator role")
    if probe:
        wait = request.app.state.probe_gate.wait()
        if wait > 0:
            return Response(
                json.dumps(
                    {
                        "error": f"providers were probed less than "
                        f"{runtime.service.probe_interval.total_seconds():g}s ago; retry in "
                        f"{wait:.0f}s or ask with probe=false",
                    }
                ),
                status_code=429,
                media_type="application/json",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
    # collect_status blocks (database, health probes): a thread, and an answer in bounded
    # time even when the database is locked or a provider hangs.
    with anyio.move_on_after(STATUS_TIMEOUT):
        statuses, notes = await anyio.to_thread.run_sync(
            lambda: collect_status(runtime.settings, probe=probe), abandon_on_cancel=True
        )
        # What only the running service knows: deliveries our configuration stops.
        notes = [*notes, *runtime.configuration_notes()]
        return json_response({"providers": [s.as_dict() for s in statuses], "notes": notes})
    return _error(
        504, f"status took longer than {STATUS_TIMEOUT:g}s: the database or a probe hangs"
    )


async def upsert_deal(request: Request) -> Response:
    """Create or update a deal and enqueue its CRM push in the same transaction."""
    runtime = _runtime(request)
    body = await _body(request)
    _only(body, {"id", "tenant_id", "name", "stage", "amount"})
    deal_id = _identifier(body, "id")
    tenant_id = _text(body, "tenant_id", 128, required=deal_id is None)
    name = _text(body, "name", 200, required=deal_id is None)
    stage = _text(body, "stage", 32, required=False)
    amount = _amount(body)
    if runtime.crm_provider is None:
        return _error(503, "no CRM provider is configured: declare a provider of kind crm")
    principal = principal_of(request)
    if tenant_id is not None:
        _tenant_allowed(principal, tenant_id)
    async with runtime.sessions.begin() as session:
        deal = None
        if deal_id is not None:
            deal = await session.get(Deal, deal_id, with_for_update=True)
            if deal is not None and not principal.can_see(deal.tenant_id):
                # Another tenant's deal: as good as missing, and this caller may not create it.
                return _error(404, f"no deal {deal_id!r}")
        created = deal is None
        if deal is None:
            if tenant_id is None or name is None:
                raise BadRequest(
                    f"deal {deal_id!r} does not exist: tenant_id and name are required to create it"
                )
            deal = Deal(id=deal_id or f"deal_{_random_hex()}", tenant_id=tenant_id, revision=0)
            deal.name = name
            session.add(deal)
        elif tenant_id is not None and tenant_id != deal.tenant_id:
            return _error(
                409,
                f"deal {deal.id!r} belongs to tenant {deal.tenant_id!r}, not {tenant_id!r}",
            )
        if name is not None:
            deal.name = name
        if "stage" in body:
            deal.stage = stage
        if "amount" in body:
            deal.amount = amount
        deal.revision += 1
        # Queued either way; while the CRM is down (breaker open, 429 pause) the push
        # cannot be delivered, and the deal says so until it is (RB-09 Triage 5).
        deal.crm_sync_status = (
            SYNC_PENDING if runtime.gateway.available(runtime.crm_provider) else SYNC_FAILED
        )
        deal.updated_at = utcnow()
        await session.flush()
        message = push_message(runtime.crm_provider, deal)
        # Same transaction as the row: the push exists if and only if the edit commits.
        await enqueue_async(session, message)
        payload = deal.as_dict()
    payload["push"] = {
        "provider": message.provider,
        "idempotency_key": message.idempotency_key,
    }
    return json_response(payload, 201 if created else 200)


async def list_deals(request: Request) -> Response:
    """The most recently updated deals, optionally of one tenant."""
    runtime = _runtime(request)
    principal = principal_of(request)
    query = select(Deal).order_by(Deal.updated_at.desc()).limit(_LIST_LIMIT)
    tenant_id = request.query_params.get("tenant_id")
    if tenant_id:
        _tenant_allowed(principal, tenant_id)
        query = query.where(Deal.tenant_id == tenant_id)
    elif principal.tenants is not None:
        query = query.where(Deal.tenant_id.in_(sorted(principal.tenants)))
    async with runtime.reads() as session:
        deals = (await session.scalars(query)).all()
    return json_response({"deals": [d.as_dict() for d in deals]})


async def get_deal(request: Request) -> Response:
    """One deal, with its CRM sync status."""
    runtime = _runtime(request)
    async with runtime.reads() as session:
        deal = await session.get(Deal, request.path_params["deal_id"])
    if deal is None or not principal_of(request).can_see(deal.tenant_id):
        return _error(404, f"no deal {request.path_params['deal_id']!r}")
    return json_response(deal.as_dict())


async def create_claim(request: Request) -> Response:
    """Create a claim (to be enriched with ``POST /claims/{id}/enrich``)."""
    runtime = _runtime(request)
    body = await _body(request)
    _only(body, {"id", "tenant_id", "deal_id", "text"})
    claim_id = _identifier(body, "id") or f"claim_{_random_hex()}"
    tenant_id = _text(body, "tenant_id", 128, required=True)
    deal_id = _identifier(body, "deal_id")
    claim_text = _text(body, "text", 10_000, required=True)
    assert tenant_id is not None  # required=True
    assert claim_text is not None
    _tenant_allowed(principal_of(request), tenant_id)
    async with runtime.sessions.begin() as session:
        if await session.get(Claim, claim_id) is not None:
            return _error(409, f"claim {claim_id!r} already exists")
        claim = Claim(id=claim_id, tenant_id=tenant_id, deal_id=deal_id, text=claim_text)
        session.add(claim)
        await session.flush()
        payload = claim.as_dict()
    return json_response(payload, 201)


async def get_claim(request: Request) -> Response:
    """One claim (the deferred worker's callback keeps a refreshed one current)."""
    runtime = _runtime(request)
    claim_id = request.path_params["claim_id"]
    async with runtime.reads() as session:
        owner = await session.scalar(select(Claim.tenant_id).where(Claim.id == claim_id))
        if owner is None or not principal_of(request).can_see(owner):
            return _error(404, f"no claim {claim_id!r}")
        claim = await session.get(Claim, claim_id)
        payload = claim.as_dict() if claim is not None else None
    if payload is None:
        return _error(404, f"no claim {claim_id!r}")
    return json_response(payload)


async def enrich_claim(request: Request) -> Response:
    """Enrich a claim through the library and record the answer on it.

    ``enriched`` / ``served_from_fallback``: fresh data. ``cached_stale``: the last good
    data, marked stale. ``deferred`` (``ENRICHMENT_DEFER_ON_ERROR=true``): no data yet; a
    STALE_ENRICHMENT defect is open and the deferred worker refreshes it after recovery.
    With deferral off an outage answers 503 and the claim is marked stale.
    """
    runtime = _runtime(request)
    claim_id = request.path_params["claim_id"]
    body = await _body(request, optional=True)
    _only(body, {"provider"})
    provider = _text(body, "provider", 64, required=False)
    enricher = runtime.enricher
    if enricher is None:
        return _error(503, "no enrichment provider is configured: set IDIS_ENRICHMENT_PROVIDER")
    chain: list[str] | None = None
    if provider is not None:
        try:
            chain = [provider, *runtime.settings.provider(provider).fallbacks]
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
    primary = chain[0] if chain else runtime.enrichment_provider
    assert primary is not None
    async with runtime.reads() as session:
        claim = await session.get(Claim, claim_id)
    if claim is None or not principal_of(request).can_see(claim.tenant_id):
        return _error(404, f"no claim {claim_id!r}")
    try:
        result = await enricher.enrich(
            claim.id, tenant_id=claim.tenant_id, subject_type=SUBJECT_TYPE, providers=chain
        )
    except ProviderRejected as exc:
        # Every provider said the claim itself cannot be enriched: not an outage.
        return _error(422, str(exc), status="rejected", error_type=exc.error_type, stale=False)
    except (ProviderError, AuthError) as exc:
        error_type = getattr(exc, "error_type", "auth")
        async with runtime.sessions.begin() as session:
            stored = await session.get(Claim, claim_id, with_for_update=True)
            if stored is not None:
                mark_failed(stored, primary)
        return _error(
            503,
            f"{primary} could not enrich claim {claim_id!r} ({error_type}) and deferral is "
            "off (ENRICHMENT_DEFER_ON_ERROR=false): the claim is marked stale",
            status="failed",
            error_type=error_type,
            stale=True,
        )
    async with runtime.sessions.begin() as session:
        stored = await session.get(Claim, claim_id, with_for_update=True)
        if stored is None:
            return _error(404, f"claim {claim_id!r} was deleted meanwhile")
        apply_result(stored, result)
        await session.flush()
        payload = stored.as_dict()
    return json_response(
        {
            "status": result.status,
            "primary": result.primary,
            "provider": result.provider,
            "stale": result.stale,
            "deferred": result.deferred,
            "defect_id": result.defect_id,
            "request_id": result.request_id,
            "claim": payload,
        }
    )


def _random_hex() -> str:
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------- plumbing


async def _bad_request(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))


async def _forbidden(request: Request, exc: Exception) -> Response:
    return _error(403, str(exc))


async def _too_large(request: Request, exc: Exception) -> Response:
    # Starlette's server closes the connection after this answer: the rest of
    # the body is never read.
    return _error(413, str(exc))


async def _conflict(request: Request, exc: Exception) -> Response:
    # Two requests created the same id at once: the loser's transaction rolled back.
    return _error(409, "a concurrent request created or changed the same record; retry")


async def _unavailable(request: Request, exc: Exception) -> Response:
    # The driver's text may quote SQL and parameters: only the type goes out.
    _log.error("idis.example.database_error", path=request.url.path, error_type=type(exc).__name__)
    return _error(503, f"database unavailable ({type(exc).__name__}); try again")


class _MetricsEndpoint:
    """``/metrics``: public (Prometheus scrapes it as before) or for the metrics/operator role."""

    def __init__(self, registry: Any, service: ServiceSettings) -> None:
        self.app = metrics_app(registry)
        self.protected = service.metrics == "token"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if self.protected:
            principal = principal_of(Request(scope))
            if not principal.roles & {"metrics", "operator"}:
                await _error(403, "/metrics needs a token with the metrics or operator role")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def _public_paths(service: ServiceSettings) -> Callable[[str], bool]:
    """Paths served without a principal (the guard protects every other one)."""
    exact = {"/healthz"} | ({"/metrics"} if service.metrics == "public" else set())

    def public(path: str) -> bool:
        # Webhooks authenticate by signature (the library's receiver verifies them).
        return path in exact or path.startswith("/webhooks/")

    return public


class _WebhookEndpoint:
    """Forwards ``/webhooks/{provider}`` to the receiver built at start."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        runtime: Runtime = self.app.state.runtime
        if not runtime.started:
            await json_response({"error": "starting"}, 503)(scope, receive, send)
            return
        await runtime.webhooks(scope, receive, send)


class _AccessLog:
    """One structured log line per request (method, path, status, duration)."""

    def __init__(self, app: Callable[[_Scope, _Receive, _Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def capture(message: MutableMapping[str, Any]) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = str(scope.get("path", ""))
            quiet = path in ("/metrics", "/healthz")
            log = _log.debug if quiet else _log.info
            log(
                "idis.example.request",
                method=scope.get("method"),
                path=path,
                status_code=status_code,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )


def create_app(
    settings: Settings | None = None,
    *,
    service: ServiceSettings | None = None,
    metrics: Metrics | None = None,
    log_stream: IO[str] | None = None,
    authenticate: Authenticate | None = None,
) -> Starlette:
    """Build the service's ASGI app; the lifespan starts and stops the background work.

    Args:
        settings: The library's settings (default: ``Settings.from_env()``).
        service: The service's own settings (default: ``ServiceSettings.from_env()``).
        metrics: Where to record metrics and what ``/metrics`` serves (default: process-wide).
        log_stream: Where JSON log lines go (default: stderr).
        authenticate: ``(request) -> Principal | None`` (or async): who is calling. Default:
            bearer tokens from ``IDIS_SERVICE_API_TOKENS`` (every caller is the local
            operator with ``IDIS_SERVICE_AUTH=off``).

    Raises:
        ConfigError: naming the first invalid environment variable.
    """
    settings = settings if settings is not None else Settings.from_env()
    service = service if service is not None else ServiceSettings.from_env()
    metrics = metrics if metrics is not None else get_metrics()
    _register_fact_sources()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level, stream=log_stream)
        runtime = Runtime(settings, service, metrics)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", _MetricsEndpoint(metrics.registry, service), methods=["GET"]),
            Route("/status", status, methods=["GET"]),
            Route("/deals", upsert_deal, methods=["POST"]),
            Route("/deals", list_deals, methods=["GET"]),
            Route("/deals/{deal_id}", get_deal, methods=["GET"]),
            Route("/claims", create_claim, methods=["POST"]),
            Route("/claims/{claim_id}", get_claim, methods=["GET"]),
            Route("/claims/{claim_id}/enrich", enrich_claim, methods=["POST"]),
        ],
        exception_handlers={
            BadRequest: _bad_request,
            UsageError: _bad_request,
            Forbidden: _forbidden,
            RequestTooLarge: _too_large,
            StorageError: _unavailable,
            OperationalError: _unavailable,
            IntegrityError: _conflict,
        },
        lifespan=lifespan,
    )
    app.state.runtime = Runtime(settings, service, metrics)
    app.state.probe_gate = _ProbeGate(service.probe_interval.total_seconds())
    app.router.routes.append(Mount("/webhooks", app=_WebhookEndpoint(app)))
    if authenticate is None:
        authenticate = allow_everyone if service.auth == "off" else BearerTokens(service.api_tokens)
    # Added first, so it runs inside the access log: refused requests are logged too.
    app.add_middleware(Guard, hook=authenticate, public=_public_paths(service))
    app.add_middleware(_AccessLog)
    return app
