"""SIGTERM and SIGINT as a graceful stop, for the long-running commands and workers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call ``stop`` on the running loop; the previous handling comes back after.

    Only the main thread of a Unix event loop can take signals; elsewhere (a worker
    run from a thread, a Windows loop) this changes nothing, and stopping is the
    caller's business.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    installed: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover  # Windows event loops
            continue
        installed[sig] = previous
    try:
        yield
    finally:
        for sig, previous in installed.items():
            loop.remove_signal_handler(sig)
            # The loop resets to the default action; a handler the host had comes back.
            if previous is not None:
                signal.signal(sig, previous)
