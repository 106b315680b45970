"""Replay-based reconciliation, the sync timeline, and sync verification (RB-09 Recovery 3).

* :func:`reconcile` (asyncio: :func:`reconcile_async`, the same flow) pages through a provider's
  replay API, skips the events webhook, poll or an earlier replay already
  applied, applies the missing ones through the host's handlers, audits each
  one (``source='replay'``) and checkpoints every page so a killed run
  resumes where it stopped.
* :func:`resync` is the fallback when the window is older than the provider
  retains: it fetches the current records and applies those that changed.
* :func:`gaps` and :func:`timeline` show where no channel covered the sync
  timeline; a completed reconcile records replay coverage so its gaps close.
* :func:`verify_sync` compares a random, seedable sample of the host's records
  (a :class:`HostRecordSource`, else the inbox's ledger) and of the provider's
  across the two, and can repair either side.

Submodules load on first use so that ``db/models.py`` can import the table
without pulling in the provider client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._db import ReconcileBusy
    from ._fallback import ResyncSummary, resync
    from ._host import HostRecordSource, load_host_records
    from ._ledger import AppliedRecordSource, LocalRecordSource
    from ._logic import FieldDiff, Gap, LocalRecord, RecordComparison, data_hash
    from ._replay import (
        AsyncReplaySource,
        EventFailure,
        ReconcileInterrupted,
        ReconcileSummary,
        ReplaySource,
        reconcile,
        reconcile_async,
    )
    from ._sources import StaticReplaySource
    from ._sync_timeline import TimelineReport, gaps, timeline
    from ._verify import Repair, VerifyReport, verify_sync

__all__ = [
    "AppliedRecordSource",
    "AsyncReplaySource",
    "EventFailure",
    "FieldDiff",
    "Gap",
    "HostRecordSource",
    "LocalRecord",
    "LocalRecordSource",
    "ReconcileBusy",
    "ReconcileInterrupted",
    "ReconcileSummary",
    "RecordComparison",
    "Repair",
    "ReplaySource",
    "ResyncSummary",
    "StaticReplaySource",
    "TimelineReport",
    "VerifyReport",
    "data_hash",
    "gaps",
    "load_host_records",
    "reconcile",
    "reconcile_async",
    "resync",
    "timeline",
    "verify_sync",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._db": ("ReconcileBusy",),
    "._fallback": ("ResyncSummary", "resync"),
    "._host": ("HostRecordSource", "load_host_records"),
    "._ledger": ("AppliedRecordSource", "LocalRecordSource"),
    "._logic": ("FieldDiff", "Gap", "LocalRecord", "RecordComparison", "data_hash"),
    "._replay": (
        "AsyncReplaySource",
        "EventFailure",
        "ReconcileInterrupted",
        "ReconcileSummary",
        "ReplaySource",
        "reconcile",
        "reconcile_async",
    ),
    "._sources": ("StaticReplaySource",),
    "._sync_timeline": ("TimelineReport", "gaps", "timeline"),
    "._verify": ("Repair", "VerifyReport", "verify_sync"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
