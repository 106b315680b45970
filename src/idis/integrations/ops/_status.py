"""What ``idis-integrations status`` knows about each provider, as data.

The running service records breaker transitions (audit rows) and health
samples (``provider_health_samples``); Redis holds the live breaker state when
configured; the provider's health endpoint is probed live. ``status`` runs in
its own process, so it reads those, and each capability adds its own facts
(outbox queue, sync mode, token state, open defects) through
:data:`FACT_SOURCES`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, event, func, inspect, select
from sqlalchemy.orm import Session

from .._audit import AuditEvent
from .._redact import url_host
from .._timeparse import utcnow
from ..config import Settings
from ..db._engine import create_db_engine, read_only
from ..exceptions import StorageError
from ..resilience._recorder import SAMPLE_HORIZON, latest_samples, live_samples

__all__ = [
    "BUILTIN_FACT_SOURCES",
    "FACT_SOURCES",
    "ProviderStatus",
    "collect_status",
    "defect_facts",
    "token_facts",
]

FactSource = Callable[[Session, Settings, str], dict[str, Any]]

#: Extra fact sources a host may add: ``(session, settings, provider) -> {label: value}``.
#: A source that fails is reported as a note, never fatal.
FACT_SOURCES: list[FactSource] = []

#: The library's own sources, imported when status is collected (``module:function``).
BUILTIN_FACT_SOURCES = (
    "idis.integrations.sync._state:status_facts",
    "idis.integrations.outbox._admin:status_facts",
    "idis.integrations.ops._status:defect_facts",
)


def token_facts(
    settings: Settings, provider: str, *, engine: Engine | None = None
) -> dict[str, Any]:
    """OAuth token state (RB-09 Triage 3), for providers that use OAuth.

    Read outside the status session, through ``engine`` (default: a short-lived
    one for ``settings.database_url``).
    """
    if settings.provider(provider).auth.grant == "none":
        return {}
    from ..auth._status import token_status

    status = token_status(settings, provider, engine=engine)
    return {"token": str(getattr(status, "state", status))}


def defect_facts(session: Session, settings: Settings, provider: str) -> dict[str, Any]:
    """Open stale-data defects filed under the provider."""
    del settings
    from ..enrichment._models import Defect

    count = session.scalar(
        select(func.count())
        .select_from(Defect)
        .where(Defect.provider == provider, Defect.status == "OPEN")
    )
    return {"open_defects": int(count or 0)}


def _fact_sources() -> list[FactSource]:
    import importlib

    sources: list[FactSource] = []
    for spec in BUILTIN_FACT_SOURCES:
        module, _, name = spec.partition(":")
        sources.append(getattr(importlib.import_module(module), name))
    return sources + [s for s in FACT_SOURCES if s not in sources]


@dataclass(slots=True)
class ProviderStatus:
    """Everything known about one provider's health."""

    provider: str
    kind: str
    host: str
    breaker_state: str = "unknown"
    breaker_source: str = "nothing recorded"
    error_rate: float | None = None
    calls: int = 0
    failures: int = 0
    last_transition: str | None = None
    last_transition_at: datetime | None = None
    probe: str = "not probed"
    probe_ok: bool | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready representation: the fields, then the facts at the same level."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "facts"}
        return {**plain, **self.facts}


#: Engines kept between calls, per database URL, least recently used evicted. A fresh
#: engine per call (0.1) compiled every statement again, most of what /status cost.
_ENGINES: OrderedDict[str, Engine] = OrderedDict()
_ENGINES_KEPT = 4
_ENGINES_LOCK = threading.Lock()


def _engine_for(url: str) -> Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.pop(url, None) or _new_engine(url)
        _ENGINES[url] = engine
        while len(_ENGINES) > _ENGINES_KEPT:
            _ENGINES.popitem(last=False)[1].dispose()
    return engine


#: Per thread: whether a statement of the current status read lost its connection.
_LOST = threading.local()


def _note_disconnect(context: Any) -> None:
    if context.is_disconnect:
        _LOST.seen = True


def _new_engine(url: str) -> Engine:
    # No pre-ping: it cost a round trip per call (a wait for a CPU each, under load).
    # A connection the server dropped (restart, failover) fails the read instead,
    # which SQLAlchemy reports as a disconnect, invalidating the pool; the read then
    # runs once more on a fresh connection (collect_status), so a restarted server
    # does not fail the next call either.
    engine = create_db_engine(url, pool_pre_ping=False)
    event.listen(engine, "handle_error", _note_disconnect)
    return engine


def _reader(engine: Engine) -> Engine:
    """``engine`` for status's reads: no write lock on SQLite, no BEGIN/ROLLBACK on PostgreSQL.

    On PostgreSQL each statement of a READ COMMITTED transaction reads its own
    snapshot anyway, so autocommit reads the same facts without the two round
    trips of BEGIN and ROLLBACK.
    """
    reader = read_only(engine)
    if engine.dialect.name == "postgresql":
        reader = reader.execution_options(isolation_level="AUTOCOMMIT")
    return reader


def _recorded(session: Session, status: ProviderStatus, now: datetime) -> None:
    # Only replicas still reporting count (within two of their sample intervals):
    # a restarted replica's last sample must not keep a breaker "open" here.
    samples = live_samples(latest_samples(session, status.provider, now - SAMPLE_HORIZON), now)
    if samples:
        status.calls = sum(s.calls for s in samples)
        status.failures = sum(s.failures for s in samples)
        status.error_rate = status.failures / status.calls if status.calls else 0.0
        states = {s.breaker_state for s in samples}
        status.breaker_state = "open" if "open" in states else sorted(states)[0]
        status.breaker_source = f"recorded by {len(samples)} replica(s)"
    last = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.provider == status.provider, AuditEvent.action.startswith("breaker."))
        .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
        .limit(1)
    ).first()
    if last is not None:
        status.last_transition = last.action.removeprefix("breaker.")
        status.last_transition_at = last.occurred_at
        if status.breaker_source == "nothing recorded":
            status.breaker_state = status.last_transition
            status.breaker_source = "last recorded transition"


def _has_tables(engine: Engine) -> bool:
    """Whether the library's tables exist (``db upgrade`` ran)."""
    with engine.connect() as conn:
        return "audit_events" in set(inspect(conn).get_table_names())


def _shared(settings: Settings, statuses: list[ProviderStatus]) -> None:
    if not settings.redis_url:
        return
    from ..resilience._shared import read_shared_state

    for status in statuses:
        shared = read_shared_state(settings.redis_url, status.provider)
        if shared is not None:
            status.breaker_state = shared.state
            status.breaker_source = "redis (live)"


def _probe(settings: Settings, statuses: list[ProviderStatus]) -> None:
    from ..resilience._gateway import Gateway

    with Gateway(settings) as gateway:
        for status in statuses:
            report = gateway.health(status.provider)
            status.probe_ok = report.ok
            status.probe = report.detail if report.ok else f"unreachable: {report.detail}"


def _read(
    reader: Engine,
    settings: Settings,
    statuses: list[ProviderStatus],
    now: datetime,
    notes: list[str],
) -> dict[str, Any] | None:
    """Every database fact, on one connection; the token states too (None: unread)."""
    from ..auth._status import token_statuses

    tokens: dict[str, Any] | None = None
    try:
        # One connection, and the catalog read only when a read failed: the
        # tables exist on every call but the first (a catalog query and a
        # second pool checkout were a fifth of a call's CPU on PostgreSQL).
        with Session(reader) as session:
            for status in statuses:
                _recorded(session, status, now)
                for source in _fact_sources():
                    try:
                        status.facts.update(source(session, settings, status.provider))
                    except Exception as exc:  # noqa: BLE001  # one broken source must not hide the rest
                        notes.append(f"{source.__module__}: {type(exc).__name__}: {exc}")
            # Every provider's token row in one statement on the same connection (each
            # provider opened a connection of its own); on failure each is read alone.
            try:
                tokens = token_statuses(settings, [s.provider for s in statuses], session)
            except Exception:  # noqa: BLE001  # token_status, per provider, says what is wrong
                tokens = None
    except Exception:
        if _LOST.seen or _has_tables(reader):  # a dropped connection: read again instead
            raise
        for status in statuses:  # nothing was read: keep what a fresh status says
            status.facts.clear()
        notes.append("database has no idis tables yet: run `idis-integrations db upgrade`")
    return tokens


def collect_status(
    settings: Settings,
    *,
    providers: list[str] | None = None,
    probe: bool = True,
    now: datetime | None = None,
) -> tuple[list[ProviderStatus], list[str]]:
    """Collect every provider's status; return it with notes about missing sources."""
    now = now or utcnow()
    names = providers or sorted(settings.providers)
    statuses = [
        ProviderStatus(
            provider=name,
            kind=settings.provider(name).kind,
            host=url_host(settings.provider(name).base_url),  # never the user info
        )
        for name in names
    ]
    notes: list[str] = []
    engine: Engine | None = None
    tokens: dict[str, Any] | None = None
    try:
        engine = _engine_for(settings.database_url)
        # Reads only: on SQLite a write lock here would queue status behind every writer.
        reader = _reader(engine)
        for attempt in (1, 2):
            _LOST.seen = False
            try:
                tokens = _read(reader, settings, statuses, now, notes)
            except Exception:
                if not _LOST.seen or attempt == 2:
                    raise
            if not _LOST.seen or attempt == 2:
                break
            # The server dropped the connection (a restart): what was read is
            # incomplete. Once more on a fresh connection (the pool was invalidated).
            notes.clear()
            statuses[:] = [
                ProviderStatus(provider=s.provider, kind=s.kind, host=s.host) for s in statuses
            ]
    except StorageError as exc:
        notes.append(str(exc))
    except Exception as exc:  # noqa: BLE001  # status must print something whatever the DB does
        notes.append(f"database unreachable: {type(exc).__name__}")
    if not any("db upgrade" in note or "unreachable" in note for note in notes):
        for status in statuses:
            try:
                if tokens is not None:
                    if tokens[status.provider].state != "not_required":
                        status.facts["token"] = str(tokens[status.provider].state)
                else:  # the one read failed: each on its own, saying why
                    status.facts.update(token_facts(settings, status.provider, engine=engine))
            except Exception as exc:  # noqa: BLE001  # one broken source must not hide the rest
                notes.append(f"token state: {type(exc).__name__}: {exc}")
    try:
        _shared(settings, statuses)
    except Exception as exc:  # noqa: BLE001  # Redis down: say so, keep the rest
        notes.append(f"redis unreachable: {type(exc).__name__}")
    if probe:
        _probe(settings, statuses)
    if settings.embedded_defaults:
        notes.append(
            "using the embedded default providers (no IDIS_PROVIDERS / IDIS_CONFIG_FILE); "
            f"they point at the simulator on {settings.simulator_url} "
            "(`idis-integrations simulate`)"
        )
    return statuses, notes
