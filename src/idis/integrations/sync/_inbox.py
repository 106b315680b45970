"""The inbox: every provider event is applied exactly once, whatever channel brought it.

Webhooks, the poller, the sentinel's repairs, reconciliation's replay, resync
and verify's repairs all apply events here, inside the caller's transaction:
:func:`apply_event` for one event, :func:`apply_events` for a batch (a poll or
replay page), each with an async face (:func:`apply_event_async`,
:func:`apply_events_async`). Both are one flow (:func:`apply_flow`), so the
single and the batched paths make the same decision with the same function
(:func:`plan_batch`) and take the same locks in the same order.

In one savepoint, for a batch:

1. **lock** the ledger row (``sync_record_versions``) of every record the batch
   touches, in record-id order (PostgreSQL; a record seen for the first time
   gets a placeholder row so it can be locked too; SQLite serializes writers);
2. read which event ids the inbox already holds;
3. **decide** each event, in the batch's order (:func:`plan_batch`): an id the
   inbox holds (or the batch repeats) is a *duplicate*; a type without a
   handler is *ignored*; an event whose order key (``providers.order_key``) is
   not greater than the record's newest applied key is *superseded*; anything
   else is *applied* and becomes the record's newest key;
4. insert the new inbox rows in event-id order; move the ledger rows;
5. call the handlers of the applied events, in order, with the caller's session.

If a handler raises, the savepoint is rolled back (no inbox row, no partial
change) and the exception propagates: the event applies when it comes again.
``apply_events(..., isolate=True)`` instead re-applies the batch event by event
so that only the failing events are lost (reconcile uses it). Nothing commits
here; ``integration_events_applied_total`` counts an event once the caller's
commit succeeds (a listener registered on that session only).

Lock order
----------
Every transaction that applies events locks ledger rows first (sorted), then
inbox keys (sorted), then whatever the host's handlers lock. The poller and the
sync service lock their provider's state row before all of these (fencing), and
reconcile writes its checkpoint after them. With one order everywhere,
concurrent channels queue instead of deadlocking.

Ordering per record
-------------------
The order key is the adapter's (see :mod:`idis.integrations.providers._order`):
the provider's record version, or its modification time with a deterministic
tie-break. An event not newer than the record's applied key is *skipped with a
record* (status ``superseded``), not buffered: events carry the record's full
state, so the newest key is the truth, and a buffer waiting for a version that
never comes (a lost webhook) would stall the record. Handlers must be upserts
of the state in the event; the keys a handler sees for one record only ever
increase.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol, TypeAlias, cast, runtime_checkable

from sqlalchemy import Connection, Table, bindparam, func, select, text
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from .._flow import AsyncIO, Flow, InSession, SyncIO, adrive, drive, perform
from .._timeparse import utcnow
from ..db._engine import (
    SqliteRun,
    aiosqlite_thread,
    await_in_greenlet,
    driver_error,
    on_driver,
    on_driver_pipeline,
    unwatched,
)
from ..exceptions import StorageError, UsageError
from ..observability._metrics import get_metrics
from ..providers._order import OrderKey, order_key
from ._effects import CallHandlers, EndSavepoint, HandlerFailed, Savepoint
from ._models import SyncInbox, SyncRecordVersion

__all__ = [
    "CHANNELS",
    "ApplyOutcome",
    "ApplyResult",
    "AsyncHandler",
    "BatchPlan",
    "EventLike",
    "Handler",
    "HandlerRegistry",
    "apply_event",
    "apply_event_async",
    "apply_event_outcome",
    "apply_event_outcome_async",
    "apply_events",
    "apply_events_async",
    "apply_flow",
    "decide",
    "get_registry",
    "inbox_rows",
    "known_event_ids",
    "plan_batch",
    "preview",
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


# --------------------------------------------------------------------------- the decision


def decide(
    *, known: bool, handled: bool, key: OrderKey | None, current: OrderKey | None
) -> ApplyOutcome:
    """What the inbox does with one event (pure): the one rule every apply path uses.

    Args:
        known: The inbox (or an earlier event of the same batch) has its id.
        handled: A handler takes its type.
        key: Its order key (None: it is about no record, so nothing orders it).
        current: The record's newest applied key (None: nothing applied yet).
    """
    if known:
        return ApplyOutcome.DUPLICATE
    if not handled:
        return ApplyOutcome.IGNORED
    if key is not None and current is not None and key <= current:
        return ApplyOutcome.SUPERSEDED
    return ApplyOutcome.APPLIED


@dataclass(slots=True)
class BatchPlan:
    """What :func:`plan_batch` decided for each event of a batch."""

    #: One outcome per event, in the batch's order.
    outcomes: list[ApplyOutcome] = field(default_factory=list)
    #: The record's new newest key and the event that brings it, per record moved.
    advance: dict[str, tuple[OrderKey, str]] = field(default_factory=dict)


def plan_batch(
    events: Sequence[Any],
    keys: Sequence[OrderKey | None],
    *,
    known: set[str],
    current: Mapping[str, OrderKey],
    handles: Callable[[str], bool],
) -> BatchPlan:
    """Decide a batch event by event, in order, as single applies would one after the other.

    Args:
        events: The events, in the provider's order.
        keys: Each event's order key (None for an event about no record).
        known: Ids the inbox holds already.
        current: Newest applied key per record id.
        handles: Whether a handler takes an event type.
    """
    plan = BatchPlan()
    seen = set(known)
    newest = dict(current)
    for event, key in zip(events, keys, strict=True):
        record = event.record_id
        outcome = decide(
            known=event.id in seen,
            handled=handles(event.type),
            key=key,
            current=newest.get(record) if record is not None else None,
        )
        plan.outcomes.append(outcome)
        if outcome is ApplyOutcome.DUPLICATE:
            continue
        seen.add(event.id)
        if outcome is ApplyOutcome.APPLIED and record is not None and key is not None:
            newest[record] = key
            plan.advance[record] = (key, event.id)
    return plan


@dataclass(slots=True)
class ApplyResult:
    """What :func:`apply_events` did with each event of a batch."""

    events: list[Any]
    #: One outcome per event; None for an event whose handler raised (``isolate``).
    outcomes: list[ApplyOutcome | None]
    #: Events whose handler raised, with what it raised (``isolate`` only).
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)

    def of(self, outcome: ApplyOutcome) -> list[Any]:
        """The events with ``outcome``, in order."""
        return [e for e, o in zip(self.events, self.outcomes, strict=True) if o is outcome]

    @property
    def applied(self) -> list[Any]:
        """Events applied now, in order."""
        return self.of(ApplyOutcome.APPLIED)

    def count(self, outcome: ApplyOutcome) -> int:
        """How many events had ``outcome``."""
        return sum(1 for o in self.outcomes if o is outcome)


# --------------------------------------------------------------------------- statements
# Built once per dialect with bound parameters, so SQLAlchemy compiles each once
# and a batch only binds values. They run on the caller's session.

_INBOX = cast(Table, SyncInbox.__table__)
_VERSIONS = cast(Table, SyncRecordVersion.__table__)
#: Ids per IN list (SQLite's bound-parameter limit).
_CHUNK = 500
#: Marks a ledger row created only so it could be locked (PostgreSQL); removed
#: again in the same transaction unless an event moved it.
_PLACEHOLDER = ""
_MIN_MAJOR = -(2**63)

# Create-or-lock the ledger rows of a batch, in the order given, and read them:
# a row that exists is locked by the no-op update; a new record gets a
# placeholder row, locked by its insertion. One statement, ledger before inbox.
_PG_LOCK = text(
    "INSERT INTO sync_record_versions "
    "(provider, record_id, order_major, order_minor, event_id, updated_at) "
    "SELECT :provider, u.r, :floor, '', '', :now "
    "FROM unnest(CAST(:ids AS VARCHAR[])) WITH ORDINALITY AS u(r, n) ORDER BY u.n "
    "ON CONFLICT (provider, record_id) DO UPDATE SET event_id = sync_record_versions.event_id "
    "RETURNING record_id, order_major, order_minor, event_id"
)
# PostgreSQL: one index probe per id. An IN list's prepared generic plan can
# scan the provider's whole inbox once statistics go stale after a backlog
# (measured at 150 ms per 1,000-id page on a 20,000-row inbox); unnest +
# LATERAL keeps it a point lookup.
_PG_INBOX_ROWS = text(
    "SELECT x.event_id, x.webhook_at IS NOT NULL FROM unnest(CAST(:ids AS VARCHAR[])) AS u(id) "
    "CROSS JOIN LATERAL (SELECT i.event_id, i.webhook_at FROM sync_inbox AS i "
    "WHERE i.provider = :provider AND i.event_id = u.id LIMIT 1) AS x"
)
# Everything a batch writes once it is decided, in one statement (one round trip):
# ``claimed`` inserts the new inbox rows (the values a batch shares as single
# parameters); ``moved`` advances the ledger rows the batch locked; ``touched``
# stamps ``webhook_at`` on events a webhook redelivered; ``dropped`` removes the
# placeholders no event moved. The four touch disjoint rows (a row changed twice
# in one statement is undefined in PostgreSQL): new inbox ids vs known ones, moved
# records vs unmoved placeholders. Data-modifying CTEs run whether or not the final
# SELECT reads them. Ledger rows are all locked already (``_PG_LOCK``), so the lock
# order stays ledger, then inbox. The rows travel as JSON (one text parameter each,
# expanded in order by ``json_to_recordset``): sixteen arrays cost psycopg more CPU
# to adapt than the statement's whole round trip. The planner takes a JSON set for
# 100 rows whatever it holds, and for 100 it joined the moves and the drops to a
# sequential scan of the provider's whole ledger, in custom and generic plans alike
# (PostgreSQL's CPU per batch grew with the ledger: 1.1 ms at 5,000 rows, 6.9 ms at
# 37,000); each set sits under a ``LIMIT`` of its length (``*_n``), which the planner
# believes, so they are point lookups at any size (a flat 0.6-0.7 ms).
_PG_WRITE = text(
    "WITH claimed AS ("
    "INSERT INTO sync_inbox (provider, event_id, event_type, record_id, tenant_id, seq, "
    "version, occurred_at, source, status, received_at, webhook_at) "
    "SELECT CAST(:provider AS VARCHAR), u.e, u.t, u.r, u.tn, u.s, u.v, u.o, "
    "CAST(:source AS VARCHAR), u.st, CAST(:now AS TIMESTAMP WITH TIME ZONE), "
    "CAST(:webhook_at AS TIMESTAMP WITH TIME ZONE) "
    "FROM json_to_recordset(CAST(:claimed AS JSON)) AS u(e VARCHAR, t VARCHAR, r VARCHAR, "
    "tn VARCHAR, s BIGINT, v BIGINT, o TIMESTAMP WITH TIME ZONE, st VARCHAR) "
    "ON CONFLICT (provider, event_id) DO NOTHING RETURNING 1), "
    "moved AS ("
    "UPDATE sync_record_versions AS v SET order_major = a.ma, order_minor = a.mi, "
    "event_id = a.e, updated_at = :now "
    "FROM (SELECT * FROM json_to_recordset(CAST(:moves AS JSON)) AS m(r VARCHAR, ma BIGINT, "
    "mi VARCHAR, e VARCHAR) LIMIT :moves_n) AS a "
    "WHERE v.provider = :provider AND v.record_id = a.r "
    'AND (v.order_major, v.order_minor) < (a.ma, a.mi COLLATE "C") RETURNING 1), '
    "touched AS ("
    "UPDATE sync_inbox SET webhook_at = :now WHERE provider = :provider "
    "AND event_id IN (SELECT json_array_elements_text(CAST(:touch AS JSON)) LIMIT :touch_n) "
    "AND webhook_at IS NULL RETURNING 1), "
    "dropped AS ("
    "DELETE FROM sync_record_versions WHERE provider = :provider "
    "AND record_id IN (SELECT json_array_elements_text(CAST(:drop AS JSON)) LIMIT :drop_n) "
    "AND event_id = '' RETURNING 1) "
    "SELECT (SELECT count(*) FROM claimed), (SELECT count(*) FROM moved)"
)


#: What the inbox's statements run on: the caller's ``Session`` or, inside a
#: batch, that session's ``Connection`` (the same transaction, without the ORM
#: layer's cost per statement: about 40 µs of CPU each on PostgreSQL).
_Executor: TypeAlias = Session | Connection


# --------------------------------------------------------------------------- on the driver
# A batch's statements (3 on PostgreSQL, 2-4 on SQLite) run on the driver's own
# cursor when nothing watches SQLAlchemy's execution of them: SQLAlchemy's execute
# (cache key, parameter processing, execution context, result wrapping) costs
# about 40 µs of CPU a statement, a large share of a small batch's transaction.
# The same SQL text and parameter values reach the database either way (the
# tests compare the rows both write); errors come out as SQLAlchemy's would.


def _driver(conn: _Executor) -> Any:
    """The DB-API connection to run the inbox's statements on directly, or None.

    None (statements go through SQLAlchemy) for a ``Session``, and whenever
    something watches execution: ``before_cursor_execute`` /
    ``after_cursor_execute`` or ``handle_error`` listeners, ``echo``, SQL logging.
    An asyncio driver's is SQLAlchemy's adapter, whose cursor awaits the driver
    (the inbox runs inside ``AsyncSession.run_sync``, where that works).
    """
    if not isinstance(conn, Connection) or not unwatched(conn):
        return None
    return conn.connection.dbapi_connection


def _pg_reads(
    conn: _Executor, provider: str, records: list[str], event_ids: list[str], now: datetime
) -> tuple[dict[str, OrderKey], set[str], dict[str, bool]]:
    """PostgreSQL: :func:`_lock_records` then :func:`inbox_rows`, on the driver in one round
    trip when it can pipeline (psycopg: the transaction's ``BEGIN``, the lock and the read
    sent together; the server runs them in that order, so the read still sees what the
    lock waited for)."""
    dbapi_conn = _driver(conn)
    ids = list(dict.fromkeys(event_ids))
    # An asyncio driver: psycopg's AsyncConnection behind SQLAlchemy's adapter, awaited
    # from this greenlet (``AsyncSession.run_sync``) as the adapter's own cursor does.
    driver = dbapi_conn
    if dbapi_conn is not None and isinstance(conn, Connection) and conn.dialect.is_async:
        driver = getattr(dbapi_conn, "driver_connection", None)
    if (
        driver is None
        or not isinstance(conn, Connection)
        or conn.dialect.paramstyle != "pyformat"
        or not callable(getattr(driver, "pipeline", None))
        or not ids
    ):
        current, placeholders = _lock_records(conn, provider, records, now)
        return current, placeholders, inbox_rows(conn, provider, ids)
    lock_sql, read_sql = _sql_of(_PG_LOCK, conn), _sql_of(_PG_INBOX_ROWS, conn)
    lock_params = {"provider": provider, "ids": records, "floor": _MIN_MAJOR, "now": now}
    read_params = {"ids": ids, "provider": provider}
    lock = (lock_sql, lock_params) if records else None
    try:
        if conn.dialect.is_async:
            locked, known = await_in_greenlet(
                _pipelined_async(driver, lock, (read_sql, read_params))
            )
        else:
            statements = (
                [(read_sql, read_params)] if lock is None else [lock, (read_sql, read_params)]
            )
            *locks, (_, known) = on_driver_pipeline(conn, statements, driver=driver)
            locked = locks[0][1] if locks else []
    except conn.dialect.loaded_dbapi.Error as exc:
        raise driver_error(conn, exc, lock_sql, lock_params) from exc
    current = {
        rid: OrderKey(int(major), minor)
        for rid, major, minor, event_id in locked
        if event_id != _PLACEHOLDER
    }
    placeholders = {rid for rid, _major, _minor, event_id in locked if event_id == _PLACEHOLDER}
    return current, placeholders, {event_id: bool(webhook) for event_id, webhook in known}


#: One statement for the driver: its SQL text and parameters.
_Statement: TypeAlias = tuple[str, dict[str, Any]]


async def _pipelined_async(
    driver: Any, lock: _Statement | None, read: _Statement
) -> tuple[Any, Any]:
    """The lock's rows (none without a lock) and the read's, on psycopg's ``AsyncConnection``
    (:func:`~idis.integrations.db._engine.on_driver_pipeline` is the blocking one): the
    transaction's ``BEGIN``, the lock and the read in one round trip, where the adapter's
    cursor would await three."""
    lock_cursor, read_cursor = driver.cursor(), driver.cursor()
    try:
        async with driver.pipeline():
            if lock is not None:
                await lock_cursor.execute(*lock)
            await read_cursor.execute(*read)
        locked = await lock_cursor.fetchall() if lock is not None else []
        return locked, await read_cursor.fetchall()
    finally:
        await lock_cursor.close()
        await read_cursor.close()


#: (statement, paramstyle) -> its SQL text for the driver (PostgreSQL's fixed statements).
_TEXTS: dict[tuple[int, str], str] = {}


def _sql_of(stmt: Any, conn: Connection) -> str:
    dialect = conn.dialect
    key = (id(stmt), dialect.paramstyle)
    sql = _TEXTS.get(key)
    if sql is None:
        sql = _TEXTS[key] = str(stmt.compile(dialect=dialect))
    return sql


def _run_text(conn: _Executor, stmt: Any, params: dict[str, Any]) -> Sequence[Any]:
    """The rows of one of the fixed ``text()`` statements (no types: values pass as they are)."""
    dbapi_conn = _driver(conn)
    if (
        dbapi_conn is None
        or not isinstance(conn, Connection)
        or conn.dialect.paramstyle != "pyformat"
    ):
        return conn.execute(stmt, params).all()
    rows: Sequence[Any] = on_driver(conn, _sql_of(stmt, conn), params)
    return rows


#: SQLite's direct statements: qmark SQL per shape (ids per IN list, rows per VALUES).
_SQLITE_TEXTS: dict[tuple[str, int, int], str] = {}
#: Rows per multi-row ``INSERT`` on SQLite's direct path (12 parameters each, under 999).
_SQLITE_ROWS = 64
_INBOX_COLUMNS = (
    "provider, event_id, event_type, record_id, tenant_id, seq, version, occurred_at, "
    "source, status, received_at, webhook_at"
)


def _sqlite_text(kind: str, first: int, second: int = 0) -> str:
    key = (kind, first, second)
    sql = _SQLITE_TEXTS.get(key)
    if sql is not None:
        return sql
    if kind == "reads":
        sql = (
            "SELECT 0, record_id, order_major, order_minor FROM sync_record_versions "  # noqa: S608  # placeholders only
            f"WHERE provider = ? AND record_id IN ({', '.join('?' * first)}) AND event_id != '' "
            "UNION ALL "
            "SELECT 1, event_id, webhook_at IS NOT NULL, NULL FROM sync_inbox "
            f"WHERE provider = ? AND event_id IN ({', '.join('?' * second)})"
        )
    elif kind == "claim":
        values = ", ".join(["(" + ", ".join("?" * 12) + ")"] * first)
        sql = (
            f"INSERT INTO sync_inbox ({_INBOX_COLUMNS}) VALUES {values} "  # noqa: S608  # placeholders only
            "ON CONFLICT (provider, event_id) DO NOTHING RETURNING event_id"
        )
    elif kind == "advance":
        values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * first)
        sql = (
            "INSERT INTO sync_record_versions "  # noqa: S608  # placeholders only
            "(provider, record_id, order_major, order_minor, event_id, updated_at) "
            f"VALUES {values} ON CONFLICT (provider, record_id) DO UPDATE SET "
            "order_major = excluded.order_major, order_minor = excluded.order_minor, "
            "event_id = excluded.event_id, updated_at = excluded.updated_at "
            "WHERE (sync_record_versions.order_major, sync_record_versions.order_minor) "
            "< (excluded.order_major, excluded.order_minor) RETURNING record_id"
        )
    else:
        sql = (
            "UPDATE sync_inbox SET webhook_at = ? "
            "WHERE provider = ? AND event_id = ? AND webhook_at IS NULL"
        )
    _SQLITE_TEXTS[key] = sql
    return sql


def _sqlite_run(conn: Connection, sql: str, params: Any, *, many: bool = False) -> list[Any]:
    """SQLite's ``sql`` (qmark) on the driver's cursor; through SQLAlchemy's
    ``exec_driver_sql`` when something watches execution, so its listeners, echo
    and log see the same text and parameters. The rows (none for ``many``)."""
    dbapi_conn = _driver(conn)
    if dbapi_conn is not None and conn.dialect.paramstyle == "qmark":
        rows: list[Any] = on_driver(conn, sql, params, many=many)
        return rows
    result = conn.exec_driver_sql(sql, list(params) if many else tuple(params))
    return list(result.all()) if result.returns_rows else []


#: Dialect -> ``UTCDateTime``'s bind processing on it (the dialects seen: one or two).
_TIME_PROCESSORS: dict[Any, Callable[[datetime | None], Any]] = {}


def _sqlite_time(conn: Connection) -> Callable[[datetime | None], Any]:
    """``UTCDateTime``'s bind processing on SQLite (what SQLAlchemy would send)."""
    dialect = conn.dialect
    process = _TIME_PROCESSORS.get(dialect)
    if process is None:
        made = _INBOX.c.received_at.type.dialect_impl(dialect).bind_processor(dialect)
        assert made is not None
        process = _TIME_PROCESSORS[dialect] = cast(Callable[[datetime | None], Any], made)
    return process


def _dialect(session: _Executor) -> str:
    name = (session.dialect if isinstance(session, Connection) else session.get_bind().dialect).name
    if name not in ("postgresql", "sqlite"):
        raise UsageError(f"the inbox needs SQLite or PostgreSQL, not {name}")
    return name


# Reads with an expanding IN list, built once (not per call): Core, no ORM entities.
_INBOX_ROWS = select(_INBOX.c.event_id, _INBOX.c.webhook_at).where(
    _INBOX.c.provider == bindparam("provider"),
    _INBOX.c.event_id.in_(bindparam("ids", expanding=True)),
)
_CURRENT_KEYS = select(
    _VERSIONS.c.record_id, _VERSIONS.c.order_major, _VERSIONS.c.order_minor
).where(
    _VERSIONS.c.provider == bindparam("provider"),
    _VERSIONS.c.record_id.in_(bindparam("ids", expanding=True)),
    _VERSIONS.c.event_id != _PLACEHOLDER,
)


def _sqlite_reads(
    run: SqliteRun, provider: str, record_ids: list[str], ids: list[str]
) -> tuple[dict[str, OrderKey], dict[str, bool]]:
    """SQLite: :func:`current_keys` and :func:`inbox_rows` of a batch, in one statement
    (at most :data:`_CHUNK` of each: see :func:`_sqlite_claim`)."""
    current: dict[str, OrderKey] = {}
    known: dict[str, bool] = {}
    rows = run(
        _sqlite_text("reads", len(record_ids), len(ids)),
        (provider, *record_ids, provider, *ids),
        False,
    )
    for which, key, first, second in rows:
        if which == 0:
            current[key] = OrderKey(int(first), second)
        else:
            known[key] = bool(first)
    return current, known


def inbox_rows(session: _Executor, provider: str, event_ids: Iterable[str]) -> dict[str, bool]:
    """Which of ``event_ids`` the inbox holds, each with whether a webhook delivered it."""
    ids = list(dict.fromkeys(event_ids))
    if not ids:
        return {}
    if _dialect(session) == "postgresql":
        pg_rows = _run_text(session, _PG_INBOX_ROWS, {"ids": ids, "provider": provider})
        return {event_id: bool(webhook) for event_id, webhook in pg_rows}
    found: dict[str, bool] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.execute(_INBOX_ROWS, {"provider": provider, "ids": chunk})
        found.update({event_id: webhook_at is not None for event_id, webhook_at in rows})
    return found


def known_event_ids(session: Session, provider: str, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` the inbox already holds for ``provider`` (any status)."""
    return set(inbox_rows(session, provider, event_ids))


def current_keys(
    session: _Executor, provider: str, record_ids: Sequence[str]
) -> dict[str, OrderKey]:
    """Newest applied key per record (no locks; absent ids: nothing applied)."""
    found: dict[str, OrderKey] = {}
    for start in range(0, len(record_ids), _CHUNK):
        chunk = list(record_ids[start : start + _CHUNK])
        rows = session.execute(_CURRENT_KEYS, {"provider": provider, "ids": chunk})
        found.update({rid: OrderKey(int(major), minor) for rid, major, minor in rows})
    return found


def webhook_reports(session: Session, provider: str, since: datetime) -> dict[str, datetime]:
    """Per record, the newest change a webhook received at or after ``since`` reported.

    Reads the webhook deliveries of the window only (the ``(provider, webhook_at)`` index).
    """
    rows = session.execute(
        select(SyncInbox.record_id, func.max(SyncInbox.occurred_at))
        .where(
            SyncInbox.provider == provider,
            SyncInbox.webhook_at >= since,
            SyncInbox.record_id.is_not(None),
            SyncInbox.occurred_at.is_not(None),
        )
        .group_by(SyncInbox.record_id)
    )
    return {str(rid): newest for rid, newest in rows if newest is not None}


def _lock_records(
    session: _Executor, provider: str, record_ids: list[str], now: datetime
) -> tuple[dict[str, OrderKey], set[str]]:
    """PostgreSQL: lock the records' ledger rows (sorted) and read them.

    Returns the current keys and the placeholder rows made (see ``_PG_LOCK``).
    """
    if not record_ids:
        return {}, set()
    rows = _run_text(
        session,
        _PG_LOCK,
        {"provider": provider, "ids": record_ids, "floor": _MIN_MAJOR, "now": now},
    )
    current = {
        rid: OrderKey(int(major), minor)
        for rid, major, minor, event_id in rows
        if event_id != _PLACEHOLDER
    }
    return current, {rid for rid, _major, _minor, event_id in rows if event_id == _PLACEHOLDER}


@dataclass(frozen=True, slots=True)
class _Writes:
    """What a decided batch writes."""

    #: New inbox rows (event, outcome), in event-id order.
    claimed: list[tuple[Any, ApplyOutcome]]
    #: ``webhook_at`` of the new rows (None unless a webhook brought them).
    webhook_at: datetime | None
    #: Known events a webhook redelivered (``webhook_at`` stamped if still empty), sorted.
    touch: list[str]
    #: Ledger rows to move: (record id, (new key, event id)), in record-id order.
    advance: list[tuple[str, tuple[OrderKey, str]]]
    #: Placeholder ledger rows no event moved (PostgreSQL), sorted.
    drop: list[str]

    def any(self) -> bool:
        return bool(self.claimed or self.advance or self.touch or self.drop)


def _pg_write(session: _Executor, batch: _Batch, writes: _Writes) -> tuple[int, int]:
    """PostgreSQL: every write of a decided batch in one statement; (rows claimed, rows moved)."""
    claimed, advance = writes.claimed, writes.advance
    (row,) = _run_text(
        session,
        _PG_WRITE,
        {
            "provider": batch.provider,
            "source": batch.source,
            "now": batch.now,
            "webhook_at": writes.webhook_at,
            "claimed": json.dumps(
                [
                    {
                        "e": e.id,
                        "t": e.type,
                        "r": e.record_id,
                        "tn": e.tenant_id,
                        "s": e.seq,
                        "v": e.version,
                        "o": None if e.occurred_at is None else e.occurred_at.isoformat(),
                        "st": o.value,
                    }
                    for e, o in claimed
                ]
            ),
            "moves": json.dumps(
                [
                    {"r": rid, "ma": key.major, "mi": key.minor, "e": event_id}
                    for rid, (key, event_id) in advance
                ]
            ),
            "touch": json.dumps(writes.touch),
            "drop": json.dumps(writes.drop),
            "moves_n": len(advance),
            "touch_n": len(writes.touch),
            "drop_n": len(writes.drop),
        },
    )
    return int(row[0]), int(row[1])


def _sqlite_write(
    run: SqliteRun, time: Callable[[datetime | None], Any], batch: _Batch, writes: _Writes
) -> tuple[int, int]:
    """SQLite: the same writes as :func:`_pg_write` (no placeholders): multi-row ``INSERT``s
    in chunks of :data:`_SQLITE_ROWS`, the touches as one executemany. ``time`` is
    ``UTCDateTime``'s bind processing (:func:`_sqlite_time`)."""
    provider, source = batch.provider, batch.source
    now = time(batch.now)
    webhook_at = time(writes.webhook_at)
    claimed_count = moved = 0
    claimed = writes.claimed
    for start in range(0, len(claimed), _SQLITE_ROWS):
        chunk = claimed[start : start + _SQLITE_ROWS]
        params: list[Any] = []
        for event, outcome in chunk:
            params += (
                provider,
                event.id,
                event.type,
                event.record_id,
                event.tenant_id,
                event.seq,
                event.version,
                time(event.occurred_at),
                source,
                outcome.value,
                now,
                webhook_at,
            )
        claimed_count += len(run(_sqlite_text("claim", len(chunk)), params, False))
    if writes.touch:
        # A redelivery of a webhook-delivered event writes nothing (webhook_at IS NULL).
        run(
            _sqlite_text("touch", 0),
            [(now, provider, event_id) for event_id in writes.touch],
            True,
        )
    advance = writes.advance
    for start in range(0, len(advance), _SQLITE_ROWS):
        part = advance[start : start + _SQLITE_ROWS]
        params = []
        for rid, (key, event_id) in part:
            params += (provider, rid, key.major, key.minor, event_id, now)
        moved += len(run(_sqlite_text("advance", len(part)), params, False))
    return claimed_count, moved


class _Conflict(Exception):
    """Another transaction wrote part of the batch after it was read: roll back and re-plan."""


@dataclass(frozen=True, slots=True)
class _Batch:
    """A checked batch: events, their keys, handlers, and what to write."""

    provider: str
    events: list[Any]
    keys: list[OrderKey | None]
    source: str
    now: datetime
    registry: HandlerRegistry

    @property
    def handles(self) -> Callable[[str], bool]:
        return self.registry.handles


def _claim(orm_session: Session, batch: _Batch) -> BatchPlan:
    """Steps 1-4 of the module docstring, in the caller's transaction (no handler runs)."""
    session = orm_session.connection()
    provider, events = batch.provider, batch.events
    handles = batch.handles
    records = sorted(
        {
            e.record_id
            for e, key in zip(events, batch.keys, strict=True)
            if key is not None and e.record_id is not None and handles(e.type)
        }
    )
    if _dialect(session) == "postgresql":
        current, placeholders, rows_known = _pg_reads(
            session, provider, records, [e.id for e in events], batch.now
        )
        plan, writes = _decide(batch, current, placeholders, rows_known)
        inserted, moved = _pg_write(session, batch, writes) if writes.any() else (0, 0)
    else:
        plan, writes, inserted, moved = _sqlite_claim(session, batch, records)
    if inserted != len(writes.claimed):
        # Only an event no ledger lock covers (no record, or a type this
        # replica's registry does not handle) can be claimed meanwhile.
        raise _Conflict(f"{provider}: events of the batch were claimed meanwhile")
    if moved != len(writes.advance):
        raise _Conflict(f"{provider}: records of the batch moved meanwhile")
    return plan


def _decide(
    batch: _Batch,
    current: dict[str, OrderKey],
    placeholders: set[str],
    rows_known: dict[str, bool],
) -> tuple[BatchPlan, _Writes]:
    """Step 3 and what step 4 writes, from what the reads found (no I/O)."""
    events = batch.events
    plan = plan_batch(
        events, batch.keys, known=set(rows_known), current=current, handles=batch.handles
    )
    claimed: list[tuple[Any, ApplyOutcome]] = []
    touch: list[str] = []
    webhook_at = batch.now if batch.source == "webhook" else None
    for event, outcome in zip(events, plan.outcomes, strict=True):
        if outcome is ApplyOutcome.DUPLICATE:
            if webhook_at is not None and not rows_known.get(event.id, True):
                touch.append(event.id)
            continue
        claimed.append((event, outcome))
    # Event-id order for the inbox rows, record-id order for the ledger's.
    claimed.sort(key=lambda c: c[0].id)
    writes = _Writes(
        claimed,
        webhook_at,
        sorted(set(touch)),
        sorted(plan.advance.items()),
        sorted(placeholders.difference(plan.advance)),
    )
    return plan, writes


def _sqlite_claim(
    conn: Connection, batch: _Batch, records: list[str]
) -> tuple[BatchPlan, _Writes, int, int]:
    """SQLite: read, decide and write a batch (BEGIN IMMEDIATE already holds the
    database's only write lock: the reads are one statement). The plan, the writes,
    and how many inbox rows were inserted and ledger rows moved.

    On aiosqlite with nothing watching execution, all of it runs in one hop to the
    connection's thread (``db._engine.aiosqlite_thread``) instead of three or four hops
    per statement through SQLAlchemy's adapter (cursor, execute, fetch, close).
    """
    ids = list(dict.fromkeys(e.id for e in batch.events))
    time = _sqlite_time(conn)
    if len(records) > _CHUNK or len(ids) > _CHUNK:
        current = current_keys(conn, batch.provider, records)
        known = inbox_rows(conn, batch.provider, ids)
        plan, writes = _decide(batch, current, set(), known)
        return (plan, writes, *_sqlite_write(_through(conn), time, batch, writes))

    def work(run: SqliteRun) -> tuple[BatchPlan, _Writes, int, int]:
        current, known = _sqlite_reads(run, batch.provider, records, ids)
        plan, writes = _decide(batch, current, set(), known)
        return (plan, writes, *_sqlite_write(run, time, batch, writes))

    hop = aiosqlite_thread(conn)
    return work(_through(conn)) if hop is None else hop(work)


def _through(conn: Connection) -> SqliteRun:
    """SQLite's direct statements on ``conn`` (:func:`_sqlite_run`)."""

    def run(sql: str, params: Any, many: bool) -> list[Any]:
        return _sqlite_run(conn, sql, params, many=many)

    return run


# --------------------------------------------------------------------------- metrics after commit

_PENDING = "idis_sync_applied"


def _count_after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending:
        metrics = get_metrics()
        for (provider, source), count in pending.items():
            metrics.child("events_applied", provider, source).inc(count)


def _forget_after_rollback(session: Session, transaction: SessionTransaction) -> None:
    # Fires after after_commit too (by then the counts are gone); on a rollback
    # of the outermost transaction the events were not applied after all.
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


class _CountingSession(Session):
    """A ``Session`` whose class carries the inbox's commit listeners.

    The library's own session factories (the webhook receivers') make these, so
    a transaction does not register the listeners on its session instance each
    time (about 18 µs); the host's sessions stay plain ``Session`` objects.
    """


sa_event.listen(_CountingSession, "after_commit", _count_after_commit)
sa_event.listen(_CountingSession, "after_transaction_end", _forget_after_rollback)


def _note_applied(session: Session, provider: str, source: str, count: int) -> None:
    """Count ``count`` applied events when ``session`` commits.

    The listeners go on this session instance only (once), never on the
    ``Session`` class: the host's other sessions do not pay for them. A
    ``_CountingSession`` has them on its class already.
    """
    if not isinstance(session, _CountingSession) and not sa_event.contains(
        session, "after_commit", _count_after_commit
    ):
        sa_event.listen(session, "after_commit", _count_after_commit)
        sa_event.listen(session, "after_transaction_end", _forget_after_rollback)
    pending: dict[tuple[str, str], int] = session.info.setdefault(_PENDING, {})
    pending[(provider, source)] = pending.get((provider, source), 0) + count


# --------------------------------------------------------------------------- the flow

#: Attempts at a batch when another transaction claimed part of it meanwhile.
_CONFLICT_ATTEMPTS = 3


def _check_event(provider: str, event: object) -> Any:
    # The runtime Protocol check walks every attribute; remember the types that passed.
    if type(event) not in _EVENT_TYPES:
        if not isinstance(event, EventLike):
            raise UsageError(
                f"{type(event).__name__} is not an event: expected id, type, seq, record_id, "
                "tenant_id, version, occurred_at and data attributes"
            )
        _EVENT_TYPES.add(type(event))
    checked = cast(Any, event)
    if not checked.id or not isinstance(checked.id, str):
        raise UsageError(f"event from {provider} has no id: {checked.id!r}")
    return checked


_EVENT_TYPES: set[type] = set()


def _prepare(
    provider: str,
    events: Iterable[Any],
    source: str,
    registry: HandlerRegistry | None,
    now: datetime | None,
) -> _Batch:
    """Validate a batch before any I/O: a bad event or source changes nothing."""
    if source not in CHANNELS:
        raise UsageError(f"source {source!r} is not one of {', '.join(CHANNELS)}")
    handlers = registry if registry is not None else _registry
    checked = [_check_event(provider, e) for e in events]
    keys: list[OrderKey | None] = [
        order_key(e) if e.record_id is not None and handlers.handles(e.type) else None
        for e in checked
    ]
    return _Batch(provider, checked, keys, source, now or utcnow(), handlers)


def apply_flow(
    provider: str,
    events: Iterable[Any],
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    atomic: bool = True,
    isolate: bool = False,
) -> Flow[ApplyResult]:
    """The one flow behind every apply: claim, decide, call handlers (see the module docstring).

    Yields ``InSession``, ``Savepoint``/``EndSavepoint`` and ``CallHandlers``
    against the io's session; :func:`apply_events` drives it with a ``Session``,
    :func:`apply_events_async` with an ``AsyncSession``. A capability that
    applies events inside a flow of its own composes it with ``yield from``.
    Arguments as for :func:`apply_events`.
    """
    batch = _prepare(provider, events, source, registry, now)
    return (yield from _apply_flow(batch, atomic=atomic, isolate=isolate))


def _require_sync_handlers(batch: _Batch) -> _Batch:
    """The sync face calls sync handlers only: refuse before any I/O."""
    for event in batch.events:
        registry = batch.registry
        if registry.handler_for(event.type) is None and registry.async_handler_for(event.type):
            raise UsageError(
                f"event type {event.type!r} has only an async handler: use the async face "
                "(apply_event_async, apply_events_async, reconcile_async)"
            )
    return batch


def _apply_flow(batch: _Batch, *, atomic: bool = True, isolate: bool = False) -> Flow[ApplyResult]:
    registry = batch.registry
    if not batch.events:
        return ApplyResult([], [])
    for attempt in range(_CONFLICT_ATTEMPTS):
        savepoint = (yield from perform(Savepoint())) if atomic else None
        try:
            plan = yield from perform(InSession(_claimer(batch)))
            applied = [
                (registry.handler_for(e.type), registry.async_handler_for(e.type), e)
                for e, o in zip(batch.events, plan.outcomes, strict=True)
                if o is ApplyOutcome.APPLIED
            ]
            if applied:
                yield from perform(CallHandlers(applied))
                # A handler's pending ORM writes fail at flush: make that its failure.
                yield from perform(InSession(_flush))
        except _Conflict:
            if savepoint is None or attempt == _CONFLICT_ATTEMPTS - 1:
                raise StorageError(
                    f"{batch.provider}: events were claimed by another transaction meanwhile; retry"
                ) from None
            yield from perform(EndSavepoint(savepoint, commit=False))
            continue
        except HandlerFailed as failed:
            if savepoint is not None:
                yield from perform(EndSavepoint(savepoint, commit=False))
            if not isolate or len(batch.events) == 1:
                raise failed.error from None
            return (yield from _one_by_one(batch))
        except BaseException:
            if savepoint is not None:
                yield from perform(EndSavepoint(savepoint, commit=False))
            raise
        if savepoint is not None:
            yield from perform(EndSavepoint(savepoint, commit=True))
        if applied:
            yield from perform(InSession(_noter(batch, len(applied))))
        return ApplyResult(batch.events, list[ApplyOutcome | None](plan.outcomes))
    raise AssertionError("unreachable")


def _claimer(batch: _Batch) -> Callable[[Session], BatchPlan]:
    def claim(session: Session) -> BatchPlan:
        return _claim(session, batch)

    return claim


def _noter(batch: _Batch, count: int) -> Callable[[Session], None]:
    def note(session: Session) -> None:
        _note_applied(session, batch.provider, batch.source, count)

    return note


def _flush(session: Session) -> None:
    try:
        session.flush()
    except Exception as exc:
        raise HandlerFailed(_FLUSH, exc) from exc


class _FlushEvent:
    id = "(flush)"
    type = "(pending writes)"


_FLUSH = _FlushEvent()


def _one_by_one(batch: _Batch) -> Flow[ApplyResult]:
    """After a handler failed: each event alone in its savepoint, so only failures are lost."""
    outcomes: list[ApplyOutcome | None] = []
    failed: list[tuple[Any, BaseException]] = []
    for event, key in zip(batch.events, batch.keys, strict=True):
        single = _Batch(batch.provider, [event], [key], batch.source, batch.now, batch.registry)
        try:
            result = yield from _apply_flow(single)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001  # a host handler may raise anything; isolate it
            outcomes.append(None)
            failed.append((event, exc))
            continue
        outcomes.append(result.outcomes[0])
    return ApplyResult(batch.events, outcomes, failed)


# --------------------------------------------------------------------------- faces


def apply_events(
    session: Session,
    provider: str,
    events: Iterable[Any],
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    isolate: bool = False,
    atomic: bool = True,
) -> ApplyResult:
    """Apply a batch of events (a page) through the inbox, in the caller's transaction.

    Same decisions and rows as applying them one by one with :func:`apply_event`,
    with a handful of statements for the whole batch.

    Args:
        session: The caller's session; nothing is committed here.
        provider: Provider name.
        events: The events, in the provider's order.
        source: ``webhook``, ``poll`` or ``replay``.
        registry: Handlers (default: :func:`get_registry`).
        now: Receipt time (default: the current UTC time).
        isolate: When a handler raises, re-apply the batch event by event so only
            the failing events are left out (listed in ``ApplyResult.failed``).
        atomic: Run in a savepoint (see :func:`apply_event_outcome`). Pass False only
            when the transaction is rolled back whole on error (the webhook
            receiver's group commit does).

    Raises:
        UsageError: a bad source or event, an event without an order key, or an
            event type with only an async handler.
        Exception: what a handler raised (``isolate=False``); the batch left nothing.
        StorageError: the database failed, or other transactions kept claiming the batch.
    """
    batch = _require_sync_handlers(_prepare(provider, events, source, registry, now))
    return drive(_apply_flow(batch, atomic=atomic, isolate=isolate), SyncIO(session=session))


async def apply_events_async(
    session: AsyncSession,
    provider: str,
    events: Iterable[Any],
    source: str,
    *,
    registry: HandlerRegistry | None = None,
    now: datetime | None = None,
    isolate: bool = False,
    atomic: bool = True,
) -> ApplyResult:
    """Async face of :func:`apply_events`: async handlers awaited, sync ones via ``run_sync``."""
    batch = _prepare(provider, events, source, registry, now)
    return await adrive(
        _apply_flow(batch, atomic=atomic, isolate=isolate), AsyncIO(session=session)
    )


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

    Raises:
        UsageError: on an unknown source, a malformed event, or an event type
            with only an async handler.
        Exception: whatever the handler raised (after rolling back the savepoint).
    """
    batch = _require_sync_handlers(_prepare(provider, [event], source, registry, now))
    result = drive(_apply_flow(batch, atomic=atomic), SyncIO(session=session))
    outcome = result.outcomes[0]
    assert outcome is not None
    return outcome


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
    """Async face of :func:`apply_event_outcome`."""
    batch = _prepare(provider, [event], source, registry, now)
    result = await adrive(_apply_flow(batch, atomic=atomic), AsyncIO(session=session))
    outcome = result.outcomes[0]
    assert outcome is not None
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
    """Async face of :func:`apply_event`."""
    outcome = await apply_event_outcome_async(
        session, provider, event, source, registry=registry, now=now, atomic=atomic
    )
    return outcome is ApplyOutcome.APPLIED


def preview(
    session: Session, provider: str, events: Sequence[Any], registry: HandlerRegistry
) -> tuple[set[str], dict[str, OrderKey]]:
    """What the inbox knows about ``events`` (ids it holds, keys per record), read without locks.

    For dry runs: :func:`plan_batch` over this says what :func:`apply_events` would do.
    """
    known = known_event_ids(session, provider, [e.id for e in events])
    records = sorted(
        {e.record_id for e in events if e.record_id is not None and registry.handles(e.type)}
    )
    return known, current_keys(session, provider, records)
