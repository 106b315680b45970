"""The persistent retry outbox: every delivery we owe a provider, crash-safe, exactly once.

Enqueue inside your own transaction, run workers, and the provider sees each
message applied once, in order per ordering key, whatever fails in between::

    from idis.integrations.outbox import NewMessage, enqueue, AsyncOutboxWorker

    with session.begin():
        deal.status = "won"                                   # your business change
        enqueue(session, NewMessage.request(
            "crm_provider", "record", method="PUT", path_params={"id": deal.id},
            json={"data": {...}}, idempotency_key=f"deal-{deal.id}-v{deal.version}",
            ordering_key=deal.id))

    # the worker is async only: a task in your service, or `idis-integrations outbox work`
    AsyncOutboxWorker(async_engine, settings, gateway=async_gateway).start()

See ``docs/outbox.md`` for the guarantees and the failure modes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

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
    from ._delivery import AsyncGatewayDelivery, build_call
    from ._messages import KIND_REQUEST, KIND_WEBHOOK, NewMessage, OutboxMessage
    from ._models import DEAD, DELIVERED, IN_FLIGHT, PENDING, OutboxMessageRow, WebhookReceiverRow
    from ._policy import Action, Disposition, backoff_delay, decide
    from ._worker import AsyncDeliver, AsyncOutboxWorker, BatchResult

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
    "Disposition",
    "MessageView",
    "NewMessage",
    "OutboxMessage",
    "OutboxMessageRow",
    "OutboxSummary",
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

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._admin": (
        "MessageView",
        "OutboxSummary",
        "RequeueResult",
        "list_messages",
        "outbox_summary",
        "outbox_summary_async",
        "purge_delivered",
        "queue_webhook_retries",
        "refresh_gauges",
        "status_facts",
    ),
    "._delivery": ("AsyncGatewayDelivery", "build_call"),
    "._messages": ("KIND_REQUEST", "KIND_WEBHOOK", "NewMessage", "OutboxMessage"),
    "._models": (
        "DEAD",
        "DELIVERED",
        "IN_FLIGHT",
        "OutboxMessageRow",
        "PENDING",
        "WebhookReceiverRow",
    ),
    "._policy": ("Action", "Disposition", "backoff_delay", "decide"),
    "._worker": ("AsyncDeliver", "AsyncOutboxWorker", "BatchResult"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
