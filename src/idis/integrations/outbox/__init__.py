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
from .enqueue import enqueue, enqueue_async, enqueue_many, enqueue_many_async

if TYPE_CHECKING:
    from .admin import (
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
    from .delivery import AsyncGatewayDelivery, GatewayDelivery, build_call
    from .messages import KIND_REQUEST, KIND_WEBHOOK, NewMessage, OutboxMessage
    from .models import DEAD, DELIVERED, IN_FLIGHT, PENDING, OutboxMessageRow, WebhookReceiverRow
    from .policy import Action, Disposition, backoff_delay, decide
    from .worker import AsyncDeliver, AsyncOutboxWorker, BatchResult, Deliver, OutboxWorker

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
    "Action": ".policy",
    "AsyncDeliver": ".worker",
    "AsyncGatewayDelivery": ".delivery",
    "AsyncOutboxWorker": ".worker",
    "BatchResult": ".worker",
    "DEAD": ".models",
    "DELIVERED": ".models",
    "Deliver": ".worker",
    "Disposition": ".policy",
    "GatewayDelivery": ".delivery",
    "IN_FLIGHT": ".models",
    "KIND_REQUEST": ".messages",
    "KIND_WEBHOOK": ".messages",
    "MessageView": ".admin",
    "NewMessage": ".messages",
    "OutboxMessage": ".messages",
    "OutboxMessageRow": ".models",
    "OutboxSummary": ".admin",
    "OutboxWorker": ".worker",
    "PENDING": ".models",
    "RequeueResult": ".admin",
    "WebhookReceiverRow": ".models",
    "backoff_delay": ".policy",
    "build_call": ".delivery",
    "decide": ".policy",
    "list_messages": ".admin",
    "outbox_summary": ".admin",
    "outbox_summary_async": ".admin",
    "purge_delivered": ".admin",
    "queue_webhook_retries": ".admin",
    "refresh_gauges": ".admin",
    "status_facts": ".admin",
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
