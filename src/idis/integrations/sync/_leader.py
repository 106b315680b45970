"""Poller leadership: exactly one replica polls (and runs the sentinel and controller) per provider.

On PostgreSQL the leader holds a session-level advisory lock
(``pg_try_advisory_lock``) on a dedicated connection for as long as it leads.
Standbys try to take the lock every ``lock_timeout / 3``. When the leader
process dies, its connection closes and PostgreSQL releases the lock at once;
when its host vanishes without closing the socket, TCP keepalives and
``tcp_user_timeout`` (both derived from ``lock_timeout``) make the server drop
the connection within about one ``lock_timeout``. Either way a standby takes
over within one lock timeout. The leader checks its connection on every tick
and steps down the moment it is gone, so two replicas never poll at once.

On SQLite (the embedded, single-process default) there is nothing to
coordinate with: the lock is always held.

The decision of *when* to try is pure (:func:`next_attempt`); the two drivers,
:class:`LeaderLock` and :class:`AsyncLeaderLock`, only run the statements.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from ..db._engine import normalize_url
from ..observability._logs import get_logger

__all__ = ["AsyncLeaderLock", "LeaderLock", "lock_key", "next_attempt"]

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
    """A leadership lock named ``name`` (e.g. ``poller:crm_provider``). Not thread-safe.

    Args:
        database_url: The library's database URL.
        name: What is being led.
        lock_timeout: ``SyncSettings.lock_timeout``.
    """

    def __init__(self, database_url: str, name: str, *, lock_timeout: timedelta) -> None:
        self.name = name
        self.key = lock_key(name)
        self.lock_timeout = lock_timeout
        self.local = _is_sqlite(database_url)
        self._engine: Engine | None = None
        if not self.local:
            self._engine = create_engine(
                normalize_url(database_url),
                poolclass=NullPool,
                connect_args=_connect_args(lock_timeout, name),
            )
        self._conn: Connection | None = None
        #: Times this replica tried to take the lock (standby attempts).
        self.attempts = 0

    @property
    def held(self) -> bool:
        """Whether this replica held the lock at the last :meth:`acquire`."""
        return self.local or self._conn is not None

    def acquire(self) -> bool:
        """Take the lock if free, or confirm it is still held; never blocks.

        Returns:
            True while this replica leads.
        """
        if self.local:
            return True
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # noqa: BLE001  # any failure means the lock is gone
                _log.warning(
                    "idis.sync.leadership_lost", lock=self.name, error_type=type(exc).__name__
                )
                self._drop()
                return False
        assert self._engine is not None
        self.attempts += 1
        try:
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:  # noqa: BLE001  # database down: stand by, retry later
            _log.warning(
                "idis.sync.lock_unavailable", lock=self.name, error_type=type(exc).__name__
            )
            return False
        try:
            got = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            )
        except Exception as exc:  # noqa: BLE001  # same
            _log.warning(
                "idis.sync.lock_unavailable", lock=self.name, error_type=type(exc).__name__
            )
            conn.close()
            return False
        if not got:
            conn.close()
            return False
        self._conn = conn
        _log.info("idis.sync.leadership_acquired", lock=self.name)
        return True

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # noqa: BLE001, S110  # already broken: nothing to release
                pass

    def release(self) -> None:
        """Give up the lock (if held) and close its connection."""
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.close()
            except Exception:  # noqa: BLE001  # closing the session releases it anyway
                self._drop()
            self._conn = None
            _log.info("idis.sync.leadership_released", lock=self.name)

    def close(self) -> None:
        """Release and dispose of the dedicated engine."""
        self.release()
        if self._engine is not None:
            self._engine.dispose()


class AsyncLeaderLock:
    """Async twin of :class:`LeaderLock` (same rules, an ``AsyncEngine`` connection)."""

    def __init__(self, database_url: str, name: str, *, lock_timeout: timedelta) -> None:
        self.name = name
        self.key = lock_key(name)
        self.lock_timeout = lock_timeout
        self.local = _is_sqlite(database_url)
        self._engine: AsyncEngine | None = None
        if not self.local:
            self._engine = create_async_engine(
                normalize_url(database_url, asynchronous=True),
                poolclass=NullPool,
                connect_args=_connect_args(lock_timeout, name),
            )
        self._conn: AsyncConnection | None = None
        #: Times this replica tried to take the lock (standby attempts).
        self.attempts = 0

    @property
    def held(self) -> bool:
        """Whether this replica held the lock at the last :meth:`acquire`."""
        return self.local or self._conn is not None

    async def acquire(self) -> bool:
        """Take the lock if free, or confirm it is still held; never blocks."""
        if self.local:
            return True
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # noqa: BLE001  # any failure means the lock is gone
                _log.warning(
                    "idis.sync.leadership_lost", lock=self.name, error_type=type(exc).__name__
                )
                await self._drop()
                return False
        assert self._engine is not None
        self.attempts += 1
        try:
            conn = await self._engine.connect()
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:  # noqa: BLE001  # database down: stand by, retry later
            _log.warning(
                "idis.sync.lock_unavailable", lock=self.name, error_type=type(exc).__name__
            )
            return False
        try:
            result = await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key})
            got = bool(result.scalar())
        except Exception as exc:  # noqa: BLE001  # same
            _log.warning(
                "idis.sync.lock_unavailable", lock=self.name, error_type=type(exc).__name__
            )
            await conn.close()
            return False
        if not got:
            await conn.close()
            return False
        self._conn = conn
        _log.info("idis.sync.leadership_acquired", lock=self.name)
        return True

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:  # noqa: BLE001, S110  # already broken: nothing to release
                pass

    async def release(self) -> None:
        """Give up the lock (if held) and close its connection."""
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
