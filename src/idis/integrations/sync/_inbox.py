"""The inbox: every provider event is applied exactly once, whatever channel brought it.

Webhooks, the poller and reconciliation's replay all call :func:`apply_event`
(or :func:`apply_event_async`) inside the host's transaction. In one savepoint
it claims the event in ``sync_inbox`` (unique per provider and event id),
checks the record's version, and calls the handler the host registered for
the event type, so the business change commits or rolls back together with
the inbox row. A second delivery of the same event, by any channel, finds the
row and changes nothing.

Ordering per record
-------------------
Events carry the record's ``version`` (or, lacking one, their feed ``seq``).
``sync_record_versions`` keeps the newest version applied per record. An event
older than (or equal to) it is *skipped with a record*: its inbox row says
``superseded`` and the handler is not called. We chose this over buffering
out-of-order events because provider events carry the record's full state
(``data`` is the record after the change), so the newest version is the
truth, and a buffer waiting for a version that never comes (a dropped
webhook) would stall the record until the poller or a replay fills the hole.
Consequence for handlers: write them as upserts of the state in the event;
the versions a handler sees for one record only ever increase, but one may be
skipped when it arrives after a newer one.

Contract (stable; the reconcile helper builds on it)::

    apply_event(session: Session, provider: str, event: EventLike, source: str,
                *, registry: HandlerRegistry | None = None, now: datetime | None = None,
                atomic: bool = True) -> bool
    apply_event_outcome(...same...) -> ApplyOutcome      # applied|duplicate|superseded|ignored
    await apply_event_async(session: AsyncSession, ...same...) -> bool
    await apply_event_outcome_async(...) -> ApplyOutcome
    known_event_ids(session, provider, event_ids) -> set[str]   # already in the inbox
    get_registry() -> HandlerRegistry                           # the process-wide default

``source`` is ``webhook``, ``poll`` or ``replay``. ``True`` means the handler ran
(the event was applied now); ``False`` means it was a duplicate, superseded by a
newer version, or has no handler (``ignored``). If the handler raises, the
savepoint is rolled back (no inbox row, no partial change) and the exception
propagates; the event is applied when it comes again. ``apply_event`` never
commits: the caller's transaction does, and ``integration_events_applied_total``
counts the event only once that commit succeeds.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, TypeAlias, cast, runtime_checkable

from sqlalchemy import Table, bindparam, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from .._timeparse import utcnow
from ..exceptions import UsageError
from ..observability._metrics import get_metrics
from ._models import SyncInbox, SyncRecordVersion

__all__ = [
    "CHANNELS",
    "ApplyOutcome",
    "AsyncHandler",
    "EventLike",
    "Handler",
    "HandlerRegistry",
    "apply_event",
    "apply_event_async",
    "apply_event_outcome",
    "apply_event_outcome_async",
    "get_registry",
    "inbox_rows",
    "known_event_ids",
    "order_key",
    "set_registry",
]

#: Channels an event can arrive by.
CHANNELS: tuple[str, ...] = ("webhook", "poll", "replay")


@runtime_checkable
class EventLike(Protocol):
    """What the inbox needs of an event (``providers.ProviderEvent`` has all of it)."""

    @property
    def id(self) -> str:
        """The provider's event id (dedupe key)."""

    @property
    def type(self) -> str:
        """Event type, e.g. ``record.updated``: selects the handler."""

    @property
    def seq(self) -> int | None:
        """Position in the provider's change feed."""

    @property
    def record_id(self) -> str | None:
        """Record the event is about."""

    @property
    def tenant_id(self) -> str | None:
        """Tenant of the record."""

    @property
    def version(self) -> int | None:
        """The record's version after the change."""

    @property
    def occurred_at(self) -> datetime | None:
        """When the change happened at the provider."""

    @property
    def data(self) -> Mapping[str, Any]:
        """The record's data after the change."""


#: A sync handler: apply the event's change through ``session`` (do not commit).
Handler: TypeAlias = Callable[[Session, Any], object]
#: An async handler: ``await``-ed with the caller's ``AsyncSession``.
AsyncHandler: TypeAlias = Callable[[AsyncSession, Any], Awaitable[object]]


class ApplyOutcome(StrEnum):
    """What :func:`apply_event_outcome` did with an event."""

    #: The handler ran; the event is now applied.
    APPLIED = "applied"
    #: The inbox already had the event (any channel): nothing changed.
    DUPLICATE = "duplicate"
    #: A newer version of the record was already applied: recorded, not applied.
    SUPERSEDED = "superseded"
    #: No handler is registered for the event type: recorded, not applied.
    IGNORED = "ignored"


class HandlerRegistry:
    """Handlers the host registers per event type.

    Sync handlers take ``(session: Session, event)``; async ones take
    ``(session: AsyncSession, event)`` and are awaited. Register ``"*"`` for
    every type that has no handler of its own. Thread-safe.

    Example::

        registry = get_registry()

        @registry.on("record.updated")
        def upsert_deal(session: Session, event: ProviderEvent) -> None:
            session.merge(Deal(id=event.record_id, **event.data))
    """

    #: Event type matching every type without a handler of its own.
    ANY = "*"

    def __init__(self) -> None:
        self._sync: dict[str, Handler] = {}
        self._async: dict[str, AsyncHandler] = {}
        self._lock = threading.Lock()

    def register(self, event_type: str, handler: Handler, *, replace: bool = False) -> None:
        """Register a sync handler for ``event_type``.

        Raises:
            UsageError: when the type already has a sync handler and ``replace`` is false.
        """
        self._add(self._sync, event_type, handler, replace)

    def register_async(
        self, event_type: str, handler: AsyncHandler, *, replace: bool = False
    ) -> None:
        """Register an async handler for ``event_type`` (used by the async drivers).

        Raises:
            UsageError: when the type already has an async handler and ``replace`` is false.
        """
        self._add(self._async, event_type, handler, replace)

    def on(self, event_type: str, *, replace: bool = False) -> Callable[[Any], Any]:
        """Decorator form of :meth:`register` / :meth:`register_async` (chosen by the function)."""

        def decorator(func: Any) -> Any:
            if inspect.iscoroutinefunction(func):
                self.register_async(event_type, func, replace=replace)
            else:
                self.register(event_type, func, replace=replace)
            return func

        return decorator

    def _add(self, table: dict[str, Any], event_type: str, handler: Any, replace: bool) -> None:
        if not isinstance(event_type, str) or not event_type:
            raise UsageError(f"event type {event_type!r} must be a non-empty string")
        if not callable(handler):
            raise UsageError(f"handler for {event_type!r} is not callable: {handler!r}")
        with self._lock:
            if event_type in table and not replace:
                raise UsageError(
                    f"a handler for {event_type!r} is already registered; pass replace=True"
                )
            table[event_type] = handler

    def unregister(self, event_type: str) -> None:
        """Remove the sync and async handlers of ``event_type`` (if any)."""
        with self._lock:
            self._sync.pop(event_type, None)
            self._async.pop(event_type, None)

    def handler_for(self, event_type: str) -> Handler | None:
        """The sync handler for ``event_type`` (or the ``"*"`` one), if any."""
        return self._sync.get(event_type) or self._sync.get(self.ANY)

    def async_handler_for(self, event_type: str) -> AsyncHandler | None:
        """The async handler for ``event_type`` (or the ``"*"`` one), if any."""
        return self._async.get(event_type) or self._async.get(self.ANY)

    def handles(self, event_type: str) -> bool:
        """Whether any handler (sync or async) would take ``event_type``."""
        return self.handler_for(event_type) is not None or (
            self.async_handler_for(event_type) is not None
        )

    def event_types(self) -> list[str]:
        """Registered event types, sorted."""
        return sorted(set(self._sync) | set(self._async))


_registry = HandlerRegistry()


def get_registry() -> HandlerRegistry:
    """The process-wide handler registry every channel applies through by default."""
    return _registry


def set_registry(registry: HandlerRegistry) -> HandlerRegistry:
    """Install ``registry`` as the process-wide default (tests, embedding); return the old one."""
    global _registry  # one registry per process, like the metrics
    previous, _registry = _registry, registry
    return previous


# --------------------------------------------------------------------------- statements
# Core statements built once per dialect with bound parameters, so SQLAlchemy
# compiles each once and every event only binds values (the hot path of the
# receiver and the poller). Executed on the session's connection, inside its
# transaction, by the sync and async drivers alike.

_INBOX = cast(Table, SyncInbox.__table__)
_VERSIONS = cast(Table, SyncRecordVersion.__table__)


@dataclass(frozen=True, slots=True)
class _Statements:
    claim: Any
    touch: Any
    take_version: Any
    supersede: Any


@functools.cache
def _statements(dialect: str) -> _Statements:
    if dialect == "postgresql":
        insert: Any = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise UsageError(f"the inbox needs SQLite or PostgreSQL, not {dialect}")
    claim = (
        insert(_INBOX)
        .on_conflict_do_nothing(index_elements=["provider", "event_id"])
        .returning(_INBOX.c.id)
    )
    touch = (
        update(_INBOX)
        .where(
            _INBOX.c.provider == bindparam("p"),
            _INBOX.c.event_id == bindparam("e"),
            # A redelivery of a webhook-delivered event writes nothing.
            _INBOX.c.webhook_at.is_(None),
        )
        .values(webhook_at=bindparam("w"))
    )
    version = insert(_VERSIONS)
    take_version = version.on_conflict_do_update(
        index_elements=["provider", "record_id"],
        set_={
            "version": version.excluded.version,
            "event_id": version.excluded.event_id,
            "updated_at": version.excluded.updated_at,
        },
        where=_VERSIONS.c.version < version.excluded.version,
    ).returning(_VERSIONS.c.id)
    supersede = (
        update(_INBOX)
        .where(_INBOX.c.id == bindparam("i"))
        .values(status=ApplyOutcome.SUPERSEDED.value)
    )
    return _Statements(claim, touch, take_version, supersede)


def order_key(event: EventLike) -> int | None:
    """The event's place in its record's history: its version, else its feed seq.

    Version 0 counts as absent (``ProviderEvent`` defaults to 0 when the provider
    sends none), so such events are ordered by seq.
    """
    if event.version:
        return int(event.version)
    if event.seq is not None:
        return int(event.seq)
    return None


_EVENT_TYPES: set[type] = set()


def _check_event(provider: str, event: object, source: str) -> EventLike:
    if source not in CHANNELS:
        raise UsageError(f"source {source!r} is not one of {', '.join(CHANNELS)}")
    # The runtime Protocol check walks every attribute; remember the types that passed.
    if type(event) not in _EVENT_TYPES:
        if not isinstance(event, EventLike):
            raise UsageError(
                f"{type(event).__name__} is not an event: expected id, type, seq, record_id, "
                "tenant_id, version, occurred_at and data attributes"
            )
        _EVENT_TYPES.add(type(event))
    event = cast(EventLike, event)
    if not event.id or not isinstance(event.id, str):
        raise UsageError(f"event from {provider} has no id: {event.id!r}")
    return event


def _claim(
    session: Session,
    provider: str,
    event: EventLike,
    source: str,
    *,
    handled: bool,
    now: datetime,
) -> ApplyOutcome | None:
    """Insert the inbox row and take the record's version; None means "call the handler"."""
    conn = session.connection()
    stmts = _statements(conn.dialect.name)
    status = ApplyOutcome.APPLIED if handled else ApplyOutcome.IGNORED
    webhook_at = now if source == "webhook" else None
    claimed = conn.execute(
        stmts.claim,
        {
            "provider": provider,
            "event_id": event.id,
            "event_type": event.type,
            "record_id": event.record_id,
            "tenant_id": event.tenant_id,
            "seq": event.seq,
            "version": event.version,
            "occurred_at": event.occurred_at,
            "source": source,
            "status": status.value,
            "received_at": now,
            "webhook_at": webhook_at,
        },
    ).scalar()
    if claimed is None:
        if webhook_at is not None:
            # The webhook channel delivered it after a poll or replay did: the
            # sentinel counts this as webhook health.
            conn.execute(stmts.touch, {"p": provider, "e": event.id, "w": webhook_at})
        return ApplyOutcome.DUPLICATE
    if not handled:
        return ApplyOutcome.IGNORED
    key = order_key(event)
    if event.record_id is None or key is None:
        return None
    newer = conn.execute(
        stmts.take_version,
        {
            "provider": provider,
            "record_id": event.record_id,
            "version": key,
            "event_id": event.id,
            "updated_at": now,
        },
    ).scalar()
    if newer is None:
        conn.execute(stmts.supersede, {"i": claimed})
        return ApplyOutcome.SUPERSEDED
    return None


# --------------------------------------------------------------------------- metrics after commit

_PENDING = "idis_sync_applied"


def _note_applied(session: Session, provider: str, source: str) -> None:
    pending: dict[tuple[str, str], int] = session.info.setdefault(_PENDING, {})
    pending[(provider, source)] = pending.get((provider, source), 0) + 1


@sa_event.listens_for(Session, "after_commit")
def _count_after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        metric = get_metrics().events_applied
        for (provider, source), count in pending.items():
            metric.labels(provider=provider, source=source).inc(count)


@sa_event.listens_for(Session, "after_transaction_end")
def _forget_after_rollback(session: Session, transaction: SessionTransaction) -> None:
    # Fires after after_commit too (by then the counts are gone); on a rollback
    # of the outermost transaction the events were not applied after all.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


# --------------------------------------------------------------------------- drivers


def _apply_once(
    session: Session,
    provider: str,
    event: EventLike,
    source: str,
    *,
    handler: Handler | None,
    now: datetime,
) -> ApplyOutcome:
    outcome = _claim(session, provider, event, source, handled=handler is not None, now=now)
    if outcome is not None:
        return outcome
    assert handler is not None
    handler(session, event)
    return ApplyOutcome.APPLIED


def apply_event_outcome(
    session: Session,
    provider: str,
    event: EventLike,
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    atomic: bool = True,
) -> ApplyOutcome:
    """Apply ``event`` once through the host's handler and say what happened.

    Args:
        session: The caller's session; the handler's change and the inbox row
            join its transaction (nothing is committed here).
        provider: Provider name.
        event: The event (``ProviderEvent`` or anything shaped like :class:`EventLike`).
        source: ``webhook``, ``poll`` or ``replay``.
        registry: Handlers to use (default: :func:`get_registry`).
        now: Receipt time (default: the current UTC time).
        atomic: Run in a savepoint, so a handler that raises leaves nothing of
            the event and the caller's transaction usable. Pass False only when
            the transaction holds this event alone and is rolled back on error
            (the webhook receiver does: it saves two statements per event).

    Returns:
        The :class:`ApplyOutcome`.

    Raises:
        UsageError: on an unknown source, a malformed event, or an event type
            with only an async handler.
        Exception: whatever the handler raised (after rolling back the savepoint).
    """
    checked = _check_event(provider, event, source)
    handlers = registry if registry is not None else _registry
    handler = handlers.handler_for(checked.type)
    if handler is None and handlers.async_handler_for(checked.type) is not None:
        raise UsageError(
            f"event type {checked.type!r} has only an async handler: use apply_event_async"
        )
    stamp = now or utcnow()
    if atomic:
        with session.begin_nested():
            outcome = _apply_once(session, provider, checked, source, handler=handler, now=stamp)
    else:
        outcome = _apply_once(session, provider, checked, source, handler=handler, now=stamp)
    if outcome is ApplyOutcome.APPLIED:
        _note_applied(session, provider, source)
    return outcome


def apply_event(
    session: Session,
    provider: str,
    event: EventLike,
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    atomic: bool = True,
) -> bool:
    """Apply ``event`` once; True when the handler ran now (see :func:`apply_event_outcome`)."""
    outcome = apply_event_outcome(
        session, provider, event, source, registry=registry, now=now, atomic=atomic
    )
    return outcome is ApplyOutcome.APPLIED


async def apply_event_outcome_async(
    session: AsyncSession,
    provider: str,
    event: EventLike,
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    atomic: bool = True,
) -> ApplyOutcome:
    """Async twin of :func:`apply_event_outcome`.

    Uses the async handler for the type, or runs the sync one through
    ``AsyncSession.run_sync``.
    """
    checked = _check_event(provider, event, source)
    handlers = registry if registry is not None else _registry
    async_handler = handlers.async_handler_for(checked.type)
    sync_handler = handlers.handler_for(checked.type)
    stamp = now or utcnow()
    handled = async_handler is not None or sync_handler is not None

    async def once() -> ApplyOutcome:
        outcome = await session.run_sync(
            lambda s: _claim(s, provider, checked, source, handled=handled, now=stamp)
        )
        if outcome is not None:
            return outcome
        if async_handler is not None:
            await async_handler(session, checked)
        else:
            assert sync_handler is not None
            await session.run_sync(lambda s: sync_handler(s, checked))
        return ApplyOutcome.APPLIED

    if atomic:
        async with session.begin_nested():
            outcome = await once()
    else:
        outcome = await once()
    if outcome is ApplyOutcome.APPLIED:
        _note_applied(session.sync_session, provider, source)
    return outcome


async def apply_event_async(
    session: AsyncSession,
    provider: str,
    event: EventLike,
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    atomic: bool = True,
) -> bool:
    """Async twin of :func:`apply_event`."""
    outcome = await apply_event_outcome_async(
        session, provider, event, source, registry=registry, now=now, atomic=atomic
    )
    return outcome is ApplyOutcome.APPLIED


# PostgreSQL: one index probe per id. An IN list's prepared generic plan can
# scan the provider's whole inbox once statistics go stale after a backlog
# (the reconcile helper measured it); unnest + LATERAL keeps it a point lookup.
_PG_INBOX_ROWS = text(
    "SELECT x.event_id, x.webhook_at IS NOT NULL FROM unnest(CAST(:ids AS VARCHAR[])) AS u(id) "
    "CROSS JOIN LATERAL (SELECT i.event_id, i.webhook_at FROM sync_inbox AS i "
    "WHERE i.provider = :provider AND i.event_id = u.id LIMIT 1) AS x"
)


def inbox_rows(session: Session, provider: str, event_ids: Iterable[str]) -> dict[str, bool]:
    """Which of ``event_ids`` the inbox holds, each with whether a webhook delivered it."""
    ids = list(dict.fromkeys(event_ids))
    if not ids:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(_PG_INBOX_ROWS, {"ids": ids, "provider": provider})
        return {event_id: bool(webhook) for event_id, webhook in rows}
    found: dict[str, bool] = {}
    # Chunks keep the IN list under SQLite's bound-parameter limit.
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = session.execute(
            select(SyncInbox.event_id, SyncInbox.webhook_at).where(
                SyncInbox.provider == provider, SyncInbox.event_id.in_(chunk)
            )
        )
        found.update({event_id: webhook_at is not None for event_id, webhook_at in rows})
    return found


def known_event_ids(session: Session, provider: str, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` the inbox already holds for ``provider`` (any status).

    Lets a replay skip a page's known events with one query instead of one
    savepoint per event.
    """
    return set(inbox_rows(session, provider, event_ids))
