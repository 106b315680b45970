"""Breaker state shared across replicas through Redis, that survives a Redis outage.

pybreaker ships a ``CircuitRedisStorage``, but it reads Redis on every call
(a network round trip on the hot path), touches Redis in its constructor (so a
Redis outage at start-up raises), and logs a stack trace per failed operation
(so a Redis outage floods the logs and slows every provider call by the
socket timeout). This storage implements the same pybreaker interface with:

* the state cached for ``ttl`` seconds (default 0.5 s): replicas converge
  within that, and a call costs no Redis round trip;
* short socket timeouts, and after a Redis error a local fallback for
  ``retry_after`` seconds with one warning: the provider calls go on using the
  last known state plus this process's own transitions;
* nothing touched at construction.

Only the state and ``opened_at`` are shared; failure counters stay per process
(the breaker keeps its own window), so a replica that trips the breaker opens
it for every replica.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pybreaker

from .._clock import Clock, system_clock
from ..observability._logs import get_logger

__all__ = ["RedisBreakerStorage", "redis_breaker_storage"]

_log = get_logger()


class RedisBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage keeping state and opened_at in Redis, cached and outage-tolerant."""

    def __init__(
        self,
        client: Any,
        key: str,
        *,
        clock: Clock = system_clock,
        ttl: float = 0.5,
        retry_after: float = 5.0,
    ) -> None:
        super().__init__("redis")
        self._redis = client
        self._key = key
        self._clock = clock
        self._ttl = ttl
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._state = pybreaker.STATE_CLOSED
        self._opened_at: datetime | None = None
        self._fresh_until = 0.0
        self._down_until = 0.0
        self._counter = 0
        self._success_counter = 0

    def _usable(self) -> bool:
        return self._clock.monotonic() >= self._down_until

    def _failed(self, exc: Exception, action: str) -> None:
        first = self._down_until == 0.0 or self._clock.monotonic() >= self._down_until
        self._down_until = self._clock.monotonic() + self._retry_after
        if first:
            _log.warning(
                "idis.breaker.shared_state_unavailable",
                msg=(
                    f"Redis breaker state unavailable ({type(exc).__name__} on {action}); "
                    f"using this process's breaker state for {self._retry_after:g}s"
                ),
                breaker=self._key,
            )

    def _refresh(self) -> None:
        now = self._clock.monotonic()
        if now < self._fresh_until or not self._usable():
            return
        try:
            state, opened = self._redis.mget(f"{self._key}:state", f"{self._key}:opened_at")
        except Exception as exc:  # noqa: BLE001  # any Redis failure means: fall back locally
            self._failed(exc, "read")
            return
        with self._lock:
            if state is not None:
                self._state = state.decode() if isinstance(state, bytes) else str(state)
            if opened is not None:
                self._opened_at = datetime.fromtimestamp(float(opened), UTC)
            self._fresh_until = now + self._ttl

    def _write(self, mapping: dict[str, Any]) -> None:
        if not self._usable():
            return
        try:
            self._redis.mset({f"{self._key}:{k}": v for k, v in mapping.items()})
        except Exception as exc:  # noqa: BLE001  # any Redis failure means: fall back locally
            self._failed(exc, "write")

    @property
    def state(self) -> str:
        """Current state (cached up to ``ttl`` seconds)."""
        self._refresh()
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        with self._lock:
            self._state = str(state)
            self._fresh_until = self._clock.monotonic() + self._ttl
        self._write({"state": str(state)})

    @property
    def opened_at(self) -> datetime | None:
        """When the breaker last opened (shared)."""
        self._refresh()
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        with self._lock:
            self._opened_at = value
        self._write({"opened_at": repr(value.timestamp())})

    # Counters are per process by design (see module docstring).
    def increment_counter(self) -> None:
        """Count one failure."""
        self._counter += 1

    def reset_counter(self) -> None:
        """Reset the failure count."""
        self._counter = 0

    def increment_success_counter(self) -> None:
        """Count one half-open success."""
        self._success_counter += 1

    def reset_success_counter(self) -> None:
        """Reset the half-open success count."""
        self._success_counter = 0

    @property
    def counter(self) -> int:
        """Consecutive failures seen by this process."""
        return self._counter

    @property
    def success_counter(self) -> int:
        """Half-open successes seen by this process."""
        return self._success_counter


def redis_breaker_storage(
    url: str,
    *,
    clock: Clock = system_clock,
    prefix: str = "idis:breaker:",
    ttl: float = 0.5,
    socket_timeout: float = 0.25,
) -> Callable[[str, str], RedisBreakerStorage]:
    """A ``(provider, breaker) -> storage`` factory for :class:`Gateway` sharing one client."""
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
    )

    def factory(provider: str, breaker: str) -> RedisBreakerStorage:
        return RedisBreakerStorage(client, f"{prefix}{provider}:{breaker}", clock=clock, ttl=ttl)

    return factory
