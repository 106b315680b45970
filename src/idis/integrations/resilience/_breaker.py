"""Circuit breakers on pybreaker, without holding a lock across I/O.

pybreaker's ``call()`` holds the breaker's lock for the whole protected call,
so concurrent calls through one breaker serialize (``calling()`` does not, but
costs four times as much per call and cannot count a windowed failure rate). We use
pybreaker for what it is good at (the state storage: in-process or shared
across replicas, its listener protocol, and its public ``open()``,
``half_open()`` and ``close()`` transitions) and drive it from outside: a call
is *admitted* under a short lock, runs with no lock held, and its outcome is
*recorded* under a short lock.

Tripping rules (``BreakerPolicy``):

* ``failure_threshold`` consecutive provider faults, or
* at least ``minimum_calls`` calls in the last ``window`` seconds with a failure
  rate of ``failure_rate`` or more: at CRM traffic levels (a few calls a
  minute) consecutive counts alone may never trip while half the calls fail.

Open → half-open after ``reset_timeout``; half-open admits at most
``half_open_max_calls`` trial calls; all must succeed to close, one failure
re-opens. Only provider faults count (5xx, timeouts, connection errors, 429,
malformed bodies); a 4xx we caused counts as a success (the provider answered).

Time comes from an injectable :class:`~idis.integrations._clock.Clock`.
Counters and the failure window are per process; the *state* lives in the
pybreaker storage, so with Redis one replica tripping opens it for all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pybreaker

from .._clock import Clock, system_clock
from ..config import BreakerPolicy
from ..exceptions import CircuitOpen
from ._policy import SlidingWindow

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "BreakerTransition",
]

CLOSED: Final = "closed"
HALF_OPEN: Final = "half_open"
OPEN: Final = "open"
_FROM_PB = {
    pybreaker.STATE_CLOSED: CLOSED,
    pybreaker.STATE_HALF_OPEN: HALF_OPEN,
    pybreaker.STATE_OPEN: OPEN,
}
#: Gauge value per state (integration_circuit_breaker_state).
STATE_VALUE: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change, as seen by this process."""

    #: Provider name.
    provider: str
    #: Breaker name: ``provider`` for the provider-wide one, else the endpoint.
    breaker: str
    from_state: str
    to_state: str
    #: Why: ``consecutive failures (5)``, ``failure rate 60% over 10 calls``, ...
    reason: str
    #: Wall time of the change (seconds since the epoch, from the breaker's clock).
    at: float
    #: True when another replica made the change and this one noticed it.
    observed: bool = False


TransitionHook = Callable[[BreakerTransition], None]


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = _FROM_PB.get(old_state.name, CLOSED) if old_state is not None else CLOSED
        # The listener is part of Breaker; _notify is private to the pair.
        self._owner._notify(old, _FROM_PB.get(new_state.name, CLOSED))


class Breaker:
    """One provider's (or one endpoint's) circuit breaker. Thread-safe, lock-free across I/O.

    Usage by a driver::

        trial = breaker.admit()          # raises CircuitOpen when not admitted
        try:
            result = do_io()
        except ProviderFault:
            breaker.record_failure(trial, "server_error")
            raise
        breaker.record_success(trial)
    """

    def __init__(
        self,
        provider: str,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Clock = system_clock,
        storage: pybreaker.CircuitBreakerStorage | None = None,
        hooks: Sequence[TransitionHook] = (),
    ) -> None:
        self.provider = provider
        self.name = name
        self.policy = policy
        self._clock = clock
        self._hooks = tuple(hooks)
        self._lock = threading.Lock()
        self._window = SlidingWindow(policy.window)
        self._consecutive = 0
        self._trials = 0
        self._trial_successes = 0
        self._opened_at: float | None = None
        self._reason = "initial"
        self._causing = False
        storage = storage or pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._pb = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold,
            reset_timeout=policy.reset_timeout,
            success_threshold=policy.half_open_max_calls,
            state_storage=storage,
            name=f"{provider}:{name}",
            listeners=[_Listener(self)],
        )
        self._seen = self._read_state()

    # ------------------------------------------------------------------ state

    def _read_state(self) -> str:
        return _FROM_PB.get(self._pb.current_state, CLOSED)

    @property
    def state(self) -> str:
        """``closed``, ``half_open`` or ``open`` (as stored; shared when storage is)."""
        state = self._read_state()
        if state != self._seen:
            with self._lock:
                state = self._read_state()
                self._notice_if_changed(state)
        return state

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a trial call (0 when not open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_time() + self.policy.reset_timeout - self._clock.time())

    def stats(self) -> dict[str, float | int | str]:
        """Window calls/failures, consecutive failures and state, for ``status``."""
        with self._lock:
            calls, failures = self._window.totals(self._clock.time())
            consecutive = self._consecutive
        return {
            "state": self.state,
            "window_calls": calls,
            "window_failures": failures,
            "error_rate": (failures / calls) if calls else 0.0,
            "consecutive_failures": consecutive,
            "retry_in": round(self.retry_in(), 3),
        }

    def _opened_time(self) -> float:
        if self._opened_at is not None:
            return self._opened_at
        stored = self._pb._state_storage.opened_at  # pybreaker exposes no getter
        if isinstance(stored, datetime):
            return stored.timestamp()
        return self._clock.time()

    # ------------------------------------------------------------ admission

    def admit(self) -> bool:
        """Admit one call; return True when it is a half-open trial.

        Raises:
            CircuitOpen: while open (with ``retry_in``), or when half-open and
                every trial slot is taken.
        """
        state = self._read_state()
        if state == CLOSED and self._seen == CLOSED:
            return False
        with self._lock:
            state = self._read_state()
            # Another replica may have changed the shared state: report it first.
            self._notice_if_changed(state)
            if state == CLOSED:
                return False
            if state == OPEN:
                wait = self._opened_time() + self.policy.reset_timeout - self._clock.time()
                if wait > 0:
                    raise CircuitOpen(
                        f"circuit breaker for {self.provider} ({self.name}) is open; "
                        f"next trial call in {wait:.1f}s",
                        provider=self.provider,
                        retry_in=wait,
                    )
                self._transition(HALF_OPEN, "reset timeout elapsed")
            # A slot stays spent once its trial succeeded: half-open lets exactly
            # half_open_max_calls trials through, not that many at a time.
            if self._trials + self._trial_successes >= self.policy.half_open_max_calls:
                raise CircuitOpen(
                    f"circuit breaker for {self.provider} ({self.name}) is half-open and its "
                    "trial calls are in flight",
                    provider=self.provider,
                    retry_in=0.0,
                )
            self._trials += 1
            return True

    def would_admit(self) -> bool:
        """Whether :meth:`admit` would let a call through now (no side effects)."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            return self.retry_in() <= 0
        return self._trials + self._trial_successes < self.policy.half_open_max_calls

    # -------------------------------------------------------------- outcomes

    def record_success(self, trial: bool) -> None:
        """Record a call the provider answered (2xx-4xx except 429)."""
        now = self._clock.time()
        with self._lock:
            self._window.record(now, failed=False)
            self._consecutive = 0
            if not trial:
                return
            self._trials = max(0, self._trials - 1)
            self._trial_successes += 1
            if (
                self._read_state() == HALF_OPEN
                and self._trial_successes >= self.policy.half_open_max_calls
            ):
                self._transition(CLOSED, "trial calls succeeded")

    def record_failure(self, trial: bool, error_type: str) -> None:
        """Record a provider fault; may open the breaker."""
        now = self._clock.time()
        with self._lock:
            self._window.record(now, failed=True)
            self._consecutive += 1
            if trial:
                self._trials = max(0, self._trials - 1)
                if self._read_state() != OPEN:
                    self._transition(OPEN, f"trial call failed ({error_type})")
                return
            if self._read_state() != CLOSED:
                return
            policy = self.policy
            if self._consecutive >= policy.failure_threshold:
                self._transition(
                    OPEN, f"{self._consecutive} consecutive failures (last: {error_type})"
                )
                return
            calls, failures = self._window.totals(now)
            if calls >= policy.minimum_calls and failures / calls >= policy.failure_rate:
                self._transition(
                    OPEN,
                    f"failure rate {failures / calls:.0%} over {calls} calls in "
                    f"{policy.window:g}s (last: {error_type})",
                )

    def release(self, trial: bool) -> None:
        """Give back an admission whose call never reached the provider (cancelled)."""
        if trial:
            with self._lock:
                self._trials = max(0, self._trials - 1)

    # ---------------------------------------------------------- transitions

    def force(self, state: str, reason: str = "forced by operator") -> None:
        """Move to ``state`` now (operator override, tests)."""
        with self._lock:
            self._transition(state, reason)

    def _transition(self, to_state: str, reason: str) -> None:
        # Caller holds self._lock. pybreaker's transitions take its own lock
        # briefly and call our listener synchronously.
        self._reason = reason
        self._trials = 0
        self._trial_successes = 0
        self._causing = True
        try:
            if to_state == OPEN:
                self._opened_at = self._clock.time()
                self._pb.open()
                # pybreaker stamps opened_at from the real clock; ours may be injected.
                self._pb._state_storage.opened_at = datetime.fromtimestamp(  # no public setter
                    self._opened_at, UTC
                )
            elif to_state == HALF_OPEN:
                self._pb.half_open()
            else:
                self._opened_at = None
                self._consecutive = 0
                self._window.clear()
                self._pb.close()
        finally:
            self._causing = False

    def _notice_if_changed(self, state: str) -> None:
        # Caller holds self._lock, so our own transitions (also under the lock)
        # have already updated _seen: a difference can only come from outside.
        if state != self._seen:
            self._noticed(state)

    def _noticed(self, state: str) -> None:
        old, self._seen = self._seen, state
        if state == OPEN:
            # The replica that opened it stamped the shared opened_at; a local
            # time from an earlier opening would let a trial through too early.
            stored = self._pb._state_storage.opened_at  # no public getter
            self._opened_at = (
                stored.timestamp() if isinstance(stored, datetime) else self._clock.time()
            )
        if state == CLOSED:
            self._opened_at = None
        self._emit(
            BreakerTransition(
                self.provider,
                self.name,
                old,
                state,
                "changed by another replica",
                self._clock.time(),
                observed=True,
            )
        )

    def _notify(self, old: str, new: str) -> None:
        if not self._causing:
            return  # pybreaker noticing a shared-storage change: _noticed reports it
        self._seen = new
        self._emit(
            BreakerTransition(self.provider, self.name, old, new, self._reason, self._clock.time())
        )

    def _emit(self, transition: BreakerTransition) -> None:
        for hook in self._hooks:
            hook(transition)

    def __repr__(self) -> str:
        return f"<Breaker {self.provider}:{self.name} {self.state}>"
