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
    from .fallback import ResyncSummary, resync
    from .ledger import AppliedRecordSource, LocalRecordSource
    from .logic import FieldDiff, Gap, LocalRecord, RecordComparison, data_hash
    from .replay import (
        AsyncReplaySource,
        EventFailure,
        ReconcileInterrupted,
        ReconcileSummary,
        ReplaySource,
        areconcile,
        reconcile,
    )
    from .sources import StaticReplaySource
    from .sync_timeline import TimelineReport, gaps, timeline
    from .verify import Repair, VerifyReport, verify_sync

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
    "TimelineReport": ".sync_timeline",
    "gaps": ".sync_timeline",
    "timeline": ".sync_timeline",
    "AppliedRecordSource": ".ledger",
    "LocalRecordSource": ".ledger",
    "FieldDiff": ".logic",
    "Gap": ".logic",
    "LocalRecord": ".logic",
    "RecordComparison": ".logic",
    "data_hash": ".logic",
    "AsyncReplaySource": ".replay",
    "EventFailure": ".replay",
    "areconcile": ".replay",
    "ReconcileInterrupted": ".replay",
    "ReconcileSummary": ".replay",
    "ReplaySource": ".replay",
    "reconcile": ".replay",
    "ResyncSummary": ".fallback",
    "resync": ".fallback",
    "StaticReplaySource": ".sources",
    "Repair": ".verify",
    "VerifyReport": ".verify",
    "verify_sync": ".verify",
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
