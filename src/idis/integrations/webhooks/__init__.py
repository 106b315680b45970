"""Inbound webhooks: verification (Standard Webhooks and pluggable HMAC schemes) and the receiver.

* :mod:`.signing`: the one Standard Webhooks HMAC implementation (sign and check),
  shared with the outbox's outbound webhooks.
* :mod:`.verify`: verification schemes, body limits and strict JSON.
* :mod:`.receiver`: framework-free ``handle()`` and an ASGI app for Starlette/FastAPI.

Submodules load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

_LAZY: dict[str, str] = {
    "AsyncWebhookReceiver": "._receiver",
    "WebhookReceiver": "._receiver",
    "WebhookResult": "._receiver",
    "HmacScheme": "._verify",
    "StandardWebhooksScheme": "._verify",
    "VerificationScheme": "._verify",
    "VerifiedWebhook": "._verify",
    "parse_json_strict": "._verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
