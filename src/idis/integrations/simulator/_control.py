"""The control API (``/_control/...``, JSON) and :class:`SimulatorControl`, its sync client.

Every action validates its whole input before changing anything and answers
``400 {"error": "invalid_request", "parameter", "detail"}`` naming the bad
value; :class:`SimulatorControl` turns that into :class:`SimulatorInputError`.
docs/simulator.md lists every action with a curl example.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._http import httpx
from ._state import SimulatorInputError, SimulatorState, format_time, parse_time

__all__ = ["SimulatorControl", "control_routes"]

_Handler = Callable[[dict[str, Any]], Any]


def _require(body: Mapping[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise SimulatorInputError(f"{name} is required", variable=name)
    return body[name]


def _check_keys(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise SimulatorInputError(
            f"unknown field {unknown[0]!r}: expected some of {', '.join(sorted(allowed))}",
            variable=unknown[0],
        )


def control_routes(sim: SimulatorState) -> list[Route]:
    """Starlette routes of the control API over ``sim``."""

    def action(allowed: Sequence[str], func: _Handler) -> Callable[[Request], Awaitable[Response]]:
        keys = frozenset(allowed)

        async def endpoint(request: Request) -> Response:
            try:
                body = await _read_body(request)
                _check_keys(body, keys)
                with sim.lock:
                    result = func(body)
            except SimulatorInputError as exc:
                return _invalid(exc.variable, str(exc))
            except ValueError as exc:
                return _invalid(None, str(exc))
            if inspect.iscoroutine(result):
                # Waiting actions validate under the lock, then wait without it.
                result = await result
            return JSONResponse(result)

        return endpoint

    def provider(body: Mapping[str, Any]) -> Any:
        return sim.provider(_require(body, "provider"))

    def ping(_body: dict[str, Any]) -> Any:
        return {"status": "ok", "now": format_time(sim.now()), "providers": sim.providers()}

    def declare(body: dict[str, Any]) -> Any:
        declared = sim.declare_provider(
            _require(body, "provider"),
            retention_seconds=body.get("retention_seconds"),
            require_auth=body.get("require_auth"),
        )
        return {
            "provider": declared.name,
            "retention_seconds": declared.retention_seconds,
            "require_auth": declared.require_auth,
        }

    def list_faults(body: dict[str, Any]) -> Any:
        return {"faults": [f.to_json() for f in provider(body).faults]}

    def set_fault(body: dict[str, Any]) -> Any:
        options = {k: v for k, v in body.items() if k not in ("provider", "kind")}
        return provider(body).add_fault(_require(body, "kind"), **options).to_json()

    def clear_faults(body: dict[str, Any]) -> Any:
        name = body.get("provider")
        fault_id = body.get("fault_id")
        if fault_id is not None and (isinstance(fault_id, bool) or not isinstance(fault_id, int)):
            raise SimulatorInputError(
                f"fault_id={fault_id!r} is not an integer", variable="fault_id"
            )
        cleared = sim.clear_faults(name, endpoint=body.get("endpoint"), fault_id=fault_id)
        return {"cleared": cleared}

    def emit(body: dict[str, Any]) -> Any:
        summary = bool(body.get("summary", False))
        events = provider(body).emit(
            body.get("count", 1),
            tenant_ids=body.get("tenant_ids"),
            record_ids=body.get("record_ids"),
            event_type=body.get("type"),
            data=body.get("data"),
            webhook=bool(body.get("webhook", True)),
        )
        if summary:
            return {
                "count": len(events),
                "first_seq": events[0]["seq"],
                "last_seq": events[-1]["seq"],
            }
        return {"events": events}

    def mutate(body: dict[str, Any]) -> Any:
        data = body.get("data", {})
        record, _, _ = provider(body).write_record(
            _require(body, "record_id"),
            data,
            tenant_id=body.get("tenant_id"),
            event_type="record.deleted" if body.get("delete") else None,
            emit_event=bool(body.get("event", False)),
            webhook=bool(body.get("webhook", False)),
        )
        return record.to_json()

    def webhook_target(body: dict[str, Any]) -> Any:
        target = provider(body)
        target.set_webhook_target(
            body.get("url"),
            body.get("secrets"),
            max_attempts=body.get("max_attempts"),
            retry_backoff=body.get("retry_backoff"),
            timeout=body.get("timeout"),
        )
        return target.webhooks.stats()

    def webhook_mode(body: dict[str, Any]) -> Any:
        target = provider(body)
        target.set_webhook_mode(
            _require(body, "mode"), delay=body.get("delay"), batch=body.get("batch")
        )
        return target.webhooks.stats()

    def stop_window(body: dict[str, Any]) -> Any:
        target = provider(body)
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

    def inbound(body: dict[str, Any]) -> Any:
        target = provider(body)
        target.configure_receiver(
            secrets=body.get("secrets"),
            mode=body.get("mode"),
            fail_status=body.get("fail_status"),
            fail_ratio=body.get("fail_ratio"),
            tolerance=body.get("tolerance"),
        )
        return target.receiver.stats()

    def inbound_deliveries(body: dict[str, Any]) -> Any:
        return {"deliveries": list(provider(body).receiver.deliveries)}

    def oauth(body: dict[str, Any]) -> Any:
        target = provider(body)
        options = {k: v for k, v in body.items() if k != "provider"}
        target.oauth.configure(**options)
        return target.oauth.stats()

    def oauth_client(body: dict[str, Any]) -> Any:
        scopes = body.get("scopes")
        if scopes is not None and (isinstance(scopes, str) or not isinstance(scopes, list)):
            raise SimulatorInputError(f"scopes={scopes!r} must be a list", variable="scopes")
        provider(body).oauth.set_client(
            _require(body, "client_id"),
            _require(body, "client_secret"),
            tuple(scopes) if scopes is not None else None,
        )
        return {"client_id": body["client_id"]}

    def oauth_issue(body: dict[str, Any]) -> Any:
        return provider(body).oauth.issue(
            body.get("client_id", "idis-local"), body.get("scope"), sim.now()
        )

    def oauth_revoke(body: dict[str, Any]) -> Any:
        return {"revoked": provider(body).oauth.revoke(str(_require(body, "token")))}

    def oauth_expire(body: dict[str, Any]) -> Any:
        return {"expired": provider(body).oauth.expire_access_tokens(sim.now())}

    def retention(body: dict[str, Any]) -> Any:
        target = provider(body)
        target.set_retention(_require(body, "seconds"))
        return {"retention_seconds": target.retention_seconds}

    def require_auth(body: dict[str, Any]) -> Any:
        target = provider(body)
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise SimulatorInputError(
                f"enabled={enabled!r} is not true or false", variable="enabled"
            )
        target.require_auth = enabled
        return {"require_auth": enabled}

    def clock(body: dict[str, Any]) -> Any:
        if "advance" in body:
            sim.advance_clock(body["advance"])
        return {"now": format_time(sim.now()), "offset_seconds": sim.clock_offset}

    def stats(body: dict[str, Any]) -> Any:
        detail = str(body.get("detail", "true")).lower() not in ("false", "0", "no")
        return sim.stats(body.get("provider") or None, detail=detail)

    def reset(body: dict[str, Any]) -> Any:
        sim.reset(body.get("provider"))
        return {"reset": body.get("provider") or "all"}

    def flush(body: dict[str, Any]) -> Any:
        timeout = body.get("timeout", 10.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise SimulatorInputError(
                f"timeout={timeout!r} must be seconds >= 0", variable="timeout"
            )
        name = body.get("provider")
        sim.pending_webhooks(name)

        async def wait() -> Any:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(timeout)
            pending = sim.pending_webhooks(name)
            while pending and loop.time() < deadline:
                await asyncio.sleep(0.01)
                pending = sim.pending_webhooks(name)
            return {"idle": pending == 0, "pending": pending}

        return wait()

    p = ("provider",)
    return [
        Route("/_control/ping", action((), ping), methods=["GET"]),
        Route(
            "/_control/providers",
            action((*p, "retention_seconds", "require_auth"), declare),
            methods=["POST"],
        ),
        Route("/_control/faults", action(p, list_faults), methods=["GET"]),
        Route(
            "/_control/faults",
            action(
                (
                    *p,
                    "kind",
                    "endpoint",
                    "status",
                    "ratio",
                    "seconds",
                    "retry_after",
                    "retry_after_format",
                    "duration",
                    "count",
                ),
                set_fault,
            ),
            methods=["POST"],
        ),
        Route(
            "/_control/faults/clear",
            action((*p, "endpoint", "fault_id"), clear_faults),
            methods=["POST"],
        ),
        Route(
            "/_control/emit",
            action(
                (*p, "count", "tenant_ids", "record_ids", "type", "data", "webhook", "summary"),
                emit,
            ),
            methods=["POST"],
        ),
        Route(
            "/_control/mutate",
            action((*p, "record_id", "data", "tenant_id", "event", "webhook", "delete"), mutate),
            methods=["POST"],
        ),
        Route(
            "/_control/webhooks/target",
            action(
                (*p, "url", "secrets", "max_attempts", "retry_backoff", "timeout"), webhook_target
            ),
            methods=["POST"],
        ),
        Route(
            "/_control/webhooks/mode",
            action((*p, "mode", "delay", "batch"), webhook_mode),
            methods=["POST"],
        ),
        Route(
            "/_control/webhooks/stop_window",
            action((*p, "start", "end", "duration"), stop_window),
            methods=["POST"],
        ),
        Route("/_control/webhooks/flush", action((*p, "timeout"), flush), methods=["POST"]),
        Route(
            "/_control/inbound",
            action((*p, "secrets", "mode", "fail_status", "fail_ratio", "tolerance"), inbound),
            methods=["POST"],
        ),
        Route("/_control/inbound", action(p, inbound_deliveries), methods=["GET"]),
        Route(
            "/_control/oauth",
            action(
                (
                    *p,
                    "access_token_lifetime",
                    "scopes",
                    "issue_refresh_token",
                    "rotation_grace_seconds",
                    "rotation_grace_uses",
                    "revoke_family_on_reuse",
                ),
                oauth,
            ),
            methods=["POST"],
        ),
        Route(
            "/_control/oauth/client",
            action((*p, "client_id", "client_secret", "scopes"), oauth_client),
            methods=["POST"],
        ),
        Route(
            "/_control/oauth/issue",
            action((*p, "client_id", "scope"), oauth_issue),
            methods=["POST"],
        ),
        Route("/_control/oauth/revoke", action((*p, "token"), oauth_revoke), methods=["POST"]),
        Route("/_control/oauth/expire", action(p, oauth_expire), methods=["POST"]),
        Route("/_control/retention", action((*p, "seconds"), retention), methods=["POST"]),
        Route("/_control/require_auth", action((*p, "enabled"), require_auth), methods=["POST"]),
        Route("/_control/clock", action((), clock), methods=["GET"]),
        Route("/_control/clock", action(("advance",), clock), methods=["POST"]),
        Route("/_control/stats", action((*p, "detail"), stats), methods=["GET"]),
        Route("/_control/reset", action(p, reset), methods=["POST"]),
    ]


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

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        if method == "GET":
            params = {k: v for k, v in (body or {}).items() if v is not None}
            response = self._client.get(path, params=params)
        else:
            payload = {k: v for k, v in (body or {}).items() if v is not None}
            response = self._client.post(path, json=payload)
        if response.status_code == 400:
            error = response.json()
            raise SimulatorInputError(str(error.get("detail")), variable=error.get("parameter"))
        response.raise_for_status()
        return response.json()

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
        return dict(
            self._call(
                "POST",
                "/providers",
                {
                    "provider": provider,
                    "retention_seconds": retention_seconds,
                    "require_auth": require_auth,
                },
            )
        )

    def set_retention(self, provider: str, seconds: float) -> None:
        """Set how far back the provider's replay API reaches."""
        self._call("POST", "/retention", {"provider": provider, "seconds": seconds})

    def require_auth(self, provider: str, enabled: bool = True) -> None:
        """Require a valid bearer token on records/changes/replay/enrich."""
        self._call("POST", "/require_auth", {"provider": provider, "enabled": enabled})

    def advance_clock(self, seconds: float) -> datetime:
        """Move simulated time forward; return the new simulated time."""
        result = self._call("POST", "/clock", {"advance": seconds})
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
        self._call("POST", "/reset", {"provider": provider})

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
    ) -> dict[str, Any]:
        """Install a fault; returns it (with its ``id``)."""
        return dict(
            self._call(
                "POST",
                "/faults",
                {
                    "provider": provider,
                    "kind": kind,
                    "endpoint": endpoint,
                    "status": status,
                    "ratio": ratio,
                    "seconds": seconds,
                    "retry_after": retry_after,
                    "retry_after_format": retry_after_format,
                    "duration": duration,
                    "count": count,
                },
            )
        )

    def clear_faults(
        self,
        provider: str | None = None,
        *,
        endpoint: str | None = None,
        fault_id: int | None = None,
    ) -> int:
        """Remove faults; returns how many."""
        result = self._call(
            "POST",
            "/faults/clear",
            {"provider": provider, "endpoint": endpoint, "fault_id": fault_id},
        )
        return int(result["cleared"])

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
        result = self._call(
            "POST",
            "/emit",
            {
                "provider": provider,
                "count": count,
                "tenant_ids": list(tenant_ids) if tenant_ids is not None else None,
                "record_ids": list(record_ids) if record_ids is not None else None,
                "type": type,
                "data": dict(data) if data is not None else None,
                "webhook": webhook,
            },
        )
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
        result = self._call(
            "POST",
            "/emit",
            {
                "provider": provider,
                "count": count,
                "tenant_ids": list(tenant_ids) if tenant_ids is not None else None,
                "record_ids": list(record_ids) if record_ids is not None else None,
                "webhook": webhook,
                "summary": True,
            },
        )
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
        return dict(
            self._call(
                "POST",
                "/mutate",
                {
                    "provider": provider,
                    "record_id": record_id,
                    "data": dict(data),
                    "tenant_id": tenant_id,
                    "event": event,
                    "webhook": webhook,
                    "delete": delete,
                },
            )
        )

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
    ) -> dict[str, Any]:
        """Where the provider POSTs its change webhooks (``url=None`` stops sending)."""
        return dict(
            self._call(
                "POST",
                "/webhooks/target",
                {
                    "provider": provider,
                    "url": url,
                    "secrets": list(secrets) if secrets is not None else None,
                    "max_attempts": max_attempts,
                    "retry_backoff": retry_backoff,
                    "timeout": timeout,
                },
            )
        )

    def set_webhook_mode(
        self, provider: str, mode: str, *, delay: float | None = None, batch: int | None = None
    ) -> dict[str, Any]:
        """deliver | stop | delay | duplicate | reorder | corrupt."""
        return dict(
            self._call(
                "POST",
                "/webhooks/mode",
                {
                    "provider": provider,
                    "mode": mode,
                    "delay": delay,
                    "batch": batch,
                },
            )
        )

    def stop_webhooks_window(
        self,
        provider: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        duration: float | None = None,
    ) -> tuple[datetime, datetime]:
        """Drop webhooks of events occurring in [start, end) of simulated time."""
        result = self._call(
            "POST",
            "/webhooks/stop_window",
            {
                "provider": provider,
                "start": format_time(start) if start else None,
                "end": format_time(end) if end else None,
                "duration": duration,
            },
        )
        return parse_time(result["start"], "start"), parse_time(result["end"], "end")

    def flush_webhooks(self, provider: str | None = None, *, timeout: float = 10.0) -> bool:
        """Wait until no webhook is queued or in flight; False if ``timeout`` passed first."""
        response = self._client.post(
            "/webhooks/flush",
            json={
                k: v for k, v in {"provider": provider, "timeout": timeout}.items() if v is not None
            },
            timeout=timeout + 10.0,
        )
        response.raise_for_status()
        return bool(response.json()["idle"])

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
        return dict(
            self._call(
                "POST",
                "/inbound",
                {
                    "provider": provider,
                    "secrets": list(secrets) if secrets is not None else None,
                    "mode": mode,
                    "fail_status": fail_status,
                    "fail_ratio": fail_ratio,
                    "tolerance": tolerance,
                },
            )
        )

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
        return dict(
            self._call(
                "POST",
                "/oauth",
                {
                    "provider": provider,
                    "access_token_lifetime": access_token_lifetime,
                    "scopes": list(scopes) if scopes is not None else None,
                    "issue_refresh_token": issue_refresh_token,
                    "rotation_grace_seconds": rotation_grace_seconds,
                    "rotation_grace_uses": rotation_grace_uses,
                    "revoke_family_on_reuse": revoke_family_on_reuse,
                },
            )
        )

    def set_oauth_client(
        self,
        provider: str,
        client_id: str,
        client_secret: str,
        scopes: Sequence[str] | None = None,
    ) -> None:
        """Register or replace an OAuth client."""
        self._call(
            "POST",
            "/oauth/client",
            {
                "provider": provider,
                "client_id": client_id,
                "client_secret": client_secret,
                "scopes": list(scopes) if scopes is not None else None,
            },
        )

    def issue_tokens(
        self, provider: str, *, client_id: str = "idis-local", scope: str | None = None
    ) -> dict[str, Any]:
        """Mint an access + refresh token pair, as an authorization-code flow would."""
        return dict(
            self._call(
                "POST",
                "/oauth/issue",
                {"provider": provider, "client_id": client_id, "scope": scope},
            )
        )

    def revoke_token(self, provider: str, token: str) -> bool:
        """Revoke a refresh or access token; True if it existed."""
        return bool(
            self._call("POST", "/oauth/revoke", {"provider": provider, "token": token})["revoked"]
        )

    def expire_tokens(self, provider: str) -> int:
        """Make every access token of the provider expired now."""
        return int(self._call("POST", "/oauth/expire", {"provider": provider})["expired"])
