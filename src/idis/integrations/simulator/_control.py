"""The control API (``/_control/...``, JSON) and :class:`SimulatorControl`, its sync client.

The API is a table (:data:`CONTROL_ACTIONS`): each row is a route, a method, a
handler ``(state, body) -> JSON`` and the body's schema (allowed and required
fields). One endpoint serves every row: it guards against cross-site use,
reads the body, checks it against the schema, and runs the handler under the
state's lock. Every action validates its whole input before changing
anything and answers ``400 {"error": "invalid_request", "parameter", "detail"}``
naming the bad value; :class:`SimulatorControl` turns that into
:class:`SimulatorInputError`. docs/simulator.md lists every action with a curl example.

The control API has no authentication, and it can make the simulator POST to
any URL (a webhook target). A web page the developer visits must not be able to
drive it (issue 17): a request whose ``Host`` is not loopback (DNS rebinding),
whose ``Origin`` is another site, or a POST that is not ``application/json``
(the only body type a cross-site form or ``fetch`` can send without a CORS
preflight, which this API never grants, is a "simple" one) is refused before
anything is read.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._http import httpx
from ._oauth import OAuthState
from ._state import (
    ProviderState,
    SimulatorInputError,
    SimulatorState,
    _number,
    format_time,
    parse_time,
)

__all__ = ["CONTROL_ACTIONS", "ControlAction", "SimulatorControl", "control_routes"]

Handler = Callable[[SimulatorState, dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class ControlAction:
    """One row of the control API."""

    #: Path under the simulator's root (``/_control/...``).
    path: str
    #: ``GET`` (parameters in the query string) or ``POST`` (a JSON object body).
    method: str
    #: ``(state, body) -> JSON-ready result`` (or a coroutine for a waiting action);
    #: run under ``state.lock``; raises :class:`SimulatorInputError` on a bad value.
    handler: Handler
    #: Fields the body may carry; any other is refused, naming it.
    fields: tuple[str, ...] = ()
    #: Fields that must be present and not null.
    required: tuple[str, ...] = ()


# --------------------------------------------------------------------------- guard

#: Host names that always mean this machine (RFC 6761 reserves ``localhost``).
_LOOPBACK_NAMES = frozenset({"localhost"})


def _host_name(authority: str) -> str:
    """The host part of ``host[:port]`` or ``[v6][:port]``, lower-cased."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    if authority.count(":") == 1:
        return authority.partition(":")[0]
    return authority


def is_loopback_host(name: str) -> bool:
    """Whether ``name`` (a Host header's host part) can only mean this machine."""
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _refusal(request: Request, extra_hosts: Collection[str]) -> JSONResponse | None:
    """Why a control request must be refused (cross-site or rebinding), or None."""
    host_header = request.headers.get("host", "")
    host = _host_name(host_header)
    if not host or not (is_loopback_host(host) or host in extra_hosts):
        return _forbidden(
            f"Host {host_header!r} is not loopback: the control API answers only requests "
            "addressed to 127.0.0.1, ::1 or localhost (or a name given with --control-host)"
        )
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if parts.netloc.lower() != host_header.strip().lower() or parts.scheme not in (
            "http",
            "https",
        ):
            return _forbidden(
                f"Origin {origin!r} is another site: the control API refuses cross-site requests"
            )
    if request.method == "POST":
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            return JSONResponse(
                {
                    "error": "unsupported_media_type",
                    "detail": f"content-type {media or 'none'!r}: expected application/json",
                },
                status_code=415,
            )
    return None


def _forbidden(detail: str) -> JSONResponse:
    return JSONResponse({"error": "forbidden", "detail": detail}, status_code=403)


# --------------------------------------------------------------------------- handlers


def _provider(sim: SimulatorState, body: Mapping[str, Any]) -> ProviderState:
    return sim.provider(body["provider"])


def _rest(body: Mapping[str, Any], *taken: str) -> dict[str, Any]:
    """The body's fields but ``taken``: the keywords of the state method the route calls
    (the route's schema allows only those, and a field left out is the method's None)."""
    return {k: v for k, v in body.items() if k not in taken}


_P = ("provider",)


def _calls(
    path: str,
    method: Callable[..., Any],
    answer: Callable[[ProviderState, Any], Any],
    on: Callable[[ProviderState], Any] = lambda provider: provider,
) -> ControlAction:
    """A POST row that calls ``method`` of the named provider (or of ``on(provider)``) with
    the body's other fields and answers ``answer(provider, result)``."""

    def handler(sim: SimulatorState, body: dict[str, Any]) -> Any:
        provider = _provider(sim, body)
        return answer(provider, method(on(provider), **_rest(body, *_P)))

    return ControlAction(path, "POST", handler, *_schema(method, *_P))


def _sim_calls(
    path: str, method: Callable[..., Any], answer: Callable[[Any], Any]
) -> ControlAction:
    """A POST row that calls a :class:`SimulatorState` ``method`` with the body's fields."""
    return ControlAction(
        path, "POST", lambda sim, body: answer(method(sim, **body)), *_schema(method)
    )


def _schema(method: Callable[..., Any], *first: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fields, required fields) of a row calling ``method`` (``first`` before them, required):
    its parameters after ``self``, required without a default. A new keyword of the state
    method is a control field at once."""
    params = list(inspect.signature(method).parameters.values())[1:]
    required = tuple(p.name for p in params if p.default is inspect.Parameter.empty)
    return (*first, *(p.name for p in params)), (*first, *required)


def _switch(path: str, field: str, attribute: str) -> ControlAction:
    """A POST row that sets a provider's boolean ``attribute`` to ``field`` (default true)."""

    def handler(sim: SimulatorState, body: dict[str, Any]) -> Any:
        value = body.get(field, True)
        if not isinstance(value, bool):
            raise SimulatorInputError(f"{field}={value!r} is not true or false", variable=field)
        setattr(_provider(sim, body), attribute, value)
        return {attribute: value}

    return ControlAction(path, "POST", handler, (*_P, field), _P)


def _ping(sim: SimulatorState, _body: dict[str, Any]) -> Any:
    return {"status": "ok", "now": format_time(sim.now()), "providers": sim.providers()}


def _declare(sim: SimulatorState, body: dict[str, Any]) -> Any:
    declared = sim.declare_provider(body["provider"], **_rest(body, *_P))
    return {
        "provider": declared.name,
        "retention_seconds": declared.retention_seconds,
        "require_auth": declared.require_auth,
    }


def _list_faults(sim: SimulatorState, body: dict[str, Any]) -> Any:
    return {"faults": [f.to_json() for f in _provider(sim, body).faults]}


def _emit(sim: SimulatorState, body: dict[str, Any]) -> Any:
    fields = _rest(body, *_P, "type", "summary")
    events = _provider(sim, body).emit(event_type=body.get("type"), **fields)
    if body.get("summary"):
        return {"count": len(events), "first_seq": events[0]["seq"], "last_seq": events[-1]["seq"]}
    return {"events": events}


def _stop_window(sim: SimulatorState, body: dict[str, Any]) -> Any:
    target = _provider(sim, body)
    start = _when(body.get("start"), "start") or sim.now()
    end = _when(body.get("end"), "end")
    duration = body.get("duration")
    if end is None:
        if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
            raise SimulatorInputError(
                f"duration={duration!r}: give end=ISO time or a positive duration in seconds",
                variable="duration",
            )
        end = start + timedelta(seconds=duration)
    target.add_stop_window(start, end)
    return {"start": format_time(start), "end": format_time(end)}


def _flush(sim: SimulatorState, body: dict[str, Any]) -> Any:
    timeout = _number(body.get("timeout", 10.0), "timeout", minimum=0.0)
    name = body.get("provider")
    sim.pending_webhooks(name)  # validates the name before the wait starts

    async def wait() -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = sim.pending_webhooks(name)
        while pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
            pending = sim.pending_webhooks(name)
        return {"idle": pending == 0, "pending": pending}

    return wait()


def _inbound_deliveries(sim: SimulatorState, body: dict[str, Any]) -> Any:
    return {"deliveries": list(_provider(sim, body).receiver.deliveries)}


def _oauth_issue(sim: SimulatorState, body: dict[str, Any]) -> Any:
    return _provider(sim, body).oauth.issue(
        body.get("client_id", "idis-local"), body.get("scope"), sim.now()
    )


def _oauth_expire(sim: SimulatorState, body: dict[str, Any]) -> Any:
    return {"expired": _provider(sim, body).oauth.expire_access_tokens(sim.now())}


def _clock(sim: SimulatorState, body: dict[str, Any]) -> Any:
    if "advance" in body:
        sim.advance_clock(body["advance"])
    return {"now": format_time(sim.now()), "offset_seconds": sim.clock_offset}


def _stats(sim: SimulatorState, body: dict[str, Any]) -> Any:
    detail = str(body.get("detail", "true")).lower() not in ("false", "0", "no")
    return sim.stats(body.get("provider") or None, detail=detail)


def _reset(sim: SimulatorState, body: dict[str, Any]) -> Any:
    sim.reset(body.get("provider"))
    return {"reset": body.get("provider") or "all"}


def _webhooks(provider: ProviderState, _result: None) -> Any:
    return provider.webhooks.stats()


def _oauth(provider: ProviderState) -> OAuthState:
    return provider.oauth


#: The control API: route, method, handler, body schema (allowed fields, required fields).
CONTROL_ACTIONS: tuple[ControlAction, ...] = (
    ControlAction("/_control/ping", "GET", _ping),
    ControlAction(
        "/_control/providers", "POST", _declare, (*_P, "retention_seconds", "require_auth"), _P
    ),
    ControlAction("/_control/faults", "GET", _list_faults, _P, _P),
    _calls("/_control/faults", ProviderState.add_fault, lambda _p, fault: fault.to_json()),
    _sim_calls("/_control/faults/clear", SimulatorState.clear_faults, lambda n: {"cleared": n}),
    ControlAction(
        "/_control/emit",
        "POST",
        _emit,
        (*_P, "count", "tenant_ids", "record_ids", "type", "data", "webhook", "summary"),
        _P,
    ),
    _sim_calls("/_control/mutate", SimulatorState.mutate, lambda record: record),
    _calls("/_control/webhooks/target", ProviderState.set_webhook_target, _webhooks),
    _calls("/_control/webhooks/mode", ProviderState.set_webhook_mode, _webhooks),
    ControlAction(
        "/_control/webhooks/stop_window",
        "POST",
        _stop_window,
        (*_P, "start", "end", "duration"),
        _P,
    ),
    ControlAction("/_control/webhooks/flush", "POST", _flush, (*_P, "timeout")),
    _calls("/_control/inbound", ProviderState.configure_receiver, lambda p, _: p.receiver.stats()),
    ControlAction("/_control/inbound", "GET", _inbound_deliveries, _P, _P),
    _calls("/_control/oauth", OAuthState.configure, lambda p, _: p.oauth.stats(), _oauth),
    _calls(
        "/_control/oauth/client",
        OAuthState.set_client,
        lambda _p, client: {"client_id": client.client_id},
        _oauth,
    ),
    ControlAction("/_control/oauth/issue", "POST", _oauth_issue, (*_P, "client_id", "scope"), _P),
    _calls("/_control/oauth/revoke", OAuthState.revoke, lambda _p, r: {"revoked": r}, _oauth),
    ControlAction("/_control/oauth/expire", "POST", _oauth_expire, _P, _P),
    _calls(
        "/_control/retention",
        ProviderState.set_retention,
        lambda p, _: {"retention_seconds": p.retention_seconds},
    ),
    _calls(
        "/_control/feed_retention",
        ProviderState.set_feed_retention,
        lambda p, _: {"feed_retention_seconds": p.feed_retention_seconds},
    ),
    _switch("/_control/require_auth", "enabled", "require_auth"),
    _switch("/_control/idempotency", "honor", "honor_idempotency"),
    ControlAction("/_control/clock", "GET", _clock),
    ControlAction("/_control/clock", "POST", _clock, ("advance",)),
    ControlAction("/_control/stats", "GET", _stats, (*_P, "detail")),
    ControlAction("/_control/reset", "POST", _reset, _P),
)


def _endpoint(
    sim: SimulatorState, action: ControlAction, extra_hosts: frozenset[str]
) -> Callable[[Request], Awaitable[Response]]:
    allowed = frozenset(action.fields)

    async def endpoint(request: Request) -> Response:
        refused = _refusal(request, extra_hosts)
        if refused is not None:
            return refused
        try:
            body = await _read_body(request)
            _check_keys(body, allowed, action.required)
            with sim.lock:
                result = action.handler(sim, body)
        except SimulatorInputError as exc:
            return _invalid(exc.variable, str(exc))
        except ValueError as exc:
            return _invalid(None, str(exc))
        if inspect.iscoroutine(result):
            # Waiting actions validate under the lock, then wait without it.
            result = await result
        return JSONResponse(result)

    return endpoint


def control_routes(sim: SimulatorState, *, allowed_hosts: Sequence[str] = ()) -> list[Route]:
    """Starlette routes of the control API over ``sim``.

    Args:
        sim: the state the actions change.
        allowed_hosts: Host names accepted besides loopback ones (for a simulator
            reached by name from another container; ``simulate --control-host``).
    """
    extra = frozenset(_host_name(h) for h in allowed_hosts)
    return [
        Route(action.path, _endpoint(sim, action, extra), methods=[action.method])
        for action in CONTROL_ACTIONS
    ]


def _check_keys(body: Mapping[str, Any], allowed: frozenset[str], required: Sequence[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise SimulatorInputError(
            f"unknown field {unknown[0]!r}: expected some of {', '.join(sorted(allowed))}",
            variable=unknown[0],
        )
    for name in required:
        if body.get(name) is None:
            raise SimulatorInputError(f"{name} is required", variable=name)


async def _read_body(request: Request) -> dict[str, Any]:
    if request.method == "GET":
        return dict(request.query_params)
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise SimulatorInputError("body is not JSON") from None
    if not isinstance(body, dict):
        raise SimulatorInputError("body must be a JSON object")
    return body


def _when(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SimulatorInputError(f"{name}={value!r} is not an ISO-8601 time", variable=name)
    return parse_time(value, name)


def _invalid(parameter: str | None, detail: str) -> JSONResponse:
    return JSONResponse(
        {"error": "invalid_request", "parameter": parameter, "detail": detail}, status_code=400
    )


# --------------------------------------------------------------------------- client


def _json_value(value: Any) -> Any:
    """A control body's value as JSON: mappings as objects, sequences (not text) as lists,
    times as ISO-8601."""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value


def _fields(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """A client method's ``locals()``, taken first thing, as its control body.

    Each method's parameters are named as the control API's fields, so the
    signature states the body once (``_call`` leaves out the None values).
    """
    return {name: value for name, value in arguments.items() if name != "self"}


class SimulatorControl:
    """Sync client of the control API; one method per action.

    Args:
        url: the simulator's base URL (``http://127.0.0.1:8765``).
        timeout: seconds per control request.

    Raises (every method):
        SimulatorInputError: the simulator rejected a value (the message names it).
    """

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url + "/_control", timeout=timeout, trust_env=False
        )

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> SimulatorControl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, **options: Any
    ) -> Any:
        values = {k: _json_value(v) for k, v in (body or {}).items() if v is not None}
        if method == "GET":
            response = self._client.get(path, params=values, **options)
        else:
            response = self._client.post(path, json=values, **options)
        if response.status_code == 400:
            error = response.json()
            raise SimulatorInputError(str(error.get("detail")), variable=error.get("parameter"))
        response.raise_for_status()
        return response.json()

    def _post(self, path: str, **body: Any) -> dict[str, Any]:
        """POST ``body`` to a control route (None values left out); its JSON answer."""
        return dict(self._call("POST", path, body))

    # ------------------------------------------------------------------ providers and time

    def ping(self) -> dict[str, Any]:
        """Liveness, simulated time and known providers."""
        return dict(self._call("GET", "/ping"))

    def declare_provider(
        self,
        provider: str,
        *,
        retention_seconds: float | None = None,
        require_auth: bool | None = None,
    ) -> dict[str, Any]:
        """Create a provider (providers are also created on first use)."""
        return self._post("/providers", **_fields(locals()))

    def set_retention(self, provider: str, seconds: float) -> None:
        """Set how far back the provider's replay API reaches."""
        self._post("/retention", provider=provider, seconds=seconds)

    def set_feed_retention(self, provider: str, seconds: float | None) -> None:
        """Set how far back the changes feed reaches (None: as far as replay)."""
        self._post("/feed_retention", provider=provider, seconds=seconds)

    def require_auth(self, provider: str, enabled: bool = True) -> None:
        """Require a valid bearer token on records/changes/replay/enrich."""
        self._post("/require_auth", provider=provider, enabled=enabled)

    def honor_idempotency(self, provider: str, honor: bool = True) -> None:
        """Whether a repeated Idempotency-Key is answered from its first outcome.

        ``False`` plays a provider without idempotency: every request applies
        again, so ``applications`` counts what the client really sent twice.
        """
        self._post("/idempotency", provider=provider, honor=honor)

    def advance_clock(self, seconds: float) -> datetime:
        """Move simulated time forward; return the new simulated time."""
        result = self._post("/clock", advance=seconds)
        return parse_time(result["now"], "now")

    def now(self) -> datetime:
        """The simulator's current (simulated) time."""
        return parse_time(self._call("GET", "/clock")["now"], "now")

    def stats(self, provider: str | None = None, *, detail: bool = True) -> dict[str, Any]:
        """Counters of one provider (or ``{"providers": {...}}``).

        ``detail=False`` leaves out the per-record writes and the per-key/per-id maps,
        which grow with traffic.
        """
        params = {"provider": provider, "detail": None if detail else "false"}
        return dict(self._call("GET", "/stats", params))

    def reset(self, provider: str | None = None) -> None:
        """Forget one provider, or everything (clock offset included)."""
        self._post("/reset", provider=provider)

    # ------------------------------------------------------------------ faults

    def set_fault(
        self,
        provider: str,
        kind: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        ratio: float | None = None,
        seconds: float | None = None,
        retry_after: float | None = None,
        retry_after_format: str | None = None,
        duration: float | None = None,
        count: int | None = None,
        policy: str | None = None,
    ) -> dict[str, Any]:
        """Install a fault; returns it (with its ``id``).

        ``policy``: HubSpot's ``policyName`` of a ``rate_limit`` on its paths (``DAILY``
        or ``TEN_SECONDLY_ROLLING``); ``REQUEST_LIMIT_EXCEEDED`` makes it Salesforce's 403
        on Salesforce's paths."""
        return self._post("/faults", **_fields(locals()))

    def clear_faults(
        self,
        provider: str | None = None,
        *,
        endpoint: str | None = None,
        fault_id: int | None = None,
    ) -> int:
        """Remove faults; returns how many."""
        return int(self._post("/faults/clear", **_fields(locals()))["cleared"])

    def faults(self, provider: str) -> list[dict[str, Any]]:
        """Active faults of a provider."""
        return list(self._call("GET", "/faults", {"provider": provider})["faults"])

    def outage(self, provider: str, *, duration: float | None = None) -> dict[str, Any]:
        """Shortcut: full outage (every endpoint 503, health 503)."""
        return self.set_fault(provider, "outage", duration=duration)

    # ------------------------------------------------------------------ data

    def emit(
        self,
        provider: str,
        count: int = 1,
        *,
        tenant_ids: Sequence[str] | None = None,
        record_ids: Sequence[str] | None = None,
        type: str | None = None,  # the event field is called "type"
        data: Mapping[str, Any] | None = None,
        webhook: bool = True,
    ) -> list[dict[str, Any]]:
        """Make ``count`` changes; returns their events."""
        result = self._post("/emit", **_fields(locals()))
        return list(result["events"])

    def emit_bulk(
        self,
        provider: str,
        count: int,
        *,
        tenant_ids: Sequence[str] | None = None,
        record_ids: Sequence[str] | None = None,
        webhook: bool = True,
    ) -> tuple[int, int]:
        """Like :meth:`emit` for large counts: returns only (first_seq, last_seq)."""
        result = self._post("/emit", summary=True, **_fields(locals()))
        return int(result["first_seq"]), int(result["last_seq"])

    def mutate(
        self,
        provider: str,
        record_id: str,
        data: Mapping[str, Any],
        *,
        tenant_id: str | None = None,
        event: bool = False,
        webhook: bool = False,
        delete: bool = False,
    ) -> dict[str, Any]:
        """Change a record behind the library's back (no event, no webhook by default)."""
        return self._post("/mutate", **_fields(locals()))

    # ------------------------------------------------------------------ outbound webhooks

    def set_webhook_target(
        self,
        provider: str,
        url: str | None,
        secrets: Sequence[str] | None = None,
        *,
        max_attempts: int | None = None,
        retry_backoff: float | None = None,
        timeout: float | None = None,
        format: str | None = None,  # the control API's field name
    ) -> dict[str, Any]:
        """Where the provider POSTs its change webhooks (``url=None`` stops sending).

        ``format="hubspot"``: batched HubSpot events signed with ``X-HubSpot-Signature-v3``
        (the provider's ``API=hubspot`` pack verifies them); default Standard Webhooks.
        """
        return self._post("/webhooks/target", **_fields(locals()))

    def set_webhook_mode(
        self, provider: str, mode: str, *, delay: float | None = None, batch: int | None = None
    ) -> dict[str, Any]:
        """deliver | stop | delay | duplicate | reorder | corrupt."""
        return self._post("/webhooks/mode", provider=provider, mode=mode, delay=delay, batch=batch)

    def stop_webhooks_window(
        self,
        provider: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        duration: float | None = None,
    ) -> tuple[datetime, datetime]:
        """Drop webhooks of events occurring in [start, end) of simulated time."""
        result = self._post("/webhooks/stop_window", **_fields(locals()))
        return parse_time(result["start"], "start"), parse_time(result["end"], "end")

    def flush_webhooks(self, provider: str | None = None, *, timeout: float = 10.0) -> bool:
        """Wait until no webhook is queued or in flight; False if ``timeout`` passed first."""
        result = self._call("POST", "/webhooks/flush", _fields(locals()), timeout=timeout + 10)
        return bool(result["idle"])

    # ------------------------------------------------------------------ inbound receiver

    def configure_receiver(
        self,
        provider: str,
        *,
        secrets: Sequence[str] | None = None,
        mode: str | None = None,
        fail_status: int | None = None,
        fail_ratio: float | None = None,
        tolerance: float | None = None,
    ) -> dict[str, Any]:
        """Secrets and behaviour (accept | gone | fail) of the inbound webhook receiver."""
        return self._post("/inbound", **_fields(locals()))

    def inbound_deliveries(self, provider: str) -> list[dict[str, Any]]:
        """Webhooks the receiver accepted (first receipt of each webhook-id), in order."""
        return list(self._call("GET", "/inbound", {"provider": provider})["deliveries"])

    # ------------------------------------------------------------------ OAuth

    def configure_oauth(
        self,
        provider: str,
        *,
        access_token_lifetime: float | None = None,
        scopes: Sequence[str] | None = None,
        issue_refresh_token: bool | None = None,
        rotation_grace_seconds: float | None = None,
        rotation_grace_uses: int | None = None,
        revoke_family_on_reuse: bool | None = None,
    ) -> dict[str, Any]:
        """OAuth settings of a provider (token lifetime, scopes, rotation grace...)."""
        return self._post("/oauth", **_fields(locals()))

    def set_oauth_client(
        self,
        provider: str,
        client_id: str,
        client_secret: str,
        scopes: Sequence[str] | None = None,
    ) -> None:
        """Register or replace an OAuth client."""
        self._post("/oauth/client", **_fields(locals()))

    def issue_tokens(
        self, provider: str, *, client_id: str = "idis-local", scope: str | None = None
    ) -> dict[str, Any]:
        """Mint an access + refresh token pair, as an authorization-code flow would."""
        return self._post("/oauth/issue", provider=provider, client_id=client_id, scope=scope)

    def revoke_token(self, provider: str, token: str) -> bool:
        """Revoke a refresh or access token; True if it existed."""
        return bool(self._post("/oauth/revoke", provider=provider, token=token)["revoked"])

    def expire_tokens(self, provider: str) -> int:
        """Make every access token of the provider expired now."""
        return int(self._post("/oauth/expire", provider=provider)["expired"])
