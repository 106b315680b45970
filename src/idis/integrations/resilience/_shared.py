"""Breaker state shared across replicas through Redis: versioned, newest wins, outage-proof.

Each breaker's shared state is one Redis hash (``idis:breaker:<provider>:<breaker>``)
holding a :class:`SharedState`: ``version``, ``state``, ``opened_at``. Every
transition a replica makes gets the next version after the newest it knows (a
Lamport clock), and is written by a Lua script that compares and sets in one
step (Redis runs a script atomically: https://redis.io/docs/latest/develop/interact/programmability/eval-intro/).
The script keeps whichever record is newer, so the rule holds in both directions:

* a replica that opened its breaker while Redis was down publishes its newer
  ``open`` when Redis returns, instead of adopting the stale shared ``closed``
  that was left there (issue 11, item 4: the breaker used to snap shut with no
  reset timeout and no trial);
* a replica that was down or restarted adopts the newer shared state.

Only a successful trial (or an operator) writes ``closed`` after ``open``, so an
open breaker never closes without its trial call succeeding, on any replica.
Ties (two replicas at the same version, reachable only while Redis was out) go
to the more cautious state: open over half-open over closed.

Redis is never on the hot path: a breaker exchanges its state at most once per
``ttl`` (0.5 s), and after a Redis error not at all for ``retry_after`` seconds
(one warning per outage), calling on with the local state. The sync gateway uses
the blocking client; the async gateway uses ``redis.asyncio``, so a slow Redis
never blocks its event loop (issue 16).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Final

from .._clock import Clock, system_clock
from ..observability._logs import get_logger

__all__ = [
    "RANK",
    "MemoryBreakerStore",
    "MemoryBreakerStores",
    "RedisBreakerStore",
    "RedisBreakerStores",
    "SharedState",
    "newer",
    "read_shared_state",
]

_log = get_logger()

#: How cautious a state is; decides ties between equal versions.
RANK: Final = {"closed": 0, "half_open": 1, "open": 2}

_FIELDS = ("version", "state", "opened_at")

#: KEYS[1]: the breaker's hash; ARGV: version, state, opened_at, rank of state.
#: Writes the record when the stored one is older (or equal and less cautious);
#: returns the record that stands afterwards, so the caller adopts it if it lost.
_PUBLISH = """
local cur = redis.call('HMGET', KEYS[1], 'version', 'state', 'opened_at', 'rank')
local stored = tonumber(cur[1])
local version = tonumber(ARGV[1])
if stored == nil or version > stored
   or (version == stored and tonumber(ARGV[4]) > (tonumber(cur[4]) or 0)) then
  redis.call('HSET', KEYS[1], 'version', ARGV[1], 'state', ARGV[2],
             'opened_at', ARGV[3], 'rank', ARGV[4])
  return {ARGV[1], ARGV[2], ARGV[3]}
end
return {cur[1], cur[2], cur[3]}
"""


@dataclass(frozen=True, slots=True)
class SharedState:
    """One breaker's state as replicas share it."""

    #: Lamport version: one more than the newest version the writer knew.
    version: int
    #: ``closed``, ``half_open`` or ``open``.
    state: str
    #: Wall time the breaker opened (seconds since the epoch); 0 when closed.
    opened_at: float


def newer(candidate: SharedState | None, than: SharedState | None) -> bool:
    """Whether ``candidate`` wins over ``than`` (the rule the Lua script applies)."""
    if candidate is None:
        return False
    if than is None:
        return True
    if candidate.version != than.version:
        return candidate.version > than.version
    return RANK.get(candidate.state, 0) > RANK.get(than.state, 0)


def _decode(values: Any) -> SharedState | None:
    version, state, opened_at = (
        v.decode() if isinstance(v, bytes) else v for v in (list(values) + [None] * 3)[:3]
    )
    if version is None or state not in RANK:
        return None  # nothing stored yet, or a key this library did not write
    return SharedState(int(version), str(state), float(opened_at or 0.0))


def _encode(record: SharedState) -> list[str]:
    return [str(record.version), record.state, repr(record.opened_at), str(RANK[record.state])]


class _Clients:
    """The Redis clients of one gateway: one blocking, one ``redis.asyncio`` per event loop."""

    def __init__(self, url: str, socket_timeout: float) -> None:
        # Imported here, when the gateway is built: importing redis.asyncio on first
        # use would stall the event loop for the length of the import.
        import redis
        import redis.asyncio

        del redis
        self.url = url
        self.socket_timeout = socket_timeout
        self._sync: Any = None
        self._sync_script: Any = None
        self._lock = threading.Lock()
        # An asyncio client is bound to the loop that made its connections.
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def _connect(self, module: Any, retry: Any) -> tuple[Any, Any]:
        """A client of ``module`` (``redis`` or ``redis.asyncio``) and its publish script."""
        from redis.backoff import NoBackoff

        client = module.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            # A pooled connection to a Redis that restarted fails once: reconnect
            # and try again, but never repeat a timeout (a slow Redis stays slow).
            retry=retry(NoBackoff(), 1, supported_errors=(module.ConnectionError,)),
        )
        return client, client.register_script(_PUBLISH)

    def sync(self) -> tuple[Any, Any]:
        if self._sync is None:
            import redis
            from redis.retry import Retry

            with self._lock:
                if self._sync is None:
                    # The script first: readers outside the lock go by ``_sync`` alone.
                    client, self._sync_script = self._connect(redis, Retry)
                    self._sync = client
        return self._sync, self._sync_script

    def for_loop(self) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        found = self._async.get(loop)
        if found is None:
            import redis.asyncio as aredis
            from redis.asyncio.retry import Retry

            found = self._async[loop] = self._connect(aredis, Retry)
        return found

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        found = self._async.pop(loop, None)
        if found is not None:
            await found[0].aclose()


class MemoryBreakerStore:
    """One breaker's :class:`SharedState` shared by the gateways of this process.

    The same newest-wins rule as Redis, without I/O: a sync and an async gateway
    in one process (or a test) share their breakers at once, on every call.
    """

    #: Exchanged on every admission and awaited inline: there is no I/O to wait for.
    ttl = 0.0
    local = True

    def __init__(self, records: dict[str, SharedState], lock: threading.Lock, key: str) -> None:
        self._records = records
        self._lock = lock
        self.key = key

    def usable(self) -> bool:
        """Always: memory does not fail."""
        return True

    def exchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Keep ``local`` if it is newer; return the record that stands."""
        with self._lock:
            if newer(local, self._records.get(self.key)):
                assert local is not None
                self._records[self.key] = local
            return True, self._records.get(self.key)

    async def aexchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Same as :meth:`exchange` (nothing to wait for)."""
        return self.exchange(local)


class MemoryBreakerStores:
    """A ``(provider, breaker) -> store`` factory whose stores live in this process.

    Pass one instance as ``breaker_storage`` to several gateways (a sync and an
    async one, say) to give them one breaker per provider.
    """

    def __init__(self) -> None:
        self._records: dict[str, SharedState] = {}
        self._lock = threading.Lock()

    def __call__(self, provider: str, breaker: str) -> MemoryBreakerStore:
        return MemoryBreakerStore(self._records, self._lock, f"{provider}:{breaker}")


class RedisBreakerStore:
    """One breaker's :class:`SharedState` in Redis, exchanged by compare-and-set.

    :meth:`exchange` (blocking) and :meth:`aexchange` (asyncio) publish a local
    record if one is given and return the record that stands in Redis afterwards
    (``None``: nothing stored). While Redis is failing they raise nothing and
    return ``None`` without trying, for ``retry_after`` seconds at a time.
    """

    #: Seconds a read of the shared state stays fresh (a round trip at most this often).
    ttl = 0.5
    #: Exchanges are network I/O: the async gateway does the periodic ones in the background.
    local = False

    def __init__(
        self,
        clients: _Clients,
        key: str,
        *,
        clock: Clock = system_clock,
        retry_after: float = 5.0,
    ) -> None:
        self._clients = clients
        self.key = key
        self._clock = clock
        self._retry_after = retry_after
        self._down_until = 0.0
        self._down = False

    def usable(self) -> bool:
        """False while a recent Redis error holds this store on local state."""
        return not self._down or self._clock.monotonic() >= self._down_until

    def exchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Publish ``local`` (if given) and read back; ``(reached Redis, standing record)``."""
        try:
            client, script = self._clients.sync()
            if local is None:
                values = client.hmget(self.key, *_FIELDS)
            else:
                values = script(keys=[self.key], args=_encode(local))
        except Exception as exc:  # noqa: BLE001  # any Redis failure means: go on locally
            self._failed(exc, "publish" if local else "read")
            return False, None
        self._recovered()
        return True, _decode(values)

    async def aexchange(self, local: SharedState | None) -> tuple[bool, SharedState | None]:
        """Async twin of :meth:`exchange`, through ``redis.asyncio``."""
        try:
            client, script = self._clients.for_loop()
            if local is None:
                values = await client.hmget(self.key, *_FIELDS)
            else:
                values = await script(keys=[self.key], args=_encode(local))
        except Exception as exc:  # noqa: BLE001  # any Redis failure means: go on locally
            self._failed(exc, "publish" if local else "read")
            return False, None
        self._recovered()
        return True, _decode(values)

    def _failed(self, exc: Exception, action: str) -> None:
        first = not self._down
        self._down = True
        self._down_until = self._clock.monotonic() + self._retry_after
        if first:
            _log.warning(
                "idis.breaker.shared_state_unavailable",
                msg=(
                    f"Redis breaker state unavailable ({type(exc).__name__} on {action}); "
                    f"using this process's breaker state, retrying every {self._retry_after:g}s"
                ),
                breaker=self.key,
            )

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            _log.info(
                "idis.breaker.shared_state_restored",
                msg="Redis breaker state reachable again; newest state wins",
                breaker=self.key,
            )


class RedisBreakerStores:
    """A ``(provider, breaker) -> store`` factory for one gateway; its stores share the clients.

    A gateway uses one when ``settings.redis_url`` is set and it is given no
    ``breaker_storage``. Nothing connects until the first exchange, so a Redis
    outage at start-up costs a warning, not an exception.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = system_clock,
        prefix: str = "idis:breaker:",
        socket_timeout: float = 0.25,
        retry_after: float = 5.0,
    ) -> None:
        self._clients = _Clients(url, socket_timeout)
        self._clock = clock
        self._prefix = prefix
        self._retry_after = retry_after

    def __call__(self, provider: str, breaker: str) -> RedisBreakerStore:
        return RedisBreakerStore(
            self._clients,
            f"{self._prefix}{provider}:{breaker}",
            clock=self._clock,
            retry_after=self._retry_after,
        )

    def close(self) -> None:
        """Close the blocking client."""
        self._clients.close()

    async def aclose(self) -> None:
        """Close the current event loop's asyncio client (and the blocking one)."""
        await self._clients.aclose()
        self._clients.close()


def read_shared_state(
    url: str, provider: str, breaker: str | None = None, *, prefix: str = "idis:breaker:"
) -> SharedState | None:
    """The shared state of one breaker, read once (for ``status``); None when nothing is stored.

    Raises:
        Exception: whatever the Redis client raises (the caller reports it).
    """
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return _decode(client.hmget(f"{prefix}{provider}:{breaker or provider}", *_FIELDS))
    finally:
        client.close()
