"""Stale-data defects: create them for a window (RB-09 Containment 3), clear them (Recovery 4).

``create_stale_defects`` opens a STALE_ENRICHMENT defect for every subject of
a provider whose enrichment went stale in the window, and makes sure each has
a pending deferred request, so that every subject it reports also refreshes
by itself once the provider is back (which resolves the defect). It is
idempotent: a second run finds the same defects OPEN and creates nothing.

``clear_stale_defects`` is RB-09 Recovery 4 as a function: it resolves the
provider's OPEN stale defects created after ``since`` with the resolution
'Data refreshed after provider recovery', and also stamps ``resolved_at``.
It does not cancel pending refreshes: the data itself is still refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .._audit import cli_actor, record_audit, row_fields
from .._timeparse import parse_since, utcnow
from ..config import Settings
from ..db._engine import create_db_engine, session_scope
from ..exceptions import ConfigError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from . import _store
from ._decisions import provider_chain
from ._models import DEFECT_OPEN, DEFECT_RESOLVED, STALE_ENRICHMENT, Defect

__all__ = [
    "ClearResult",
    "CreateResult",
    "DefectRecord",
    "clear_stale_defects",
    "create_stale_defects",
    "list_defects",
]

_log = get_logger()


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateResult:
    """What ``create_stale_defects`` did."""

    provider: str
    since: datetime
    #: Subjects found stale in the window.
    subjects: int
    #: Defects opened by this run.
    created: int
    #: Subjects that already had an OPEN defect (left as they were).
    already_open: int
    #: Deferred refresh requests this run added (subjects that had none pending).
    requests_enqueued: int
    #: Ids of the OPEN defects covering the window's subjects (new and existing), ascending.
    defect_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearResult:
    """What ``clear_stale_defects`` did."""

    provider: str
    since: datetime
    #: Defects resolved by this run.
    resolved: int
    #: Their ids, ascending.
    defect_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DefectRecord:
    """A read-only view of one defect row."""

    id: int
    defect_type: str
    provider: str
    tenant_id: str
    subject_type: str
    subject_id: str
    status: str
    resolution: str | None
    created_at: datetime
    resolved_at: datetime | None
    details: dict[str, Any]

    @classmethod
    def from_row(cls, row: Defect) -> DefectRecord:
        """Build from an ORM row: each field from the column of its name."""
        return cls(**row_fields(cls, row))


def _validated(
    provider: str, since: str | datetime, settings: Settings | None
) -> tuple[Settings, datetime]:
    """Check provider and window before anything is touched; bad input changes nothing."""
    settings = settings or Settings.from_env()
    settings.provider(provider)
    return settings, parse_since(since, name="since")


class _Database:
    """An engine passed in, or one created for the call and disposed after it."""

    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        self.engine = engine or create_db_engine(settings.database_url)
        self._owned = engine is None

    def __enter__(self) -> Engine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self.engine.dispose()


def create_stale_defects(
    provider: str,
    since: str | datetime,
    *,
    settings: Settings | None = None,
    engine: Engine | None = None,
    actor: str | None = None,
    now: datetime | None = None,
    metrics: Metrics | None = None,
) -> CreateResult:
    """Open a STALE_ENRICHMENT defect for every subject of ``provider`` stale since ``since``.

    A subject counts when it is stale now and its enrichment last failed in the
    window (deferred, served from cache, or raised while deferral was off), or
    when it was deferred in the window and is still pending. Each also gets a
    pending refresh request if it had none, so it refreshes by itself.
    Idempotent: subjects with an OPEN defect are counted as ``already_open``.

    Args:
        provider: Primary provider name as configured (``crm_provider``).
        since: Start of the window: ``"1 hour ago"``, ISO-8601, or an aware datetime.
        settings: Library settings (default: from the environment).
        engine: Database engine (default: one on ``settings.database_url``).
        actor: Audit actor (default ``cli:<login>``).
        now: Timestamp for new rows (default: the current time).
        metrics: Metrics whose gauges are refreshed.

    Returns:
        Created vs already-open counts and the defect ids.

    Raises:
        UnknownProviderError: ``provider`` is not configured (nothing changed).
        ConfigError: ``since`` is not a time (nothing changed).
        StorageError: the database is unreachable.
    """
    settings, start = _validated(provider, since, settings)
    chain = provider_chain(settings, provider)
    moment = now or utcnow()
    who = actor or cli_actor()
    with _Database(settings, engine) as db, session_scope(db) as session:
        keys = _store.stale_subjects(session, provider, start)
        _, enqueued = _store.ensure_requests(session, [(key, chain) for key in keys], now=moment)
        details = {"origin": "create_stale_defects", "since": start.isoformat()}
        created, already = _store.open_defects(
            session, [(key, details) for key in keys], now=moment, actor=who
        )
        record_audit(
            session,
            "defects.create_stale",
            provider=provider,
            actor=who,
            details={
                "since": start.isoformat(),
                "subjects": len(keys),
                "created": len(created),
                "already_open": len(already),
                "requests_enqueued": enqueued,
            },
            occurred_at=moment,
        )
        _store.refresh_gauges(session, metrics or get_metrics(), settings.providers)
    _log.info(
        "idis.defects.stale_created",
        msg=f"stale defects for {provider}: {len(created)} created, {len(already)} already open",
        provider=provider,
        since=start.isoformat(),
        created=len(created),
        already_open=len(already),
        requests_enqueued=enqueued,
    )
    return CreateResult(
        provider=provider,
        since=start,
        subjects=len(keys),
        created=len(created),
        already_open=len(already),
        requests_enqueued=enqueued,
        defect_ids=tuple(sorted([*created.values(), *already.values()])),
    )


def clear_stale_defects(
    provider: str,
    since: str | datetime,
    *,
    settings: Settings | None = None,
    engine: Engine | None = None,
    actor: str | None = None,
    now: datetime | None = None,
    metrics: Metrics | None = None,
) -> ClearResult:
    """Resolve ``provider``'s OPEN stale defects created after ``since`` (RB-09 Recovery 4).

    Same rows as RB-09's ``UPDATE defects SET status = 'RESOLVED' ...``, with the same
    resolution, plus ``resolved_at`` and one audit row per defect.

    Raises:
        UnknownProviderError: ``provider`` is not configured (nothing changed).
        ConfigError: ``since`` is not a time (nothing changed).
        StorageError: the database is unreachable.
    """
    settings, start = _validated(provider, since, settings)
    moment = now or utcnow()
    who = actor or cli_actor()
    with _Database(settings, engine) as db, session_scope(db) as session:
        ids = _store.resolve_defects_since(session, provider, start, now=moment, actor=who)
        record_audit(
            session,
            "defects.clear_stale",
            provider=provider,
            actor=who,
            details={"since": start.isoformat(), "resolved": len(ids)},
            occurred_at=moment,
        )
        _store.refresh_gauges(session, metrics or get_metrics(), settings.providers)
    _log.info(
        "idis.defects.stale_cleared",
        msg=f"stale defects for {provider}: {len(ids)} resolved",
        provider=provider,
        since=start.isoformat(),
        resolved=len(ids),
    )
    return ClearResult(provider=provider, since=start, resolved=len(ids), defect_ids=tuple(ids))


_STATUSES = (DEFECT_OPEN, DEFECT_RESOLVED)


def query_defects(
    session: Session,
    *,
    provider: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    tenant_id: str | None = None,
    limit: int | None = 1000,
) -> list[DefectRecord]:
    """Stale defects in ``session``, oldest first, filtered (see :func:`list_defects`)."""
    if status is not None and status not in _STATUSES:
        raise ConfigError(f"status={status!r} is invalid: expected OPEN or RESOLVED")
    query = (
        select(Defect)
        .where(Defect.defect_type == STALE_ENRICHMENT)
        .order_by(Defect.created_at, Defect.id)
    )
    if provider is not None:
        query = query.where(Defect.provider == provider)
    if status is not None:
        query = query.where(Defect.status == status)
    if since is not None:
        query = query.where(Defect.created_at > since)
    if tenant_id is not None:
        query = query.where(Defect.tenant_id == tenant_id)
    if limit is not None:
        query = query.limit(limit)
    return [DefectRecord.from_row(row) for row in session.scalars(query)]


def list_defects(
    *,
    provider: str | None = None,
    status: str | None = None,
    since: str | datetime | None = None,
    tenant_id: str | None = None,
    settings: Settings | None = None,
    engine: Engine | None = None,
    limit: int | None = 1000,
) -> list[DefectRecord]:
    """STALE_ENRICHMENT defects, oldest first.

    Args:
        provider: Only this provider's (validated against the configuration).
        status: ``OPEN`` or ``RESOLVED`` (``status`` is the source of truth; RB-09's SQL
            resolves without setting ``resolved_at``).
        since: Only defects created after this time.
        tenant_id: Only this tenant's.
        settings: Library settings (default: from the environment).
        engine: Database engine (default: one on ``settings.database_url``).
        limit: Most rows returned (None: all).

    Raises:
        UnknownProviderError: ``provider`` is not configured.
        ConfigError: a bad ``status`` or ``since``.
    """
    settings = settings or Settings.from_env()
    if provider is not None:
        settings.provider(provider)
    start = parse_since(since, name="since") if since is not None else None
    with _Database(settings, engine) as db, session_scope(db, write=False) as session:
        return query_defects(
            session, provider=provider, status=status, since=start, tenant_id=tenant_id, limit=limit
        )
