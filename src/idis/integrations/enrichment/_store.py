"""Every statement enrichment runs, as functions of a sync ``Session``.

The async drivers run the very same functions through
``AsyncSession.run_sync``, SQLAlchemy's own bridge: the function sees a
``Session`` while the I/O stays on the event loop (greenlets, no threads), so
the storage logic exists once.

Upserts and "create if absent" use ``INSERT ... ON CONFLICT``, which PostgreSQL
and SQLite both support, including against the partial unique indexes that
keep one OPEN defect and one pending request per subject. That is what makes
defect creation idempotent when several callers defer the same subject at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from .._audit import AuditEvent, audit_row
from ..db._base import dialect_insert
from ..observability._metrics import Metrics
from ._decisions import SubjectKey
from ._models import (
    DEFECT_OPEN,
    DEFECT_RESOLVED,
    NO_MATCH_RESOLUTION,
    RECOVERY_RESOLUTION,
    REQUEST_DONE,
    REQUEST_FAILED,
    REQUEST_PENDING,
    STALE_ENRICHMENT,
    SUBJECT_COLUMNS,
    Defect,
    EnrichmentCacheEntry,
    EnrichmentRequest,
)

__all__ = ["SUSPECT", "CachedCopy", "LeaseResult", "LeasedRequest", "given_up_error"]

_OPEN_ONLY = Defect.status == DEFECT_OPEN
_PENDING_ONLY = EnrichmentRequest.status == REQUEST_PENDING
# ON CONFLICT must name the partial index's predicate as literal SQL: a bound
# parameter stops matching it once psycopg switches to a prepared statement.
_OPEN_INDEX_WHERE = text(f"status = '{DEFECT_OPEN}'")
_PENDING_INDEX_WHERE = text(f"status = '{REQUEST_PENDING}'")
_DEFECT_KEY = ("defect_type", *SUBJECT_COLUMNS)


@dataclass(frozen=True, slots=True)
class CachedCopy:
    """The last good result of a subject."""

    served_by: str
    data: Mapping[str, Any]
    fetched_at: datetime


#: ``last_error`` of a pending request whose lapsed lease was taken over: the worker
#: refreshing it stopped without settling it. It stays a suspect, leased alone, until
#: a refresh settles it (any settle rewrites ``last_error``).
SUSPECT = (
    "suspect: the worker refreshing it stopped without settling it (its lease lapsed); "
    "refreshed alone until it settles"
)


def given_up_error(takeovers: int) -> str:
    """``last_error`` of a request given up because its refresh kept stopping the worker."""
    return (
        f"its refresh stopped the worker {takeovers} times (each time its lease lapsed and "
        "was taken over): given up; its defect stays OPEN"
    )


@dataclass(frozen=True, slots=True)
class LeasedRequest:
    """A deferred request leased by a worker."""

    id: int
    key: SubjectKey
    providers: tuple[str, ...]
    attempts: int
    #: Leases of it taken over after they lapsed (see :func:`lease`).
    takeovers: int = 0


@dataclass(frozen=True, slots=True)
class LeaseResult:
    """What one :func:`lease` did."""

    #: The requests leased, to refresh in this order.
    requests: list[LeasedRequest]
    #: Lapsed leases taken over and put back as suspects (``takeovers`` as counted now).
    taken_over: list[LeasedRequest]
    #: Lapsed leases taken over for the ``max_takeovers``-th time: given up (failed).
    given_up: list[LeasedRequest]
    #: Due requests were left out of ``requests`` (lapsed leases taken over, suspects
    #: left out or leased alone): more may be due now.
    cut: bool = False


def _insert(session: Session, model: Any) -> Any:
    """A dialect-specific INSERT (for ON CONFLICT)."""
    return dialect_insert(model, session.get_bind().dialect.name)


def _key_values(key: SubjectKey) -> dict[str, str]:
    return {name: getattr(key, name) for name in SUBJECT_COLUMNS}


def _subject_filter(model: Any, key: SubjectKey) -> Any:
    return and_(*(getattr(model, name) == value for name, value in _key_values(key).items()))


def _subject(model: Any) -> tuple[Any, ...]:
    """``model``'s subject key columns, to select for :func:`_key`."""
    return tuple(getattr(model, name) for name in SUBJECT_COLUMNS)


def _key(row: Any) -> SubjectKey:
    return SubjectKey(*(getattr(row, name) for name in SUBJECT_COLUMNS))


def _due(now: datetime) -> tuple[Any, ...]:
    """Pending, due and not leased (or its lease ran out)."""
    return (
        _PENDING_ONLY,
        EnrichmentRequest.next_attempt_at <= now,
        or_(
            EnrichmentRequest.lease_expires_at.is_(None),
            EnrichmentRequest.lease_expires_at <= now,
        ),
    )


def _upsert_cache(
    session: Session, key: SubjectKey, values: Mapping[str, Any], changes: Mapping[str, Any]
) -> None:
    """Insert the subject's cache row with ``values``, or set ``changes`` on the existing one."""
    cache = EnrichmentCacheEntry.__table__
    stmt = _insert(session, cache).values(**_key_values(key), **values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[cache.c[n] for n in SUBJECT_COLUMNS], set_=dict(changes)
        )
    )


# --------------------------------------------------------------------------- cache


def load_cached(session: Session, key: SubjectKey) -> CachedCopy | None:
    """The subject's last good result, if it was ever enriched."""
    row = session.execute(
        select(
            EnrichmentCacheEntry.served_by,
            EnrichmentCacheEntry.data,
            EnrichmentCacheEntry.fetched_at,
        ).where(_subject_filter(EnrichmentCacheEntry, key))
    ).first()
    if row is None or row.data is None or row.fetched_at is None:
        return None
    return CachedCopy(row.served_by or key.provider, dict(row.data), row.fetched_at)


def load_no_match(session: Session, key: SubjectKey, *, since: datetime) -> datetime | None:
    """When every provider last answered "no match" for the subject, if at or after ``since``."""
    return session.execute(
        select(EnrichmentCacheEntry.no_match_at).where(
            _subject_filter(EnrichmentCacheEntry, key),
            EnrichmentCacheEntry.no_match_at >= since,
        )
    ).scalar_one_or_none()


def record_no_match(session: Session, key: SubjectKey, *, now: datetime, actor: str) -> list[int]:
    """Remember that every provider answered "no match"; settle the subject if it has no data.

    A subject that was never enriched has nothing stale to show: the answer ends its
    staleness and resolves its OPEN stale defects (``NO_MATCH_RESOLUTION``, audited).
    A subject with cached data keeps it as it was (stale, defect OPEN): whether the
    old data should go now that the provider no longer knows the subject is a
    human's call.

    Returns:
        The ids of the defects this resolved.
    """
    seen = {"no_match_at": now, "updated_at": now}
    _upsert_cache(session, key, {"stale": False, **seen}, seen)
    has_data = session.execute(
        select(EnrichmentCacheEntry.fetched_at.is_not(None)).where(
            _subject_filter(EnrichmentCacheEntry, key)
        )
    ).scalar_one()
    if has_data:
        return []
    session.execute(
        update(EnrichmentCacheEntry)
        .where(_subject_filter(EnrichmentCacheEntry, key))
        .values(stale=False, stale_since=None)
        .execution_options(synchronize_session=False)
    )
    return resolve_subject_defects(
        session, key, now=now, actor=actor, resolution=NO_MATCH_RESOLUTION
    )


def record_success(
    session: Session,
    key: SubjectKey,
    *,
    served_by: str,
    data: Mapping[str, Any],
    fetched_at: datetime,
    now: datetime,
    actor: str,
) -> tuple[list[int], int]:
    """Store a fresh result: cache it, clear staleness, finish pending requests, resolve defects.

    Returns:
        The ids of the defects this resolved, and how many pending requests it finished.
    """
    fresh = {
        "served_by": served_by,
        "data": dict(data),
        "fetched_at": fetched_at,
        "stale": False,
        "stale_since": None,
        "last_error": None,
        "no_match_at": None,
        "updated_at": now,
    }
    _upsert_cache(session, key, fresh, fresh)
    finished = {
        "status": REQUEST_DONE,
        "served_by": served_by,
        "completed_at": now,
        "updated_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    # Any pending request for the subject is answered by this result, whoever asked.
    done = session.execute(
        update(EnrichmentRequest)
        .where(_subject_filter(EnrichmentRequest, key), _PENDING_ONLY)
        .values(finished)
        .execution_options(synchronize_session=False)
    )
    resolved = resolve_subject_defects(session, key, now=now, actor=actor)
    return resolved, int(done.rowcount)  # type: ignore[attr-defined]  # CursorResult for UPDATE


def resolve_subject_defects(
    session: Session,
    key: SubjectKey,
    *,
    now: datetime,
    actor: str,
    resolution: str = RECOVERY_RESOLUTION,
) -> list[int]:
    """Resolve the subject's OPEN stale defects (by default with RB-09's resolution; audited)."""
    rows = session.execute(
        update(Defect)
        .where(Defect.defect_type == STALE_ENRICHMENT, _subject_filter(Defect, key), _OPEN_ONLY)
        .values(status=DEFECT_RESOLVED, resolution=resolution, resolved_at=now)
        .returning(Defect.id)
    ).all()
    ids = [row.id for row in rows]
    if ids:
        _audit_defects(
            session,
            "defect.resolved",
            key.provider,
            [(i, key) for i in ids],
            now=now,
            actor=actor,
        )
    return ids


def record_failure(session: Session, key: SubjectKey, *, error: str, now: datetime) -> None:
    """Mark the subject stale (keeping the time it first went stale) and note the failure."""
    cache = EnrichmentCacheEntry.__table__
    failed = {"stale": True, "last_failure_at": now, "last_error": error[:255], "updated_at": now}
    keep_since = case(
        (
            and_(cache.c.stale.is_(True), cache.c.stale_since.is_not(None)),
            cache.c.stale_since,
        ),
        else_=now,
    )
    _upsert_cache(
        session, key, {**failed, "stale_since": now}, {**failed, "stale_since": keep_since}
    )


# --------------------------------------------------------------------------- deferral


def ensure_requests(
    session: Session,
    items: Sequence[tuple[SubjectKey, Sequence[str]]],
    *,
    now: datetime,
    error: str | None = None,
) -> tuple[dict[SubjectKey, int], int]:
    """Make sure each subject has a pending deferred request; create the missing ones.

    Returns:
        The pending request id per subject (new or existing), and how many were created.
    """
    items = list({key: (key, chain) for key, chain in items}.values())
    if not items:
        return {}, 0
    rows = [
        {
            **_key_values(key),
            "providers": list(chain),
            "status": REQUEST_PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "last_error": error,
            "created_at": now,
            "updated_at": now,
        }
        for key, chain in items
    ]
    stmt = (
        _insert(session, EnrichmentRequest.__table__)
        .on_conflict_do_nothing(
            index_elements=list(SUBJECT_COLUMNS), index_where=_PENDING_INDEX_WHERE
        )
        .returning(EnrichmentRequest.__table__.c.id)
    )
    created = 0
    for start in range(0, len(rows), 500):
        created += len(session.execute(stmt, rows[start : start + 500]).all())
    keys = [key for key, _ in items]
    return _pending_ids(session, keys), created


def _pending_ids(session: Session, keys: Sequence[SubjectKey]) -> dict[SubjectKey, int]:
    return _ids_by_key(session, EnrichmentRequest, keys, _PENDING_ONLY)


def _ids_by_key(
    session: Session, model: Any, keys: Sequence[SubjectKey], *where: Any
) -> dict[SubjectKey, int]:
    """The id of ``model``'s row per subject key, among the rows matching ``where``."""
    found: dict[SubjectKey, int] = {}
    wanted = set(keys)
    for provider in {k.provider for k in keys}:
        ids = [k.subject_id for k in keys if k.provider == provider]
        for start in range(0, len(ids), 500):
            chunk = model.subject_id.in_(ids[start : start + 500])
            rows = session.execute(
                select(model.id, *_subject(model)).where(model.provider == provider, chunk, *where)
            ).all()
            for row in rows:
                key = _key(row)
                if key in wanted:
                    found[key] = row.id
    return found


def open_defects(
    session: Session,
    items: Sequence[tuple[SubjectKey, Mapping[str, Any]]],
    *,
    now: datetime,
    actor: str,
) -> tuple[dict[SubjectKey, int], dict[SubjectKey, int]]:
    """Open a STALE_ENRICHMENT defect per subject unless one is OPEN already (audited).

    Returns:
        (created, already_open): defect id per subject.
    """
    items = list({key: (key, details) for key, details in items}.values())
    if not items:
        return {}, {}
    rows = [
        {
            "defect_type": STALE_ENRICHMENT,
            **_key_values(key),
            "status": DEFECT_OPEN,
            "details": dict(details),
            "created_at": now,
        }
        for key, details in items
    ]
    stmt = (
        _insert(session, Defect.__table__)
        .on_conflict_do_nothing(index_elements=list(_DEFECT_KEY), index_where=_OPEN_INDEX_WHERE)
        .returning(Defect.id, *_subject(Defect))
    )
    created: dict[SubjectKey, int] = {}
    for start in range(0, len(rows), 500):
        for row in session.execute(stmt, rows[start : start + 500]).all():
            created[_key(row)] = row.id
    rest = [key for key, _ in items if key not in created]
    already = _open_defect_ids(session, rest) if rest else {}
    if created:
        by_provider: dict[str, list[tuple[int, SubjectKey]]] = {}
        for key, defect_id in created.items():
            by_provider.setdefault(key.provider, []).append((defect_id, key))
        for provider, pairs in by_provider.items():
            _audit_defects(session, "defect.created", provider, pairs, now=now, actor=actor)
    return created, already


def _open_defect_ids(session: Session, keys: Sequence[SubjectKey]) -> dict[SubjectKey, int]:
    return _ids_by_key(session, Defect, keys, Defect.defect_type == STALE_ENRICHMENT, _OPEN_ONLY)


def _audit_defects(
    session: Session,
    action: str,
    provider: str,
    pairs: Iterable[tuple[int, SubjectKey]],
    *,
    now: datetime,
    actor: str,
    details: Mapping[str, Any] | None = None,
) -> None:
    rows = [
        audit_row(
            action,
            provider=provider,
            actor=actor,
            subject_type="defect",
            subject_id=str(defect_id),
            tenant_id=key.tenant_id,
            details={
                "defect_type": STALE_ENRICHMENT,
                "subject_type": key.subject_type,
                "subject_id": key.subject_id,
                **(details or {}),
            },
            occurred_at=now,
        )
        for defect_id, key in pairs
    ]
    if rows:
        session.execute(insert(AuditEvent), rows)


def defer(
    session: Session,
    key: SubjectKey,
    *,
    chain: Sequence[str],
    now: datetime,
    error: str,
    origin: str,
    actor: str,
    cached_age: timedelta | None = None,
) -> tuple[int, int]:
    """Persist a deferred request and open a defect for one subject (both idempotent).

    Returns:
        (request id, defect id).
    """
    request_ids, _ = ensure_requests(session, [(key, chain)], now=now, error=error)
    details: dict[str, Any] = {"origin": origin, "error": error, "providers": list(chain)}
    if cached_age is not None:
        details["cached_age_seconds"] = round(cached_age.total_seconds(), 3)
    created, already = open_defects(session, [(key, details)], now=now, actor=actor)
    return request_ids[key], (created.get(key) or already[key])


# --------------------------------------------------------------------------- stale windows


def stale_subjects(session: Session, provider: str, since: datetime) -> list[SubjectKey]:
    """Subjects of ``provider`` whose enrichment went stale (failed) at or after ``since``.

    A subject counts when it is stale now and its last failure (deferred,
    served from cache, or raised) lies in the window, or when a request for it
    was deferred in the window and is still pending.
    """
    cached = session.execute(
        select(*_subject(EnrichmentCacheEntry))
        .where(
            EnrichmentCacheEntry.provider == provider,
            EnrichmentCacheEntry.stale.is_(True),
            EnrichmentCacheEntry.last_failure_at >= since,
        )
        .order_by(EnrichmentCacheEntry.id)
    ).all()
    pending = session.execute(
        select(*_subject(EnrichmentRequest))
        .where(
            EnrichmentRequest.provider == provider,
            _PENDING_ONLY,
            EnrichmentRequest.created_at >= since,
        )
        .order_by(EnrichmentRequest.id)
    ).all()
    return list(dict.fromkeys(_key(row) for row in [*cached, *pending]))


def resolve_defects_since(
    session: Session, provider: str, since: datetime, *, now: datetime, actor: str
) -> list[int]:
    """Resolve ``provider``'s OPEN stale defects created after ``since`` (RB-09 Recovery 4)."""
    rows = session.execute(
        update(Defect)
        .where(
            Defect.defect_type == STALE_ENRICHMENT,
            Defect.provider == provider,
            Defect.created_at > since,
            _OPEN_ONLY,
        )
        .values(status=DEFECT_RESOLVED, resolution=RECOVERY_RESOLUTION, resolved_at=now)
        .returning(Defect.id, *_subject(Defect))
        .execution_options(synchronize_session=False)
    ).all()
    pairs = [(row.id, _key(row)) for row in rows]
    _audit_defects(
        session, "defect.resolved", provider, pairs, now=now, actor=actor, details={"manual": True}
    )
    return sorted(row.id for row in rows)


# --------------------------------------------------------------------------- worker


def due_providers(session: Session, now: datetime) -> list[str]:
    """Providers with at least one deferred request due and not leased."""
    rows = session.execute(select(EnrichmentRequest.provider).where(*_due(now)).distinct()).all()
    return sorted(row.provider for row in rows)


def lease(
    session: Session,
    provider: str,
    *,
    limit: int,
    owner: str,
    now: datetime,
    lease_for: timedelta,
    max_takeovers: int = 3,
) -> LeaseResult:
    """Lease up to ``limit`` due requests of ``provider``, oldest due first.

    ``FOR UPDATE SKIP LOCKED`` lets several workers lease side by side on
    PostgreSQL; SQLite has no row locks, but the engine begins every
    transaction IMMEDIATE, so lessees queue on the write lock instead.

    A due request whose lease lapsed was held by a worker that stopped without
    settling it: killed, crashed, or killed *by* that refresh (a native crash,
    memory). Its takeover is written in this transaction, before anything is
    refreshed: ``takeovers`` + 1, and at ``max_takeovers`` the request is given
    up (``failed``, :func:`given_up_error`; its defect stays OPEN); otherwise it
    becomes a :data:`SUSPECT` due now, behind every request already due, and is
    not leased by this call. A suspect is leased alone (when it is the first
    due), so one that kills its worker takes no neighbour down with it and
    spends only its own takeovers. The oldest-due order alone would hand it to
    the first lease after every restart, before anything else of the provider.
    """
    taken_over: list[LeasedRequest] = []
    given_up: list[LeasedRequest] = []
    while True:
        rows = session.execute(
            select(
                EnrichmentRequest.id,
                *_subject(EnrichmentRequest),
                EnrichmentRequest.providers,
                EnrichmentRequest.attempts,
                EnrichmentRequest.takeovers,
                EnrichmentRequest.lease_expires_at,
                EnrichmentRequest.last_error,
            )
            .where(EnrichmentRequest.provider == provider, *_due(now))
            .order_by(EnrichmentRequest.next_attempt_at, EnrichmentRequest.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        lapsed = [row for row in rows if row.lease_expires_at is not None]
        if not lapsed:
            break
        _take_over(session, lapsed, now=now, limit=max_takeovers, into=(taken_over, given_up))
        rows = [row for row in rows if row.lease_expires_at is None]
        if rows:
            break
        # Every candidate was a lapsed lease: look again (none of them is lapsed now).
    if not rows:
        return LeaseResult([], taken_over, given_up)
    if rows[0].last_error == SUSPECT:
        chosen = rows[:1]
    else:
        chosen = [row for row in rows if row.last_error != SUSPECT]
    session.execute(
        update(EnrichmentRequest)
        .where(EnrichmentRequest.id.in_([row.id for row in chosen]))
        .values(lease_owner=owner, lease_expires_at=now + lease_for, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    leased = [_leased(row, provider) for row in chosen]
    cut = len(chosen) < len(rows) or bool(taken_over or given_up)
    return LeaseResult(leased, taken_over, given_up, cut=cut)


def _leased(row: Any, provider: str, *, takeovers: int | None = None) -> LeasedRequest:
    return LeasedRequest(
        id=row.id,
        key=_key(row),
        providers=tuple(row.providers or (provider,)),
        attempts=row.attempts,
        takeovers=row.takeovers if takeovers is None else takeovers,
    )


def _take_over(
    session: Session,
    rows: Sequence[Any],
    *,
    now: datetime,
    limit: int,
    into: tuple[list[LeasedRequest], list[LeasedRequest]],
) -> None:
    """Count the takeover of lapsed leases ``rows``: give up those at ``limit``, the rest
    become suspects due now (behind what is due already), not leased."""
    suspects, given_up = into
    lost = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    for row in rows:
        takeovers = row.takeovers + 1
        request = _leased(row, row.provider, takeovers=takeovers)
        values: dict[str, Any] = {**lost, "takeovers": takeovers}
        if takeovers >= limit:
            given_up.append(request)
            error = given_up_error(takeovers)
            values.update(status=REQUEST_FAILED, last_error=error, completed_at=now)
            # The subject's last failure is now: still stale, and in the window of a
            # later `create-stale-defects`, which queues it again once the cause is fixed.
            record_failure(session, request.key, error=error, now=now)
        else:
            suspects.append(request)
            values.update(last_error=SUSPECT, next_attempt_at=now)
        session.execute(
            update(EnrichmentRequest)
            .where(EnrichmentRequest.id == row.id, _PENDING_ONLY)
            .values(values)
            .execution_options(synchronize_session=False)
        )


def release_own(session: Session, *, owner: str, now: datetime) -> None:
    """Give back, untried, every pending request still leased to ``owner``.

    After a pass of ``owner`` failed (database unreachable, task cancelled) its
    leases are not a dead worker's and must not lapse into takeovers.
    """
    session.execute(
        update(EnrichmentRequest)
        .where(EnrichmentRequest.lease_owner == owner, _PENDING_ONLY)
        .values(lease_owner=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )


def release(session: Session, ids: Sequence[int], *, owner: str, now: datetime) -> None:
    """Give leased requests back untouched (no attempt counted)."""
    if not ids:
        return
    session.execute(
        update(EnrichmentRequest)
        .where(
            EnrichmentRequest.id.in_(list(ids)),
            EnrichmentRequest.lease_owner == owner,
            _PENDING_ONLY,
        )
        .values(lease_owner=None, lease_expires_at=None, updated_at=now)
        .execution_options(synchronize_session=False)
    )


def reschedule(
    session: Session,
    request: LeasedRequest,
    *,
    next_attempt_at: datetime,
    error: str,
    now: datetime,
) -> None:
    """Count a failed refresh attempt and schedule the next one."""
    _attempted(session, request, next_attempt_at=next_attempt_at, last_error=error, updated_at=now)
    record_failure(session, request.key, error=error, now=now)


def fail_request(session: Session, request: LeasedRequest, *, error: str, now: datetime) -> None:
    """Give up on a request every provider rejected (4xx); its defect stays OPEN."""
    _attempted(
        session, request, status=REQUEST_FAILED, last_error=error, completed_at=now, updated_at=now
    )


def _attempted(session: Session, request: LeasedRequest, **values: Any) -> None:
    """Count an attempt at a leased request, give its lease back and set ``values``."""
    session.execute(
        update(EnrichmentRequest)
        .where(EnrichmentRequest.id == request.id, _PENDING_ONLY)
        .values(attempts=EnrichmentRequest.attempts + 1, lease_owner=None, lease_expires_at=None)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


# --------------------------------------------------------------------------- gauges


def refresh_gauges(session: Session, metrics: Metrics, providers: Iterable[str]) -> None:
    """Set ``enrichment_deferred_pending`` and ``defects_open`` from the tables.

    Every configured provider gets a sample, so a count that fell to zero reads 0.
    """
    pending = dict(
        session.execute(
            select(EnrichmentRequest.provider, func.count())
            .where(_PENDING_ONLY)
            .group_by(EnrichmentRequest.provider)
        ).all()
    )
    open_counts: dict[tuple[str, str], int] = {
        (row.provider, row.defect_type): row.n
        for row in session.execute(
            select(Defect.provider, Defect.defect_type, func.count().label("n"))
            .where(_OPEN_ONLY)
            .group_by(Defect.provider, Defect.defect_type)
        ).all()
    }
    names = set(providers) | set(pending) | {p for p, _ in open_counts}
    for name in names:
        metrics.enrichment_deferred_pending.labels(provider=name).set(pending.get(name, 0))
    types = {t for _, t in open_counts} | {STALE_ENRICHMENT}
    for name in names:
        for defect_type in types:
            metrics.defects_open.labels(provider=name, defect_type=defect_type).set(
                open_counts.get((name, defect_type), 0)
            )


def purge_finished(session: Session, before: datetime) -> int:
    """Delete done/failed requests completed before ``before`` (housekeeping)."""
    result = session.execute(
        delete(EnrichmentRequest).where(
            EnrichmentRequest.status.in_([REQUEST_DONE, REQUEST_FAILED]),
            EnrichmentRequest.completed_at < before,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult for DELETE
