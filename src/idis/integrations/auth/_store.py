"""Statements on ``oauth_tokens``, built once and run by the sync and async stores.

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

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Select, Table, insert, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .._audit import AuditEvent, audit_row
from ..exceptions import StorageError, TokenLockTimeout
from ..observability._logs import redact_text
from ._models import OAuthTokenRow

__all__ = ["AsyncTokenStore", "RowSnapshot", "SyncTokenStore", "db_errors"]

# Declarative models expose __table__ as FromClause; it is a Table.
TABLE = cast(Table, OAuthTokenRow.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)
#: PostgreSQL SQLSTATE for "lock_not_available" (lock_timeout expired).
_LOCK_NOT_AVAILABLE = "55P03"
#: PostgreSQL SQLSTATE for "undefined_table".
_UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True, slots=True)
class RowSnapshot:
    """The columns of one ``oauth_tokens`` row, read at one moment."""

    provider: str
    grant_type: str
    state: str
    generation: int
    token_type: str | None
    access_token_enc: str | None
    refresh_token_enc: str | None
    scopes: list[str]
    issued_at: datetime | None
    expires_at: datetime | None
    last_refresh_at: datetime | None
    last_attempt_at: datetime | None
    last_outcome: str | None
    last_error: str | None
    consecutive_failures: int
    next_attempt_at: datetime | None
    client_id: str | None
    client_secret_enc: str | None
    credential_source: str | None
    credential_version: int | None
    credentials_rotated_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_mapping(cls, row: RowMapping | Mapping[str, Any]) -> RowSnapshot:
        """Build from a result row (Core mapping)."""
        values = {f.name: row[f.name] for f in fields(cls)}
        values["scopes"] = list(values["scopes"] or [])
        return cls(**values)

    def __repr__(self) -> str:
        return (
            f"RowSnapshot(provider={self.provider!r}, state={self.state!r}, "
            f"generation={self.generation})"
        )


def blank_values(provider: str, now: datetime) -> dict[str, Any]:
    """Values of a new, empty row (no token yet)."""
    return {
        "provider": provider,
        "grant_type": "",
        "state": "ok",
        "generation": 0,
        "scopes": [],
        "consecutive_failures": 0,
        "updated_at": now,
    }


def select_row(provider: str, *, for_update: bool) -> Select[Any]:
    """The provider's row; with ``FOR UPDATE`` when taking the refresh lock."""
    query = select(TABLE).where(TABLE.c.provider == provider)
    return query.with_for_update() if for_update else query


def insert_missing(provider: str, now: datetime, dialect: str) -> Any:
    """Create the provider's empty row unless it exists (race-free on both backends)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return (
            pg_insert(TABLE)
            .values(**blank_values(provider, now))
            .on_conflict_do_nothing(index_elements=["provider"])
        )
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return (
            sqlite_insert(TABLE)
            .values(**blank_values(provider, now))
            .on_conflict_do_nothing(index_elements=["provider"])
        )
    return insert(TABLE).values(**blank_values(provider, now))


def update_row(provider: str, values: Mapping[str, Any], expect_generation: int | None) -> Any:
    """Write ``values``; with ``expect_generation``, only if nobody wrote a newer token."""
    statement = update(TABLE).where(TABLE.c.provider == provider)
    if expect_generation is not None:
        statement = statement.where(TABLE.c.generation == expect_generation)
    return statement.values(**values)


def audit_insert(entries: list[dict[str, Any]]) -> list[Any]:
    """Insert statements for audit rows (redacted by ``audit_row``)."""
    return [insert(_AUDIT).values(**audit_row(**entry)) for entry in entries]


def lock_timeout_sql(seconds: float) -> str:
    """``SET LOCAL lock_timeout`` for the current transaction (PostgreSQL)."""
    return f"SET LOCAL lock_timeout = '{max(1, int(seconds * 1000))}ms'"


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def translate_db_error(exc: DBAPIError, provider: str, lock_timeout: float) -> Exception:
    """The library error a database failure on the token row means."""
    state = _sqlstate(exc)
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


# --------------------------------------------------------------------------- sync


class SyncRow:
    """The provider's row, read (and on PostgreSQL locked) for one refresh decision."""

    def __init__(
        self,
        store: SyncTokenStore,
        provider: str,
        snapshot: RowSnapshot,
        connection: Connection | None,
    ) -> None:
        self._store = store
        self.provider = provider
        self.snapshot = snapshot
        self._connection = connection  # set while a PostgreSQL row lock is held

    @property
    def locked(self) -> bool:
        """Whether this process holds the row lock (PostgreSQL)."""
        return self._connection is not None

    def write(
        self,
        values: Mapping[str, Any],
        *,
        expect_generation: int | None,
        audit: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Write and commit ``values`` (with audit rows); False if the compare-and-set lost."""
        statement = update_row(self.provider, values, expect_generation)
        with db_errors(self.provider):
            if self._connection is not None:
                conn = self._connection
                written = conn.execute(statement).rowcount == 1
                if written:
                    for entry in audit_insert(audit or []):
                        conn.execute(entry)
                conn.commit()
                self._connection = None
                return written
            with self._store.engine.begin() as conn:
                written = conn.execute(statement).rowcount == 1
                if written:
                    for entry in audit_insert(audit or []):
                        conn.execute(entry)
                return written

    def reread(self) -> RowSnapshot:
        """Read the row again (after a lost compare-and-set)."""
        self.snapshot = self._store.read(self.provider)
        return self.snapshot


class SyncTokenStore:
    """Token rows through a sync engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def read(self, provider: str) -> RowSnapshot:
        """Read (creating if needed) the provider's row without locking it."""
        with db_errors(provider), self.engine.begin() as conn:
            return self._fetch(conn, provider, for_update=False)

    def _fetch(self, conn: Connection, provider: str, *, for_update: bool) -> RowSnapshot:
        from .._timeparse import utcnow

        row = conn.execute(select_row(provider, for_update=for_update)).mappings().first()
        if row is None:
            conn.execute(insert_missing(provider, utcnow(), self.dialect))
            row = conn.execute(select_row(provider, for_update=for_update)).mappings().one()
        return RowSnapshot.from_mapping(row)

    @contextmanager
    def locked(self, provider: str, lock_timeout: float) -> Iterator[SyncRow]:
        """The provider's row, locked on PostgreSQL until written (or the block ends)."""
        if self.dialect != "postgresql":
            yield SyncRow(self, provider, self.read(provider), None)
            return
        with db_errors(provider, lock_timeout):
            conn = self.engine.connect()
        try:
            with db_errors(provider, lock_timeout):
                conn.begin()
                conn.exec_driver_sql(lock_timeout_sql(lock_timeout))
                snapshot = self._fetch(conn, provider, for_update=True)
            handle = SyncRow(self, provider, snapshot, conn)
            yield handle
        finally:
            try:
                if conn.in_transaction():
                    conn.rollback()
            finally:
                conn.close()

    def audit_only(self, audit: list[dict[str, Any]]) -> None:
        """Insert audit rows in a transaction of their own (touches no token row)."""
        with db_errors(""), self.engine.begin() as conn:
            for entry in audit_insert(audit):
                conn.execute(entry)

    def write_unlocked(
        self,
        provider: str,
        values: Mapping[str, Any],
        *,
        audit: list[dict[str, Any]] | None = None,
    ) -> None:
        """Write without a refresh lock (metadata only, e.g. rotation bookkeeping)."""
        with db_errors(provider), self.engine.begin() as conn:
            self._fetch(conn, provider, for_update=False)
            conn.execute(update_row(provider, values, None))
            for entry in audit_insert(audit or []):
                conn.execute(entry)


# --------------------------------------------------------------------------- async


class AsyncRow:
    """Async twin of :class:`SyncRow`."""

    def __init__(
        self,
        store: AsyncTokenStore,
        provider: str,
        snapshot: RowSnapshot,
        connection: AsyncConnection | None,
    ) -> None:
        self._store = store
        self.provider = provider
        self.snapshot = snapshot
        self._connection = connection

    @property
    def locked(self) -> bool:
        """Whether this task holds the row lock (PostgreSQL)."""
        return self._connection is not None

    async def write(
        self,
        values: Mapping[str, Any],
        *,
        expect_generation: int | None,
        audit: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Write and commit ``values`` (with audit rows); False if the compare-and-set lost."""
        statement = update_row(self.provider, values, expect_generation)
        with db_errors(self.provider):
            if self._connection is not None:
                conn = self._connection
                written = (await conn.execute(statement)).rowcount == 1
                if written:
                    for entry in audit_insert(audit or []):
                        await conn.execute(entry)
                await conn.commit()
                self._connection = None
                return written
            async with self._store.engine.begin() as aconn:
                written = (await aconn.execute(statement)).rowcount == 1
                if written:
                    for entry in audit_insert(audit or []):
                        await aconn.execute(entry)
                return written

    async def reread(self) -> RowSnapshot:
        """Read the row again (after a lost compare-and-set)."""
        self.snapshot = await self._store.read(self.provider)
        return self.snapshot


class AsyncTokenStore:
    """Token rows through an async engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    async def read(self, provider: str) -> RowSnapshot:
        """Read (creating if needed) the provider's row without locking it."""
        with db_errors(provider):
            async with self.engine.begin() as conn:
                return await self._fetch(conn, provider, for_update=False)

    async def _fetch(
        self, conn: AsyncConnection, provider: str, *, for_update: bool
    ) -> RowSnapshot:
        from .._timeparse import utcnow

        row = (await conn.execute(select_row(provider, for_update=for_update))).mappings().first()
        if row is None:
            await conn.execute(insert_missing(provider, utcnow(), self.dialect))
            result = await conn.execute(select_row(provider, for_update=for_update))
            row = result.mappings().one()
        return RowSnapshot.from_mapping(row)

    @asynccontextmanager
    async def locked(self, provider: str, lock_timeout: float) -> AsyncIterator[AsyncRow]:
        """The provider's row, locked on PostgreSQL until written (or the block ends)."""
        if self.dialect != "postgresql":
            yield AsyncRow(self, provider, await self.read(provider), None)
            return
        with db_errors(provider, lock_timeout):
            conn = await self.engine.connect()
        try:
            with db_errors(provider, lock_timeout):
                await conn.begin()
                await conn.exec_driver_sql(lock_timeout_sql(lock_timeout))
                snapshot = await self._fetch(conn, provider, for_update=True)
            yield AsyncRow(self, provider, snapshot, conn)
        finally:
            try:
                if conn.in_transaction():
                    await conn.rollback()
            finally:
                await conn.close()
