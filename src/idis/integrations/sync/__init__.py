"""Inbound sync: the inbox, the poller, the webhook/polling mode controller and the timeline.

* The inbox (:func:`apply_event`, :func:`apply_events`, and their ``_async``
  faces) applies each provider event exactly once, whatever channel brought
  it, in order per record (the adapter's order key), through the handlers the
  host registers in a :class:`HandlerRegistry`.
* :class:`AsyncSyncService` runs the background work for the host: the
  sentinel that checks webhooks keep up, the mode controller (webhook <->
  polling failover and return), and the poller (one leader per provider,
  fenced by an epoch). It is async only; sync programs use ``asyncio.run``.
* :func:`sync_summary` is the state ``status`` and ``sync status`` show;
  :func:`coverage` / :func:`record_coverage` are the sync timeline.

Submodules load on first use so ``db/models.py`` can import the tables cheaply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._inbox import (
        ApplyOutcome,
        ApplyResult,
        HandlerRegistry,
        apply_event,
        apply_event_async,
        apply_event_outcome,
        apply_event_outcome_async,
        apply_events,
        apply_events_async,
        get_registry,
        known_event_ids,
    )
    from ._service import AsyncSyncService
    from ._state import SyncSummary, sync_summary
    from ._timeline import CoveredInterval, coverage, record_coverage

__all__ = [
    "ApplyOutcome",
    "ApplyResult",
    "AsyncSyncService",
    "CoveredInterval",
    "HandlerRegistry",
    "SyncSummary",
    "apply_event",
    "apply_event_async",
    "apply_event_outcome",
    "apply_event_outcome_async",
    "apply_events",
    "apply_events_async",
    "coverage",
    "get_registry",
    "known_event_ids",
    "record_coverage",
    "sync_summary",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._inbox": (
        "ApplyOutcome",
        "ApplyResult",
        "HandlerRegistry",
        "apply_event",
        "apply_event_async",
        "apply_event_outcome",
        "apply_event_outcome_async",
        "apply_events",
        "apply_events_async",
        "get_registry",
        "known_event_ids",
    ),
    "._service": ("AsyncSyncService",),
    "._state": ("SyncSummary", "sync_summary"),
    "._timeline": ("CoveredInterval", "coverage", "record_coverage"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
