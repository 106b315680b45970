"""The simulator's ASGI app: the provider API under ``/p/{provider}`` and ``/_control``.

Each provider request first passes the fault layer (in :class:`SimulatorApp`,
before Starlette's own middleware so it still holds the server's raw ``send``),
then the optional bearer-token check, then the route. The routes are thin:
they parse parameters and call :class:`~.state.ProviderState` under the lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ._dialects import dialect_routes, provider_route, unauthorized_body
from ._faults import apply_fault, send_json
from ._gdrive import extra_routes
from ._oauth import revoke_endpoint, rotate_endpoint, salesforce_token_endpoint, token_endpoint
from ._state import (
    ENDPOINTS,
    RetentionExceeded,
    SimulatorInputError,
    SimulatorState,
    format_time,
    parse_time,
)
from ._webhooks import WebhookEmitter, inbound_endpoint

__all__ = ["SimulatorApp", "build_app"]

#: Endpoints that need a bearer token while the provider's require_auth is on.
PROTECTED = frozenset({"records", "record", "changes", "replay", "enrich"})


class SimulatorApp(Starlette):
    """Starlette app with the fault and auth layers in front of routing."""

    sim: SimulatorState
    emitter: WebhookEmitter
    #: The provider API's routes, each named by its endpoint (what faults target).
    endpoints: list[Route]

    def classify(self, path: str) -> tuple[str, str] | None:
        """``(provider, endpoint name)`` of a provider API path, or None for anything else."""
        path = path.rstrip("/")
        for route in self.endpoints:
            match = route.path_regex.match(path)
            if match is not None:
                return match["provider"], route.name
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run faults and auth on the raw ASGI call, then route."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if not self.emitter.started and self.sim.has_webhook_targets():
            # In-process use (httpx.ASGITransport) runs no lifespan; whoever does
            # that should `await app.emitter.stop()` when done.
            self.emitter.start()
        target = self.classify(scope["path"])
        if target is None:
            await super().__call__(scope, receive, send)
            return
        name, endpoint = target
        sim = self.sim
        try:
            with sim.lock:
                provider = sim.provider(name)
                latency, fault = provider.on_request(endpoint)
                needs_auth = provider.require_auth and endpoint in PROTECTED
        except SimulatorInputError as exc:
            await send_json(send, 404, {"error": "unknown_provider", "detail": str(exc)})
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                with sim.lock:
                    provider.responses[f"{endpoint}:{message['status']}"] += 1
            await send(message)

        if latency > 0:
            await asyncio.sleep(latency)
        rest = scope["path"][3:].partition("/")[2]
        if fault is not None:
            if fault.kind == "drop":
                with sim.lock:
                    provider.responses[f"{endpoint}:dropped"] += 1
                await apply_fault(fault, sim, endpoint, send)
            else:
                await apply_fault(fault, sim, endpoint, counting_send, rest)
            return
        if needs_auth and not self._authorized(scope, provider):
            await send_json(
                counting_send,
                401,
                unauthorized_body(rest) or {"error": "invalid_token"},
                [(b"www-authenticate", b'Bearer error="invalid_token"')],
            )
            return
        await super().__call__(scope, receive, counting_send)

    def _authorized(self, scope: Scope, provider: Any) -> bool:
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        with self.sim.lock:
            ok = scheme.lower() == "bearer" and provider.oauth.validate_bearer(
                token.strip(), self.sim.now()
            )
            if not ok:
                provider.auth_failures += 1
        return bool(ok)


def _bad(exc: SimulatorInputError) -> JSONResponse:
    return JSONResponse(
        {"error": "invalid_parameter", "parameter": exc.variable, "detail": str(exc)},
        status_code=400,
    )


def _int_param(request: Request, name: str, default: int | None, maximum: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SimulatorInputError(f"{name}={raw!r} is not an integer", variable=name) from None
    minimum = 0 if name == "after" else 1
    if value < minimum or value > maximum:
        raise SimulatorInputError(
            f"{name}={raw!r} is out of range: expected {minimum}..{maximum}", variable=name
        )
    return value


def _time_param(request: Request, name: str) -> Any:
    raw = request.query_params.get(name)
    return parse_time(raw, name) if raw else None


_INDUSTRIES = ("software", "fintech", "healthcare", "manufacturing", "retail", "energy", "media")
_SIZES = ("1-10", "11-50", "51-200", "201-1000", "1001-5000", "5000+")
_COUNTRIES = ("US", "GB", "DE", "FR", "NL", "SE", "SG", "CA")


def enrichment_for(subject_id: str) -> dict[str, Any]:
    """Deterministic fake company data for ``subject_id`` (same id, same data)."""
    digest = hashlib.sha256(subject_id.encode()).digest()
    return {
        "company_name": f"{subject_id.replace('_', ' ').title()} Inc.",
        "industry": _INDUSTRIES[digest[0] % len(_INDUSTRIES)],
        "company_size": _SIZES[digest[1] % len(_SIZES)],
        "employees": 5 + int.from_bytes(digest[2:4], "big") % 20_000,
        "country": _COUNTRIES[digest[4] % len(_COUNTRIES)],
        "founded": 1950 + digest[5] % 75,
        "score": round(digest[6] / 255, 3),
    }


def build_app(
    state: SimulatorState | None = None, *, control_hosts: Sequence[str] = ()
) -> SimulatorApp:
    """The simulator as an ASGI app over ``state`` (a fresh one by default).

    Args:
        state: the simulated providers; a fresh :class:`SimulatorState` by default.
        control_hosts: Host names the control API accepts besides loopback ones
            (``simulate --control-host``); it refuses every other ``Host``.
    """
    from ._control import control_routes

    sim = state or SimulatorState()

    def provider_of(request: Request) -> Any:
        return sim.provider(request.path_params["provider"])

    async def health(request: Request) -> Response:
        with sim.lock:
            provider = provider_of(request)
            outage = provider.in_outage()
        if outage:
            return JSONResponse({"status": "outage"}, status_code=503)
        return JSONResponse(
            {"status": "ok", "provider": provider.name, "time": format_time(sim.now())}
        )

    def paged(read: Callable[[Any, Request], Any]) -> Callable[[Request], Awaitable[Response]]:
        """A GET route answering ``read(provider, request)``: a page, or the error it raised."""

        async def endpoint(request: Request) -> Response:
            try:
                with sim.lock:
                    page = read(provider_of(request), request)
            except SimulatorInputError as exc:
                return _bad(exc)
            except RetentionExceeded as exc:
                return JSONResponse(
                    {
                        "error": "retention_exceeded",
                        "retention_seconds": exc.retention_seconds,
                        "oldest_available": format_time(exc.oldest) if exc.oldest else None,
                    },
                    status_code=422,
                )
            return JSONResponse(page)

        return endpoint

    def records(provider: Any, request: Request) -> Any:
        items, next_cursor = provider.list_records(
            limit=_int_param(request, "limit", 100, 1000),
            updated_since=_time_param(request, "updated_since"),
            cursor=request.query_params.get("cursor") or None,
        )
        return {"items": items, "next_cursor": next_cursor}

    def changes(provider: Any, request: Request) -> Any:
        return provider.changes(
            limit=_int_param(request, "limit", 100, 1000),
            after=_int_param(request, "after", None, 2**62),
            since=_time_param(request, "since"),
        )

    def replay(provider: Any, request: Request) -> Any:
        return provider.replay(
            limit=_int_param(request, "limit", 500, 5000),
            since=_time_param(request, "since"),
            cursor=request.query_params.get("cursor") or None,
        )

    async def record(request: Request) -> Response:
        record_id = request.path_params["record_id"]
        if request.method == "GET":
            with sim.lock:
                found = provider_of(request).records.get(record_id)
                body = found.to_json() if found is not None and not found.deleted else None
            if body is None:
                return JSONResponse({"error": "not_found", "id": record_id}, status_code=404)
            return JSONResponse(body)
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except ValueError:
            return JSONResponse(
                {"error": "invalid_body", "detail": "body is not JSON"}, status_code=400
            )
        key = request.headers.get("idempotency-key")
        try:
            with sim.lock:
                status, result, replayed = provider_of(request).put_record(record_id, payload, key)
        except SimulatorInputError as exc:
            return JSONResponse({"error": "invalid_body", "detail": str(exc)}, status_code=400)
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return JSONResponse(result, status_code=status, headers=headers)

    async def enrich(request: Request) -> Response:
        subject_id = request.path_params["subject_id"]
        provider = request.path_params["provider"]
        return JSONResponse(
            {
                "subject_id": subject_id,
                "provider": provider,
                "data": enrichment_for(subject_id),
                "fetched_at": format_time(sim.now()),
            }
        )

    routes = [
        provider_route("health", "health", health),
        provider_route("records", "records", paged(records)),
        provider_route("records/{record_id}", "record", record, "GET PUT"),
        provider_route("changes", "changes", paged(changes)),
        provider_route("replay", "replay", paged(replay)),
        provider_route("enrich/{subject_id}", "enrich", enrich),
        provider_route("webhooks/inbound", "webhooks_inbound", inbound_endpoint, "POST"),
        provider_route("oauth/token", "token", token_endpoint, "POST"),
        provider_route("services/oauth2/token", "token", salesforce_token_endpoint, "POST"),
        provider_route("login/services/oauth2/token", "token", salesforce_token_endpoint, "POST"),
        provider_route("oauth/revoke", "revoke", revoke_endpoint, "POST"),
        provider_route("oauth/rotate", "rotate", rotate_endpoint, "POST"),
        *dialect_routes(sim, provider_of),
        *extra_routes(sim, provider_of),
        *control_routes(sim, allowed_hosts=control_hosts),
    ]
    emitter = WebhookEmitter(sim)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        sim.closing = False
        emitter.start()
        try:
            yield
        finally:
            sim.closing = True
            await emitter.stop()

    app = SimulatorApp(routes=routes, lifespan=lifespan)
    app.sim = sim
    app.endpoints = [r for r in routes if isinstance(r, Route) and r.name in ENDPOINTS]
    app.emitter = emitter
    app.state.sim = sim
    return app
