"""Circuit breakers that hold no lock across I/O and share a versioned state across replicas.

A call is *admitted* under a short lock, runs with no lock held, and its outcome
is *recorded* under a short lock, so concurrent calls through one breaker run
concurrently (pybreaker's ``call()`` holds its lock for the whole call; see
docs/architecture.md for why this module no longer builds on pybreaker).

Tripping rules (``BreakerPolicy``):

* ``failure_threshold`` consecutive provider faults, or
* at least ``minimum_calls`` calls in the last ``window`` seconds with a failure
  rate of ``failure_rate`` or more: at CRM traffic levels (a few calls a
  minute) consecutive counts alone may never trip while half the calls fail.

Open → half-open after ``reset_timeout``; half-open admits at most
``half_open_max_calls`` trial calls; all must succeed to close, one failure
re-opens. Only provider faults count (5xx, timeouts, connection errors, 429,
malformed bodies); a 4xx we caused counts as a success (the provider answered).

Counters and the failure window are per process. The *state* can be shared
through a store (:mod:`._shared`): every transition gets a version, the newest
version wins in both directions, and the gateway exchanges the state with the
store at most once per ``ttl`` (:meth:`Breaker.share` / :meth:`Breaker.ashare`),
never on every call. Time comes from an injectable :class:`~idis.integrations._clock.Clock`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .._clock import Clock, system_clock
from ..config import BreakerPolicy
from ..exceptions import CircuitOpen
from ._policy import SlidingWindow
from ._shared import SharedState, newer

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "BreakerStore",
    "BreakerTransition",
]

CLOSED: Final = "closed"
HALF_OPEN: Final = "half_open"
OPEN: Final = "open"
#: The canonical string for each state name (states read from Redis are new str objects).
_STATES: Final = {CLOSED: CLOSED, HALF_OPEN: HALF_OPEN, OPEN: OPEN}
#: Gauge value per state (integration_circuit_breaker_state).
STATE_VALUE: Final = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
#: Seconds a breaker's view of the shared state stays fresh (unless its store says otherwise).
SHARED_TTL: Final = 0.5


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


class BreakerStore(Protocol):
    """Where breakers share their state (``RedisBreakerStore``, ``MemoryBreakerStore``)."""

    #: Seconds a read of the shared state stays fresh.
    ttl: float
    #: True when an exchange does no I/O (it is then done inline on every call).
    local: bool

    def usable(self) -> bool:
        """False while the store is known to be failing."""

    def exchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Publish ``local`` if given; return (store reached, the record that stands)."""

    async def aexchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Async twin of :meth:`exchange` (must not block the event loop)."""


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
        store: BreakerStore | None = None,
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
        self._reason = "initial"
        # The state, its version and when it opened (wall time), as one record.
        self._state: str = CLOSED
        self._version = 0
        self._opened_at = 0.0
        # Shared state: the record the store holds as far as we know, when to look again.
        self._store = store
        self._published: SharedState | None = None
        self._fresh_until = 0.0
        self._sharing = False
        self._synced = False

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """``closed``, ``half_open`` or ``open`` (this process's view of the shared state)."""
        return self._state

    @property
    def shared(self) -> bool:
        """Whether the state is shared with other replicas through a store."""
        return self._store is not None

    def retry_in(self) -> float:
        """Seconds until an open breaker admits a trial call (0 when not open)."""
        if self._state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.reset_timeout - self._clock.time())

    def stats(self) -> dict[str, float | int | str]:
        """Window calls/failures, consecutive failures and state, for ``status``."""
        with self._lock:
            calls, failures = self._window.totals(self._clock.time())
            consecutive = self._consecutive
        return {
            "state": self._state,
            "window_calls": calls,
            "window_failures": failures,
            "error_rate": (failures / calls) if calls else 0.0,
            "consecutive_failures": consecutive,
            "retry_in": round(self.retry_in(), 3),
            "version": self._version,
        }

    # ------------------------------------------------------------ admission

    def admit(self) -> bool:
        """Admit one call; return True when it is a half-open trial.

        Raises:
            CircuitOpen: while open (with ``retry_in``), or when half-open and
                every trial slot is taken.
        """
        if self._state == CLOSED:
            return False
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN:
                wait = self._opened_at + self.policy.reset_timeout - self._clock.time()
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
        state = self._state
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
                self._state == HALF_OPEN
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
                if self._state != OPEN:
                    self._transition(OPEN, f"trial call failed ({error_type})")
                return
            if self._state != CLOSED:
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
        if state not in _STATES:
            raise ValueError(f"breaker state {state!r}: expected closed, half_open or open")
        with self._lock:
            self._transition(_STATES[state], reason)

    def _transition(self, to_state: str, reason: str) -> None:
        # Caller holds self._lock; hooks run under it so their order is the order of changes.
        old = self._state
        self._state = to_state
        self._version += 1
        if to_state == OPEN:
            self._opened_at = self._clock.time()
        elif to_state == CLOSED:
            self._opened_at = 0.0
        self._entered(old, reason)

    def _entered(self, old: str, reason: str, *, observed: bool = False) -> None:
        # Caller holds self._lock and has set the new state: start its counts afresh,
        # then tell the hooks (under the lock, so their order is the order of changes).
        self._reason = reason
        self._trials = 0
        self._trial_successes = 0
        if self._state == CLOSED:
            self._consecutive = 0
            self._window.clear()
        transition = BreakerTransition(
            self.provider, self.name, old, self._state, reason, self._clock.time(), observed
        )
        for hook in self._hooks:
            hook(transition)

    # --------------------------------------------------------- shared state

    def share_due(self, now: float) -> bool:
        """Whether the state should be exchanged with the store now (``now``: monotonic).

        True when a transition of ours is not yet published, or our view of the
        shared state is older than ``SHARED_TTL``; never while an exchange is in
        flight or the store is failing.
        """
        store = self._store
        if store is None or self._sharing or not store.usable():
            return False
        return now >= self._fresh_until or self._outgoing() is not None

    @property
    def local_store(self) -> bool:
        """Whether the shared state lives in this process (an exchange does no I/O)."""
        return self._store is not None and self._store.local

    @property
    def synced(self) -> bool:
        """Whether this breaker has read the shared state at least once."""
        return self._synced

    def share_urgent(self) -> bool:
        """Whether a call should wait for the exchange: a transition of ours to publish,
        or no shared state read yet (a fresh replica must not ignore an open breaker)."""
        store = self._store
        return (
            (store is not None and store.local) or not self._synced or self._outgoing() is not None
        )

    def share(self) -> None:
        """Exchange the state with the store (blocking I/O; the sync gateway's way)."""
        claimed, outgoing = self._claim_share()
        if not claimed:
            return
        assert self._store is not None
        try:
            for _ in range(2):  # once more at once if a transition happened meanwhile
                reached, standing = self._store.exchange(outgoing)
                outgoing = self._end_share(reached, standing)
                if outgoing is None:
                    return
        finally:
            self._sharing = False

    async def ashare(self) -> None:
        """Exchange the state with the store without blocking the event loop."""
        work = self.start_ashare()
        if work is not None:
            await work

    def start_ashare(self) -> Coroutine[Any, Any, None] | None:
        """Claim the exchange now (one at a time) and return the coroutine doing it.

        Claiming before the coroutine runs keeps a background exchange single:
        the next call sees it in flight and does not start another.
        """
        claimed, outgoing = self._claim_share()
        return self._aexchange(outgoing) if claimed else None

    async def _aexchange(self, outgoing: SharedState | None) -> None:
        assert self._store is not None
        try:
            for _ in range(2):  # once more at once if a transition happened meanwhile
                reached, standing = await self._store.aexchange(outgoing)
                outgoing = self._end_share(reached, standing)
                if outgoing is None:
                    return
        finally:
            self._sharing = False

    def _record(self) -> SharedState:
        return SharedState(self._version, self._state, self._opened_at)

    def _outgoing(self) -> SharedState | None:
        if self._version == 0:
            return None  # nothing happened here yet: nothing to tell the others
        record = self._record()
        return None if record == self._published else record

    def _claim_share(self) -> tuple[bool, SharedState | None]:
        with self._lock:
            if self._store is None or self._sharing:
                return False, None
            self._sharing = True
            return True, self._outgoing()

    def _end_share(self, reached: bool, standing: SharedState | None) -> SharedState | None:
        """Take in what the store holds; return our record if it still needs publishing."""
        if not reached:
            return None  # the store said why (once); keep our state and publish it later
        with self._lock:
            self._synced = True
            ttl = self._store.ttl if self._store is not None else SHARED_TTL
            self._fresh_until = self._clock.monotonic() + ttl
            self._published = standing
            if newer(standing, self._record()):
                assert standing is not None
                self._adopt(standing)
            return self._outgoing()

    def _adopt(self, record: SharedState) -> None:
        # Caller holds self._lock. Another replica's newer state wins over ours.
        old = self._state
        state = _STATES[record.state]
        self._state = state
        self._version = record.version
        self._opened_at = record.opened_at if state == OPEN else 0.0
        if state == old:
            return  # a newer record of the same state: trials in flight stay counted
        self._entered(old, "changed by another replica", observed=True)

    def __repr__(self) -> str:
        return f"<Breaker {self.provider}:{self.name} {self._state} v{self._version}>"
