"""Bulkheads that admit callers in arrival order (FIFO), for threads and for asyncio tasks.

Neither ``threading.Semaphore`` nor ``asyncio.Semaphore`` is fair: a caller
arriving just as a slot frees can take it before the callers already waiting
(a thread that never sleeps barges past the ones the GIL keeps asleep). Under
64 threads sharing 16 slots that starved some callers for a second while the
median waited a few milliseconds (issue 16: p99 1.04 s against bare httpx's
0.31 s). Here a released slot is *handed* to the longest waiter, never put back
for grabs while someone waits, so every caller is served in the order it came.

A call takes a slot without waiting through :meth:`try_acquire` (the healthy
path, no I/O) and only when none is free waits through ``acquire``. Both
classes are small enough to read in one sitting; the gateway's flow yields an
effect that calls one or the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

__all__ = ["AsyncBulkhead", "ThreadBulkhead"]


class _Slots:
    """Size, free slots and the queue of waiters, as both bulkheads count them."""

    __slots__ = ("_free", "_waiters", "size")

    _waiters: deque[Any]

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"bulkhead size={size!r}: expected at least 1")
        self.size = size
        self._free = size
        self._waiters = deque()

    @property
    def in_flight(self) -> int:
        """Slots held now."""
        return self.size - self._free

    @property
    def waiting(self) -> int:
        """Callers queued for a slot."""
        return len(self._waiters)


class ThreadBulkhead(_Slots):
    """At most ``size`` holders at a time, admitted in arrival order. Thread-safe."""

    __slots__ = ("_lock",)

    # _waiters holds one pre-acquired lock per waiting thread; releasing it hands the slot over.
    _waiters: deque[threading.Lock]

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued before us."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            return False

    def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a slot, behind every earlier caller."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            if timeout <= 0:
                return False
            ticket = threading.Lock()
            ticket.acquire()
            self._waiters.append(ticket)
        if ticket.acquire(timeout=timeout):
            return True
        with self._lock:
            try:
                self._waiters.remove(ticket)
            except ValueError:
                # A release handed us the slot between our timeout and this lock:
                # it is ours, and the deadline logic after us decides what to do.
                return True
        return False

    def release(self) -> None:
        """Give a slot back: to the longest waiter if there is one, else to the pool."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


class AsyncBulkhead(_Slots):
    """At most ``size`` holders at a time, admitted in arrival order. For one event loop."""

    __slots__ = ()

    _waiters: deque[asyncio.Future[bool]]

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is queued before us."""
        if self._free and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a slot, behind every earlier caller.

        Cancellation while waiting gives up the place in the queue, or the slot
        when one was handed over in the same loop turn.
        """
        if self.try_acquire():
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(ticket)
        timer = loop.call_later(timeout, self._expire, ticket)
        try:
            return await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled() and ticket.result():
                self.release()  # handed over, then cancelled: pass it on
            else:
                self._forget(ticket)
            raise
        finally:
            timer.cancel()

    def _expire(self, ticket: asyncio.Future[bool]) -> None:
        if not ticket.done():
            self._forget(ticket)
            ticket.set_result(False)

    def _forget(self, ticket: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(ticket)

    def release(self) -> None:
        """Give a slot back: to the longest waiter if there is one, else to the pool."""
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(True)
                return
        self._free += 1
