"""``reconcile``: catch up on missed events through the provider's replay API (RB-09 Recovery 3).

One run pages through the replay from ``since`` and, per page, in one
transaction: skips the events the inbox already holds (webhook, poll or an
earlier replay), applies the others through the host's handlers in the
provider's order, writes one audit row per applied event
(``reconcile.event_applied``, ``source='replay'``) and moves the run's
checkpoint to the page's cursor. A run killed at any instant therefore
resumes after the last committed page, and a second run applies nothing.

It refuses, before any call, a ``since`` older than the provider's replay
retention (``ProviderSettings.replay_retention``), naming the window and the
fallback (:func:`~idis.integrations.reconciliation._fallback`), instead of returning
a silently partial replay; a provider that answers "retention exceeded" gets
the same treatment.

When the run completes, the window ``[since, end]`` is recorded as ``replay``
coverage in the sync timeline, so the gaps it filled close. A run with failed
events covers only up to the first failure, and exits non-zero from the CLI.
"""

from __future__ import annotations

import functools
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from .._audit import AuditEvent, audit_row
from .._clock import Clock, system_clock
from .._flow import Flow, Transaction, adrive, drive, perform
from .._timeparse import parse_since
from ..config import Settings
from ..db._engine import create_async_db_engine
from ..exceptions import (
    ConfigError,
    IntegrationError,
    ProviderError,
    ReplayWindowExceeded,
    StorageError,
)
from ..observability._logs import get_logger, redact_text
from ..observability._metrics import get_metrics
from ..sync._effects import AsyncFace, ClientCall, SyncFace
from ..sync._inbox import (
    ApplyOutcome,
    ApplyResult,
    HandlerRegistry,
    get_registry,
    plan_batch,
    preview,
)
from ..sync._timeline import record_coverage
from ._db import (
    LOCK_WAIT,
    ReconcileBusy,
    audit_result,
    commit_flow,
    default_async_client,
    default_client,
    default_engine,
    run_lock_flow,
    unlock,
)
from ._logic import check_retention, retention_error
from ._models import ReconcileCheckpoint
from ._sync_timeline import gaps_in

__all__ = [
    "MAX_PAGE_SIZE",
    "AsyncReplaySource",
    "EventFailure",
    "ReconcileBusy",
    "ReconcileInterrupted",
    "ReconcileSummary",
    "ReplaySource",
    "reconcile",
    "reconcile_async",
]

log = get_logger()

#: Largest page the replay is asked for (the simulator's ceiling; most providers are lower).
MAX_PAGE_SIZE = 5000
#: Failures listed individually in the summary (the count is always exact).
_MAX_LISTED_FAILURES = 100
#: A run's totals, each named alike on the summary, the checkpoint row, the audit and the log.
_TOTALS = ("fetched", "already_applied", "applied", "superseded", "ignored", "failed")


def _tally(result: ApplyResult) -> dict[str, int]:
    """A page's events by outcome, under the names of :data:`_TOTALS` (and the metric's)."""
    return {
        "already_applied": result.count(ApplyOutcome.DUPLICATE),
        "applied": result.count(ApplyOutcome.APPLIED),
        "superseded": result.count(ApplyOutcome.SUPERSEDED),
        "ignored": result.count(ApplyOutcome.IGNORED),
        "failed": len(result.failed),
    }


@runtime_checkable
class ReplaySource(Protocol):
    """A provider's replay API: pages of events since a time, resumable by cursor.

    :class:`~idis.integrations.providers.ProviderClient` implements it; so does
    :class:`~idis.integrations.reconciliation._sources.StaticReplaySource`.
    """

    def replay(self, since: datetime, *, cursor: str | None = None, limit: int = 500) -> Any:
        """One page: an object with ``events`` (in provider order) and ``next_cursor``.

        Raises:
            ReplayWindowExceeded: ``since`` (or the cursor) is older than retained.
        """


class ReconcileInterrupted(IntegrationError):
    """A reconcile run stopped before the end of the replay; its checkpoint is kept.

    Run the same command again: it resumes after the last committed page.
    """

    def __init__(self, message: str, *, summary: ReconcileSummary, retryable: bool) -> None:
        super().__init__(message)
        #: Counts up to the interruption.
        self.summary = summary
        self.retryable = retryable  # type: ignore[misc]  # per instance: depends on the cause


@dataclass(frozen=True, slots=True)
class EventFailure:
    """One event whose handler raised (not applied; the next run retries it)."""

    event_id: str
    record_id: str | None
    error_type: str
    #: The handler's message, redacted.
    message: str


@dataclass(frozen=True, slots=True)
class ReconcileSummary:
    """What one reconcile invocation did (a resumed run counts only its own part).

    ``fetched == already_applied + applied + superseded + ignored + failed``.
    """

    provider: str
    #: Run id (the audit rows' correlation id); None for a dry run.
    run_id: str | None
    since: datetime
    #: Where the covered window ends (None until the run completes, and for a dry run).
    covered_until: datetime | None
    fetched: int = 0
    #: Skipped: the inbox already had them (webhook, poll or an earlier replay).
    already_applied: int = 0
    #: Applied through the host's handlers (dry run: would be applied).
    applied: int = 0
    #: Older than an applied version of their record: recorded, not applied.
    superseded: int = 0
    #: No handler for the type: recorded, not applied.
    ignored: int = 0
    #: Handler raised: not applied, retried by the next run.
    failed: int = 0
    pages: int = 0
    dry_run: bool = False
    #: Whether this invocation resumed a run that had stopped.
    resumed: bool = False
    completed: bool = False
    failures: tuple[EventFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """True when the run completed and no event failed."""
        return self.completed and self.failed == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"ok": self.ok}


@dataclass(slots=True)
class _Run:
    """One run's identity and position, plus what it needs to move on."""

    provider: str
    run_id: str
    since: datetime
    cursor: str | None
    checkpoint_id: int | None
    resumed: bool
    registry: HandlerRegistry
    page_size: int
    retention: timedelta
    actor: str
    clock: Clock
    progress: Callable[[int], None] | None
    #: This invocation's totals so far: :data:`_TOTALS` and ``pages``.
    counts: Counter[str] = field(default_factory=Counter)
    #: The first failed events, for the summary (the count is always exact).
    failures: list[EventFailure] = field(default_factory=list)

    def add(self, result: ApplyResult, fetched: int) -> None:
        """Count one page of ``fetched`` events and keep its first failures."""
        self.counts.update(_tally(result), fetched=fetched, pages=1)
        room = max(0, _MAX_LISTED_FAILURES - len(self.failures))
        self.failures.extend(
            EventFailure(
                event_id=str(event.id),
                record_id=event.record_id,
                error_type=type(error).__name__,
                message=redact_text(str(error))[:300],
            )
            for event, error in result.failed[:room]
        )

    def summary(
        self, *, dry_run: bool, completed: bool, covered_until: datetime | None
    ) -> ReconcileSummary:
        return ReconcileSummary(
            provider=self.provider,
            run_id=None if dry_run else self.run_id,
            since=self.since,
            covered_until=covered_until,
            **{name: self.counts[name] for name in (*_TOTALS, "pages")},
            dry_run=dry_run,
            resumed=self.resumed,
            completed=completed,
            failures=tuple(self.failures),
        )

    def fetch(self) -> Flow[Any]:
        """The next page of the replay (a provider call through the io's adapter)."""
        try:
            return (
                yield from perform(
                    ClientCall(
                        "replay", (self.since,), {"cursor": self.cursor, "limit": self.page_size}
                    )
                )
            )
        except ReplayWindowExceeded as exc:
            raise self._reworded(exc) from exc

    def _reworded(self, exc: ReplayWindowExceeded) -> ReplayWindowExceeded:
        # Re-worded so it names the window and the fallback whatever the
        # adapter said; a status code means the provider itself refused. The
        # retention the provider stated (a 422's retention_seconds), or the one
        # its pack knows from the vendor's documentation (Salesforce's 30 days),
        # is kept.
        return retention_error(
            self.provider,
            self.since,
            self.retention,
            now=self.clock.now(),
            refused_by_provider=exc.status_code is not None,
            applied_nothing=self.counts["pages"] == 0 and not self.resumed,
            stated=exc.retention,
        )


# --------------------------------------------------------------------------- validation


def _check_page_size(page_size: int) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise ConfigError(f"page_size={page_size!r} is not an integer", variable="page_size")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ConfigError(
            f"page_size={page_size!r} must be between 1 and {MAX_PAGE_SIZE}", variable="page_size"
        )


def require_handlers(registry: HandlerRegistry, provider: str) -> None:
    """Refuse to apply events when the host registered no handler at all.

    Without handlers every event would be recorded as ``ignored``, so no later
    run would apply it either: an empty registry means "the host's handlers
    were not loaded", never "the host wants nothing".

    Raises:
        ConfigError: naming the provider and how to register handlers.
    """
    if not registry.event_types():
        raise ConfigError(
            f"no event handlers are registered, so applying {provider}'s events would mark "
            "them handled without applying them; load the host's handlers "
            "(IDIS_HANDLERS=package.module:register or handlers=HandlerRegistry), or use a dry run",
            variable="IDIS_HANDLERS",
        )


# --------------------------------------------------------------------------- checkpoints
# Each step is written once against a sync Session; the sync driver runs it in
# a transaction, the async one through ``AsyncSession.run_sync``.


def _pick_resumable(
    session: Session, provider: str, since: datetime, oldest: datetime, now: datetime
) -> ReconcileCheckpoint | None:
    """The newest stopped run that can stand in for a run from ``since``; abandon the others.

    A stopped run can stand in when its window starts no later than ``since``
    (it covers the same events and more) and is still within the replay
    retention (``oldest``). Every other stopped run of the provider is marked
    ``abandoned``: the inbox makes a fresh run skip whatever they had applied.
    """
    chosen: ReconcileCheckpoint | None = None
    rows = session.scalars(
        select(ReconcileCheckpoint)
        .where(ReconcileCheckpoint.provider == provider, ReconcileCheckpoint.status == "running")
        .order_by(ReconcileCheckpoint.id.desc())
    )
    for row in rows:
        if chosen is None and oldest <= row.since <= since:
            chosen = row
            continue
        row.status = "abandoned"
        row.finished_at = now
        row.error = (
            "abandoned: its window is no longer within the replay retention"
            if row.since < oldest
            else "abandoned: a later run's window did not match it"
        )
    return chosen


def _new_checkpoint(run: _Run, now: datetime) -> ReconcileCheckpoint:
    return ReconcileCheckpoint(
        run_id=run.run_id,
        provider=run.provider,
        status="running",
        since=run.since,
        pages=0,
        **dict.fromkeys(_TOTALS, 0),
        started_at=now,
        updated_at=now,
    )


def _save_page(
    session: Session,
    run: _Run,
    result: ApplyResult,
    page: Any,
    now: datetime,
) -> None:
    """Move the checkpoint past ``page`` (same transaction as the page's rows)."""
    events = page.events
    values: dict[str, Any] = {
        "cursor": page.next_cursor,
        "pages": ReconcileCheckpoint.pages + 1,
        "fetched": ReconcileCheckpoint.fetched + len(events),
        **{n: getattr(ReconcileCheckpoint, n) + k for n, k in _tally(result).items()},
        "updated_at": now,
        "error": None,
    }
    if events:
        values["last_seq"] = events[-1].seq
        values["last_occurred_at"] = events[-1].occurred_at
    if run.checkpoint_id is None:
        row = _new_checkpoint(run, now)
        session.add(row)
        session.flush()
        run.checkpoint_id = row.id
    first_failed = min((e.occurred_at for e, _ in result.failed), default=None)
    if first_failed is not None:
        current = session.scalar(
            select(ReconcileCheckpoint.first_failed_at).where(
                ReconcileCheckpoint.id == run.checkpoint_id
            )
        )
        if current is None or first_failed < current:
            values["first_failed_at"] = first_failed
    session.execute(
        update(ReconcileCheckpoint)
        .where(ReconcileCheckpoint.id == run.checkpoint_id)
        .values(values)
    )


def _write_page(run: _Run, page: Any, session: Session, result: ApplyResult, now: datetime) -> None:
    """The rows a committed page writes beside its events: audit rows and the checkpoint."""
    audit_result(
        session,
        result,
        _applied_details,
        applied="reconcile.event_applied",
        failed="reconcile.event_failed",
        provider=run.provider,
        actor=run.actor,
        source="replay",
        correlation_id=run.run_id,
        occurred_at=now,
    )
    _save_page(session, run, result, page, now)


def _applied_details(event: Any) -> dict[str, Any]:
    return {
        "event_id": event.id,
        "event_type": event.type,
        "seq": event.seq,
        "version": event.version,
    }


def _finish_in(session: Session, run: _Run, end: datetime) -> datetime:
    """Mark the run completed and record its replay coverage; return where coverage ends."""
    now = run.clock.now()
    row = session.get(ReconcileCheckpoint, run.checkpoint_id) if run.checkpoint_id else None
    if row is None:
        # An empty replay: nothing was checkpointed, but the window is covered.
        row = _new_checkpoint(run, now)
        session.add(row)
    covered_until = end if row.first_failed_at is None else min(end, row.first_failed_at)
    row.status = "completed"
    row.cursor = None
    row.covered_until = covered_until
    row.finished_at = now
    row.updated_at = now
    if covered_until > run.since:
        record_coverage(session, run.provider, "replay", run.since, covered_until)
    totals = {name: getattr(row, name) for name in _TOTALS}
    session.add(
        AuditEvent(
            **audit_row(
                "reconcile.completed",
                provider=run.provider,
                actor=run.actor,
                source="replay",
                outcome="ok" if row.failed == 0 else "failed",
                details={
                    **totals,
                    "since": run.since.isoformat(),
                    "covered_until": covered_until.isoformat(),
                    "resumed": run.resumed,
                },
                correlation_id=run.run_id,
                message=(
                    f"reconciled {run.provider} since {run.since.isoformat()}: "
                    f"{row.applied} applied, {row.already_applied} already applied, "
                    f"{row.failed} failed"
                ),
                occurred_at=now,
            )
        )
    )
    # The gauge reflects the window this run covered (normally no gap left).
    gaps_in(session, run.provider, run.since, max(covered_until, run.since))
    return covered_until


def _note_in(session: Session, run: _Run, error: BaseException, *, abandon: bool) -> None:
    """Record why the run stopped on its checkpoint (and close it when it cannot resume)."""
    values: dict[str, Any] = {"error": redact_text(f"{type(error).__name__}: {error}")[:1000]}
    if abandon:
        values.update(status="abandoned", finished_at=run.clock.now())
    session.execute(
        update(ReconcileCheckpoint)
        .where(ReconcileCheckpoint.id == run.checkpoint_id)
        .values(values)
    )


# --------------------------------------------------------------------------- shared steps


def _adopt(run: _Run, found: ReconcileCheckpoint | None) -> None:
    """Continue ``found`` (a stopped run) or start a new run id."""
    if found is not None:
        run.run_id, run.since, run.cursor = found.run_id, found.since, found.cursor
        run.checkpoint_id, run.resumed = found.id, True
        log.info(
            "idis.reconcile.resumed",
            provider=run.provider,
            run_id=run.run_id,
            since=run.since.isoformat(),
            pages=found.pages,
            applied=found.applied,
            msg="resuming a stopped reconcile run from its checkpoint",
        )
        return
    run.run_id = f"rc_{uuid.uuid4().hex[:20]}"
    log.info(
        "idis.reconcile.started",
        provider=run.provider,
        run_id=run.run_id,
        since=run.since.isoformat(),
        msg="reconcile run started",
    )


def _stop_reason(run: _Run, exc: BaseException) -> tuple[bool, bool]:
    """For an error mid-run: (re-raise it as is, abandon the run)."""
    if isinstance(exc, ReplayWindowExceeded):
        if run.counts["pages"] == 0 and not run.resumed:
            return True, False  # nothing was applied: the plain error says it all
        # The provider dropped events after our cursor: resuming cannot help,
        # only a resync can. Close the run so nobody resumes it.
        return False, True
    return False, False


def _interrupted(run: _Run, exc: IntegrationError, *, resumable: bool) -> ReconcileInterrupted:
    log.warning(
        "idis.reconcile.interrupted",
        provider=run.provider,
        run_id=run.run_id,
        pages=run.counts["pages"],
        applied=run.counts["applied"],
        error_type=type(exc).__name__,
        msg="reconcile run interrupted; its checkpoint is kept",
    )
    advice = (
        " Run the same command again to resume from the checkpoint"
        if resumable
        else " The run cannot resume."
    )
    return ReconcileInterrupted(
        f"reconcile of {run.provider} (run {run.run_id}) stopped after {run.counts['pages']} "
        f"pages ({run.counts['applied']} events applied) because {type(exc).__name__}: "
        f"{exc}.{advice}",
        summary=run.summary(dry_run=False, completed=False, covered_until=None),
        retryable=exc.retryable,
    )


def _paged(run: _Run, page: Any, result: ApplyResult) -> bool:
    """Account for a committed page; return whether the replay has more."""
    run.add(result, len(page.events))
    run.cursor = page.next_cursor
    _count(get_metrics(), run.provider, result)
    if run.progress is not None:
        run.progress(len(page.events))
    return bool(page.next_cursor)


def _count(metrics: Any, provider: str, result: ApplyResult) -> None:
    for outcome, number in _tally(result).items():
        if number:
            metrics.reconcile_events.labels(provider=provider, outcome=outcome).inc(number)


def _completed(run: _Run, covered_until: datetime, started: float) -> ReconcileSummary:
    log.info(
        "idis.reconcile.completed",
        provider=run.provider,
        run_id=run.run_id,
        seconds=round(run.clock.monotonic() - started, 3),
        msg="reconcile run completed",
        **{name: run.counts[name] for name in _TOTALS},
    )
    return run.summary(dry_run=False, completed=True, covered_until=covered_until)


def _plan(
    provider: str,
    since: datetime | str,
    *,
    settings: Settings | None,
    dry_run: bool,
    handlers: HandlerRegistry | None,
    page_size: int,
    resume: bool,
    actor: str,
    clock: Clock,
    progress: Callable[[int], None] | None,
    lock_wait: float,
) -> tuple[Settings, Flow[ReconcileSummary]]:
    """Validate everything before any call; the settings, and the flow both faces drive."""
    settings = settings if settings is not None else Settings.from_env()
    retention = settings.provider(provider).replay_retention
    start_now = clock.now()
    window_start = parse_since(since, name="since", now=lambda: start_now)
    _check_page_size(page_size)
    registry = handlers if handlers is not None else get_registry()
    if not dry_run:
        require_handlers(registry, provider)
    check_retention(provider, window_start, retention, start_now)
    run = _Run(
        provider=provider,
        run_id="dry-run",
        since=window_start,
        cursor=None,
        checkpoint_id=None,
        resumed=False,
        registry=registry,
        page_size=page_size,
        retention=retention,
        actor=actor,
        clock=clock,
        progress=progress,
    )
    return settings, _reconcile_flow(run, dry_run=dry_run, resume=resume, lock_wait=lock_wait)


# --------------------------------------------------------------------------- the flow


def _reconcile_flow(
    run: _Run, *, dry_run: bool, resume: bool, lock_wait: float
) -> Flow[ReconcileSummary]:
    """One reconcile run, written once: ``reconcile`` drives it sync, ``reconcile_async`` async."""
    if dry_run:
        return (yield from _dry_run_flow(run))
    handle = yield from run_lock_flow(run.provider, wait=lock_wait, clock=run.clock)
    try:
        found = None
        if resume:
            now = run.clock.now()
            oldest = now - run.retention
            found = yield from perform(
                Transaction(lambda s: _pick_resumable(s, run.provider, run.since, oldest, now))
            )
        _adopt(run, found)
        return (yield from _pages_flow(run))
    finally:
        yield from unlock(run.provider, handle)


def _pages_flow(run: _Run) -> Flow[ReconcileSummary]:
    """Fetch, apply and checkpoint page after page; then record the run's coverage."""
    started = run.clock.monotonic()
    while True:
        fetched_at = run.clock.now()
        try:
            page = yield from run.fetch()
            result = yield from commit_flow(
                run.provider,
                list(page.events),
                registry=run.registry,
                source="replay",
                clock=run.clock,
                also=functools.partial(_write_page, run, page),
            )
        except (ProviderError, StorageError) as exc:
            as_is, abandon = _stop_reason(run, exc)
            if as_is:
                raise
            yield from _note_flow(run, exc, abandon=abandon)
            raise _interrupted(run, exc, resumable=not abandon) from exc
        if not _paged(run, page, result):
            break
    covered_until = yield from perform(Transaction(lambda s: _finish_in(s, run, fetched_at)))
    return _completed(run, covered_until, started)


def _note_flow(run: _Run, error: BaseException, *, abandon: bool) -> Flow[None]:
    if run.checkpoint_id is None:
        return
    try:
        yield from perform(Transaction(lambda s: _note_in(s, run, error, abandon=abandon)))
    except StorageError:
        log.warning("idis.reconcile.checkpoint_note_failed", provider=run.provider)


def _dry_run_flow(run: _Run) -> Flow[ReconcileSummary]:
    """Count what a run would do, writing nothing: pages planned as if earlier ones committed."""
    planned_ids: set[str] = set()
    planned_keys: dict[str, Any] = {}
    more = True
    while more:
        page = yield from run.fetch()
        events = list(page.events)
        known, current = yield from perform(Transaction(_previewer(run, events), write=False))
        # Earlier pages' planned keys are newer than what the database holds.
        current.update(planned_keys)
        keys = [
            _key_or_none(e) if e.record_id is not None and run.registry.handles(e.type) else None
            for e in events
        ]
        plan = plan_batch(
            events,
            keys,
            known=known | planned_ids,
            current=current,
            handles=run.registry.handles,
        )
        planned_ids.update(
            e.id
            for e, o in zip(events, plan.outcomes, strict=True)
            if o is not ApplyOutcome.DUPLICATE
        )
        planned_keys.update({rid: key for rid, (key, _eid) in plan.advance.items()})
        run.add(ApplyResult(events, list[ApplyOutcome | None](plan.outcomes)), len(events))
        if run.progress is not None:
            run.progress(len(events))
        run.cursor = page.next_cursor
        more = bool(page.next_cursor)
    return run.summary(dry_run=True, completed=True, covered_until=None)


def _previewer(run: _Run, events: list[Any]) -> Callable[[Session], Any]:
    def read(session: Session) -> Any:
        return preview(session, run.provider, events, run.registry)

    return read


def _key_or_none(event: Any) -> Any:
    from ..providers._order import order_key

    return order_key(event)


# --------------------------------------------------------------------------- faces


@runtime_checkable
class AsyncReplaySource(Protocol):
    """Async twin of :class:`ReplaySource` (``AsyncProviderClient`` implements it)."""

    async def replay(self, since: datetime, *, cursor: str | None = None, limit: int = 500) -> Any:
        """One page: an object with ``events`` and ``next_cursor``."""


def reconcile(
    provider: str,
    since: datetime | str,
    *,
    settings: Settings | None = None,
    dry_run: bool = False,
    handlers: HandlerRegistry | None = None,
    client: ReplaySource | None = None,
    engine: Engine | None = None,
    page_size: int = 1000,
    resume: bool = True,
    actor: str = "system",
    clock: Clock = system_clock,
    progress: Callable[[int], None] | None = None,
    lock_wait: float = LOCK_WAIT,
) -> ReconcileSummary:
    """Replay ``provider``'s events since ``since`` and apply the ones the host missed.

    Example::

        summary = reconcile("crm_provider", "2 hours ago")
        assert summary.ok, summary.failures

    Args:
        provider: Provider name as configured.
        since: Start of the window: an aware datetime, ``"2 hours ago"`` or ISO-8601.
        settings: Library settings (default: from the environment).
        dry_run: Fetch and count only: no inbox, audit, checkpoint or coverage
            rows, no handler calls.
        handlers: The host's handlers (default: the inbox's process-wide registry).
        client: The replay API (default: a ``ProviderClient`` over a new ``Gateway``).
        engine: Database engine (default: one for ``settings.database_url``).
        page_size: Events per replay page (1-5000); each page is one transaction.
        resume: Resume this provider's stopped run when its window covers ``since``.
        actor: Who runs it, for the audit trail (``cli:<user>``, ``system``).
        clock: Time source (tests and the drill pass a manual clock).
        progress: Called with the number of events in each page fetched.
        lock_wait: Seconds to wait for another run's lock (PostgreSQL) before
            giving up; a killed run's lock goes a moment after the kill.

    Returns:
        The counts of this invocation (:class:`ReconcileSummary`).

    Raises:
        ConfigError: unknown provider, bad ``since`` or ``page_size``, or no handlers.
        ReplayWindowExceeded: ``since`` is older than the provider retains
            (checked before any call); nothing was applied.
        ReconcileBusy: another run for the provider holds the lock (PostgreSQL).
        ReconcileInterrupted: the provider or the database failed mid-run; the
            checkpoint is kept, run again to resume.
        StorageError: the database is unreachable.
    """
    settings, flow = _plan(
        provider,
        since,
        settings=settings,
        dry_run=dry_run,
        handlers=handlers,
        page_size=page_size,
        resume=resume,
        actor=actor,
        clock=clock,
        progress=progress,
        lock_wait=lock_wait,
    )
    with ExitStack() as stack:
        engine = engine if engine is not None else default_engine(settings, stack)
        client = client if client is not None else default_client(settings, provider, stack, engine)
        return drive(flow, SyncFace(clock=clock, engine=engine, client=client))
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


async def reconcile_async(
    provider: str,
    since: datetime | str,
    *,
    settings: Settings | None = None,
    dry_run: bool = False,
    handlers: HandlerRegistry | None = None,
    client: AsyncReplaySource | None = None,
    engine: AsyncEngine | None = None,
    page_size: int = 1000,
    resume: bool = True,
    actor: str = "system",
    clock: Clock = system_clock,
    progress: Callable[[int], None] | None = None,
    lock_wait: float = LOCK_WAIT,
) -> ReconcileSummary:
    """Async face of :func:`reconcile`, for the service's event loop.

    The same flow: decisions, checkpoints, audit rows and coverage. The replay
    comes from an ``AsyncProviderClient`` and the database from an
    ``AsyncEngine``; async handlers (``registry.register_async``) are awaited,
    sync ones run through ``AsyncSession.run_sync``. Takes the arguments of
    :func:`reconcile` (``client`` async, ``engine`` an ``AsyncEngine``).

    Raises:
        The exceptions of :func:`reconcile`.
    """
    settings, flow = _plan(
        provider,
        since,
        settings=settings,
        dry_run=dry_run,
        handlers=handlers,
        page_size=page_size,
        resume=resume,
        actor=actor,
        clock=clock,
        progress=progress,
        lock_wait=lock_wait,
    )
    async with AsyncExitStack() as stack:
        if engine is None:
            engine = create_async_db_engine(settings.database_url)
            stack.push_async_callback(engine.dispose)
        if client is None:
            client = await default_async_client(settings, provider, stack, engine)
        return await adrive(flow, AsyncFace(clock=clock, engine=engine, client=client))
    raise AssertionError("unreachable")  # AsyncExitStack does not swallow exceptions
