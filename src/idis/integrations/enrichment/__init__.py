"""Deferred enrichment, stale-data defects, CRM sync status and impact (RB-09).

What a host uses:

* :class:`Enricher` / :class:`AsyncEnricher`: the sync and async faces of one
  enrichment flow (primary → fallbacks → stale cache → deferral with a defect),
  answering an :class:`EnrichmentResult`;
* :class:`AsyncDeferredEnrichmentWorker` (an asyncio task, with an
  ``on_refreshed`` callback) and :func:`run_deferred` (the same with
  ``asyncio.run``), which refresh deferred subjects once providers recover;
* :func:`create_stale_defects`, :func:`clear_stale_defects`, :func:`list_defects`
  (RB-09 Containment 3, Recovery 4) and :func:`impact` (RB-09 Triage 5);
* :class:`CrmSyncStatusMixin` and the ``mark_sync_*`` helpers;
* :class:`Defect` and its constants, for the host's own queries.

Private modules: ``_decisions`` (pure decisions), ``_flow`` (the enrichment
flow), ``_enricher`` (its faces), ``_worker``, ``_store`` (every statement),
``_defects``, ``_assessment``, ``_syncstatus``, ``_models``. Names load on first
use so that importing the table models (``db/_models.py``) does not pull in the
gateway.
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
    from ._models import NO_MATCH_RESOLUTION, RECOVERY_RESOLUTION, STALE_ENRICHMENT, Defect
    from ._syncstatus import (
        AsyncSyncStatusDelivery,
        CrmSyncStatusMixin,
        mark_sync_failed,
        mark_sync_pending,
        mark_sync_succeeded,
        sync_status_update,
    )
    from ._worker import AsyncDeferredEnrichmentWorker, RunStats, run_deferred

__all__ = [
    "NO_MATCH_RESOLUTION",
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
    "Enricher",
    "EnrichmentResult",
    "RunStats",
    "SubjectKey",
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
    "._models": ("Defect", "NO_MATCH_RESOLUTION", "RECOVERY_RESOLUTION", "STALE_ENRICHMENT"),
    "._syncstatus": (
        "AsyncSyncStatusDelivery",
        "CrmSyncStatusMixin",
        "mark_sync_failed",
        "mark_sync_pending",
        "mark_sync_succeeded",
        "sync_status_update",
    ),
    "._worker": ("AsyncDeferredEnrichmentWorker", "RunStats", "run_deferred"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
