"""The circuit breaker on its own, driven by a manual clock: tripping, half-open trials, hooks."""

from __future__ import annotations

import pytest

from idis.integrations.config import BreakerPolicy
from idis.integrations.exceptions import CircuitOpen
from idis.integrations.resilience import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    Breaker,
    BreakerTransition,
    ManualClock,
)


def make_breaker(
    clock: ManualClock, transitions: list[BreakerTransition] | None = None, **policy: object
) -> Breaker:
    """A breaker on ``clock`` whose transitions land in ``transitions``."""
    hooks = [transitions.append] if transitions is not None else []
    return Breaker("crm", "crm", BreakerPolicy(**policy), clock=clock, hooks=hooks)  # type: ignore[arg-type]


def fail(breaker: Breaker, error_type: str = "server_error") -> None:
    """One admitted call that failed."""
    breaker.record_failure(breaker.admit(), error_type)


def succeed(breaker: Breaker) -> None:
    """One admitted call that succeeded."""
    breaker.record_success(breaker.admit())


def test_consecutive_failures_open_at_the_threshold() -> None:
    """failure_threshold consecutive faults open it; one fewer does not."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=3, minimum_calls=1000)

    fail(breaker)
    fail(breaker)
    before = breaker.state
    fail(breaker)

    assert CLOSED == before
    assert OPEN == breaker.state


def test_a_success_resets_the_consecutive_count() -> None:
    """Faults interleaved with successes never reach the consecutive threshold."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=3, minimum_calls=1000)

    for _ in range(5):
        fail(breaker)
        fail(breaker)
        succeed(breaker)

    assert CLOSED == breaker.state


def test_open_breaker_fails_fast_with_retry_in() -> None:
    """While open, admission raises CircuitOpen saying when the next trial call is due."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=30.0)
    fail(breaker)
    clock.advance(10)

    with pytest.raises(CircuitOpen, match=r"crm .* is open; next trial call in 20\.0s") as info:
        breaker.admit()

    assert 20.0 == pytest.approx(info.value.retry_in)
    assert 20.0 == pytest.approx(breaker.retry_in())


def test_failure_rate_trips_at_low_traffic() -> None:
    """4 failures in 10 calls spread over 4.5 minutes (never 2 in a row) open it at 40%."""
    clock = ManualClock()
    breaker = make_breaker(
        clock, failure_threshold=5, failure_rate=0.4, minimum_calls=10, window=600.0
    )
    pattern = "SFSSFSSFSF"
    states = []
    for outcome in pattern:
        fail(breaker) if outcome == "F" else succeed(breaker)
        states.append(breaker.state)
        clock.advance(30)

    assert [CLOSED] * 9 + [OPEN] == states


def test_failure_rate_needs_minimum_calls() -> None:
    """Below minimum_calls a 100% failure rate is not judged (consecutive rule aside)."""
    clock = ManualClock()
    breaker = make_breaker(
        clock, failure_threshold=100, failure_rate=0.4, minimum_calls=10, window=600.0
    )

    for _ in range(9):
        fail(breaker)
        clock.advance(30)

    assert CLOSED == breaker.state


def test_failures_outside_the_window_do_not_count() -> None:
    """The same 40% pattern spread over longer than the window keeps the breaker closed."""
    clock = ManualClock()
    breaker = make_breaker(
        clock, failure_threshold=5, failure_rate=0.4, minimum_calls=10, window=120.0
    )

    for outcome in "SFSSFSSFSF" * 2:
        fail(breaker) if outcome == "F" else succeed(breaker)
        clock.advance(30)

    assert CLOSED == breaker.state


def test_half_open_admits_only_the_configured_trial_calls() -> None:
    """After reset_timeout, exactly half_open_max_calls trials pass; the next caller is refused."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=30.0, half_open_max_calls=2)
    fail(breaker)
    clock.advance(30)

    first = breaker.admit()
    second = breaker.admit()
    with pytest.raises(CircuitOpen, match="half-open"):
        breaker.admit()
    breaker.record_success(first)
    with pytest.raises(CircuitOpen, match="half-open"):
        breaker.admit()

    assert (True, True) == (first, second)
    assert HALF_OPEN == breaker.state


def test_half_open_closes_after_every_trial_succeeds() -> None:
    """When all trial calls succeed the breaker closes and admits normal calls again."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=30.0, half_open_max_calls=2)
    fail(breaker)
    clock.advance(30)
    trials = [breaker.admit(), breaker.admit()]

    breaker.record_success(trials[0])
    midway = breaker.state
    breaker.record_success(trials[1])

    assert HALF_OPEN == midway
    assert CLOSED == breaker.state
    assert False is breaker.admit()


def test_a_failed_trial_reopens_for_a_full_reset_timeout() -> None:
    """One failed trial re-opens the breaker, and the reset timeout starts again from then."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=30.0, half_open_max_calls=2)
    fail(breaker)
    clock.advance(45)
    trial = breaker.admit()

    breaker.record_failure(trial, "timeout")

    assert OPEN == breaker.state
    assert 30.0 == pytest.approx(breaker.retry_in())


def test_released_trial_slot_can_be_used_again() -> None:
    """A trial cancelled before reaching the provider gives its slot back."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=5.0, half_open_max_calls=1)
    fail(breaker)
    clock.advance(5)
    trial = breaker.admit()

    breaker.release(trial)

    assert True is breaker.admit()


def test_would_admit_has_no_side_effects() -> None:
    """would_admit answers without taking a trial slot or changing state."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=1, reset_timeout=5.0, half_open_max_calls=1)
    fail(breaker)
    while_open = breaker.would_admit()
    clock.advance(5)

    after_timeout = [breaker.would_admit(), breaker.would_admit()]

    assert False is while_open
    assert [True, True] == after_timeout
    assert True is breaker.admit()
    assert False is breaker.would_admit()


def test_every_transition_reaches_the_hooks_with_a_reason() -> None:
    """closed->open->half_open->closed each call the hooks, with the reason and clock time."""
    clock = ManualClock()
    transitions: list[BreakerTransition] = []
    breaker = make_breaker(clock, transitions, failure_threshold=2, reset_timeout=10.0)
    fail(breaker, "timeout")
    fail(breaker, "timeout")
    opened_at = clock.time()
    clock.advance(10)
    succeed(breaker)

    assert [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)] == [
        (t.from_state, t.to_state) for t in transitions
    ]
    assert "2 consecutive failures (last: timeout)" == transitions[0].reason
    assert opened_at == transitions[0].at
    assert "reset timeout elapsed" == transitions[1].reason
    assert "trial calls succeeded" == transitions[2].reason
    assert all(not t.observed for t in transitions)


def test_failure_rate_reason_names_rate_and_calls() -> None:
    """A rate trip says which rate over how many calls tripped it."""
    clock = ManualClock()
    transitions: list[BreakerTransition] = []
    breaker = make_breaker(
        clock, transitions, failure_threshold=50, failure_rate=0.5, minimum_calls=4, window=60.0
    )

    for outcome in "SFSF":
        fail(breaker) if outcome == "F" else succeed(breaker)

    assert ["failure rate 50% over 4 calls in 60s (last: server_error)"] == [
        t.reason for t in transitions
    ]


def test_stats_report_window_and_state() -> None:
    """stats() gives the window's calls, failures, error rate and the state for ``status``."""
    clock = ManualClock()
    breaker = make_breaker(clock, failure_threshold=10, minimum_calls=100)
    for outcome in "SSFS":
        fail(breaker) if outcome == "F" else succeed(breaker)

    stats = breaker.stats()

    assert {
        "state": CLOSED,
        "window_calls": 4,
        "window_failures": 1,
        "error_rate": 0.25,
        "consecutive_failures": 0,
        "retry_in": 0.0,
        "version": 0,
    } == stats


def test_force_moves_state_and_reports_the_operator() -> None:
    """An operator override opens the breaker and says who did it."""
    clock = ManualClock()
    transitions: list[BreakerTransition] = []
    breaker = make_breaker(clock, transitions)

    breaker.force(OPEN)

    assert OPEN == breaker.state
    assert "forced by operator" == transitions[-1].reason


def test_concurrent_outcomes_never_look_like_another_replica() -> None:
    """Threads hammering one in-process breaker produce only transitions this process made."""
    import random
    import threading

    from idis.integrations._clock import ManualClock
    from idis.integrations.exceptions import CircuitOpen
    from idis.integrations.resilience._breaker import Breaker

    seen: list[BreakerTransition] = []
    clock = ManualClock()
    breaker = Breaker(
        "crm",
        "crm",
        BreakerPolicy(failure_threshold=3, reset_timeout=0.0, half_open_max_calls=2),
        clock=clock,
        hooks=[seen.append],
    )
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                try:
                    trial = breaker.admit()
                except CircuitOpen:
                    continue
                if rng.random() < 0.5:
                    breaker.record_failure(trial, "server_error")
                else:
                    breaker.record_success(trial)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert [] == errors
    assert seen  # it did trip and recover many times
    assert [] == [t for t in seen if t.observed]
