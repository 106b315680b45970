"""The default delivery strategies: send a leased message through the gateway.

:class:`AsyncGatewayDelivery` (the outbox worker's default strategy) builds
the call with :func:`build_call`:

* ``request`` messages become ``gateway.request(provider, endpoint, method=...,
  path_params=..., params=..., json=..., idempotency_key=key)``;
* ``webhook`` messages become a ``POST`` of the stored body to the provider's
  receiver endpoint, signed with Standard Webhooks headers (``webhook-id``,
  ``webhook-timestamp``, ``webhook-signature``) by the provider's own
  ``outbound_webhook_secret`` (never an inbound ``webhook_secrets`` one), with
  the idempotency key as ``Idempotency-Key`` too.

The gateway supplies the resilience (timeouts, retries on provider faults,
breaker, rate-limit pauses); the outbox supplies persistence and the long
retries. Other kinds go to ``handlers`` (kind -> callable); an unknown kind is
a :class:`~idis.integrations.exceptions.UsageError`, which dead-letters it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._clock import Clock, system_clock
from ..config import Settings
from ..exceptions import UsageError
from ..webhooks._signing import sign_headers
from ._messages import KIND_REQUEST, KIND_WEBHOOK, OutboxMessage

__all__ = ["AsyncGatewayDelivery", "GatewayCall", "build_call"]


@dataclass(frozen=True, slots=True)
class GatewayCall:
    """Arguments of one ``gateway.request`` call."""

    provider: str
    endpoint: str
    kwargs: Mapping[str, Any]


def build_call(message: OutboxMessage, settings: Settings, *, now: float) -> GatewayCall:
    """Turn a leased message into the gateway call that delivers it.

    Args:
        message: The leased message.
        settings: Library settings (the provider's webhook secrets).
        now: Unix time of this attempt (``webhook-timestamp``).

    Raises:
        UsageError: for a kind this strategy does not know or a malformed payload.
        ConfigError: for a webhook to a provider with no outbound webhook secret of its own.
    """
    payload = message.payload
    if message.kind == KIND_REQUEST:
        endpoint = payload.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise UsageError(f"outbox message {message.id}: request payload has no endpoint")
        kwargs: dict[str, Any] = {
            "method": str(payload.get("method") or "POST"),
            "idempotency_key": message.idempotency_key,
        }
        for name in ("path_params", "params", "json"):
            if payload.get(name) is not None:
                kwargs[name] = payload[name]
        return GatewayCall(message.provider, endpoint, kwargs)
    if message.kind == KIND_WEBHOOK:
        body = payload.get("body")
        webhook_id = payload.get("webhook_id")
        if not isinstance(body, str) or not isinstance(webhook_id, str):
            raise UsageError(f"outbox message {message.id}: webhook payload has no body or id")
        raw = body.encode()
        # Its own secret, never an inbound one: a captured delivery must not
        # verify at our receiver (ConfigError, our configuration, when unset).
        secret = settings.checked_outbound_webhook_secret(message.provider)
        headers = sign_headers(secret, raw, msg_id=webhook_id, timestamp=int(now))
        headers["content-type"] = "application/json"
        return GatewayCall(
            message.provider,
            str(payload.get("endpoint") or "webhooks"),
            {
                "method": "POST",
                "content": raw,
                "headers": headers,
                "idempotency_key": message.idempotency_key,
            },
        )
    raise UsageError(
        f"outbox message {message.id}: no delivery strategy for kind {message.kind!r} "
        "(pass handlers={kind: callable} to the delivery strategy)"
    )


class AsyncGatewayDelivery:
    """Deliver messages through an :class:`~idis.integrations.resilience.AsyncGateway`.

    Args:
        gateway: The gateway.
        settings: Library settings (default: the gateway's).
        clock: Time source for ``webhook-timestamp`` (default: the gateway's clock).
        handlers: Delivery coroutine functions for custom kinds.
    """

    def __init__(
        self,
        gateway: Any,
        settings: Settings | None = None,
        *,
        clock: Clock | None = None,
        handlers: Mapping[str, Callable[[OutboxMessage], Awaitable[None]]] | None = None,
    ) -> None:
        self.gateway = gateway
        self.settings = settings or gateway.settings
        self.clock = clock or getattr(gateway, "clock", None) or system_clock
        self.handlers = dict(handlers or {})

    async def __call__(self, message: OutboxMessage) -> Any:
        """Deliver ``message``; return the provider's answer, raise the gateway's error."""
        handler = self.handlers.get(message.kind)
        if handler is not None:
            return await handler(message)
        call = build_call(message, self.settings, now=self.clock.time())
        return await self.gateway.request(call.provider, call.endpoint, **call.kwargs)
