"""The simulator's Google Drive and People Data Labs dialects over its records and faults.

Google Drive (https://developers.google.com/drive/api/reference/rest/v3/changes):
    ``GET /drive/v3/changes/startPageToken``, ``GET /drive/v3/changes?pageToken=``
    (``nextPageToken`` / ``newStartPageToken``; a deletion is a trashed file),
    ``GET /drive/v3/files[/{id}]`` (``q=modifiedTime >= '...'``), ``PATCH
    /drive/v3/files/{id}`` (``appProperties``), ``POST /drive/v3/changes/watch``
    (channels expiring on the simulator's clock), ``POST /drive/v3/channels/stop``;
    errors as Google's ``{"error": {"code", "message", "errors": [{"reason"}]}}``.
    Push is pulled by tests: ``GET /drive/_notifications`` lists the data-less
    notifications (``X-Goog-*`` headers) Drive would have sent to live channels,
    and ``POST /drive/_push`` delivers them (``POST`` to each channel's address);
    ``POST /drive/_silence`` makes every channel stop without a word.
People Data Labs (https://docs.peopledatalabs.com/docs/errors):
    ``GET /v5/person/enrich?pdl_id=|email=|profile=`` answers ``{"status": 200,
    "likelihood", "data"}``, 404 ``not_found`` for a subject whose enrichment was
    never seeded or is flagged ``no_match``, and 402 ``payment_required`` once the
    credits set by ``POST /v5/_credits`` are spent (a 404 costs none);
    ``x-ratelimit-remaining`` and ``x-totallimit-remaining`` on answers.
"""

from __future__ import annotations

import json
import re
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._dialects import google_error, ms_time, provider_route
from ._state import Record, SimulatorState

__all__ = ["extra_routes"]

_Q_SINCE = re.compile(r"modifiedTime >= '([^']+)'")


def _pdl_error(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"status": status, "error": {"type": kind, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _gerror(status: int, reason: str, message: str) -> Response:
    return JSONResponse(google_error(status, reason, message), status)


def _file(record: Record) -> dict[str, Any]:
    return {
        "kind": "drive#file",
        "id": record.id,
        "name": str(record.data.get("name", record.id)),
        "version": str(record.version),
        "modifiedTime": ms_time(record.updated_at),
        "trashed": record.deleted,
        "appProperties": {k: None if v is None else str(v) for k, v in record.data.items()},
    }


@dataclass(slots=True)
class _Channel:
    id: str
    resource_id: str
    token: str
    address: str
    expiration: datetime
    after_seq: int
    messages: int = 0


@dataclass(slots=True)
class _Extra:
    """Per-provider state of these dialects (channels, credits)."""

    channels: dict[str, _Channel] = field(default_factory=dict)
    silenced: bool = False
    credits: int | None = None
    no_match: set[str] = field(default_factory=set)


def extra_routes(sim: SimulatorState, provider_of: Callable[[Request], Any]) -> list[Route]:
    """The Drive and PDL routes."""
    # Keyed by the provider's state object: a reset replaces it, and forgets these too.
    extras: weakref.WeakKeyDictionary[Any, _Extra] = weakref.WeakKeyDictionary()

    def extra(provider: Any) -> _Extra:
        return extras.setdefault(provider, _Extra())

    async def start_token(request: Request) -> Response:
        with sim.lock:
            provider = provider_of(request)
            token = str(provider.event_count())
        return JSONResponse({"kind": "drive#startPageToken", "startPageToken": token})

    async def changes(request: Request) -> Response:
        token = request.query_params.get("pageToken", "")
        try:
            size = int(request.query_params.get("pageSize", "100"))
        except ValueError:
            size = 0
        if not token.isdigit() or not 1 <= size <= 1000:
            return _gerror(400, "invalid", "Invalid Value: pageToken or pageSize")
        with sim.lock:
            provider = provider_of(request)
            page = provider.changes(after=int(token), since=None, limit=size)
            files = {r.id: r for r in provider.records.values()}
        out = []
        for event in page["events"]:
            record = files.get(event["record_id"])
            state = _file(record) if record is not None else None
            if state is not None:
                # The change as it was: its version and time, not the file's latest.
                state.update(
                    version=str(event["version"]),
                    modifiedTime=ms_time(datetime.fromisoformat(event["occurred_at"])),
                    trashed=event["type"] == "record.deleted",
                )
            out.append(
                {
                    "kind": "drive#change",
                    "changeType": "file",
                    "fileId": event["record_id"],
                    "removed": False,
                    "time": ms_time(datetime.fromisoformat(event["occurred_at"])),
                    "file": state,
                }
            )
        answer: dict[str, Any] = {"kind": "drive#changeList", "changes": out}
        key = "nextPageToken" if page["has_more"] else "newStartPageToken"
        answer[key] = str(page["next_after"])
        return JSONResponse(answer)

    async def files(request: Request) -> Response:
        q = request.query_params.get("q", "")
        match = _Q_SINCE.search(q)
        try:
            since = datetime.fromisoformat(match.group(1).replace("Z", "+00:00")) if match else None
            size = int(request.query_params.get("pageSize", "100"))
            offset = int(request.query_params.get("pageToken") or 0)
        except ValueError:
            return _gerror(400, "invalid", "Invalid Value")
        with sim.lock:
            provider = provider_of(request)
            chosen = sorted(
                (r for r in provider.records.values() if since is None or r.updated_at >= since),
                key=lambda r: (r.updated_at, r.id),
            )
        page = chosen[offset : offset + size]
        answer: dict[str, Any] = {"kind": "drive#fileList", "files": [_file(r) for r in page]}
        if offset + size < len(chosen):
            answer["nextPageToken"] = str(offset + size)
        return JSONResponse(answer)

    async def one_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        fields: Any = None
        if request.method == "PATCH":
            try:
                fields = json.loads(await request.body()).get("appProperties")
            except (ValueError, AttributeError):
                fields = None
            if not isinstance(fields, dict):
                return _gerror(400, "badRequest", "body needs an appProperties object")
        with sim.lock:
            provider = provider_of(request)
            found = provider.records.get(file_id)
            if found is not None and fields is not None and not found.deleted:
                found, _, _ = provider.write_record(file_id, {**found.data, **fields})
            body = _file(found) if found is not None else None
        if body is None:
            return _gerror(404, "notFound", f"File not found: {file_id}.")
        return JSONResponse(body)

    async def watch(request: Request) -> Response:
        token = request.query_params.get("pageToken", "")
        try:
            body = json.loads(await request.body())
            expiration = datetime.fromtimestamp(int(body["expiration"]) / 1000, tz=UTC)
            channel = _Channel(
                str(body["id"]),
                uuid.uuid4().hex,
                str(body.get("token", "")),
                str(body["address"]),
                expiration,
                int(token),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return _gerror(400, "invalid", "Invalid channel or pageToken")
        with sim.lock:
            extra(provider_of(request)).channels[channel.id] = channel
        return JSONResponse(
            {
                "kind": "api#channel",
                "id": channel.id,
                "resourceId": channel.resource_id,
                "resourceUri": "https://www.googleapis.com/drive/v3/changes",
                "token": channel.token,
                "expiration": str(int(expiration.timestamp() * 1000)),
            }
        )

    async def stop(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            channel_id = str(body["id"])
        except (ValueError, KeyError, TypeError):
            return _gerror(400, "invalid", "Invalid channel")
        with sim.lock:
            gone = extra(provider_of(request)).channels.pop(channel_id, None)
        if gone is None:
            return _gerror(404, "notFound", f"Channel '{channel_id}' not found")
        return Response(status_code=204)

    def pending(request: Request) -> list[tuple[str, dict[str, str]]]:
        """(channel address, headers) of what Drive would have pushed since the last call."""
        sent: list[tuple[str, dict[str, str]]] = []
        with sim.lock:
            provider = provider_of(request)
            state = extra(provider)
            now = sim.now()
            last = provider.event_count()
            for channel in list(state.channels.values()):
                if channel.expiration <= now:
                    del state.channels[channel.id]  # Drive drops it without a word
                    continue
                if state.silenced:
                    continue
                base = {
                    "X-Goog-Channel-ID": channel.id,
                    "X-Goog-Channel-Token": channel.token,
                    "X-Goog-Channel-Expiration": channel.expiration.strftime(
                        "%a, %d %b %Y %H:%M:%S GMT"
                    ),
                    "X-Goog-Resource-ID": channel.resource_id,
                    "X-Goog-Resource-URI": "https://www.googleapis.com/drive/v3/changes",
                }
                # A new channel's first message is "sync"; then one "change" per call with news.
                kinds = [] if channel.messages else ["sync"]
                if last > channel.after_seq:
                    channel.after_seq = last
                    kinds.append("change")
                for kind in kinds:
                    channel.messages += 1
                    number = str(channel.messages)
                    headers = {"X-Goog-Resource-State": kind, "X-Goog-Message-Number": number}
                    sent.append((channel.address, base | headers))
        return sent

    async def notifications(request: Request) -> Response:
        """What Drive would have pushed since the last call (headers only)."""
        return JSONResponse({"notifications": [headers for _, headers in pending(request)]})

    async def push(request: Request) -> Response:
        """Deliver what Drive would have pushed since the last call: a data-less ``POST`` of
        each notification to its channel's address (one attempt each), answering the
        statuses. Drive's own delivery retries 5xx with backoff; call this again for that."""
        from .._http import httpx

        delivered: list[dict[str, Any]] = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0), trust_env=False) as client:
            for address, headers in pending(request):
                try:
                    answer = await client.post(address, content=b"", headers=headers)
                    status: int | None = answer.status_code
                except httpx.HTTPError:
                    status = None
                delivered.append(
                    {
                        "channel": headers["X-Goog-Channel-ID"],
                        "state": headers["X-Goog-Resource-State"],
                        "message": headers["X-Goog-Message-Number"],
                        "status": status,
                    }
                )
        return JSONResponse({"pushed": delivered})

    async def silence(request: Request) -> Response:
        with sim.lock:
            extra(provider_of(request)).silenced = request.query_params.get("on", "true") == "true"
        return Response(status_code=204)

    # ------------------------------------------------------------------ PDL

    def pdl_headers(state: _Extra) -> dict[str, str]:
        headers = {
            "x-ratelimit-remaining": json.dumps({"minute": 99}),
            "x-ratelimit-limit": json.dumps({"minute": 100}),
        }
        if state.credits is not None:
            headers["x-totallimit-remaining"] = str(state.credits)
        return headers

    async def pdl_enrich(request: Request) -> Response:
        subject = next(
            (
                request.query_params[k]
                for k in ("pdl_id", "email", "profile")
                if k in request.query_params
            ),
            None,
        )
        if not request.headers.get("x-api-key", "").strip():
            # PDL refuses every call without its key (X-Api-Key), whatever else it carries.
            return _pdl_error(401, "invalid_auth", "Invalid API key")
        if not subject:
            return _pdl_error(400, "invalid_request_error", "no identifier")
        with sim.lock:
            provider = provider_of(request)
            state = extra(provider)
            record = provider.records.get(subject)
            matched = record is not None and not record.deleted and subject not in state.no_match
            if matched and state.credits is not None:
                if state.credits <= 0:
                    message = "You have hit your account maximum"
                    return _pdl_error(402, "payment_required", message, pdl_headers(state))
                state.credits -= 1
            headers = pdl_headers(state)
        if not matched or record is None:
            message = "No records were found matching your request"
            return _pdl_error(404, "not_found", message, headers)
        data = {"id": record.id, **record.data}
        return JSONResponse({"status": 200, "likelihood": 8, "data": data}, headers=headers)

    async def pdl_control(request: Request) -> Response:
        body = json.loads(await request.body() or b"{}")
        with sim.lock:
            state = extra(provider_of(request))
            if "credits" in body:
                state.credits = None if body["credits"] is None else int(body["credits"])
            state.no_match.update(str(s) for s in body.get("no_match", ()))
        return Response(status_code=204)

    return [
        provider_route("drive/v3/changes/startPageToken", "changes", start_token),
        provider_route("drive/v3/changes/watch", "changes", watch, "POST"),
        provider_route("drive/v3/changes", "changes", changes),
        provider_route("drive/v3/channels/stop", "changes", stop, "POST"),
        provider_route("drive/v3/files", "records", files),
        provider_route("drive/v3/files/{file_id}", "record", one_file, "GET PATCH"),
        provider_route("drive/_notifications", None, notifications),
        provider_route("drive/_push", None, push, "POST"),
        provider_route("drive/_silence", None, silence, "POST"),
        provider_route("v5/person/enrich", "enrich", pdl_enrich),
        provider_route("v5/_control", None, pdl_control, "POST"),
    ]
