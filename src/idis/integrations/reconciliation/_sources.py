"""An in-process replay source: the replay API's contract over a list of events.

For benchmarks that must isolate reconciliation from HTTP, and for hosts that
feed events from a provider export. It honours the same contract as the
provider client: pages in ``seq`` order from ``since``, an opaque cursor, and
``ReplayWindowExceeded`` for a ``since`` older than the retention.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .._clock import Clock, system_clock
from ..exceptions import ConfigError
from ._logic import retention_error

__all__ = ["StaticReplayPage", "StaticReplaySource"]


@dataclass(frozen=True, slots=True)
class StaticReplayPage:
    """One page (same shape as ``providers.ReplayPage``)."""

    events: list[Any]
    next_cursor: str | None


class StaticReplaySource:
    """Serve ``events`` (``ProviderEvent``-shaped, any order) as a replay API.

    Args:
        provider: Provider name (for errors).
        events: The events; sorted by ``seq`` here.
        retention: How far back the source serves (None: forever).
        clock: Time source, for the retention check.
    """

    def __init__(
        self,
        provider: str,
        events: Iterable[Any],
        *,
        retention: timedelta | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.provider = provider
        self._events = sorted(events, key=lambda e: e.seq)
        self._times = [e.occurred_at for e in self._events]
        self._retention = retention
        self._clock = clock

    def replay(
        self, since: datetime, *, cursor: str | None = None, limit: int = 500
    ) -> StaticReplayPage:
        """One page from ``since`` (or from ``cursor``).

        Raises:
            ReplayWindowExceeded: ``since`` is older than the retention.
            ConfigError: a cursor this source did not issue.
        """
        now = self._clock.now()
        if self._retention is not None and since < now - self._retention:
            raise retention_error(self.provider, since, self._retention, now=now)
        if cursor is None:
            start = bisect.bisect_left(self._times, since)
        else:
            if not cursor.startswith("i") or not cursor[1:].isdigit():
                raise ConfigError(f"cursor={cursor!r} was not issued by this source")
            start = int(cursor[1:])
        end = min(start + limit, len(self._events))
        return StaticReplayPage(
            self._events[start:end], f"i{end}" if end < len(self._events) else None
        )
