"""The sync service: receiver, sentinel, mode controller and poller wired together for the host.

::

    service = AsyncSyncService(settings, registry=registry)   # asyncio: one task
    app.mount("/webhooks", service.asgi_app())                 # POST /webhooks/{provider}
    await service.start()
    ...
    await service.aclose()

The service is a background worker, so it exists once, async (issue 12): a
sync program runs it with ``asyncio.run(service.run())`` (``idis-integrations
sync run``), or ticks it with ``asyncio.run(service.tick_all())``.

Every replica receives webhooks. For each provider, one replica (the
leader: :mod:`.leader`) also runs, on each tick:

1. the **sentinel** (every ``sentinel_interval``, not while polling is pinned):
   reads the change feed since its last position and measures webhook lag;
2. the **mode controller** (:func:`.mode.decide`) on what was observed:
   the provider's breaker, the sentinel's lag, the last webhook's time (bad
   signatures are not a signal: anyone can forge those);
3. in webhook mode, the **repair** of lost webhooks the sentinel found (events
   older than ``lag_threshold`` no channel applied), and webhook coverage;
4. in polling mode, the **poller** every ``CRM_POLL_INTERVAL`` (at once after a
   switch), starting where webhooks were last confirmed.

A tick's decisions are pure (:mod:`.mode`, :mod:`.sentinel`, :mod:`.poller`).
Provider calls happen outside database transactions, so a slow provider never
holds a database lock. Every write of the leader is fenced on its epoch
(:func:`~idis.integrations.sync._state.fence`); a fenced tick steps down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from .._backoff import Backoff
from .._clock import Clock, system_clock
from ..config import Settings
from ..db._engine import async_session_factory, create_async_db_engine
from ..exceptions import AuthError, ProviderError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._inbox import ApplyOutcome, HandlerRegistry, apply_events_async
from ._leader import LeaderLock, next_attempt
from ._mode import Decision, Mode, ModeController, ModePolicy, ModeState, Observation, Transition
from ._poller import Poller, PollResult, error_type
from ._sentinel import (
    FeedBatch,
    SentinelReport,
    assess,
    fetch_changes_async,
    inbox_status,
    known_prefix,
)
from ._state import Fenced, carry_out, fence, last_webhook_at, mode_state, save_mode_state
from ._timeline import record_coverage

__all__ = ["AsyncSyncService", "TickReport", "default_providers"]

_log = get_logger()

#: Most change-feed pages one sentinel check reads.
SENTINEL_PAGES = 10
#: Extra wait between ticks while every tick fails (the database is down, typically).
_TICK_BACKOFF = Backoff(initial=1.0, maximum=60.0, jitter="equal")


@dataclass(frozen=True, slots=True)
class TickReport:
    """What one tick did for one provider."""

    provider: str
    #: Whether this replica leads the provider (standbys only receive webhooks).
    leader: bool
    mode: Mode | None = None
    transition: Transition | None = None
    sentinel: SentinelReport | None = None
    #: Lost webhooks the sentinel applied itself.
    repaired: int = 0
    poll: PollResult | None = None
    #: A provider error this tick (bounded error type), if any; ``fenced`` when
    #: another replica or an operator took over mid-tick.
    error: str | None = None
    #: The tick itself failed (our database, a bug): logged, retried with backoff.
    failed: bool = False


def default_providers(settings: Settings) -> list[str]:
    """Providers a service syncs by default: every provider of kind ``crm``."""
    return sorted(name for name, p in settings.providers.items() if p.kind == "crm")


def default_replica_id() -> str:
    """``host:pid:random``, shown by ``status`` as the poller's leader."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def tick_interval(settings: Settings) -> float:
    """How often the service loop ticks: often enough for every interval it serves."""
    sync = settings.sync
    shortest = min(sync.sentinel_interval, sync.crm_poll_interval, sync.lock_timeout / 3)
    return min(5.0, max(0.05, shortest.total_seconds()))


# --------------------------------------------------------------------------- shared steps


@dataclass(frozen=True, slots=True)
class _Snapshot:
    state: ModeState
    sentinel_seq: int | None
    sentinel_at: datetime | None
    silent_since: datetime | None
    polled_at: datetime | None
    last_webhook_at: datetime | None


def _snapshot(session: Session, provider: str, epoch: int) -> _Snapshot:
    row = fence(session, provider, epoch)
    return _Snapshot(
        state=mode_state(row),
        sentinel_seq=row.sentinel_seq,
        sentinel_at=row.sentinel_at,
        silent_since=row.silent_since,
        polled_at=row.polled_at,
        last_webhook_at=last_webhook_at(session, provider),
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    after: int | None
    since: datetime | None


def _sentinel_plan(
    snap: _Snapshot, now: datetime, settings: Settings, policy: ModePolicy
) -> _Plan | None:
    if snap.state.pinned(policy):
        return None
    due = snap.sentinel_at is None or now - snap.sentinel_at >= settings.sync.sentinel_interval
    if not due:
        return None
    if snap.sentinel_seq is not None:
        return _Plan(snap.sentinel_seq, None)
    # No feed position (the first check, or an API whose positions are opaque):
    # read by time, back to the lag threshold, so that a change whose webhook
    # never came is looked at again once it is late.
    return _Plan(None, (snap.sentinel_at or now) - settings.sync.lag_threshold)


def _decide(
    session: Session,
    provider: str,
    controller: ModeController,
    obs: Observation,
    epoch: int,
) -> tuple[Any, ModeState, Decision]:
    # Fenced: the state row is locked first, and only the current leader decides.
    row = fence(session, provider, epoch)
    before = mode_state(row)
    return row, before, controller.decide(before, obs)


def _finish(
    session: Session,
    row: Any,
    before: ModeState,
    decision: Decision,
    *,
    plan: _Plan | None,
    batch: FeedBatch | None,
    report: SentinelReport | None,
    known: set[str],
    now: datetime,
    metrics: Metrics,
) -> None:
    provider = row.provider
    if report is not None and plan is not None and batch is not None:
        if report.next_seq is not None:
            row.sentinel_seq = report.next_seq
        row.silent_since = report.silent_since
        if report.lag is not None:
            row.lag_seconds = report.lag.total_seconds()
        row.sentinel_at = now
        if before.mode is Mode.WEBHOOK:
            seq, until = known_prefix(
                batch.events,
                known,
                start_seq=plan.after,
                now=now,
                next_after=batch.next_after,
                complete=batch.complete,
            )
            if seq is not None and (row.confirmed_seq is None or seq > row.confirmed_seq):
                row.confirmed_seq = seq
            if until is not None and (row.confirmed_at is None or until > row.confirmed_at):
                if row.confirmed_at is not None:
                    record_coverage(session, provider, "webhook", row.confirmed_at, until)
                row.confirmed_at = until
    if decision.transition is not None:
        carry_out(session, row, decision.state, decision.transition, metrics=metrics)
    else:
        save_mode_state(row, decision.state, now)


def _gauges(
    metrics: Metrics, provider: str, mode: Mode, last_webhook: datetime | None, now: datetime
) -> None:
    metrics.sync_mode.labels(provider=provider).set(1 if mode is Mode.POLLING else 0)
    if last_webhook is not None:
        metrics.last_webhook_age.labels(provider=provider).set(
            max(0.0, (now - last_webhook).total_seconds())
        )


def _poll_due(
    mode: Mode,
    transition: Transition | None,
    polled_at: datetime | None,
    now: datetime,
    interval: timedelta,
) -> bool:
    if mode is not Mode.POLLING:
        return False
    if transition is not None or polled_at is None:
        return True
    return now - polled_at >= interval


class AsyncSyncService:
    """Webhooks, failover and polling for one host process: an asyncio task.

    Args:
        settings: Library settings.
        engine: ``AsyncEngine`` of the library's database (default: from
            ``settings.database_url``).
        gateway: The ``AsyncGateway`` for provider calls (default: a new one).
        registry: Handlers (default: the process-wide registry); may be async.
        providers: Providers to sync (default: every provider of kind ``crm``).
        clock: Time source (tests and the drill pass a manual clock).
        metrics: Metrics (default: process-wide).
        replica_id: This replica's name in ``status`` (default: host:pid:random).
        receiver: Build an ``AsyncWebhookReceiver`` for the providers that have
            webhook secrets (``asgi_app()``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        gateway: Any = None,
        registry: HandlerRegistry | None = None,
        providers: Iterable[str] | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        replica_id: str | None = None,
        receiver: bool = True,
    ) -> None:
        from ..providers import async_client_for
        from ..resilience._gateway import AsyncGateway

        self.settings = settings
        self.providers = list(providers) if providers is not None else default_providers(settings)
        for name in self.providers:
            settings.provider(name)
        self.registry = registry
        self.clock: Clock = clock or system_clock
        self._metrics = metrics
        self.replica_id = replica_id or default_replica_id()
        self.policy = ModePolicy.from_settings(settings.sync)
        self.controller = ModeController(self.policy)
        self.interval = tick_interval(settings)
        self._failed_rounds = 0
        self._last_try: dict[str, float] = {}
        self._own_engine = engine is None
        self.engine = engine or create_async_db_engine(settings.database_url)
        self._sessions = async_session_factory(self.engine)
        self._own_gateway = gateway is None
        self.gateway = gateway or AsyncGateway(settings, clock=self.clock, metrics=metrics)
        self.feeds = {name: async_client_for(self.gateway, name) for name in self.providers}
        self.pollers = {
            name: Poller(
                self.feeds[name],
                self._sessions,
                settings,
                name,
                registry=registry,
                clock=self.clock,
                metrics=metrics,
            )
            for name in self.providers
        }
        self.locks = {
            name: LeaderLock(
                settings.database_url,
                name,
                sessions=self._sessions,
                replica=self.replica_id,
                lock_timeout=settings.sync.lock_timeout,
                policy=self.policy,
                clock=self.clock,
            )
            for name in self.providers
        }
        self.receiver: Any = None
        if receiver:
            from ..webhooks._receiver import AsyncWebhookReceiver

            self.receiver = AsyncWebhookReceiver(
                settings,
                self._sessions,
                registry=registry,
                providers=[n for n in self.providers if settings.provider(n).webhook_secrets],
                clock=self.clock,
                metrics=metrics,
                # A data-less notification (Drive) fetches through the service's own adapter.
                feeds=self.feeds,
            )
        self._task: asyncio.Task[None] | None = None

    @property
    def metrics(self) -> Metrics:
        """The metrics this component records into."""
        return self._metrics if self._metrics is not None else get_metrics()

    def asgi_app(self) -> Any:
        """The webhook receiver's ASGI app (``POST /{provider}``)."""
        if self.receiver is None:
            raise RuntimeError("this AsyncSyncService was built with receiver=False")
        return self.receiver.asgi_app()

    # ------------------------------------------------------------------ one tick

    def _should_try(self, provider: str) -> bool:
        mono = self.clock.monotonic()
        if next_attempt(self._last_try.get(provider), mono, self.settings.sync.lock_timeout):
            self._last_try[provider] = mono
            return True
        return False

    async def _lead(self, provider: str) -> int | None:
        lock = self.locks[provider]
        if lock.held:
            return await lock.acquire()
        return await lock.acquire() if self._should_try(provider) else None

    async def tick(self, provider: str) -> TickReport:
        """One iteration for ``provider``: lead?, sentinel, decide, repair, poll."""
        epoch = await self._lead(provider)
        if epoch is None:
            # Standing by because another replica leads is normal; because the database
            # could not be asked, it is a failed tick (the run loop backs off on those).
            unavailable = self.locks[provider].unavailable
            if unavailable is not None:
                return TickReport(provider, leader=False, error=unavailable, failed=True)
            return TickReport(provider, leader=False)
        try:
            return await self._tick(provider, epoch)
        except Fenced:
            self.locks[provider].deposed()
            _log.warning(
                "idis.sync.fenced",
                provider=provider,
                epoch=epoch,
                msg="another replica or an operator took over mid-tick; nothing more written",
            )
            return TickReport(provider, leader=False, error="fenced")

    async def _tick(self, provider: str, epoch: int) -> TickReport:
        settings = self.settings
        now = self.clock.now()
        session: AsyncSession
        async with self._sessions() as session, session.begin():
            snap = await session.run_sync(lambda s: _snapshot(s, provider, epoch))
        plan = _sentinel_plan(snap, now, settings, self.policy)
        batch: FeedBatch | None = None
        report: SentinelReport | None = None
        known: set[str] = set()
        failed = False
        error: str | None = None
        if plan is not None:
            try:
                batch = await fetch_changes_async(
                    self.feeds[provider],
                    after=plan.after,
                    since=plan.since,
                    page_size=settings.sync.page_size,
                    max_pages=SENTINEL_PAGES,
                )
            except (ProviderError, AuthError) as exc:
                failed, error = True, error_type(exc)
                _log.warning("idis.sync.sentinel_failed", provider=provider, error_type=error)
            else:
                events = batch.events
                async with self._sessions() as session, session.begin():
                    known, by_webhook = await session.run_sync(
                        lambda s: inbox_status(s, provider, events)
                    )
                report = assess(
                    events,
                    by_webhook=by_webhook,
                    known=known,
                    now=now,
                    lag_threshold=settings.sync.lag_threshold,
                    start_seq=plan.after,
                    silent_since=snap.silent_since,
                    next_after=batch.next_after,
                    complete=batch.complete,
                )
        obs = Observation(
            now=now,
            breaker=self.gateway.breaker_state(provider),
            lag=report.lag if report is not None else None,
            sentinel_failed=failed,
            last_webhook_at=snap.last_webhook_at,
        )
        repaired = 0
        async with self._sessions() as session, session.begin():
            row, before, decision = await session.run_sync(
                lambda s: _decide(s, provider, self.controller, obs, epoch)
            )
            if (
                report is not None
                and report.late_unknown
                and before.mode is Mode.WEBHOOK
                and decision.state.mode is Mode.WEBHOOK
            ):
                result = await apply_events_async(
                    session, provider, report.late_unknown, "poll", registry=self.registry, now=now
                )
                known.update(e.id for e in report.late_unknown)
                repaired = result.count(ApplyOutcome.APPLIED)
            await session.run_sync(
                lambda s: _finish(
                    s,
                    row,
                    before,
                    decision,
                    plan=plan,
                    batch=batch,
                    report=report,
                    known=known,
                    now=now,
                    metrics=self.metrics,
                )
            )
        if repaired:
            _log.warning("idis.sync.webhooks_repaired", provider=provider, events=repaired)
        mode = decision.state.mode
        poll: PollResult | None = None
        if _poll_due(
            mode, decision.transition, snap.polled_at, now, settings.sync.crm_poll_interval
        ):
            try:
                poll = await self.pollers[provider].poll_once(epoch=epoch)
            except (ProviderError, AuthError) as exc:
                error = error_type(exc)
        _gauges(self.metrics, provider, mode, snap.last_webhook_at, now)
        return TickReport(
            provider,
            leader=True,
            mode=mode,
            transition=decision.transition,
            sentinel=report,
            repaired=repaired,
            poll=poll,
            error=error,
        )

    async def tick_all(self) -> list[TickReport]:
        """One tick for every provider; a failure of one never stops the others."""
        reports = []
        for provider in self.providers:
            try:
                reports.append(await self.tick(provider))
            except Exception as exc:  # noqa: BLE001  # the loop must survive a bad tick
                _log.error(
                    "idis.sync.tick_failed", provider=provider, error_type=type(exc).__name__
                )
                reports.append(
                    TickReport(
                        provider,
                        leader=self.locks[provider].held,
                        error=type(exc).__name__,
                        failed=True,
                    )
                )
        return reports

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Tick every provider until cancelled (waits go through the clock).

        While every tick fails (our database unreachable, say), the wait between
        ticks backs off (the library's one ``Backoff``, from the tick interval up
        to a minute), so a down database is not hammered by every replica.
        """
        while True:
            await self.clock.asleep(self.pause_after(await self.tick_all()))

    def pause_after(self, reports: list[TickReport]) -> float:
        """Seconds to wait after a round of ticks that gave ``reports``: the tick
        interval, plus a growing backoff while every tick fails in a row (what
        :meth:`run` and ``idis-integrations sync run`` wait)."""
        broken = bool(reports) and all(r.failed for r in reports)
        self._failed_rounds = self._failed_rounds + 1 if broken else 0
        failures = self._failed_rounds
        return self.interval + (_TICK_BACKOFF.delay(failures) if failures else 0.0)

    async def start(self) -> None:
        """Run as a task on the current loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="idis-sync")

    async def stop(self) -> None:
        """Cancel the task and give up leadership."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for lock in self.locks.values():
            await lock.release()

    async def aclose(self) -> None:
        """Stop, then close what this service created."""
        await self.stop()
        for lock in self.locks.values():
            await lock.aclose()
        if self._own_gateway:
            await self.gateway.aclose()
        if self._own_engine:
            await self.engine.dispose()

    async def __aenter__(self) -> AsyncSyncService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
