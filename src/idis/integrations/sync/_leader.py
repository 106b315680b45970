"""Poller leadership: exactly one replica polls (and runs the sentinel and controller) per provider.

On PostgreSQL the leader holds a session-level advisory lock
(``pg_try_advisory_lock``) on a dedicated connection for as long as it leads.
Standbys try to take the lock every ``lock_timeout / 3``. When the leader
process dies, its connection closes and PostgreSQL releases the lock at once;
when its host vanishes without closing the socket, TCP keepalives and
``tcp_user_timeout`` (both derived from ``lock_timeout``) make the server drop
the connection within about one ``lock_timeout``. Either way a standby takes
over within one lock timeout. The leader checks its connection on every tick
and steps down the moment it is gone.

On SQLite (the embedded default) the leadership is a lease on the provider's
state row: the leader renews it every tick (``lease_until = now +
lock_timeout``); another process on the same database file takes over once it
has lapsed, or at once when the leader gave it up on a clean stop.

Checking "am I still the leader?" once per tick is not enough on its own: a
poll may read hundreds of pages, and a leader can be deposed in between
(network partition, a stalled process whose lease lapsed). So taking the
leadership also takes a **fencing epoch** (``sync_provider_state.leader_epoch``,
bumped each time; :func:`~idis.integrations.sync._state.take_epoch`), and every
cursor and mode write is compare-and-set on it
(:func:`~idis.integrations.sync._state.fence`): a deposed leader's late writes
change nothing.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .._clock import Clock, system_clock
from ..db._engine import normalize_url
from ..observability._logs import get_logger
from ._mode import ModePolicy
from ._state import release_epoch, take_epoch

__all__ = ["LeaderLock", "lock_key", "next_attempt"]

_log = get_logger()


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name``."""
    digest = hashlib.blake2b(f"idis.integrations:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def next_attempt(last_attempt: float | None, now: float, lock_timeout: timedelta) -> bool:
    """Whether a standby should try the lock now (every third of a lock timeout)."""
    return last_attempt is None or now - last_attempt >= lock_timeout.total_seconds() / 3


def _connect_args(lock_timeout: timedelta, name: str) -> dict[str, Any]:
    seconds = max(1, int(lock_timeout.total_seconds()))
    return {
        # libpq keepalives: a half-open connection to a vanished leader is
        # detected by the server within about one lock timeout.
        "keepalives": 1,
        "keepalives_idle": max(1, seconds // 3),
        "keepalives_interval": max(1, seconds // 6),
        "keepalives_count": 3,
        "tcp_user_timeout": seconds * 1000,
        "application_name": f"idis-leader:{name}"[:63],
    }


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


class LeaderLock:
    """The leadership of one provider's sync for this replica, with its fencing epoch.

    Not safe to share between tasks. ``acquire()`` every tick returns the epoch
    while this replica leads (pass it to ``Poller.poll_once(epoch=...)`` and to
    :func:`~idis.integrations.sync._state.fence`), None otherwise.

    Args:
        database_url: The library's database URL.
        provider: The provider led.
        sessions: Async session factory on the library's database (epochs, leases).
        replica: This replica's id (``status`` shows it as the leader).
        lock_timeout: ``SyncSettings.lock_timeout``.
        policy: For creating the provider's state row.
        clock: Time source (lease times).
    """

    def __init__(
        self,
        database_url: str,
        provider: str,
        *,
        sessions: Any,
        replica: str,
        lock_timeout: timedelta,
        policy: ModePolicy | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.provider = provider
        self.name = f"sync:{provider}"
        self.key = lock_key(self.name)
        self.lock_timeout = lock_timeout
        self.replica = replica
        self.policy = policy or ModePolicy()
        self.clock: Clock = clock or system_clock
        self._sessions = sessions
        self.local = _is_sqlite(database_url)
        self._engine: AsyncEngine | None = None
        if not self.local:
            self._engine = create_async_engine(
                normalize_url(database_url, asynchronous=True),
                poolclass=NullPool,
                connect_args=_connect_args(lock_timeout, self.name),
            )
        self._conn: AsyncConnection | None = None
        #: The fencing epoch while this replica leads, else None.
        self.epoch: int | None = None
        #: Times this replica tried to take the lock (standby attempts).
        self.attempts = 0
        #: Why the last attempt could not even ask (the database's error type), or None.
        self.unavailable: str | None = None

    @property
    def held(self) -> bool:
        """Whether this replica led at the last :meth:`acquire`."""
        return self.epoch is not None

    async def _take_epoch(self, *, lease: bool) -> int | None:
        async with self._sessions() as session, session.begin():
            epoch: int | None = await session.run_sync(
                lambda s: take_epoch(
                    s,
                    self.provider,
                    self.policy,
                    self.clock.now(),
                    self.replica,
                    lease=self.lock_timeout if lease else None,
                    current=self.epoch,
                )
            )
        return epoch

    async def acquire(self) -> int | None:
        """Take the leadership if free, or confirm (renew) it; never blocks.

        Returns:
            The fencing epoch while this replica leads, else None.
        """
        if self.local:
            return await self._acquire_lease()
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT 1"))
            except Exception as exc:  # noqa: BLE001  # any failure means the lock is gone
                _log.warning(
                    "idis.sync.leadership_lost", lock=self.name, error_type=type(exc).__name__
                )
                await self._drop()
                return None
            if self.epoch is None:
                # Fenced (an operator's override moved the epoch) but still holding
                # the lock: lead again under a new epoch.
                self.epoch = await self._take_epoch(lease=False)
            return self.epoch
        return await self._acquire_lock()

    async def _acquire_lease(self) -> int | None:
        self.attempts += self.epoch is None
        held = self.epoch is not None
        self.epoch = await self._take_epoch(lease=True)
        if self.epoch is not None and not held:
            _log.info("idis.sync.leadership_acquired", lock=self.name, epoch=self.epoch)
        elif self.epoch is None and held:
            _log.warning("idis.sync.leadership_lost", lock=self.name, error_type="lease_taken")
        return self.epoch

    async def _acquire_lock(self) -> int | None:
        assert self._engine is not None
        self.attempts += 1
        self.unavailable = None
        conn: AsyncConnection | None = None
        try:
            conn = await self._engine.connect()
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            result = await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
            got = bool(result.scalar())
        except Exception as exc:  # noqa: BLE001  # database down: stand by, retry later
            self.unavailable = type(exc).__name__
            _log.warning("idis.sync.lock_unavailable", lock=self.name, error_type=self.unavailable)
            if conn is not None:
                await conn.close()
            return None
        if not got:
            await conn.close()
            return None
        self._conn = conn
        try:
            self.epoch = await self._take_epoch(lease=False)
        except Exception:
            await self._drop()
            raise
        _log.info("idis.sync.leadership_acquired", lock=self.name, epoch=self.epoch)
        return self.epoch

    def deposed(self) -> None:
        """A fenced write showed the epoch moved on: lead again only under a new one."""
        self.epoch = None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.epoch = None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:  # noqa: BLE001, S110  # already broken: nothing to release
                pass

    async def release(self) -> None:
        """Give up the leadership (if held): a standby may lead at once."""
        epoch = self.epoch
        if epoch is not None:
            try:
                async with self._sessions() as session, session.begin():
                    await session.run_sync(
                        lambda s: release_epoch(s, self.provider, self.replica, epoch)
                    )
            except Exception as exc:  # noqa: BLE001  # the lease lapses, the lock closes anyway
                _log.warning(
                    "idis.sync.release_failed", lock=self.name, error_type=type(exc).__name__
                )
        self.epoch = None
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                await self._conn.close()
            except Exception:  # noqa: BLE001  # closing the session releases it anyway
                await self._drop()
            self._conn = None
            _log.info("idis.sync.leadership_released", lock=self.name)

    async def aclose(self) -> None:
        """Release and dispose of the dedicated engine."""
        await self.release()
        if self._engine is not None:
            await self._engine.dispose()
