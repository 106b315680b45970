"""Cases `make mutate` found missing for the circuit breaker (docs/testing.md, "Mutation testing").

Each test kills a mutant of ``resilience/_breaker.py`` that survived every listed test.
"""

from __future__ import annotations

import pytest

from idis.integrations.config import BreakerPolicy
from idis.integrations.exceptions import CircuitOpen
from idis.integrations.resilience import CLOSED, OPEN, Breaker, ManualClock


def _breaker(clock: ManualClock, **policy: float) -> Breaker:
    return Breaker("crm", "crm", BreakerPolicy(**policy), clock=clock)  # type: ignore[arg-type]


def test_a_failure_rate_below_the_threshold_keeps_the_breaker_closed() -> None:
    """1 failure in 10 calls (10%) at a 40% threshold, minimum calls reached: still closed.

    Kills ``failures / calls`` → ``failures * calls``, which opened on any failure once
    ``minimum_calls`` was reached.
    """
    clock = ManualClock()
    breaker = _breaker(clock, failure_threshold=5, failure_rate=0.4, minimum_calls=10, window=600)
    for outcome in "SSSSSSSSSF":
        trial = breaker.admit()
        if outcome == "F":
            breaker.record_failure(trial, "server_error")
        else:
            breaker.record_success(trial)
        clock.advance(1)

    assert CLOSED == breaker.state


def test_an_open_breaker_refuses_calls_until_the_reset_timeout_has_fully_elapsed() -> None:
    """Half a second before ``reset_timeout`` the breaker is still open; at it, a trial passes.

    Kills ``wait > 0`` → ``wait > 1`` in ``admit`` and ``<= 0`` → ``<= 1`` in ``would_admit``
    (a trial admitted up to a second early).
    """
    clock = ManualClock()
    breaker = _breaker(clock, failure_threshold=1, reset_timeout=30.0)
    breaker.record_failure(breaker.admit(), "server_error")
    assert OPEN == breaker.state

    clock.advance(29.5)
    assert not breaker.would_admit()
    with pytest.raises(CircuitOpen):
        breaker.admit()

    clock.advance(0.5)
    assert breaker.would_admit()
    assert breaker.admit() is True
