"""One backoff policy for every wait the library schedules, and the testing switch that reaches it.

:class:`Backoff` is an immutable value, like urllib3's ``Retry``: it says *how
long* to wait after the n-th consecutive failure, never waits itself. The
gateway's retries, token requests, outbox redeliveries, workers' database
reconnects and deferred-enrichment refreshes all compute their delays here, so
one formula governs them and :func:`set_testing` turns every one of them off.

Delays use "full jitter" by default (uniform in ``[0, cap]``; AWS architecture
blog, "Exponential Backoff And Jitter"), so replicas that failed together do
not retry together. ``jitter="equal"`` keeps half the cap fixed (for waits that
must not collapse to zero, like a worker's reconnect loop), ``"none"`` is
deterministic.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

__all__ = ["Backoff", "TestingMode", "effective_attempts", "set_testing", "testing_mode"]

Jitter = Literal["full", "equal", "none"]

#: Exponents beyond this overflow nothing and change nothing (the cap wins long before).
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff: the cap after failure ``n`` is ``initial * multiplier ** (n - 1)``.

    Attributes are validated on construction; a bad value raises ``ValueError``
    naming it (configuration turns that into a ``ConfigError`` naming the variable).

    Example::

        policy = Backoff(initial=0.2, maximum=10.0)
        policy.delay(1)   # uniform in [0, 0.2]
        policy.delay(4)   # uniform in [0, 1.6]
        policy.cap(20)    # 10.0
    """

    #: Cap of the delay after the first failure, in seconds.
    initial: float = 0.2
    #: Largest cap, in seconds.
    maximum: float = 30.0
    #: Growth of the cap per further failure.
    multiplier: float = 2.0
    #: ``full``: uniform in [0, cap]; ``equal``: cap/2 + uniform in [0, cap/2]; ``none``: cap.
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        if not self.initial >= 0:
            raise ValueError(f"backoff initial={self.initial!r}: expected seconds >= 0")
        if not self.maximum >= self.initial:
            raise ValueError(
                f"backoff maximum={self.maximum!r}: expected seconds >= initial ({self.initial})"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"backoff multiplier={self.multiplier!r}: expected a number >= 1")
        if self.jitter not in ("full", "equal", "none"):
            raise ValueError(f"backoff jitter={self.jitter!r}: expected full, equal or none")

    def cap(self, failures: int) -> float:
        """Upper bound of the delay after ``failures`` consecutive failures (1 = the first)."""
        exponent = min(max(0, failures - 1), _MAX_EXPONENT)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures; 0 in testing mode."""
        if _testing.enabled:
            return 0.0
        cap = self.cap(failures)
        source = rng or random  # jitter, not cryptography
        if self.jitter == "full":
            return source.uniform(0.0, cap)
        if self.jitter == "equal":
            return cap / 2 + source.uniform(0.0, cap / 2)
        return cap


class TestingMode:
    """Process-wide switch for test suites: no backoff anywhere, capped attempts.

    Strictly private state; use :func:`set_testing`.
    """

    __slots__ = ("attempts", "enabled")

    def __init__(self) -> None:
        self.enabled = False
        self.attempts = 1


_testing = TestingMode()
_testing_lock = threading.Lock()


def testing_mode() -> TestingMode:
    """The current testing mode (read-only view)."""
    return _testing


@contextmanager
def set_testing(enabled: bool = True, *, attempts: int = 1) -> Iterator[None]:
    """Turn off every backoff and cap gateway attempts for the whole process; restore on exit.

    Meant for the test suites of services that embed the library, so a failing
    provider fails a test at once instead of after seconds of backoff::

        with set_testing(attempts=2):
            ...

    Raises:
        ValueError: when ``attempts`` is below 1.
    """
    if attempts < 1:
        raise ValueError(f"attempts={attempts!r}: expected at least 1")
    with _testing_lock:
        previous = (_testing.enabled, _testing.attempts)
        _testing.enabled, _testing.attempts = enabled, attempts
    try:
        yield
    finally:
        with _testing_lock:
            _testing.enabled, _testing.attempts = previous


def effective_attempts(max_attempts: int) -> int:
    """``max_attempts``, capped while testing mode is on."""
    if _testing.enabled:
        return min(max_attempts, _testing.attempts)
    return max_attempts
