"""Deferred enrichment, stale-data defects, CRM sync status and impact (RB-09).

Modules:

* :mod:`.decisions`: the pure decision chain (primary → fallbacks → cache → defer),
  backoff and slow start, and :class:`EnrichmentResult`;
* :mod:`.enricher`: :class:`Enricher` / :class:`AsyncEnricher`, the drivers callers use;
* :mod:`.worker`: :class:`DeferredEnrichmentWorker` / :class:`AsyncDeferredEnrichmentWorker`
  and :func:`run_deferred`, which refresh deferred subjects once providers recover;
* :mod:`.defects`: :func:`create_stale_defects`, :func:`clear_stale_defects`, :func:`list_defects`
  (RB-09 Containment 3, Recovery 4);
* :mod:`.syncstatus`: :class:`CrmSyncStatusMixin` and the ``mark_sync_*`` helpers;
* :mod:`.assessment`: :func:`impact` (RB-09 Triage 5);
* :mod:`.models`: the ``defects``, ``enrichment_cache`` and ``enrichment_requests`` tables.

Names load on first use so that importing the table models (``db/models.py``)
does not pull in the gateway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._assessment import TenantImpact, impact
    from ._decisions import Attempt, EnrichmentResult, SubjectKey
    from ._defects import (
        ClearResult,
        CreateResult,
        DefectRecord,
        clear_stale_defects,
        create_stale_defects,
        list_defects,
    )
    from ._enricher import AsyncEnricher, Enricher
    from ._models import RECOVERY_RESOLUTION, STALE_ENRICHMENT, Defect
    from ._syncstatus import (
        AsyncSyncStatusDelivery,
        CrmSyncStatusMixin,
        SyncStatusDelivery,
        mark_sync_failed,
        mark_sync_pending,
        mark_sync_succeeded,
        sync_status_update,
    )
    from ._worker import (
        AsyncDeferredEnrichmentWorker,
        DeferredEnrichmentWorker,
        RunStats,
        run_deferred,
    )

__all__ = [
    "RECOVERY_RESOLUTION",
    "STALE_ENRICHMENT",
    "AsyncDeferredEnrichmentWorker",
    "AsyncEnricher",
    "AsyncSyncStatusDelivery",
    "Attempt",
    "ClearResult",
    "CreateResult",
    "CrmSyncStatusMixin",
    "Defect",
    "DefectRecord",
    "DeferredEnrichmentWorker",
    "Enricher",
    "EnrichmentResult",
    "RunStats",
    "SubjectKey",
    "SyncStatusDelivery",
    "TenantImpact",
    "clear_stale_defects",
    "create_stale_defects",
    "impact",
    "list_defects",
    "mark_sync_failed",
    "mark_sync_pending",
    "mark_sync_succeeded",
    "run_deferred",
    "sync_status_update",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._assessment": ("TenantImpact", "impact"),
    "._decisions": ("Attempt", "EnrichmentResult", "SubjectKey"),
    "._defects": (
        "ClearResult",
        "CreateResult",
        "DefectRecord",
        "clear_stale_defects",
        "create_stale_defects",
        "list_defects",
    ),
    "._enricher": ("AsyncEnricher", "Enricher"),
    "._models": ("Defect", "RECOVERY_RESOLUTION", "STALE_ENRICHMENT"),
    "._syncstatus": (
        "AsyncSyncStatusDelivery",
        "CrmSyncStatusMixin",
        "SyncStatusDelivery",
        "mark_sync_failed",
        "mark_sync_pending",
        "mark_sync_succeeded",
        "sync_status_update",
    ),
    "._worker": (
        "AsyncDeferredEnrichmentWorker",
        "DeferredEnrichmentWorker",
        "RunStats",
        "run_deferred",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
