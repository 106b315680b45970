"""Standard Webhooks, both ways: the simulator's outbound emitter and its inbound receiver.

Outbound: each change event of a provider with a registered target is POSTed
as ``{"type", "timestamp", "data": event}`` with the headers ``webhook-id``
(the event id), ``webhook-timestamp`` (simulated Unix seconds) and
``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``
under each configured ``whsec_`` secret, space-separated). A background
task per provider delivers in order, retrying 5xx, 429 and connection errors
a few times like real providers do; the delivery mode (deliver, stop, delay,
duplicate, reorder, corrupt) is taken when the event happens.

HubSpot shape (``format="hubspot"`` on the target, for a provider the library
reads with ``IDIS_PROVIDER_<NAME>_API=hubspot``): the queued events go out as
one JSON array per request (up to :data:`HUBSPOT_BATCH`), each change as
HubSpot describes its webhook events (``eventId``, ``subscriptionId``,
``portalId``, ``appId``, ``occurredAt`` in ms, ``subscriptionType`` such as
``deal.propertyChange``, ``attemptNumber``, ``objectId``, ``propertyName``,
``propertyValue``, ``changeSource``; an update becomes one ``propertyChange``
per property, in property-name order), signed with ``X-HubSpot-Signature-v3``
(base64 HMAC-SHA256 of method + URL + body + ``X-HubSpot-Request-Timestamp``
in ms, keyed by the target secret's text as the app's client secret):
https://developers.hubspot.com/docs/api/webhooks and
https://developers.hubspot.com/docs/api/webhooks/validating-requests.

Inbound: ``POST /p/{provider}/webhooks/inbound`` verifies the same scheme
against the provider's receiver secrets, dedupes by ``webhook-id`` and counts
receipts and applications per id; it can be told to answer 410 or to fail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._http import httpx
from ._oauth import _sim
from ._state import Delivery, ProviderState, format_time

if TYPE_CHECKING:
    from ._state import SimulatorState

__all__ = [
    "WebhookEmitter",
    "inbound_endpoint",
    "sign",
    "signature_header",
    "verify",
]

#: How long reorder mode waits for more events to shuffle with, in seconds.
_REORDER_GATHER = 0.05
#: Most events in one HubSpot-shaped request (HubSpot sends up to 100).
HUBSPOT_BATCH = 100
_CORRUPTED_KEY = "whsec_" + base64.b64encode(b"corrupted-key").decode()
_HS_SUBSCRIPTIONS = {
    "record.created": "deal.creation",
    "record.updated": "deal.propertyChange",
    "record.deleted": "deal.deletion",
}


def _hs_ms(text: str) -> int:
    moment = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return int(moment.timestamp() * 1000)


def hubspot_events(event: Mapping[str, Any], attempt: int) -> list[dict[str, Any]]:
    """A simulator change event as the HubSpot webhook events it would be (one per property)."""
    seq = int(event["seq"])
    kind = str(event["type"])
    subscription = _HS_SUBSCRIPTIONS.get(kind, "deal." + kind.rpartition(".")[2])
    record_id = str(event["record_id"])
    base: dict[str, Any] = {
        "eventId": seq * 1000,
        "subscriptionId": 1,
        "portalId": event.get("tenant_id"),
        "appId": 1,
        "occurredAt": _hs_ms(event["occurred_at"]),
        "subscriptionType": subscription,
        "attemptNumber": attempt,
        "objectId": int(record_id) if record_id.isdigit() else record_id,
        "changeSource": "CRM",
    }
    if subscription != "deal.propertyChange":
        if subscription == "deal.creation":
            base["changeFlag"] = "NEW"
        return [base]
    data = event.get("data") or {}
    names = sorted(data) or ["hs_lastmodifieddate"]
    out = []
    for i, name in enumerate(names):
        value = data.get(name, base["occurredAt"])
        out.append(
            {
                **base,
                "eventId": seq * 1000 + i,
                "propertyName": name,
                "propertyValue": None if value is None else str(value),
            }
        )
    return out


def sign_hubspot_v3(secret: str, method: str, url: str, body: bytes, timestamp: str) -> str:
    """``X-HubSpot-Signature-v3``: base64 HMAC-SHA256 of method + URL + body + timestamp.

    The simulator's own implementation (not the library's), so a test of one against
    the other can fail.
    """
    source = method.encode() + url.encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<signature>`` entry for ``secret`` (a ``whsec_`` key)."""
    payload = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), payload, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one entry per secret."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets)


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    tolerance: float | None,
) -> tuple[int, str] | None:
    """Check a Standard Webhooks request; return (status, reason) when rejected, else None."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    if not msg_id or not stamp or not signature:
        return 400, "missing_headers"
    try:
        timestamp = int(stamp)
    except ValueError:
        return 400, "bad_timestamp"
    if tolerance is not None and abs(now.timestamp() - timestamp) > tolerance:
        return 401, "stale_timestamp"
    offered = []
    for entry in signature.split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and value:
            try:
                offered.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                continue
    payload = f"{msg_id}.{timestamp}.".encode() + body
    for secret in secrets:
        expected = hmac.new(_key(secret), payload, hashlib.sha256).digest()
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return None
    return 401, "bad_signature"


def _standard_request(
    batch: list[Delivery], _attempt: int, _url: str, secrets: Sequence[str], now: datetime
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a Standard Webhooks request for one event."""
    event = batch[0].event
    msg_id = str(event["id"])
    body = json.dumps(
        {"type": event["type"], "timestamp": event["occurred_at"], "data": event},
        separators=(",", ":"),
    ).encode()
    timestamp = int(now.timestamp())
    if batch[0].mode == "corrupt":
        # Signed with the right scheme but a key nobody holds.
        signature = sign(_CORRUPTED_KEY, msg_id, timestamp, body)
    else:
        signature = signature_header(secrets, msg_id, timestamp, body)
    return body, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "user-agent": "idis-simulator-webhooks",
    }


def _hubspot_request(
    batch: list[Delivery], attempt: int, url: str, secrets: Sequence[str], now: datetime
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one HubSpot request for ``batch`` (its ``attemptNumber`` in it)."""
    events = [e for d in batch for e in hubspot_events(d.event, attempt)]
    body = json.dumps(events, separators=(",", ":")).encode()
    stamp = str(int(now.timestamp() * 1000))
    key = "not-the-client-secret" if batch[0].mode == "corrupt" else secrets[0]
    return body, {
        "content-type": "application/json",
        "x-hubspot-signature-v3": sign_hubspot_v3(key, "POST", url, body, stamp),
        "x-hubspot-request-timestamp": stamp,
        "user-agent": "idis-simulator-webhooks (HubSpot)",
    }


# --------------------------------------------------------------------------- outbound


class WebhookEmitter:
    """Delivers queued webhooks from the server's event loop, one worker per provider."""

    def __init__(self, state: SimulatorState) -> None:
        self._state = state
        self._client: httpx.AsyncClient | None = None
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        # Keyed by the provider object: a reset replaces it under the same name.
        self._workers: dict[ProviderState, asyncio.Task[None]] = {}

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran on a loop."""
        return self._main is not None

    def start(self) -> None:
        """Start delivering on the running event loop."""
        if self._main is not None:
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # trust_env=False: a proxy from the environment must not intercept test traffic.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=32), trust_env=False
        )
        wake = self._wake

        def wakeup() -> None:
            # Called from any thread that changed the state.
            loop.call_soon_threadsafe(wake.set)

        self._main = loop.create_task(self._run(), name="simulator-webhooks")
        self._state.set_wakeup(wakeup)

    async def stop(self) -> None:
        """Stop delivering and close the HTTP client."""
        self._state.set_wakeup(None)
        tasks = [t for t in (self._main, *self._workers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()
        self._main = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            live = self._state.all_providers()
            for gone in set(self._workers) - set(live):
                # The provider was reset away: its queued deliveries go with it.
                self._workers.pop(gone).cancel()
            for provider in live:
                if provider in self._workers:
                    continue
                with self._state.lock:
                    busy = bool(provider.webhooks.queue)
                if busy:
                    self._workers[provider] = asyncio.create_task(self._worker(provider))

    def _take(self, provider: ProviderState, hubspot: bool) -> list[Delivery]:
        config = provider.webhooks
        first = config.queue.popleft()
        batch = [first]
        if first.mode == "reorder":
            while config.queue and len(batch) < config.reorder_batch:
                if config.queue[0].mode != "reorder":
                    break
                batch.append(config.queue.popleft())
            if len(batch) > 1:
                original = list(batch)
                self._state.reorder_rng.shuffle(batch)
                if batch == original:
                    batch.reverse()
                config.reordered_batches += 1
        # One HubSpot request carries the queued deliveries of the same mode too.
        while hubspot and config.queue and len(batch) < HUBSPOT_BATCH:
            if config.queue[0].mode != first.mode:
                break
            batch.append(config.queue.popleft())
        config.in_flight += len(batch)
        return batch

    async def _worker(self, provider: ProviderState) -> None:
        state = self._state
        config = provider.webhooks
        try:
            while True:
                with state.lock:
                    if not config.queue:
                        # Synchronous with the check: a later enqueue wakes _run,
                        # which then starts a fresh worker.
                        self._workers.pop(provider, None)
                        return
                    gather = (
                        config.queue[0].mode == "reorder"
                        and len(config.queue) < config.reorder_batch
                    )
                if gather:
                    await asyncio.sleep(_REORDER_GATHER)
                with state.lock:
                    hubspot = config.format == "hubspot"
                    batch = self._take(provider, hubspot)
                # A Standard Webhooks request carries one event; a HubSpot one the batch.
                for request in [batch] if hubspot else [[delivery] for delivery in batch]:
                    try:
                        wait = max(d.due for d in request) - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        await self._deliver(provider, request, hubspot)
                    finally:
                        with state.lock:
                            config.in_flight -= len(request)
        except BaseException:
            if self._workers.get(provider) is asyncio.current_task():
                del self._workers[provider]
            raise

    async def _deliver(self, provider: ProviderState, batch: list[Delivery], hubspot: bool) -> None:
        """One request for ``batch``, sent twice in duplicate mode, retried as the senders retry."""
        state = self._state
        with state.lock:
            config = provider.webhooks
            url = config.url
            secrets = config.secrets
            attempts = config.max_attempts
            backoff = config.retry_backoff
            timeout = config.timeout
        if url is None:
            with state.lock:
                config.no_target += len(batch)
            return
        mode = batch[0].mode
        build = _hubspot_request if hubspot else _standard_request
        delivered = False
        for _ in range(2 if mode == "duplicate" else 1):
            for attempt in range(attempts):
                body, headers = build(batch, attempt, url, secrets, state.now())
                ok, retryable = await self._attempt(config, url, body, headers, timeout)
                if ok or not retryable or attempt + 1 >= attempts:
                    break
                with state.lock:
                    config.retries += 1
                await asyncio.sleep(backoff * (2**attempt))
            delivered = delivered or ok
        with state.lock:
            if mode == "duplicate":
                config.duplicated += len(batch)
            if mode == "corrupt":
                config.corrupted += len(batch)
            if delivered:
                config.delivered_events += len(batch)
            else:
                config.failed += len(batch)
                config.failed_ids.extend(str(d.event["id"]) for d in batch)

    async def _attempt(
        self, config: Any, url: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[bool, bool]:
        """One delivery attempt, counted: (delivered, worth retrying).

        A receiver's 5xx, its 429 and a network error are retried, as the real
        senders do; any other refusal is final.
        """
        assert self._client is not None  # started
        with self._state.lock:
            config.attempts += 1
        try:
            response = await self._client.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError:
            return False, True
        if response.is_success:
            with self._state.lock:
                config.delivered += 1
            return True, True
        return False, response.status_code >= 500 or response.status_code == 429


# --------------------------------------------------------------------------- inbound


async def inbound_endpoint(request: Request) -> Response:
    """``POST /p/{provider}/webhooks/inbound``: a Standard Webhooks receiver."""
    sim = _sim(request)
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
    with sim.lock:
        provider = sim.provider(request.path_params["provider"])
        receiver = provider.receiver
        receiver.received += 1
        msg_id = headers.get("webhook-id")
        if msg_id:
            receiver.received_per_id[msg_id] += 1
        if receiver.mode == "gone":
            receiver.rejected["gone"] += 1
            return JSONResponse({"error": "gone"}, status_code=410)
        if receiver.mode == "fail" and provider.receiver_rng.random() < receiver.fail_ratio:
            receiver.rejected["failed"] += 1
            return JSONResponse({"error": "simulated_failure"}, status_code=receiver.fail_status)
        problem = verify(receiver.secrets, headers, body, sim.now(), receiver.tolerance)
        if problem is not None:
            status, reason = problem
            receiver.rejected[reason] += 1
            return JSONResponse({"error": reason}, status_code=status)
        try:
            payload: Any = json.loads(body)
        except ValueError:
            receiver.rejected["malformed_body"] += 1
            return JSONResponse({"error": "malformed_body"}, status_code=400)
        assert msg_id is not None
        if msg_id in receiver.applied_per_id:
            receiver.duplicates += 1
            return JSONResponse({"status": "duplicate", "webhook_id": msg_id})
        receiver.applied_per_id[msg_id] = 1
        receiver.accepted += 1
        receiver.deliveries.append(
            {
                "webhook_id": msg_id,
                "timestamp": headers.get("webhook-timestamp"),
                "received_at": format_time(sim.now()),
                "payload": payload,
            }
        )
    return JSONResponse({"status": "accepted", "webhook_id": msg_id})
