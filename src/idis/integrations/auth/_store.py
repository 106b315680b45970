"""Statements on ``oauth_tokens``, written once and run by the sync and async stores.

The statements run on a sync ``Connection``; the async store runs the very
same functions on its connection through ``AsyncConnection.run_sync``. Only
the lifecycle of the connection that holds the row lock (connect, begin,
commit, roll back, close) has a sync and an async body.

Locking: on PostgreSQL a refresh runs inside one transaction that holds
``SELECT ... FOR UPDATE`` on the provider's row (waiting at most
``lock_timeout``; a timeout is SQLSTATE 55P03 and becomes
:class:`TokenLockTimeout`). SQLite has no row locks and its only lock is
database-wide, so there the row is read in a short transaction and written
back with a compare-and-set on ``generation``: a losing failure write learns
that another process refreshed and adopts its token. SQLite is the embedded,
single-process default; replicas share PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, Table, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._audit import AuditEvent, audit_row
from ..db._base import dialect_insert
from ..exceptions import StorageError, TokenLockTimeout
from ..observability._logs import redact_text
from ._models import OAuthTokenRow

__all__ = ["AsyncTokenStore", "RowHandle", "RowSnapshot", "SyncTokenStore", "db_errors"]

# Declarative models expose __table__ as FromClause; it is a Table.
TABLE = cast(Table, OAuthTokenRow.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)
#: PostgreSQL SQLSTATE for "lock_not_available" (lock_timeout expired).
_LOCK_NOT_AVAILABLE = "55P03"
#: PostgreSQL SQLSTATE for "undefined_table".
_UNDEFINED_TABLE = "42P01"


#: A provider's row as read at one moment: a detached ``OAuthTokenRow`` (its columns are the
#: fields; never added to a session, so nothing written to it reaches the database).
RowSnapshot = OAuthTokenRow


def translate_db_error(exc: DBAPIError, provider: str, lock_timeout: float) -> Exception:
    """The library error a database failure on the token row means."""
    state = getattr(exc.orig, "sqlstate", None)
    if state == _LOCK_NOT_AVAILABLE:
        return TokenLockTimeout(
            f"waited {lock_timeout:g}s for the token lock of provider {provider!r}: another "
            "process or replica is refreshing it (or holds the row); the credentials may be "
            "fine - retry shortly",
            provider=provider,
        )
    text = str(exc.orig) if exc.orig is not None else type(exc).__name__
    if state == _UNDEFINED_TABLE or "no such table" in text:
        return StorageError(
            "the token table oauth_tokens does not exist: run `idis-integrations db upgrade`"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return StorageError(f"token store unreachable or refused the statement: {redact_text(first)}")


@contextmanager
def db_errors(provider: str, lock_timeout: float = 0.0) -> Iterator[None]:
    """Translate database errors around token-row statements."""
    try:
        yield
    except DBAPIError as exc:
        raise translate_db_error(exc, provider, lock_timeout) from exc


# --------------------------------------------------------------------------- statements


def fetch(
    conn: Connection,
    provider: str,
    *,
    for_update: bool,
    dialect: str,
    lock_timeout: float = 10.0,
) -> RowSnapshot:
    """Read the provider's row (creating an empty one if needed), locked if ``for_update``.

    Locking waits at most ``lock_timeout`` (PostgreSQL ``SET LOCAL lock_timeout``).
    """
    from .._timeparse import utcnow

    query = select(TABLE).where(TABLE.c.provider == provider)
    if for_update:
        query = query.with_for_update()
        if dialect == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{max(1, int(lock_timeout * 1000))}ms'")
    row = conn.execute(query).mappings().first()
    if row is None:
        blank = {
            "provider": provider,
            "grant_type": "",
            "state": "ok",
            "generation": 0,
            "scopes": [],
            "consecutive_failures": 0,
            "updated_at": utcnow(),
        }
        # Unless another caller created it meanwhile (race-free on both backends).
        conn.execute(
            dialect_insert(TABLE, dialect)
            .values(**blank)
            .on_conflict_do_nothing(index_elements=["provider"])
        )
        row = conn.execute(query).mappings().one()
    return RowSnapshot(**row)


def write_values(
    conn: Connection,
    provider: str,
    values: Mapping[str, Any],
    expect_generation: int | None,
    audit: list[dict[str, Any]],
) -> bool:
    """UPDATE the row (and insert audit rows if it was written); False if the CAS lost.

    With ``expect_generation``, only if nobody wrote a newer token.
    """
    statement = update(TABLE).where(TABLE.c.provider == provider)
    if expect_generation is not None:
        statement = statement.where(TABLE.c.generation == expect_generation)
    written = conn.execute(statement.values(**values)).rowcount == 1
    if written:
        insert_audit(conn, audit)
    return written


def insert_audit(conn: Connection, audit: list[dict[str, Any]]) -> None:
    """Insert audit rows only (redacted by ``audit_row``)."""
    for entry in audit:
        conn.execute(insert(_AUDIT).values(**audit_row(**entry)))


@dataclass(slots=True)
class RowHandle:
    """A provider's row read for one decision; on PostgreSQL it holds the row lock.

    ``connection`` is the sync or async connection whose transaction holds
    ``SELECT ... FOR UPDATE``; None on SQLite (no row locks) and once the
    handle was written (the commit released the lock) or released.
    """

    provider: str
    snapshot: RowSnapshot
    connection: Any = None

    @property
    def locked(self) -> bool:
        """Whether the row lock is still held."""
        return self.connection is not None

    def __repr__(self) -> str:
        return f"RowHandle(provider={self.provider!r}, locked={self.locked})"


# --------------------------------------------------------------------------- sync


class SyncTokenStore:
    """Token rows through a sync engine (thread-safe: each call uses its own connection)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def read(self, provider: str) -> RowSnapshot:
        """Read (creating if needed) the provider's row without locking it."""
        with db_errors(provider), self.engine.begin() as conn:
            return fetch(conn, provider, for_update=False, dialect=self.dialect)

    def lock(self, provider: str, lock_timeout: float) -> RowHandle:
        """The provider's row, locked on PostgreSQL until written or released."""
        if self.dialect != "postgresql":
            return RowHandle(provider, self.read(provider))
        with db_errors(provider, lock_timeout):
            conn = self.engine.connect()
            try:
                conn.begin()
                snapshot = fetch(
                    conn, provider, for_update=True, dialect=self.dialect, lock_timeout=lock_timeout
                )
            except BaseException:
                self._close(conn)
                raise
        return RowHandle(provider, snapshot, conn)

    def write(
        self,
        handle: RowHandle,
        values: Mapping[str, Any],
        *,
        expect_generation: int | None,
        audit: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Write and commit ``values`` (with audit rows); False if the compare-and-set lost.

        With the row lock held the write commits its transaction, which releases
        the lock; otherwise it runs in a short transaction of its own.
        """
        with db_errors(handle.provider):
            conn: Connection | None = handle.connection
            if conn is not None:
                written = write_values(
                    conn, handle.provider, values, expect_generation, audit or []
                )
                conn.commit()
                self.release(handle)
                return written
            with self.engine.begin() as own:
                return write_values(own, handle.provider, values, expect_generation, audit or [])

    def release(self, handle: RowHandle) -> None:
        """Give up the row lock (roll back) if it is still held; safe to call twice."""
        conn: Connection | None = handle.connection
        handle.connection = None
        if conn is not None:
            self._close(conn)

    @staticmethod
    def _close(conn: Connection) -> None:
        try:
            if conn.in_transaction():
                conn.rollback()
        finally:
            conn.close()

    def reread(self, handle: RowHandle) -> RowSnapshot:
        """Read the row again (after a lost compare-and-set)."""
        handle.snapshot = self.read(handle.provider)
        return handle.snapshot

    @contextmanager
    def locked(self, provider: str, lock_timeout: float) -> Iterator[RowHandle]:
        """``lock`` as a context manager (released on exit)."""
        handle = self.lock(provider, lock_timeout)
        try:
            yield handle
        finally:
            self.release(handle)

    def audit_only(self, audit: list[dict[str, Any]]) -> None:
        """Insert audit rows in a transaction of their own (touches no token row)."""
        with db_errors(""), self.engine.begin() as conn:
            insert_audit(conn, audit)


# --------------------------------------------------------------------------- async


class AsyncTokenStore:
    """Token rows through an async engine: the same statements, run through ``run_sync``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    async def read(self, provider: str) -> RowSnapshot:
        """Read (creating if needed) the provider's row without locking it."""
        with db_errors(provider):
            async with self.engine.begin() as conn:
                return await conn.run_sync(fetch, provider, for_update=False, dialect=self.dialect)

    async def lock(self, provider: str, lock_timeout: float) -> RowHandle:
        """The provider's row, locked on PostgreSQL until written or released."""
        if self.dialect != "postgresql":
            return RowHandle(provider, await self.read(provider))
        with db_errors(provider, lock_timeout):
            conn = await self.engine.connect()
            try:
                await conn.begin()
                snapshot = await conn.run_sync(
                    fetch,
                    provider,
                    for_update=True,
                    dialect=self.dialect,
                    lock_timeout=lock_timeout,
                )
            except BaseException:
                await self._close(conn)
                raise
        return RowHandle(provider, snapshot, conn)

    async def write(
        self,
        handle: RowHandle,
        values: Mapping[str, Any],
        *,
        expect_generation: int | None,
        audit: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Async :meth:`SyncTokenStore.write`."""
        with db_errors(handle.provider):
            conn: AsyncConnection | None = handle.connection
            if conn is not None:
                written = await conn.run_sync(
                    write_values, handle.provider, values, expect_generation, audit or []
                )
                await conn.commit()
                await self.release(handle)
                return written
            async with self.engine.begin() as own:
                return await own.run_sync(
                    write_values, handle.provider, values, expect_generation, audit or []
                )

    async def release(self, handle: RowHandle) -> None:
        """Async :meth:`SyncTokenStore.release`."""
        conn: AsyncConnection | None = handle.connection
        handle.connection = None
        if conn is not None:
            await self._close(conn)

    @staticmethod
    async def _close(conn: AsyncConnection) -> None:
        try:
            if conn.in_transaction():
                await conn.rollback()
        finally:
            await conn.close()

    async def reread(self, handle: RowHandle) -> RowSnapshot:
        """Async :meth:`SyncTokenStore.reread`."""
        handle.snapshot = await self.read(handle.provider)
        return handle.snapshot
