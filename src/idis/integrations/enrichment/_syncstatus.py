"""CRM sync status on the host's own tables (RB-09 Triage 5).

A host table such as ``deals`` takes :class:`CrmSyncStatusMixin` and gets
``crm_sync_status`` ('SYNCED', 'PENDING', 'FAILED'), ``crm_synced_at`` and
``updated_at``, plus an index on ``(crm_sync_status, updated_at)`` that serves
RB-09's impact query verbatim::

    SELECT tenant_id, COUNT(*) as affected_deals FROM deals
    WHERE crm_sync_status = 'FAILED' AND updated_at > NOW() - INTERVAL '1 hour'
    GROUP BY tenant_id;

Every status change moves ``updated_at`` too, because that query reads
``updated_at`` as "when it failed": a deal last edited a week ago whose push
failed a minute ago must count.

The ``mark_sync_*`` helpers update rows by primary key inside the caller's
transaction; async callers execute :func:`sync_status_update` themselves.

Wiring with the outbox: mark rows PENDING in the same transaction that enqueues
their CRM push, and wrap the outbox worker's delivery strategy in
:class:`AsyncSyncStatusDelivery`, which marks the row SYNCED when a delivery
succeeds and FAILED when an attempt fails::

    with Session(host_engine) as session, session.begin():
        deal.amount = 42
        mark_sync_pending(session, Deal, [deal.id])
        enqueue(session, NewMessage.request("crm_provider", "record", method="PUT",
                path_params={"id": deal.id}, json={...}, ordering_key=str(deal.id),
                idempotency_key=f"deal-{deal.id}-v{deal.version}"))

    deliver = AsyncSyncStatusDelivery(AsyncGatewayDelivery(gateway), async_host_engine, Deal)
    await AsyncOutboxWorker(engine, settings, deliver=deliver).run()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any, Final, Literal

from sqlalchemy import CheckConstraint, Index, String, Table, Update, inspect, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, Session, declared_attr, mapped_column
from sqlalchemy.sql.expression import Executable

from .._timeparse import utcnow
from ..db._base import UTCDateTime
from ..exceptions import UsageError
from ..observability._logs import get_logger

__all__ = [
    "SYNC_FAILED",
    "SYNC_PENDING",
    "SYNC_STATUSES",
    "SYNC_SYNCED",
    "AsyncSyncStatusDelivery",
    "CrmSyncStatusMixin",
    "SyncStatus",
    "crm_sync_status_table_args",
    "mark_sync_failed",
    "mark_sync_pending",
    "mark_sync_succeeded",
    "sync_status_update",
]

SyncStatus = Literal["SYNCED", "PENDING", "FAILED"]
SYNC_SYNCED: Final = "SYNCED"
SYNC_PENDING: Final = "PENDING"
SYNC_FAILED: Final = "FAILED"
SYNC_STATUSES: tuple[str, ...] = (SYNC_SYNCED, SYNC_PENDING, SYNC_FAILED)

#: Columns a table needs for impact assessment (the mixin's, plus the host's tenant_id).
REQUIRED_COLUMNS: tuple[str, ...] = ("tenant_id", "crm_sync_status", "updated_at")


def crm_sync_status_table_args(tablename: str) -> tuple[Any, ...]:
    """The mixin's index and check constraint for ``tablename``.

    Use it when the host class declares its own ``__table_args__`` (which
    replaces the mixin's): ``__table_args__ = (*crm_sync_status_table_args("deals"), ...)``.
    Names are explicit so they do not depend on the host's naming convention.
    """
    return (
        Index(f"ix_{tablename}_crm_sync_status_updated_at", "crm_sync_status", "updated_at"),
        CheckConstraint(
            "crm_sync_status IN ('SYNCED', 'PENDING', 'FAILED')",
            name=f"ck_{tablename}_crm_sync_status",
        ),
    )


class CrmSyncStatusMixin:
    """Sync-status columns for a host table whose rows are pushed to a CRM.

    Example::

        class Deal(HostBase, CrmSyncStatusMixin):
            __tablename__ = "deals"
            id: Mapped[int] = mapped_column(primary_key=True)
            tenant_id: Mapped[str] = mapped_column(String(128))
    """

    #: 'SYNCED', 'PENDING' (a push is queued) or 'FAILED' (the last push failed).
    crm_sync_status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=SYNC_PENDING, server_default=SYNC_PENDING
    )
    #: When the row was last pushed successfully.
    crm_synced_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Last change to the row or to its sync status (RB-09 Triage 5 filters on it).
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        return crm_sync_status_table_args(cls.__tablename__)  # type: ignore[attr-defined]  # set by the host class


def _table(model: Any) -> Table:
    if isinstance(model, Table):
        table = model
    else:
        try:
            table = inspect(model).local_table
        except Exception as exc:
            raise UsageError(f"{model!r} is neither a Table nor a mapped class") from exc
    missing = [name for name in ("crm_sync_status", "updated_at") if name not in table.c]
    if missing:
        raise UsageError(
            f"table {table.name!r} has no {', '.join(missing)} column: use CrmSyncStatusMixin"
        )
    return table


def sync_status_update(
    model: Any, ids: Iterable[Any], status: SyncStatus, *, now: datetime | None = None
) -> Update:
    """The UPDATE that sets ``status`` (and ``updated_at``) on rows with these primary keys.

    Args:
        model: A mapped class on the mixin, or its ``Table``.
        ids: Primary-key values (single-column primary keys).
        status: 'SYNCED', 'PENDING' or 'FAILED'. 'SYNCED' also sets ``crm_synced_at``.
        now: Timestamp to write (aware UTC); the current time by default.

    Raises:
        UsageError: for an unknown status, a table without the mixin's columns, or a
            composite primary key.
    """
    if status not in SYNC_STATUSES:
        raise UsageError(f"sync status {status!r} is invalid: expected one of {SYNC_STATUSES}")
    table = _table(model)
    keys = list(table.primary_key.columns)
    if len(keys) != 1:
        raise UsageError(f"table {table.name!r} needs a single-column primary key")
    moment = now or utcnow()
    values: dict[str, Any] = {"crm_sync_status": status, "updated_at": moment}
    if status == SYNC_SYNCED:
        values["crm_synced_at"] = moment
    return update(table).where(keys[0].in_([_coerce(keys[0], i) for i in ids])).values(values)


def _coerce(column: Any, value: Any) -> Any:
    """An outbox ordering key is text; an integer primary key needs an int (PostgreSQL)."""
    try:
        python_type = column.type.python_type
    except NotImplementedError:
        return value
    if isinstance(value, str) and python_type is int:
        try:
            return int(value)
        except ValueError:
            raise UsageError(
                f"row id {value!r} is not an integer: table {column.table.name!r} has an "
                "integer primary key"
            ) from None
    return value


def _mark(
    session: Session, model: Any, ids: Iterable[Any], status: SyncStatus, now: datetime | None
) -> int:
    id_list = list(ids)
    if not id_list:
        return 0
    result = session.execute(sync_status_update(model, id_list, status, now=now))
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult for UPDATE


def mark_sync_pending(
    session: Session, model: Any, ids: Iterable[Any], *, now: datetime | None = None
) -> int:
    """Mark rows PENDING (a CRM push is queued), in the caller's transaction.

    Returns:
        The number of rows updated.
    """
    return _mark(session, model, ids, SYNC_PENDING, now)


def mark_sync_succeeded(
    session: Session, model: Any, ids: Iterable[Any], *, now: datetime | None = None
) -> int:
    """Mark rows SYNCED and stamp ``crm_synced_at``, in the caller's transaction.

    Returns:
        The number of rows updated.
    """
    return _mark(session, model, ids, SYNC_SYNCED, now)


def mark_sync_failed(
    session: Session, model: Any, ids: Iterable[Any], *, now: datetime | None = None
) -> int:
    """Mark rows FAILED (the CRM push failed), in the caller's transaction.

    Returns:
        The number of rows updated.
    """
    return _mark(session, model, ids, SYNC_FAILED, now)


_log = get_logger()


def _ordering_key(message: Any) -> Any:
    return message.ordering_key


class _SyncStatusHook:
    """Which row a delivered message is about, and how to record the outcome."""

    def __init__(
        self,
        model: Any,
        record_id: Callable[[Any], Any] | None,
        kinds: Iterable[str] | None,
        *,
        revision: Callable[[Any], Any] | None,
        revision_column: str,
        on_delivered: Callable[[Any, Any], Executable | None] | None,
    ) -> None:
        table = _table(model)  # fail now, not on the first delivery
        if revision is not None and revision_column not in table.c:
            raise UsageError(
                f"table {table.name!r} has no {revision_column!r} column to compare a push's "
                "revision with: pass revision_column= naming it"
            )
        self.model = model
        self.table = table
        self.record_id = record_id or _ordering_key
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.revision = revision
        self.revision_column = revision_column
        self.on_delivered = on_delivered

    def target(self, message: Any) -> Any:
        if self.kinds is not None and getattr(message, "kind", None) not in self.kinds:
            return None
        return self.record_id(message)

    def statements(
        self, message: Any, row_id: Any, status: SyncStatus, result: Any = None
    ) -> list[Executable]:
        """The writes that record ``status`` for ``row_id``, in one transaction."""
        out: list[Executable] = []
        if status == SYNC_SYNCED and self.on_delivered is not None:
            extra = self.on_delivered(message, result)
            if extra is not None:
                out.append(extra)
        statement = sync_status_update(self.model, [row_id], status)
        revision = self.revision(message) if self.revision is not None else None
        if status == SYNC_SYNCED and revision is not None:
            # A push of an older edit leaves the row PENDING while a newer edit
            # of it is still queued: SYNCED only when the provider has the latest.
            statement = statement.where(self.table.c[self.revision_column] == revision)
        out.append(statement)
        return out

    @staticmethod
    def log_failure(row_id: Any, status: str, exc: Exception) -> None:
        # The delivery's own outcome matters more than the status column: never
        # let a failed status write turn a delivered message into a retry.
        _log.warning(
            "idis.enrichment.sync_status_write_failed",
            msg=f"could not mark row {row_id} {status}",
            error_type=type(exc).__name__,
        )


class AsyncSyncStatusDelivery:
    """Wraps an outbox delivery strategy so each push keeps ``crm_sync_status`` current.

    SYNCED after a successful delivery, FAILED after a failed attempt (the
    delivery's error is re-raised untouched, so the outbox retries as usual).

    Version-aware with ``revision``: a push carries the row's revision (the
    edit it sends), and its delivery marks the row SYNCED only if the row is
    still at that revision. A row edited twice while the provider was down
    stays PENDING (or FAILED) until its latest push is through: the host never
    shows SYNCED for a state the provider does not have.

    Args:
        deliver: The outbox delivery callable (a coroutine function, e.g.
            ``AsyncGatewayDelivery(gateway)``).
        engine: Async engine of the database holding the host table.
        model: The host table (a mapped class on the mixin, or its ``Table``).
        record_id: Row id a message is about (default: its ``ordering_key``).
        kinds: Only messages of these kinds (default: all with a row id).
        revision: The row revision a message pushes (None: not versioned).
        revision_column: The row's revision column (default ``revision``).
        on_delivered: ``(message, provider answer) -> statement or None``, run in
            the SYNCED transaction whether or not the row is still at that
            revision (e.g. keep the provider's record version for stale-echo
            checks).
    """

    def __init__(
        self,
        deliver: Callable[[Any], Awaitable[Any]],
        engine: AsyncEngine,
        model: Any,
        *,
        record_id: Callable[[Any], Any] | None = None,
        kinds: Iterable[str] | None = None,
        revision: Callable[[Any], Any] | None = None,
        revision_column: str = "revision",
        on_delivered: Callable[[Any, Any], Executable | None] | None = None,
    ) -> None:
        self.deliver = deliver
        self.engine = engine
        self._hook = _SyncStatusHook(
            model,
            record_id,
            kinds,
            revision=revision,
            revision_column=revision_column,
            on_delivered=on_delivered,
        )

    async def _mark(
        self, message: Any, row_id: Any, status: SyncStatus, result: Any = None
    ) -> None:
        try:
            async with self.engine.begin() as conn:
                for statement in self._hook.statements(message, row_id, status, result):
                    await conn.execute(statement)
        except Exception as exc:  # noqa: BLE001  # see _SyncStatusHook.log_failure
            self._hook.log_failure(row_id, status, exc)

    async def __call__(self, message: Any) -> Any:
        """Deliver ``message`` and record the outcome on its row; return the provider's answer."""
        row_id = self._hook.target(message)
        try:
            result = await self.deliver(message)
        except Exception:
            if row_id is not None:
                await self._mark(message, row_id, SYNC_FAILED)
            raise
        if row_id is not None:
            await self._mark(message, row_id, SYNC_SYNCED, result)
        return result
