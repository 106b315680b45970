"""Plumbing shared by reconcile, resync and verify-sync: page commits, the run lock, clients.

A page of events commits in one transaction with its audit and checkpoint rows
(:func:`commit_flow`), through the inbox's one apply flow
(:func:`~idis.integrations.sync._inbox.apply_flow`): the same decisions, rows
and lock order as a webhook. The run lock and the provider calls are effects,
so :func:`~._replay.reconcile` and :func:`~._replay.reconcile_async` are one
flow driven twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, Table, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

from .._audit import AuditEvent, audit_row
from .._clock import Clock
from .._flow import Effect, Flow, InSession, Sleep, perform
from ..config import Settings
from ..db._engine import create_db_engine, read_only, storage_errors
from ..exceptions import IntegrationError, StorageError
from ..observability._logs import get_logger, redact_text
from ..sync._bulk import bulk_insert
from ..sync._effects import TransactionFlow
from ..sync._inbox import ApplyResult, HandlerRegistry, apply_flow

if TYPE_CHECKING:
    from ..auth._httpx_auth import OAuthAuthFactory

__all__ = [
    "AUDIT_TABLE",
    "LOCK_WAIT",
    "ReconcileBusy",
    "audit_result",
    "commit_flow",
    "default_async_client",
    "default_client",
    "default_engine",
    "is_conflict",
    "run_lock_flow",
    "sessions",
    "transaction",
    "unlock",
]

log = get_logger()

#: ``audit_events`` as a Core table: bulk audit inserts skip the ORM's per-row bookkeeping.
AUDIT_TABLE: Table = AuditEvent.__table__  # type: ignore[assignment]  # declarative __table__

#: Attempts at a page whose transaction hit a serialization failure or a unique violation.
_CONFLICT_RETRIES = 3
#: SQLSTATEs that mean "another transaction got there first": retry the page.
_RETRY_SQLSTATES = frozenset({"23505", "40001", "40P01"})


class ReconcileBusy(IntegrationError):
    """Another reconcile run for this provider holds the lock; wait for it or stop it."""

    retryable = True


def sessions(engine: Engine, *, write: bool = True) -> sessionmaker[Session]:
    """A session factory that keeps loaded values after commit.

    ``write=False`` for reads: on SQLite they take no write lock, so a timeline
    or a verify sample never queues behind a worker's writes.
    """
    return sessionmaker(engine if write else read_only(engine), expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, storage errors translated."""
    with storage_errors(), factory.begin() as session:
        yield session


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) means a concurrent writer got there first."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, IntegrityError):
            return True
        if isinstance(seen, DBAPIError):
            state = getattr(seen.orig, "sqlstate", None)
            if state in _RETRY_SQLSTATES:
                return True
        seen = seen.__cause__
    return False


# --------------------------------------------------------------------------- the run lock


def _lock_key(provider: str) -> int:
    digest = hashlib.blake2b(f"idis.reconcile:{provider}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


#: How long a run waits for another run's lock before giving up. A killed run's
#: lock goes when PostgreSQL notices its connection closed, which can take a
#: moment after the kill; a live run keeps it.
LOCK_WAIT = 10.0
_LOCK_POLL = 0.2
#: The lock handle of a database that needs none (SQLite: every page transaction
#: takes the database's write lock, and the inbox's unique key does the rest).
_NO_LOCK = object()


@dataclass(frozen=True, slots=True)
class _TryLock(Effect[Any]):
    """Try the provider's session advisory lock on a dedicated connection (PostgreSQL).

    Returns the connection holding it, ``_NO_LOCK`` on SQLite, or None when
    another run holds it.
    """

    provider: str

    def run(self, io: Any) -> Any:
        engine: Engine = io.engine
        if engine.dialect.name != "postgresql":
            return _NO_LOCK
        with storage_errors():
            conn = engine.connect()
            try:
                query = text("SELECT pg_try_advisory_lock(:k)")
                got = conn.execute(query, {"k": _lock_key(self.provider)}).scalar()
                conn.commit()
            except BaseException:
                conn.close()
                raise
        if got:
            return conn
        conn.close()
        return None

    async def arun(self, io: Any) -> Any:
        engine: AsyncEngine = io.engine
        if engine.dialect.name != "postgresql":
            return _NO_LOCK
        with storage_errors():
            conn = await engine.connect()
            try:
                query = text("SELECT pg_try_advisory_lock(:k)")
                result = await conn.execute(query, {"k": _lock_key(self.provider)})
                got = result.scalar()
                await conn.commit()
            except BaseException:
                await conn.close()
                raise
        if got:
            return conn
        await conn.close()
        return None


@dataclass(frozen=True, slots=True)
class _Unlock(Effect[None]):
    """Release the lock a :class:`_TryLock` took and close its connection."""

    provider: str
    handle: Any

    def run(self, io: Any) -> None:
        if self.handle is _NO_LOCK:
            return
        try:
            self.handle.execute(
                text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(self.provider)}
            )
            self.handle.commit()
        finally:
            self.handle.close()  # closing the session releases it anyway

    async def arun(self, io: Any) -> None:
        if self.handle is _NO_LOCK:
            return
        try:
            await self.handle.execute(
                text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(self.provider)}
            )
            await self.handle.commit()
        finally:
            await self.handle.close()


def run_lock_flow(provider: str, *, wait: float, clock: Clock) -> Flow[Any]:
    """Take the one-run-per-provider lock, waiting up to ``wait`` seconds; return its handle.

    On PostgreSQL a session advisory lock, which dies with its connection, so a
    killed run never blocks the next one. Release it with :func:`unlock`.

    Raises:
        ReconcileBusy: another run still holds the lock after ``wait`` seconds.
    """
    deadline = clock.monotonic() + wait
    while True:
        handle = yield from perform(_TryLock(provider))
        if handle is not None:
            return handle
        if clock.monotonic() >= deadline:
            raise ReconcileBusy(
                f"another reconcile run for {provider} is in progress (its PostgreSQL "
                f"advisory lock was still held after {wait:g}s); wait for it to finish, "
                "then run again"
            )
        yield from perform(Sleep(_LOCK_POLL))


def unlock(provider: str, handle: Any) -> Flow[None]:
    """Release a lock taken by :func:`run_lock_flow`."""
    yield from perform(_Unlock(provider, handle))


# --------------------------------------------------------------------------- page commits


def audit_result(
    session: Session,
    result: ApplyResult,
    details: Callable[[Any], dict[str, Any]],
    *,
    applied: str,
    failed: str,
    **common: Any,
) -> None:
    """Audit a committed page: a row per applied event (action ``applied``, ``details(event)``)
    and per failed one (action ``failed``, the error's type and redacted message); ``common``
    is what every row names (provider, actor, source, correlation id, time)."""

    def row(action: str, **values: Any) -> dict[str, Any]:
        return audit_row(action, subject_type="record", **common, **values)

    rows = [
        row(applied, subject_id=e.record_id, tenant_id=e.tenant_id, details=details(e))
        for e in result.applied
    ]
    rows.extend(
        row(
            failed,
            subject_id=event.record_id,
            tenant_id=event.tenant_id,
            outcome="failed",
            details={"event_id": event.id, "event_type": event.type, "error": type(error).__name__},
            message=redact_text(str(error))[:500],
        )
        for event, error in result.failed
    )
    if rows:
        bulk_insert(session, AUDIT_TABLE, rows)


def _page_flow(
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str,
    now: datetime,
    also: Callable[[Session, ApplyResult, datetime], None],
) -> Flow[ApplyResult]:
    result = yield from apply_flow(
        provider, events, source, registry=registry, now=now, isolate=True
    )
    yield from perform(InSession(lambda session: also(session, result, now)))
    return result


def commit_flow(
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str,
    clock: Clock,
    also: Callable[[Session, ApplyResult, datetime], None],
) -> Flow[ApplyResult]:
    """Apply ``events`` through the inbox in one transaction, with ``also``'s rows beside them.

    A handler that raises costs only its own event (the inbox re-applies the
    page event by event, ``ApplyResult.failed``). A transaction that lost a
    race to another writer (unique violation, serialization failure) is retried.

    Args:
        provider: Provider name.
        events: The events, in the provider's order.
        registry: The host's handlers.
        source: Inbox channel.
        clock: Current time.
        also: Writes the caller's rows (audit, checkpoint) in the same transaction.
    """
    for attempt in range(_CONFLICT_RETRIES):
        try:
            result: ApplyResult = yield from perform(
                TransactionFlow(
                    _page_flow(
                        provider,
                        events,
                        registry=registry,
                        source=source,
                        now=clock.now(),
                        also=also,
                    )
                )
            )
            return result
        except (IntegrityError, StorageError) as exc:
            if not is_conflict(exc) or attempt == _CONFLICT_RETRIES - 1:
                raise
            log.info(
                "idis.reconcile.page_conflict",
                provider=provider,
                msg="a concurrent writer got there first; retrying the page",
            )
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- defaults


def default_engine(settings: Settings, stack: ExitStack) -> Engine:
    """An engine for the configured database, disposed when ``stack`` closes."""
    engine = create_db_engine(settings.database_url)
    stack.callback(engine.dispose)
    return engine


def _oauth(settings: Settings, provider: str, **engine: Any) -> OAuthAuthFactory | None:
    """The auth module's token machinery when the provider uses OAuth, else None (its token
    table is then never touched)."""
    if settings.provider(provider).auth.grant == "none":
        return None
    from ..auth._httpx_auth import oauth_auth_factory

    return oauth_auth_factory(settings, **engine)


def default_client(settings: Settings, provider: str, stack: ExitStack, engine: Engine) -> Any:
    """A ``ProviderClient`` over a new ``Gateway``, closed when ``stack`` closes.

    A provider that uses OAuth gets the auth module's token machinery (tokens
    stored in ``engine``'s database); others get none, so its table is never touched.
    """
    from ..providers import client_for
    from ..providers._pack import pack_auth
    from ..resilience import Gateway

    oauth = _oauth(settings, provider, engine=engine)
    if oauth is not None:
        stack.callback(oauth.close)
    gateway = Gateway(settings, auth=pack_auth(oauth))
    stack.callback(gateway.close)
    return client_for(gateway, provider)


async def default_async_client(
    settings: Settings, provider: str, stack: AsyncExitStack, engine: AsyncEngine
) -> Any:
    """An ``AsyncProviderClient`` over a new ``AsyncGateway``, closed when ``stack`` closes."""
    from ..providers import async_client_for
    from ..providers._pack import pack_auth
    from ..resilience import AsyncGateway

    oauth = _oauth(settings, provider, async_engine=engine)
    if oauth is not None:
        stack.push_async_callback(oauth.aclose)
    gateway = AsyncGateway(settings, auth=pack_auth(oauth))
    stack.push_async_callback(gateway.aclose)
    return async_client_for(gateway, provider)
