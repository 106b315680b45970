"""Inbound sync: the inbox, the poller, the webhook/polling mode controller and the timeline.

* :mod:`.inbox`: :func:`apply_event` applies each provider event exactly once,
  whatever channel brought it, in version order per record, through the
  handlers the host registers in a :class:`HandlerRegistry`.
* :mod:`.poller`: incremental polling with a durable cursor per provider and
  stream, overlapping windows, and one poller per provider across replicas.
* :mod:`.mode`: the mode controller (webhook <-> polling failover and return),
  written as a pure state machine with thin drivers.
* :mod:`.sentinel`: the light check that webhooks deliver every change.
* :mod:`.timeline`: coverage intervals per provider and source.
* :mod:`.service`: :class:`SyncService` / :class:`AsyncSyncService` wire it all
  together for the host.

Submodules load on first use so ``db/models.py`` can import the tables cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._inbox import (
        ApplyOutcome,
        HandlerRegistry,
        apply_event,
        apply_event_async,
        apply_event_outcome,
        get_registry,
        known_event_ids,
    )
    from ._mode import ModeController
    from ._service import AsyncSyncService, SyncService
    from ._state import SyncSummary, sync_summary
    from ._timeline import CoveredInterval, coverage, record_coverage

__all__ = [
    "ApplyOutcome",
    "AsyncSyncService",
    "CoveredInterval",
    "HandlerRegistry",
    "ModeController",
    "SyncService",
    "SyncSummary",
    "apply_event",
    "apply_event_async",
    "apply_event_outcome",
    "coverage",
    "get_registry",
    "known_event_ids",
    "record_coverage",
    "sync_summary",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._inbox": (
        "ApplyOutcome",
        "HandlerRegistry",
        "apply_event",
        "apply_event_async",
        "apply_event_outcome",
        "get_registry",
        "known_event_ids",
    ),
    "._mode": ("ModeController",),
    "._service": ("AsyncSyncService", "SyncService"),
    "._state": ("SyncSummary", "sync_summary"),
    "._timeline": ("CoveredInterval", "coverage", "record_coverage"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
