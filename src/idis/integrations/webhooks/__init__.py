"""Inbound webhooks: verification (Standard Webhooks and pluggable HMAC schemes) and the receiver.

* :mod:`.signing`: the one Standard Webhooks HMAC implementation (sign and check),
  shared with the outbox's outbound webhooks.
* :mod:`.verify`: verification schemes, body limits and strict JSON.
* :mod:`.receiver`: framework-free ``handle()`` and an ASGI app for Starlette/FastAPI.

Submodules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._receiver import AsyncWebhookReceiver, WebhookReceiver, WebhookResult
    from ._verify import (
        HmacScheme,
        StandardWebhooksScheme,
        VerificationScheme,
        VerifiedWebhook,
        parse_json_strict,
    )

__all__ = [
    "AsyncWebhookReceiver",
    "HmacScheme",
    "StandardWebhooksScheme",
    "VerificationScheme",
    "VerifiedWebhook",
    "WebhookReceiver",
    "WebhookResult",
    "parse_json_strict",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._receiver": ("AsyncWebhookReceiver", "WebhookReceiver", "WebhookResult"),
    "._verify": (
        "HmacScheme",
        "StandardWebhooksScheme",
        "VerificationScheme",
        "VerifiedWebhook",
        "parse_json_strict",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
