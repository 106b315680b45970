"""The persistent retry outbox: every delivery we owe a provider, crash-safe, exactly once.

Enqueue inside your own transaction, run workers, and the provider sees each
message applied once, in order per ordering key, whatever fails in between::

    from idis.integrations.outbox import NewMessage, enqueue, OutboxWorker

    with session.begin():
        deal.status = "won"                                   # your business change
        enqueue(session, NewMessage.request(
            "crm_provider", "record", method="PUT", path_params={"id": deal.id},
            json={"data": {...}}, idempotency_key=f"deal-{deal.id}-v{deal.version}",
            ordering_key=deal.id))

    OutboxWorker(engine, settings, gateway=gateway).start()   # or `idis-integrations outbox work`

See ``docs/outbox.md`` for the guarantees and the failure modes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager, not lazy: ``enqueue`` is also a submodule's name, and importing that
# submodule would otherwise set the package attribute to the module. The
# module is light (messages, models, statements).
from ._enqueue import enqueue, enqueue_async, enqueue_many, enqueue_many_async

if TYPE_CHECKING:
    from ._admin import (
        MessageView,
        OutboxSummary,
        RequeueResult,
        list_messages,
        outbox_summary,
        outbox_summary_async,
        purge_delivered,
        queue_webhook_retries,
        refresh_gauges,
        status_facts,
    )
    from ._delivery import AsyncGatewayDelivery, GatewayDelivery, build_call
    from ._messages import KIND_REQUEST, KIND_WEBHOOK, NewMessage, OutboxMessage
    from ._models import DEAD, DELIVERED, IN_FLIGHT, PENDING, OutboxMessageRow, WebhookReceiverRow
    from ._policy import Action, Disposition, backoff_delay, decide
    from ._worker import AsyncDeliver, AsyncOutboxWorker, BatchResult, Deliver, OutboxWorker

__all__ = [
    "DEAD",
    "DELIVERED",
    "IN_FLIGHT",
    "KIND_REQUEST",
    "KIND_WEBHOOK",
    "PENDING",
    "Action",
    "AsyncDeliver",
    "AsyncGatewayDelivery",
    "AsyncOutboxWorker",
    "BatchResult",
    "Deliver",
    "Disposition",
    "GatewayDelivery",
    "MessageView",
    "NewMessage",
    "OutboxMessage",
    "OutboxMessageRow",
    "OutboxSummary",
    "OutboxWorker",
    "RequeueResult",
    "WebhookReceiverRow",
    "backoff_delay",
    "build_call",
    "decide",
    "enqueue",
    "enqueue_async",
    "enqueue_many",
    "enqueue_many_async",
    "list_messages",
    "outbox_summary",
    "outbox_summary_async",
    "purge_delivered",
    "queue_webhook_retries",
    "refresh_gauges",
    "status_facts",
]

# Submodules load on first use: db/models.py imports .models, and that must not
# pull in the gateway, the worker or the CLI.
_LAZY: dict[str, str] = {
    "Action": "._policy",
    "AsyncDeliver": "._worker",
    "AsyncGatewayDelivery": "._delivery",
    "AsyncOutboxWorker": "._worker",
    "BatchResult": "._worker",
    "DEAD": "._models",
    "DELIVERED": "._models",
    "Deliver": "._worker",
    "Disposition": "._policy",
    "GatewayDelivery": "._delivery",
    "IN_FLIGHT": "._models",
    "KIND_REQUEST": "._messages",
    "KIND_WEBHOOK": "._messages",
    "MessageView": "._admin",
    "NewMessage": "._messages",
    "OutboxMessage": "._messages",
    "OutboxMessageRow": "._models",
    "OutboxSummary": "._admin",
    "OutboxWorker": "._worker",
    "PENDING": "._models",
    "RequeueResult": "._admin",
    "WebhookReceiverRow": "._models",
    "backoff_delay": "._policy",
    "build_call": "._delivery",
    "decide": "._policy",
    "list_messages": "._admin",
    "outbox_summary": "._admin",
    "outbox_summary_async": "._admin",
    "purge_delivered": "._admin",
    "queue_webhook_retries": "._admin",
    "refresh_gauges": "._admin",
    "status_facts": "._admin",
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
