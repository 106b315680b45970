"""How each fault kind answers a request, at the raw ASGI level.

Faults run before routing, on the server's own ``send``, because a dropped
connection must close the socket without a response: an exception in the app
would make the server answer 500 instead, which is a different failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, timedelta
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from starlette.types import Send

if TYPE_CHECKING:
    from ._state import Fault, SimulatorState

__all__ = ["apply_fault", "drop_connection", "interruptible_sleep", "send_json"]

#: The body of a "malformed" response: a 200 that is not valid JSON.
MALFORMED_BODY = b'{"items": [{"id": "rec_1", "version": 1,'
_POLL = 0.05


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    raw: bytes | None = None,
) -> None:
    """Send a complete JSON (or ``raw``) response."""
    body = raw if raw is not None else json.dumps(payload, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def drop_connection(send: Send) -> bool:
    """Close the client connection without a response; False if the server offers no way.

    uvicorn's ``send`` is a bound method of its per-request cycle, which holds the
    transport; marking the cycle disconnected stops uvicorn from writing a 500.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(transport, "close"):
        return False
    if cycle is not None and hasattr(cycle, "disconnected"):
        cycle.disconnected = True
    transport.close()
    return True


async def interruptible_sleep(state: SimulatorState, seconds: float) -> bool:
    """Sleep up to ``seconds``; return False early when faults are cleared or the server stops."""
    generation = state.hang_generation
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, _POLL))
        if state.closing or state.hang_generation != generation:
            return False


def _dialect_rate_limit(fault: Fault, rest: str) -> tuple[int, Any] | None:
    """A ``rate_limit`` on a dialect's path, as that API answers it (status, body), or None.

    Salesforce (``policy="REQUEST_LIMIT_EXCEEDED"``): 403
    ``[{"errorCode": "REQUEST_LIMIT_EXCEEDED"}]``
    (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm);
    HubSpot: 429 whose ``policyName`` names the limit
    (https://developers.hubspot.com/docs/api/usage-details).
    """
    if rest.startswith("services/data/"):
        if fault.policy != "REQUEST_LIMIT_EXCEEDED":
            return None
        message = "TotalRequests Limit exceeded."
        return 403, [{"message": message, "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    if rest.startswith("crm/"):
        policy = fault.policy if fault.policy in ("DAILY",) else "TEN_SECONDLY_ROLLING"
        return 429, {
            "status": "error",
            "message": f"You have reached your {policy.lower().replace('_', ' ')} limit.",
            "errorType": "RATE_LIMIT",
            "policyName": policy,
        }
    return None


async def apply_fault(
    fault: Fault, state: SimulatorState, endpoint: str, send: Send, rest: str = ""
) -> None:
    """Answer a request the way ``fault`` says (``rest``: the path after ``/p/{provider}/``)."""
    kind = fault.kind
    if kind == "drop":
        if drop_connection(send):
            # Let the transport's connection_lost run before the app returns.
            await asyncio.sleep(0)
            return
        raise ConnectionResetError("simulated dropped connection")
    if kind == "timeout":
        await interruptible_sleep(state, fault.seconds)
        await send_json(send, fault.status, {"error": "simulated_timeout"})
        return
    if kind == "malformed":
        await send_json(send, 200, None, raw=MALFORMED_BODY)
        return
    headers: list[tuple[bytes, bytes]] = []
    if fault.retry_after is not None:
        headers.append((b"retry-after", _retry_after(fault, state).encode()))
    answer: tuple[int, Any]
    if kind == "rate_limit":
        generic = {"error": "rate_limited", "retry_after": fault.retry_after}
        answer = _dialect_rate_limit(fault, rest) or (fault.status, generic)
    elif kind == "outage" and endpoint == "health":
        answer = (fault.status, {"status": "outage"})
    else:
        error = "outage" if kind == "outage" else "simulated_error"
        answer = (fault.status, {"error": error, "status": fault.status})
    await send_json(send, answer[0], answer[1], headers)


def _retry_after(fault: Fault, state: SimulatorState) -> str:
    assert fault.retry_after is not None
    if fault.retry_after_format == "date":
        when = (state.now() + timedelta(seconds=fault.retry_after)).astimezone(UTC)
        # HTTP-dates have whole seconds: round up so the client never waits too little.
        if when.microsecond:
            when = when.replace(microsecond=0) + timedelta(seconds=1)
        return format_datetime(when, usegmt=True)
    seconds = fault.retry_after
    return str(int(seconds)) if seconds == int(seconds) else f"{seconds:g}"
