"""SIGTERM/SIGINT as a graceful stop (``_signals.stop_on_signals``), with real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from types import FrameType

from idis.integrations._signals import stop_on_signals


def test_a_signal_calls_stop_and_the_hosts_handlers_come_back_after() -> None:
    seen: list[int] = []

    def host(signum: int, _frame: FrameType | None) -> None:
        seen.append(signum)

    before = {sig: signal.signal(sig, host) for sig in (signal.SIGTERM, signal.SIGINT)}
    stops: list[str] = []

    async def main() -> None:
        with stop_on_signals(lambda: stops.append("stop")):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                if len(stops) == 2:
                    break
                await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        assert stops == ["stop", "stop"]
        assert seen == []  # the stop took the signals, not the host's handler
        assert signal.getsignal(signal.SIGTERM) is host
        assert signal.getsignal(signal.SIGINT) is host
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_off_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGTERM)
    inside: list[object] = []

    def run() -> None:
        async def main() -> None:
            with stop_on_signals(lambda: None):
                inside.append(signal.getsignal(signal.SIGTERM))

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert inside == [before]
    assert signal.getsignal(signal.SIGTERM) is before
