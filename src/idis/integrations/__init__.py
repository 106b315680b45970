"""idis.integrations: keep integrations-service alive and its data whole while providers fail.

The public surface is listed in ``__all__``; everything else is internal.
Heavy modules load on first use, so ``from idis.integrations import check_token``
(RB-09 Triage 3) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Settings
from .exceptions import (
    AuthError,
    CircuitOpen,
    ConfigError,
    IntegrationError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UnknownProviderError,
    UsageError,
)

if TYPE_CHECKING:
    from ._audit import list_audit_events, record_audit
    from .auth._httpx_auth import oauth_auth_factory
    from .auth._rotation import rotate_credentials
    from .auth._status import check_token
    from .auth._tokens import AsyncTokenManager, TokenManager, import_token, refresh_tokens
    from .enrichment import (
        AsyncDeferredEnrichmentWorker,
        AsyncEnricher,
        CrmSyncStatusMixin,
        DeferredEnrichmentWorker,
        Enricher,
        EnrichmentResult,
        TenantImpact,
        clear_stale_defects,
        create_stale_defects,
        impact,
        list_defects,
        mark_sync_failed,
        mark_sync_pending,
        mark_sync_succeeded,
        run_deferred,
    )
    from .outbox import (
        AsyncOutboxWorker,
        NewMessage,
        OutboxWorker,
        enqueue,
        enqueue_async,
        outbox_summary,
        queue_webhook_retries,
    )
    from .reconciliation import (
        ReconcileSummary,
        VerifyReport,
        areconcile,
        gaps,
        reconcile,
        resync,
        timeline,
        verify_sync,
    )
    from .sync import (
        AsyncSyncService,
        HandlerRegistry,
        SyncService,
        apply_event,
        apply_event_async,
        get_registry,
        sync_summary,
    )
    from .webhooks import AsyncWebhookReceiver, WebhookReceiver

__all__ = [
    "AsyncDeferredEnrichmentWorker",
    "AsyncEnricher",
    "AsyncOutboxWorker",
    "AsyncSyncService",
    "AsyncTokenManager",
    "AsyncWebhookReceiver",
    "AuthError",
    "CircuitOpen",
    "ConfigError",
    "CrmSyncStatusMixin",
    "DeferredEnrichmentWorker",
    "Enricher",
    "EnrichmentResult",
    "HandlerRegistry",
    "IntegrationError",
    "NewMessage",
    "OutboxWorker",
    "ProviderError",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "ReconcileSummary",
    "Settings",
    "SyncService",
    "TenantImpact",
    "TokenManager",
    "UnknownProviderError",
    "UsageError",
    "VerifyReport",
    "WebhookReceiver",
    "__version__",
    "apply_event",
    "apply_event_async",
    "areconcile",
    "check_token",
    "clear_stale_defects",
    "create_stale_defects",
    "enqueue",
    "enqueue_async",
    "gaps",
    "get_registry",
    "impact",
    "import_token",
    "list_audit_events",
    "list_defects",
    "mark_sync_failed",
    "mark_sync_pending",
    "mark_sync_succeeded",
    "oauth_auth_factory",
    "outbox_summary",
    "queue_webhook_retries",
    "reconcile",
    "record_audit",
    "refresh_tokens",
    "resync",
    "rotate_credentials",
    "run_deferred",
    "sync_summary",
    "timeline",
    "verify_sync",
]

#: Public name -> module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "AsyncTokenManager": ".auth._tokens",
    "TokenManager": ".auth._tokens",
    "check_token": ".auth._status",
    "import_token": ".auth._tokens",
    "oauth_auth_factory": ".auth._httpx_auth",
    "refresh_tokens": ".auth._tokens",
    "rotate_credentials": ".auth._rotation",
    "list_audit_events": "._audit",
    "ReconcileSummary": ".reconciliation",
    "VerifyReport": ".reconciliation",
    "areconcile": ".reconciliation",
    "gaps": ".reconciliation",
    "reconcile": ".reconciliation",
    "resync": ".reconciliation",
    "timeline": ".reconciliation",
    "verify_sync": ".reconciliation",
    "AsyncOutboxWorker": ".outbox",
    "NewMessage": ".outbox",
    "OutboxWorker": ".outbox",
    "enqueue": ".outbox",
    "enqueue_async": ".outbox",
    "outbox_summary": ".outbox",
    "queue_webhook_retries": ".outbox",
    "record_audit": "._audit",
    "AsyncDeferredEnrichmentWorker": ".enrichment",
    "AsyncEnricher": ".enrichment",
    "CrmSyncStatusMixin": ".enrichment",
    "DeferredEnrichmentWorker": ".enrichment",
    "Enricher": ".enrichment",
    "EnrichmentResult": ".enrichment",
    "TenantImpact": ".enrichment",
    "clear_stale_defects": ".enrichment",
    "create_stale_defects": ".enrichment",
    "impact": ".enrichment",
    "list_defects": ".enrichment",
    "mark_sync_failed": ".enrichment",
    "mark_sync_pending": ".enrichment",
    "mark_sync_succeeded": ".enrichment",
    "run_deferred": ".enrichment",
    "AsyncSyncService": ".sync",
    "HandlerRegistry": ".sync",
    "SyncService": ".sync",
    "apply_event": ".sync",
    "apply_event_async": ".sync",
    "get_registry": ".sync",
    "sync_summary": ".sync",
    "AsyncWebhookReceiver": ".webhooks",
    "WebhookReceiver": ".webhooks",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("idis-integrations")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
