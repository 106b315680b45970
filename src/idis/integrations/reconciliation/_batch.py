"""Apply a whole replay page through the sync inbox with one statement per table.

The inbox's :func:`~idis.integrations.sync._inbox.apply_event` costs one
savepoint and two or three statements per event, which caps a replay of
100,000 events at a few thousand per second. A replay page is a better unit:
the events are known up front, in the provider's order, so the inbox's rule
(:func:`~idis.integrations.reconciliation._logic.plan_page`) can be decided for the
whole page at once and written with one existence query, one ledger read, one
multi-row inbox insert and one ledger upsert, inside the caller's transaction.

The result is the same rows ``apply_event`` would have written (same tables,
same statuses, same per-record version guard). Two safety nets keep it exact:

* a concurrent channel (a webhook arriving mid-page) shows up as an inbox row
  or a ledger version the page did not expect: :class:`PageConflict` is
  raised before any handler runs and the caller retries the page;
* a handler that raises fails the whole page with :class:`HandlerFailed`;
  the caller rolls back and re-applies that page event by event through
  ``apply_event`` itself, whose savepoints isolate the failing event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..exceptions import UsageError
from ..sync._inbox import HandlerRegistry, known_event_ids
from ..sync._models import SyncInbox, SyncRecordVersion
from ._bulk import pg_unnest_insert
from ._logic import PagePlan, plan_page

__all__ = [
    "HandlerFailed",
    "PageConflict",
    "PageResult",
    "apply_one_by_one",
    "apply_page",
    "claim_page",
    "page_state",
    "plan_for",
]

#: Ids per IN list: under SQLite's and PostgreSQL's bound-parameter limits.
_CHUNK = 500
#: Core tables: bulk statements skip the ORM's per-row bookkeeping.
_INBOX: Table = SyncInbox.__table__  # type: ignore[assignment]  # declarative __table__ is a Table
_VERSIONS: Table = SyncRecordVersion.__table__  # type: ignore[assignment]  # same


class PageConflict(Exception):
    """Another channel wrote an event or a record version of this page meanwhile; retry."""


class HandlerFailed(Exception):
    """A handler raised while the page was applied in bulk."""

    def __init__(self, event: Any | None, error: BaseException) -> None:
        what = f"handler for {event.type} failed on event {event.id}" if event else "flush failed"
        super().__init__(what)
        self.event = event
        self.error = error


@dataclass(slots=True)
class PageResult:
    """What :func:`apply_page` did."""

    plan: PagePlan
    #: Events whose handler raised (only from the event-by-event path).
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)

    @property
    def applied(self) -> list[Any]:
        """Events applied now, in order."""
        return self.plan.apply


def _insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise UsageError(f"reconciliation needs SQLite or PostgreSQL, not {name}")


# PostgreSQL: one point lookup per id through the unique index, whatever the
# planner's statistics say. With an IN list (or = ANY) and the stale statistics
# of a table that just grew (an outage's backlog), psycopg's prepared generic
# plan scans every inbox row of the provider instead: measured at 150 ms per
# 1,000-id page on a 20,000-row inbox, and growing with the inbox.
_PG_KNOWN_IDS = text(
    "SELECT x.event_id FROM unnest(CAST(:ids AS VARCHAR[])) AS u(id) "
    "CROSS JOIN LATERAL (SELECT i.event_id FROM sync_inbox AS i "
    "WHERE i.provider = :provider AND i.event_id = u.id LIMIT 1) AS x"
)
# Same lookup for the version ledger, row-locked until the page commits. Ids
# are passed sorted, so two pages touching the same records lock them in the
# same order and queue instead of deadlocking.
_PG_VERSIONS = text(
    "SELECT x.record_id, x.version FROM unnest(CAST(:ids AS VARCHAR[])) AS u(id) "
    "CROSS JOIN LATERAL (SELECT v.record_id, v.version FROM sync_record_versions AS v "
    "WHERE v.provider = :provider AND v.record_id = u.id LIMIT 1 FOR UPDATE) AS x"
)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _known_ids(session: Session, provider: str, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` the inbox holds (the inbox's own query on SQLite)."""
    if not _is_postgres(session):
        return known_event_ids(session, provider, event_ids)
    ids = list(dict.fromkeys(event_ids))
    return set(session.scalars(_PG_KNOWN_IDS, {"ids": ids, "provider": provider}))


def _current_versions(session: Session, provider: str, record_ids: list[str]) -> dict[str, int]:
    """Newest applied version per record; row-locked on PostgreSQL until the page commits."""
    if _is_postgres(session):
        rows = session.execute(_PG_VERSIONS, {"ids": sorted(record_ids), "provider": provider})
        return {rid: int(version) for rid, version in rows}
    found: dict[str, int] = {}
    for start in range(0, len(record_ids), _CHUNK):
        chunk = record_ids[start : start + _CHUNK]
        query = select(SyncRecordVersion.record_id, SyncRecordVersion.version).where(
            SyncRecordVersion.provider == provider, SyncRecordVersion.record_id.in_(chunk)
        )
        found.update({rid: int(version) for rid, version in session.execute(query)})
    return found


def _claim(session: Session, provider: str, plan: PagePlan, source: str, now: datetime) -> None:
    statuses = plan.status_of()
    events = [*plan.apply, *plan.superseded, *plan.ignored]
    if not events:
        return
    rows = [
        {
            "provider": provider,
            "event_id": e.id,
            "event_type": e.type,
            "record_id": e.record_id,
            "tenant_id": e.tenant_id,
            "seq": e.seq,
            "version": e.version,
            "occurred_at": e.occurred_at,
            "source": source,
            "status": statuses[e.id],
            "received_at": now,
            "webhook_at": None,
        }
        for e in events
    ]
    if _is_postgres(session):
        result = pg_unnest_insert(
            session,
            _INBOX,
            rows,
            suffix="ON CONFLICT (provider, event_id) DO NOTHING RETURNING id",
        )
    else:
        # One cached statement as executemany, which SQLAlchemy batches into
        # multi-row INSERTs ("insertmanyvalues").
        stmt = (
            _insert(session)(_INBOX)
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(_INBOX.c.id)
        )
        result = session.execute(stmt, rows)
    claimed = len(result.all())
    if claimed != len(rows):
        raise PageConflict(f"{len(rows) - claimed} events of the page arrived meanwhile")


def _advance_versions(session: Session, provider: str, plan: PagePlan, now: datetime) -> None:
    if not plan.versions:
        return
    rows = [
        {
            "provider": provider,
            "record_id": record_id,
            "version": key,
            "event_id": event_id,
            "updated_at": now,
        }
        for record_id, (key, event_id) in plan.versions.items()
    ]
    if _is_postgres(session):
        result = pg_unnest_insert(
            session,
            _VERSIONS,
            rows,
            suffix=(
                "ON CONFLICT (provider, record_id) DO UPDATE SET version = EXCLUDED.version, "
                "event_id = EXCLUDED.event_id, updated_at = EXCLUDED.updated_at "
                "WHERE sync_record_versions.version < EXCLUDED.version RETURNING id"
            ),
        )
    else:
        stmt = _insert(session)(_VERSIONS)
        stmt = stmt.on_conflict_do_update(
            index_elements=["provider", "record_id"],
            set_={
                "version": stmt.excluded.version,
                "event_id": stmt.excluded.event_id,
                "updated_at": stmt.excluded.updated_at,
            },
            where=_VERSIONS.c.version < stmt.excluded.version,
        ).returning(_VERSIONS.c.id)
        result = session.execute(stmt, rows)
    advanced = len(result.all())
    if advanced != len(rows):
        # A record gained a newer version after the ledger read (a concurrent
        # first insert, which row locks cannot cover): re-plan the page.
        raise PageConflict(f"{len(rows) - advanced} records moved meanwhile")


def page_state(
    session: Session,
    provider: str,
    events: Sequence[Any],
    registry: HandlerRegistry,
) -> tuple[set[str], dict[str, int]]:
    """What the inbox knows about a page: ids it holds, newest version per record."""
    known = _known_ids(session, provider, [e.id for e in events])
    handles = registry.handles
    record_ids = sorted(
        {
            e.record_id
            for e in events
            if e.id not in known and e.record_id is not None and handles(e.type)
        }
    )
    return known, _current_versions(session, provider, record_ids)


def plan_for(
    session: Session,
    provider: str,
    events: Sequence[Any],
    registry: HandlerRegistry,
) -> PagePlan:
    """Decide the page against the inbox and the version ledger (reads only)."""
    known, current = page_state(session, provider, events, registry)
    return plan_page(events, known, current, registry.handles)


def claim_page(
    session: Session,
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str = "replay",
    now: datetime,
) -> PagePlan:
    """Decide the page and write its inbox rows and ledger versions; no handler runs yet.

    The first half of :func:`apply_page`, shared with the async driver, which
    awaits async handlers between this and the page's other rows.

    Raises:
        PageConflict: another channel wrote part of the page meanwhile; roll back, retry.
    """
    plan = plan_for(session, provider, events, registry)
    _claim(session, provider, plan, source, now)
    _advance_versions(session, provider, plan, now)
    return plan


def apply_page(
    session: Session,
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str = "replay",
    now: datetime,
) -> PageResult:
    """Apply one page of events exactly as the inbox would, in bulk, in ``session``'s transaction.

    Args:
        session: The caller's session; nothing is committed here.
        provider: Provider name.
        events: The page, in the provider's order.
        registry: The host's handlers (sync ones).
        source: Inbox channel (``replay``).
        now: Receipt time written on the inbox rows.

    Raises:
        PageConflict: another channel wrote part of the page meanwhile; roll back, retry.
        HandlerFailed: a handler raised; roll back and use the event-by-event path.
        UsageError: an event type has only an async handler (use ``areconcile``).
    """
    for event in events:
        if registry.handler_for(event.type) is None and registry.async_handler_for(event.type):
            raise UsageError(
                f"event type {event.type!r} has only an async handler: reconcile runs sync "
                "handlers; register a sync one too, or use areconcile"
            )
    plan = claim_page(session, provider, events, registry=registry, source=source, now=now)
    for event in plan.apply:
        handler = registry.handler_for(event.type)
        assert handler is not None  # checked above
        try:
            handler(session, event)
        except Exception as exc:
            raise HandlerFailed(event, exc) from exc
    try:
        # A handler's pending ORM writes fail at flush; flush now so the error
        # is the handlers' (event-by-event path), not a page conflict.
        session.flush()
    except Exception as exc:
        raise HandlerFailed(None, exc) from exc
    return PageResult(plan)


def apply_one_by_one(
    session: Session,
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    source: str = "replay",
    now: datetime,
) -> PageResult:
    """Apply a page through the inbox's own ``apply_event``, isolating failing handlers.

    The slow, exact path after :class:`HandlerFailed`: each event runs in the
    inbox's savepoint, so a failing handler loses only its own event (no inbox
    row: a later run retries it) and the rest of the page is applied.
    """
    from ..sync._inbox import ApplyOutcome, apply_event_outcome

    plan = PagePlan()
    failed: list[tuple[Any, BaseException]] = []
    buckets = {
        ApplyOutcome.APPLIED: plan.apply,
        ApplyOutcome.DUPLICATE: plan.duplicates,
        ApplyOutcome.SUPERSEDED: plan.superseded,
        ApplyOutcome.IGNORED: plan.ignored,
    }
    for event in events:
        try:
            outcome = apply_event_outcome(
                session, provider, event, source, registry=registry, now=now
            )
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001  # a host handler may raise anything; isolate it
            failed.append((event, exc))
            continue
        buckets[outcome].append(event)
    return PageResult(plan, failed)
