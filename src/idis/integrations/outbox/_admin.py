"""Operating the outbox: the queue per provider, re-queueing failed deliveries, purging.

* :func:`outbox_summary`: counts by status and the oldest pending age, per
  provider (``outbox status``; the lead's ``status`` command calls it);
* :func:`queue_webhook_retries`: RB-09 Containment 4, re-queue a provider's
  failed and dead-lettered deliveries with a fresh budget;
* :func:`purge_delivered`, :func:`list_messages`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    null,
    select,
    update,
)
from sqlalchemy.orm import Session

from .._audit import record_audit
from .._timeparse import parse_since, utcnow
from ..config import Settings
from ..db._base import UTCDateTime
from ..exceptions import ConfigError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics
from ._messages import check_aware, check_max_retries
from ._models import DEAD, DELIVERED, IN_FLIGHT, PENDING, REPORTED_STATES, OutboxMessageRow
from ._queries import (
    UNSETTLED,
    first_pending,
    messages,
    not_leased,
    purge_statement,
    reactivate_receivers_statement,
    receivers,
    retryable_filter,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "MessageView",
    "OutboxSummary",
    "RequeueResult",
    "list_messages",
    "outbox_summary",
    "outbox_summary_async",
    "purge_delivered",
    "queue_webhook_retries",
    "refresh_gauges",
    "status_facts",
]

_log = get_logger()


@dataclass(frozen=True, slots=True)
class OutboxSummary:
    """One provider's queue."""

    provider: str
    #: Waiting for an attempt (new, or failed and backing off).
    pending: int = 0
    #: Of ``pending``, those that failed at least once (the retry queue).
    retrying: int = 0
    #: Leased by a worker right now (pending under an unexpired lease).
    in_flight: int = 0
    #: Accepted by the provider (until purged).
    delivered: int = 0
    #: Dead letters.
    dead: int = 0
    #: Creation time of the oldest message not yet delivered (pending or in flight).
    oldest_pending_at: datetime | None = None
    #: Seconds since then, at the time of the summary (None when nothing is waiting).
    oldest_pending_age: float | None = None

    @property
    def undelivered(self) -> int:
        """Messages still owed: pending and in flight."""
        return self.pending + self.in_flight

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``status --json``): the fields, the age named in seconds."""
        data = _fields(self)
        data["oldest_pending_at"] = _iso(self.oldest_pending_at)
        data["oldest_pending_age_seconds"] = data.pop("oldest_pending_age")
        return data


def _fields(view: Any) -> dict[str, Any]:
    return {f.name: getattr(view, f.name) for f in fields(view)}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _summary(provider: str, now: datetime, oldest: datetime | None, **counts: int) -> OutboxSummary:
    age = max(0.0, (now - oldest).total_seconds()) if oldest else None
    return OutboxSummary(provider, oldest_pending_at=oldest, oldest_pending_age=age, **counts)


def outbox_summary(
    session: Session | Connection,
    *,
    providers: Iterable[str] | None = None,
    include_delivered: bool = True,
    now: datetime | None = None,
    detail: bool = True,
) -> list[OutboxSummary]:
    """The outbox queue per provider: counts by status and the oldest pending age.

    Reads only the partial indexes' rows: pending and dead messages grouped by
    provider and status (in flight: pending under an unexpired lease at
    ``now``), and, when asked, a count of delivered ones. Sorted by provider.

    Args:
        session: A Session or Connection on the library's database.
        providers: Only these providers, each listed even when it has no
            messages (zeros); None lists every provider that has messages.
        include_delivered: Count delivered rows as well (a scan of every
            delivered row kept; workers refreshing gauges skip it).
        now: Reference time for the age (default: now).
        detail: Split pending into retrying and in flight. False counts by status
            only (``pending`` then includes the in-flight ones) and takes the oldest
            pending message as the first by id: the counts come from the partial
            index alone, a fraction of the cost on a large backlog (``status``).

    Returns:
        One :class:`OutboxSummary` per provider.
    """
    now = now or utcnow()
    if not detail:
        return _counts_only(session, providers, now)
    t = messages
    # Two reads, each on its partial index: the unsettled rows (the IN list is
    # the index predicate word for word, so SQLite uses it too), and, only if
    # asked, a count of the delivered ones.
    at = bindparam("p_now", type_=UTCDateTime())
    leased = t.c.lease_expires_at > at
    free = not_leased(t, at)
    stmt = (
        select(
            t.c.provider,
            t.c.status,
            func.count(),
            func.min(t.c.created_at),
            func.sum(case((and_(t.c.attempts > 0, free), 1), else_=0)),
            func.sum(case((leased, 1), else_=0)),
        )
        .where(t.c.status.in_(UNSETTLED))
        .group_by(t.c.provider, t.c.status)
    )
    delivered = (
        select(
            t.c.provider,
            literal_column(f"'{DELIVERED}'"),
            func.count(),
            null(),
            null(),
            null(),
        )
        .where(t.c.status == literal_column(f"'{DELIVERED}'"))
        .group_by(t.c.provider)
    )
    wanted = list(providers) if providers is not None else None
    if wanted is not None:
        stmt = stmt.where(t.c.provider.in_(wanted))
        delivered = delivered.where(t.c.provider.in_(wanted))
    rows = list(session.execute(stmt, {"p_now": now}))
    if include_delivered:
        rows += list(session.execute(delivered))
    counts: dict[str, dict[str, Any]] = {name: {} for name in wanted or ()}
    for provider, status, count, first, retrying, in_flight in rows:
        entry = counts.setdefault(provider, {})
        entry[status] = int(count)
        if status == PENDING:
            entry[IN_FLIGHT] = int(in_flight or 0)
            entry[PENDING] = int(count) - entry[IN_FLIGHT]
            entry["retrying"] = int(retrying or 0)
            if first is not None:
                entry["oldest"] = _aware(first)
    return [
        # An entry's keys are OutboxSummary's count fields (the states' names) and "oldest".
        _summary(provider, now, entry.pop("oldest", None), **entry)
        for provider, entry in sorted(counts.items())
    ]


@functools.cache
def first_pending_statement(dialect: str) -> Select[Any]:
    """``created_at`` of the first pending message of ``:p_provider`` (due index)."""
    provider = bindparam("p_provider", type_=messages.c.provider.type)
    head = first_pending(messages, provider, dialect)
    return head.with_only_columns(messages.c.created_at)


def _counts_only(
    session: Session | Connection, providers: Iterable[str] | None, now: datetime
) -> list[OutboxSummary]:
    t = messages
    dialect = (session.get_bind() if isinstance(session, Session) else session).dialect.name
    counts = select(t.c.provider, t.c.status, func.count()).where(t.c.status.in_(UNSETTLED))
    wanted = list(providers) if providers is not None else None
    if wanted is not None:
        counts = counts.where(t.c.provider.in_(wanted))
    found: dict[str, dict[str, int]] = {name: {} for name in wanted or ()}
    for provider, status, count in session.execute(counts.group_by(t.c.provider, t.c.status)):
        found.setdefault(provider, {})[status] = int(count)
    out = []
    for provider in sorted(found):
        pending = found[provider].get(PENDING, 0)
        oldest = None
        if pending:
            head = first_pending_statement(dialect)
            first = session.execute(head, {"p_provider": provider}).scalar()
            oldest = _aware(first) if first is not None else None
        out.append(_summary(provider, now, oldest, **found[provider]))
    return out


async def outbox_summary_async(
    session: AsyncSession,
    *,
    providers: Iterable[str] | None = None,
    include_delivered: bool = True,
    now: datetime | None = None,
) -> list[OutboxSummary]:
    """Async twin of :func:`outbox_summary` for an ``AsyncSession``."""
    wanted = list(providers) if providers is not None else None
    return await session.run_sync(
        lambda sync: outbox_summary(
            sync, providers=wanted, include_delivered=include_delivered, now=now
        )
    )


def _aware(value: datetime) -> datetime:
    # Aggregates bypass the column type on SQLite: min() returns the stored text.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def refresh_gauges(
    session: Session | Connection,
    metrics: Metrics,
    *,
    providers: Iterable[str] | None = None,
    now: datetime | None = None,
) -> list[OutboxSummary]:
    """Set ``integration_outbox_messages{provider,status}`` and the oldest-pending-age gauge.

    Delivered rows are not counted here (``integration_outbox_deliveries_total``
    counts deliveries); pending, in_flight and dead are.
    """
    rows = outbox_summary(session, providers=providers, include_delivered=False, now=now)
    for row in rows:
        for state in (PENDING, IN_FLIGHT, DEAD):  # each state is its field's name
            metrics.outbox_messages.labels(row.provider, state).set(getattr(row, state))
        metrics.outbox_oldest_pending_age.labels(row.provider).set(row.oldest_pending_age or 0.0)
    return rows


_STATUS_SUMMARIES = "idis.outbox.status_summaries"


def status_facts(session: Session, settings: Settings, provider: str) -> dict[str, Any]:
    """Outbox facts for ``idis-integrations status`` (a ``status.FACT_SOURCES`` entry).

    Returns:
        ``outbox_pending`` (pending and in flight: still owed), ``outbox_dead``
        and ``outbox_oldest_pending_age_seconds`` (None when nothing is owed).
    """
    # One read for every configured provider, kept for the rest of the session's
    # transaction (one status call): the aggregate walks every unsettled message, so
    # read per provider it was most of /status's time on a large backlog.
    transaction = session.get_transaction()
    kept = session.info.get(_STATUS_SUMMARIES)
    if kept is not None and kept[0] is transaction and transaction is not None:
        summaries: dict[str, OutboxSummary] = kept[1]
    else:
        names = sorted({*settings.providers, provider})
        rows = outbox_summary(session, providers=names, include_delivered=False, detail=False)
        summaries = {r.provider: r for r in rows}
        session.info[_STATUS_SUMMARIES] = (session.get_transaction(), summaries)
    row = summaries.get(provider) or OutboxSummary(provider)
    return {
        "outbox_pending": row.undelivered,
        "outbox_dead": row.dead,
        "outbox_oldest_pending_age_seconds": (
            round(row.oldest_pending_age, 1) if row.oldest_pending_age is not None else None
        ),
    }


# ------------------------------------------------------------------ re-queue


@dataclass(frozen=True, slots=True)
class RequeueResult:
    """What :func:`queue_webhook_retries` re-queued (or would, with ``dry_run``)."""

    provider: str
    #: Dead letters re-queued.
    dead: int
    #: Failed messages still waiting to retry, re-queued now with a fresh budget.
    failed: int
    #: Webhook receivers that had answered 410 and are active again.
    receivers_reactivated: int
    #: The fresh retry budget given.
    max_retries: int
    since: datetime | None
    dry_run: bool

    @property
    def total(self) -> int:
        """Messages re-queued."""
        return self.dead + self.failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``--json``): the fields and ``requeued`` (the total)."""
        return {**_fields(self), "requeued": self.total, "since": _iso(self.since)}


def _check_since(value: datetime | str | None, now: datetime) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        check_aware("--since", value)
    return parse_since(value, name="--since", now=lambda: now)


def queue_webhook_retries(
    provider: str,
    max_retries: int,
    since: datetime | str | None = None,
    dry_run: bool = False,
    *,
    kinds: Sequence[str] | None = None,
    settings: Settings | None = None,
    engine: Engine | None = None,
    actor: str = "system",
    now: datetime | None = None,
) -> RequeueResult:
    """Re-queue ``provider``'s failed and dead-lettered deliveries with a fresh budget (RB-09).

    Dead letters and failed messages still waiting to retry go back to pending,
    due now, with ``attempts = 0`` and ``max_retries`` retries. Receivers that
    answered 410 are re-activated (if one is still gone, its first delivery will
    say so again). Every delivery the library owes the provider goes through
    the outbox, outbound webhooks and provider calls alike; ``kinds`` narrows it
    (``["webhook"]``). Messages in flight are left alone.

    Idempotent: a re-queued message has no counted attempts, so a second run
    finds nothing new. Audited as ``outbox.requeued`` (not when ``dry_run``).
    All input is validated before the database is touched.

    Args:
        provider: Provider name, as configured.
        max_retries: Retries each re-queued message gets after its next attempt (>= 0).
        since: Only messages whose last attempt (or creation) is at or after
            this time: ``"2 hours ago"``, ISO-8601, or an aware datetime.
        dry_run: Count what would be re-queued; change nothing.
        kinds: Only these message kinds (default: all).
        settings: Library settings (default: from the environment).
        engine: Database engine (default: one for ``settings.database_url``).
        actor: Who asked, for the audit row (``cli:<user>``).
        now: Current time (tests).

    Returns:
        How many were (or would be) re-queued.

    Raises:
        UnknownProviderError: the provider is not configured.
        ConfigError: ``max_retries`` is negative or ``since`` cannot be parsed.
        StorageError: the database is unreachable.
    """
    settings = settings or Settings.from_env()
    settings.provider(provider)
    budget = check_max_retries(max_retries, "--max-retries")
    now = now or utcnow()
    since_at = _check_since(since, now)
    kind_filter = tuple(kinds) if kinds else None
    from ..db._engine import create_db_engine, session_scope

    own_engine = engine is None
    db = engine if engine is not None else create_db_engine(settings.database_url)
    try:
        with session_scope(db) as session:
            cond = retryable_filter(provider, kind_filter, since_at)
            at = {"p_now": now}
            counted: dict[str, int] = dict(
                session.execute(
                    select(messages.c.status, func.count()).where(cond).group_by(messages.c.status),
                    at,
                ).all()
            )
            gone = session.execute(
                select(func.count()).where(
                    receivers.c.provider == provider, receivers.c.status == "gone"
                )
            ).scalar_one()
            if dry_run:
                dead, failed = int(counted.get(DEAD, 0)), int(counted.get(PENDING, 0))
            else:
                reset = {
                    "status": PENDING,
                    "attempts": 0,
                    "max_retries": budget,
                    "next_attempt_at": now,
                    "updated_at": now,
                    "lease_owner": None,
                    "lease_expires_at": None,
                }
                # Two statements so each count is exact even if a worker leases
                # a failed message between the count and the update.
                dead, failed = (
                    _rowcount(
                        session.execute(update(messages).where(and_(cond, state)).values(reset), at)
                    )
                    for state in (messages.c.status == DEAD, messages.c.status == PENDING)
                )
                if gone:
                    gone = _rowcount(session.execute(reactivate_receivers_statement(provider)))
                record_audit(
                    session,
                    "outbox.requeued",
                    provider=provider,
                    actor=actor,
                    subject_type="outbox_message",
                    source="manual",
                    outcome="ok",
                    details={
                        "dead": dead,
                        "failed": failed,
                        "receivers_reactivated": int(gone),
                        "max_retries": budget,
                        "since": since_at.isoformat() if since_at else None,
                        "kinds": list(kind_filter) if kind_filter else None,
                    },
                    message=f"re-queued {dead + failed} outbox messages for {provider}",
                    occurred_at=now,
                )
    finally:
        if own_engine:
            db.dispose()
    result = RequeueResult(
        provider=provider,
        dead=dead,
        failed=failed,
        receivers_reactivated=int(gone),
        max_retries=budget,
        since=since_at,
        dry_run=dry_run,
    )
    _log.info(
        "idis.outbox.requeued",
        msg="dry run: outbox messages that would be re-queued"
        if dry_run
        else "outbox messages re-queued",
        provider=provider,
        dead=dead,
        failed=failed,
        max_retries=budget,
        dry_run=dry_run,
        actor=actor,
    )
    return result


def _rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


# --------------------------------------------------------------- housekeeping


def purge_delivered(
    session: Session,
    older_than: timedelta,
    *,
    providers: Iterable[str] | None = None,
    now: datetime | None = None,
) -> int:
    """Delete delivered messages settled more than ``older_than`` ago; return how many.

    Delivered rows are what makes a repeated enqueue of the same idempotency
    key a no-op; keep them longer than any caller might repeat a key.
    """
    if older_than < timedelta(0):
        raise ConfigError(f"older_than={older_than} must not be negative", variable="older_than")
    before = (now or utcnow()) - older_than
    names = (
        list(providers)
        if providers is not None
        else list(session.execute(select(messages.c.provider).distinct()).scalars())
    )
    return sum(_rowcount(session.execute(purge_statement(name, before))) for name in names)


@dataclass(frozen=True, slots=True)
class MessageView:
    """An outbox message for operators (no payload: it may hold customer data).

    Each field is the ``outbox_messages`` column of its name (read by name from the row).
    """

    id: int
    provider: str
    kind: str
    status: str
    attempts: int
    max_retries: int | None
    ordering_key: str | None
    idempotency_key: str
    tenant_id: str | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime


def list_messages(
    session: Session,
    *,
    provider: str | None = None,
    status: str | None = None,
    limit: int = 50,
    now: datetime | None = None,
) -> list[MessageView]:
    """Messages newest first, optionally of one provider and one state (``dead``: dead letters).

    ``status`` is a reported state: ``pending`` (waiting), ``in_flight`` (pending
    under an unexpired lease), ``delivered`` or ``dead``.

    Raises:
        ConfigError: naming an unknown ``status``.
    """
    if status is not None and status not in REPORTED_STATES:
        raise ConfigError(
            f"--status={status!r} is invalid: expected one of {', '.join(REPORTED_STATES)}",
            variable="--status",
        )
    now = now or utcnow()
    row_type = OutboxMessageRow
    query = select(row_type).order_by(row_type.id.desc()).limit(limit)
    if provider is not None:
        query = query.where(row_type.provider == provider)
    if status == IN_FLIGHT:
        query = query.where(row_type.status == PENDING, row_type.lease_expires_at > now)
    elif status == PENDING:
        query = query.where(row_type.status == PENDING, not_leased(messages, now))
    elif status is not None:
        query = query.where(row_type.status == status)
    views = []
    for row in session.scalars(query):
        leased = row.lease_expires_at is not None and row.lease_expires_at > now
        view = MessageView(*(getattr(row, name) for name in MessageView.__slots__))
        views.append(replace(view, status=IN_FLIGHT) if view.status == PENDING and leased else view)
    return views
