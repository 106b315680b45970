"""Plumbing shared by reconcile, resync and verify-sync: transactions, conflicts, clients."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .._audit import AuditEvent
from ..config import Settings
from ..db._engine import create_db_engine, storage_errors
from ..exceptions import IntegrationError, StorageError, UsageError
from ..observability._logs import get_logger
from ..sync._inbox import HandlerRegistry
from ._batch import (
    HandlerFailed,
    PageConflict,
    PageResult,
    apply_one_by_one,
    apply_page,
    claim_page,
)
from ._logic import PagePlan

__all__ = [
    "AUDIT_TABLE",
    "LOCK_WAIT",
    "ReconcileBusy",
    "acommit_events",
    "async_run_lock",
    "async_transaction",
    "commit_events",
    "default_async_client",
    "default_client",
    "default_engine",
    "is_conflict",
    "run_lock",
    "sessions",
    "transaction",
]

log = get_logger()

#: ``audit_events`` as a Core table: bulk audit inserts skip the ORM's per-row bookkeeping.
AUDIT_TABLE: Table = AuditEvent.__table__  # type: ignore[assignment]  # declarative __table__

#: Bulk attempts after a concurrent channel wrote part of a page, before going event by event.
_CONFLICT_RETRIES = 3
#: SQLSTATEs that mean "another transaction got there first": retry the page.
_RETRY_SQLSTATES = frozenset({"23505", "40001", "40P01"})


class ReconcileBusy(IntegrationError):
    """Another reconcile run for this provider holds the lock; wait for it or stop it."""

    retryable = True


def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory that keeps loaded values after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on error, storage errors translated."""
    with storage_errors(), factory.begin() as session:
        yield session


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) means a concurrent writer got there first."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, PageConflict | IntegrityError):
            return True
        if isinstance(seen, DBAPIError):
            state = getattr(seen.orig, "sqlstate", None)
            if state in _RETRY_SQLSTATES:
                return True
        seen = seen.__cause__
    return False


def _lock_key(provider: str) -> int:
    digest = hashlib.blake2b(f"idis.reconcile:{provider}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


#: How long a run waits for another run's lock before giving up. A killed run's
#: lock goes when PostgreSQL notices its connection closed, which can take a
#: moment after the kill; a live run keeps it.
LOCK_WAIT = 10.0
_LOCK_POLL = 0.2


@contextmanager
def run_lock(engine: Engine, provider: str, *, wait: float = LOCK_WAIT) -> Iterator[None]:
    """One reconcile run per provider at a time on PostgreSQL (session advisory lock).

    The lock dies with its connection, so a killed run never blocks the next
    one. SQLite needs none: every page transaction takes the database's write
    lock (``BEGIN IMMEDIATE``) and the inbox's unique key does the rest.

    Raises:
        ReconcileBusy: another run still holds the lock after ``wait`` seconds.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    key = _lock_key(provider)
    deadline = time.monotonic() + wait
    with storage_errors(), engine.connect() as conn:
        while True:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            conn.commit()
            if got or time.monotonic() >= deadline:
                break
            time.sleep(_LOCK_POLL)
        if not got:
            raise ReconcileBusy(
                f"another reconcile run for {provider} is in progress (its PostgreSQL "
                f"advisory lock was still held after {wait:g}s); wait for it to finish, "
                "then run again"
            )
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def default_engine(settings: Settings, stack: ExitStack) -> Engine:
    """An engine for the configured database, disposed when ``stack`` closes."""
    engine = create_db_engine(settings.database_url)
    stack.callback(engine.dispose)
    return engine


def default_client(settings: Settings, provider: str, stack: ExitStack, engine: Engine) -> Any:
    """A ``ProviderClient`` over a new ``Gateway``, closed when ``stack`` closes.

    A provider that uses OAuth gets the auth module's token machinery (tokens
    stored in ``engine``'s database); others get none, so its table is never touched.
    """
    from ..providers import ProviderClient
    from ..resilience import Gateway

    auth = None
    if settings.provider(provider).auth.grant != "none":
        from ..auth._httpx_auth import oauth_auth_factory

        factory = oauth_auth_factory(settings, engine=engine)
        stack.callback(factory.close)
        auth = factory
    gateway = Gateway(settings, auth=auth)
    stack.callback(gateway.close)
    return ProviderClient(gateway, provider)


async def default_async_client(
    settings: Settings, provider: str, stack: AsyncExitStack, engine: AsyncEngine
) -> Any:
    """An ``AsyncProviderClient`` over a new ``AsyncGateway``, closed when ``stack`` closes."""
    from ..providers import AsyncProviderClient
    from ..resilience import AsyncGateway

    auth = None
    if settings.provider(provider).auth.grant != "none":
        from ..auth._httpx_auth import oauth_auth_factory

        factory = oauth_auth_factory(settings, async_engine=engine)
        stack.push_async_callback(factory.aclose)
        auth = factory
    gateway = AsyncGateway(settings, auth=auth)
    stack.push_async_callback(gateway.aclose)
    return AsyncProviderClient(gateway, provider)


def commit_events(
    factory: sessionmaker[Session],
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str,
    clock: Callable[[], datetime],
    also: Callable[[Session, PageResult, datetime], None],
) -> tuple[PageResult, bool]:
    """Apply ``events`` through the inbox in one transaction, with ``also``'s rows beside them.

    Tries the bulk path (:func:`~.batch.apply_page`) and retries it when a
    concurrent channel wrote part of the page; after a failing handler, or
    after repeated conflicts, applies the page event by event through the
    inbox's own ``apply_event`` so that only the failing events are lost.

    Args:
        factory: Session factory.
        provider: Provider name.
        events: The events, in the provider's order.
        registry: The host's handlers.
        source: Inbox channel.
        clock: Current time.
        also: Writes the caller's rows (audit, checkpoint) in the same transaction.

    Returns:
        The page result and whether the bulk path applied it.
    """
    for _attempt in range(_CONFLICT_RETRIES):
        now = clock()
        try:
            with transaction(factory) as session:
                result = apply_page(
                    session, provider, events, registry=registry, source=source, now=now
                )
                also(session, result, now)
            return result, True
        except HandlerFailed:
            break
        except (PageConflict, IntegrityError, StorageError) as exc:
            if not is_conflict(exc):
                raise
            log.info(
                "idis.reconcile.page_conflict",
                provider=provider,
                msg="a concurrent channel wrote part of the page; retrying it",
            )
    now = clock()
    with transaction(factory) as session:
        result = apply_one_by_one(
            session, provider, events, registry=registry, source=source, now=now
        )
        also(session, result, now)
    return result, False


# --------------------------------------------------------------------------- asyncio twins


@asynccontextmanager
async def async_transaction(
    factory: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """Async twin of :func:`transaction`."""
    with storage_errors():
        async with factory.begin() as session:
            yield session


@asynccontextmanager
async def async_run_lock(
    engine: AsyncEngine, provider: str, *, wait: float = LOCK_WAIT
) -> AsyncIterator[None]:
    """Async twin of :func:`run_lock`.

    Raises:
        ReconcileBusy: another run still holds the lock after ``wait`` seconds.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    key = _lock_key(provider)
    deadline = time.monotonic() + wait
    with storage_errors():
        async with engine.connect() as conn:
            while True:
                got = (
                    await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})
                ).scalar()
                await conn.commit()
                if got or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(_LOCK_POLL)
            if not got:
                raise ReconcileBusy(
                    f"another reconcile run for {provider} is in progress (its PostgreSQL "
                    f"advisory lock was still held after {wait:g}s); wait for it to "
                    "finish, then run again"
                )
            try:
                yield
            finally:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                await conn.commit()


async def _run_handlers(session: AsyncSession, plan: PagePlan, registry: HandlerRegistry) -> None:
    for event in plan.apply:
        async_handler = registry.async_handler_for(event.type)
        sync_handler = registry.handler_for(event.type)
        try:
            if async_handler is not None:
                await async_handler(session, event)
            else:
                assert sync_handler is not None  # the plan applies handled types only
                await session.run_sync(sync_handler, event)
        except Exception as exc:
            raise HandlerFailed(event, exc) from exc
    try:
        await session.flush()
    except Exception as exc:
        raise HandlerFailed(None, exc) from exc


async def acommit_events(
    factory: async_sessionmaker[AsyncSession],
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str,
    clock: Callable[[], datetime],
    also: Callable[[Session, PageResult, datetime], None],
) -> tuple[PageResult, bool]:
    """Async twin of :func:`commit_events`: async handlers are awaited, sync ones run in place.

    ``also`` writes its rows through the session's sync facade (``run_sync``).
    """
    from ..sync._inbox import ApplyOutcome, apply_event_outcome_async

    def claim(session: Session, now: datetime) -> PagePlan:
        return claim_page(session, provider, events, registry=registry, source=source, now=now)

    for _attempt in range(_CONFLICT_RETRIES):
        now = clock()
        try:
            async with async_transaction(factory) as session:
                plan = await session.run_sync(claim, now)
                await _run_handlers(session, plan, registry)
                result = PageResult(plan)
                await session.run_sync(also, result, now)
            return result, True
        except HandlerFailed:
            break
        except (PageConflict, IntegrityError, StorageError) as exc:
            if not is_conflict(exc):
                raise
            log.info(
                "idis.reconcile.page_conflict",
                provider=provider,
                msg="a concurrent channel wrote part of the page; retrying it",
            )
    now = clock()
    plan = PagePlan()
    failed: list[tuple[Any, BaseException]] = []
    buckets = {
        ApplyOutcome.APPLIED: plan.apply,
        ApplyOutcome.DUPLICATE: plan.duplicates,
        ApplyOutcome.SUPERSEDED: plan.superseded,
        ApplyOutcome.IGNORED: plan.ignored,
    }
    async with async_transaction(factory) as session:
        for event in events:
            try:
                outcome = await apply_event_outcome_async(
                    session, provider, event, source, registry=registry, now=now
                )
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001  # a host handler may raise anything
                failed.append((event, exc))
                continue
            buckets[outcome].append(event)
        result = PageResult(plan, failed)
        await session.run_sync(also, result, now)
    return result, False
