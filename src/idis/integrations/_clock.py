"""Time, injectable: every time-based decision and every wait in the library goes through a Clock.

There is one :class:`Clock` protocol for the whole library: every ``clock=``
parameter takes it. Tests and the drill pass a :class:`ManualClock` and move it,
so a two-hour outage or a 30-second breaker reset takes no real time and no
test asserts on wall time. Waits go through the clock too (``sleep`` /
``asleep``), so a manual clock's waits advance it instead of blocking.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "system_clock"]


class Clock(Protocol):
    """Where the library reads time from."""

    def time(self) -> float:
        """Seconds since the epoch (wall time; comparable across processes)."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes backwards (deadlines)."""

    def now(self) -> datetime:
        """Aware UTC datetime."""

    def sleep(self, seconds: float) -> None:
        """Block the calling thread for ``seconds`` (a manual clock advances instead)."""

    async def asleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds`` (a manual clock advances instead)."""


class SystemClock:
    """The real clock."""

    __slots__ = ()

    def time(self) -> float:
        """Seconds since the epoch."""
        return time.time()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def now(self) -> datetime:
        """Current aware UTC datetime."""
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` (never negative)."""
        time.sleep(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """``asyncio.sleep`` (never negative)."""
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


system_clock = SystemClock()


class ManualClock:
    """A clock that only moves when told to (thread-safe).

    ``sleep`` advances it, so it can be passed as the gateway's ``sleep`` and a
    backoff "waits" instantly while the deadline logic still sees time pass.
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or datetime(2026, 1, 19, 9, 0, tzinfo=UTC)
        self._epoch = start.timestamp()
        self._lock = threading.Lock()

    def time(self) -> float:
        """Seconds since the epoch."""
        with self._lock:
            return self._epoch

    def monotonic(self) -> float:
        """Same as :meth:`time`: a manual clock never goes backwards."""
        return self.time()

    def now(self) -> datetime:
        """Current aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    def advance(self, seconds: float | timedelta) -> None:
        """Move time forward."""
        delta = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if delta < 0:
            raise ValueError(f"cannot move a clock backwards by {delta} s")
        with self._lock:
            self._epoch += delta

    def sleep(self, seconds: float) -> None:
        """Advance instead of sleeping."""
        self.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """Advance, then yield to the event loop once so other tasks see the new time."""
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"ManualClock({self.now().isoformat()})"
