"""Replay-based reconciliation, the sync timeline, and sync verification (RB-09 Recovery 3).

* :func:`reconcile` (asyncio: :func:`areconcile`) pages through a provider's
  replay API, skips the events webhook, poll or an earlier replay already
  applied, applies the missing ones through the host's handlers, audits each
  one (``source='replay'``) and checkpoints every page so a killed run
  resumes where it stopped.
* :func:`resync` is the fallback when the window is older than the provider
  retains: it fetches the current records and applies those that changed.
* :func:`gaps` and :func:`timeline` show where no channel covered the sync
  timeline; a completed reconcile records replay coverage so its gaps close.
* :func:`verify_sync` compares a random, seedable sample of local records
  with the provider's copies and can repair the ones that differ.

Submodules load on first use so that ``db/models.py`` can import the table
without pulling in the provider client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._db import ReconcileBusy
    from ._fallback import ResyncSummary, resync
    from ._ledger import AppliedRecordSource, LocalRecordSource
    from ._logic import FieldDiff, Gap, LocalRecord, RecordComparison, data_hash
    from ._replay import (
        AsyncReplaySource,
        EventFailure,
        ReconcileInterrupted,
        ReconcileSummary,
        ReplaySource,
        areconcile,
        reconcile,
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
    "areconcile",
    "data_hash",
    "gaps",
    "reconcile",
    "resync",
    "timeline",
    "verify_sync",
]

_LAZY: dict[str, str] = {
    "ReconcileBusy": "._db",
    "TimelineReport": "._sync_timeline",
    "gaps": "._sync_timeline",
    "timeline": "._sync_timeline",
    "AppliedRecordSource": "._ledger",
    "LocalRecordSource": "._ledger",
    "FieldDiff": "._logic",
    "Gap": "._logic",
    "LocalRecord": "._logic",
    "RecordComparison": "._logic",
    "data_hash": "._logic",
    "AsyncReplaySource": "._replay",
    "EventFailure": "._replay",
    "areconcile": "._replay",
    "ReconcileInterrupted": "._replay",
    "ReconcileSummary": "._replay",
    "ReplaySource": "._replay",
    "reconcile": "._replay",
    "ResyncSummary": "._fallback",
    "resync": "._fallback",
    "StaticReplaySource": "._sources",
    "Repair": "._verify",
    "VerifyReport": "._verify",
    "verify_sync": "._verify",
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
