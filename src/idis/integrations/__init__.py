"""idis.integrations: keep integrations-service alive and its data whole while providers fail.

The public surface is listed in ``__all__``; everything else is internal.
Heavy modules load on first use, so ``from idis.integrations import check_token``
(RB-09 Triage 3) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._lazy import lazy_exports
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
        enqueue,
        enqueue_async,
        outbox_summary,
        queue_webhook_retries,
    )
    from .reconciliation import (
        ReconcileSummary,
        VerifyReport,
        gaps,
        reconcile,
        reconcile_async,
        resync,
        timeline,
        verify_sync,
    )
    from .sync import (
        AsyncSyncService,
        HandlerRegistry,
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
    "Enricher",
    "EnrichmentResult",
    "HandlerRegistry",
    "IntegrationError",
    "NewMessage",
    "ProviderError",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "ReconcileSummary",
    "Settings",
    "TenantImpact",
    "TokenManager",
    "UnknownProviderError",
    "UsageError",
    "VerifyReport",
    "WebhookReceiver",
    "__version__",
    "apply_event",
    "apply_event_async",
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
    "reconcile_async",
    "record_audit",
    "refresh_tokens",
    "resync",
    "rotate_credentials",
    "run_deferred",
    "sync_summary",
    "timeline",
    "verify_sync",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._audit": ("list_audit_events", "record_audit"),
    ".auth._httpx_auth": ("oauth_auth_factory",),
    ".auth._rotation": ("rotate_credentials",),
    ".auth._status": ("check_token",),
    ".auth._tokens": ("AsyncTokenManager", "TokenManager", "import_token", "refresh_tokens"),
    ".enrichment": (
        "AsyncDeferredEnrichmentWorker",
        "AsyncEnricher",
        "CrmSyncStatusMixin",
        "Enricher",
        "EnrichmentResult",
        "TenantImpact",
        "clear_stale_defects",
        "create_stale_defects",
        "impact",
        "list_defects",
        "mark_sync_failed",
        "mark_sync_pending",
        "mark_sync_succeeded",
        "run_deferred",
    ),
    ".outbox": (
        "AsyncOutboxWorker",
        "NewMessage",
        "enqueue",
        "enqueue_async",
        "outbox_summary",
        "queue_webhook_retries",
    ),
    ".reconciliation": (
        "ReconcileSummary",
        "VerifyReport",
        "gaps",
        "reconcile",
        "reconcile_async",
        "resync",
        "timeline",
        "verify_sync",
    ),
    ".sync": (
        "AsyncSyncService",
        "HandlerRegistry",
        "apply_event",
        "apply_event_async",
        "get_registry",
        "sync_summary",
    ),
    ".webhooks": ("AsyncWebhookReceiver", "WebhookReceiver"),
}

_getattr, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("idis-integrations")
    return _getattr(name)
