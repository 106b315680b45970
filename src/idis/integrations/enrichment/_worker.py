"""The deferred-enrichment worker: refresh stale subjects once their providers recover.

Each pass (:meth:`DeferredEnrichmentWorker.run_once`), per provider with due requests:

1. **Gate.** Skip the provider while no provider of its chain is available
   (breaker open and not yet due for a trial, or a 429 pause): waiting burns
   no attempts and sends no traffic. An open breaker whose reset timeout has
   passed counts as available, so the worker's first call is the trial call.
2. **Lease** a batch (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), oldest due
   first. The batch slow-starts: 1 request after the provider was unavailable
   or failed, doubling per fully successful batch up to ``batch_size``.
3. **Refresh** the batch one request at a time through the same chain logic as
   :class:`~idis.integrations.enrichment.Enricher`. A success caches the data,
   clears the stale mark and resolves the subject's defects with
   'Data refreshed after provider recovery'. The first outage failure stops
   the batch: that request is rescheduled with exponential backoff and jitter,
   the rest go back untouched. A 4xx from every provider fails the request and
   leaves its defect OPEN.

Between passes the worker waits ``batch_interval`` while work remains, else
``poll_interval``, each jittered by ±20% so replicas drift apart. Together
these keep a recovered provider from being hit by the whole backlog at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session

from ..config import Settings
from ..db._engine import create_async_db_engine, create_db_engine, session_scope, storage_errors
from ..exceptions import IntegrationError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from . import _store
from ._decisions import describe_attempts, next_batch_size, provider_chain, refresh_delay
from ._enricher import ChainOutcome, Clock, _UTCNow, atry_chain, default_auth, try_chain

if TYPE_CHECKING:
    from ..resilience import AsyncGateway, Gateway

__all__ = [
    "AsyncDeferredEnrichmentWorker",
    "DeferredEnrichmentWorker",
    "RunStats",
    "run_deferred",
]

_log = get_logger()
_Verdict = Literal["refreshed", "rescheduled", "failed", "gated"]


@dataclass(slots=True)
class RunStats:
    """Counts of what a worker did (one pass, or accumulated over a run)."""

    #: Passes made.
    passes: int = 0
    #: Requests leased.
    leased: int = 0
    #: Subjects refreshed (cache updated, defects resolved).
    refreshed: int = 0
    #: Refreshes that failed on an outage and were rescheduled with backoff.
    rescheduled: int = 0
    #: Requests every provider rejected (4xx); their defects stay OPEN.
    failed: int = 0
    #: Leased requests handed back untouched (the batch stopped early).
    released: int = 0
    #: Provider-passes skipped because no provider of the chain was available.
    gated: int = 0
    #: Defects resolved by refreshes.
    defects_resolved: int = 0
    #: Passes that failed (database or configuration error), logged and retried.
    errors: int = 0
    #: Whether a batch came back full (more may be due right away).
    more_due: bool = False

    @property
    def worked(self) -> bool:
        """Whether the pass refreshed, rescheduled or failed anything."""
        return bool(self.refreshed or self.rescheduled or self.failed)

    def add(self, other: RunStats) -> None:
        """Accumulate ``other`` into this one."""
        for item in fields(self):
            if item.name != "more_due":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))
        self.more_due = other.more_due

    def as_dict(self) -> dict[str, int]:
        """Counts as a plain dict (for ``--json``)."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self) if f.name != "more_due"}


@dataclass(slots=True)
class _Plan:
    """Pure per-worker state: slow-start batch sizes, backoff, jitter."""

    settings: Settings
    owner: str
    rng: random.Random
    ramp: dict[str, int] = field(default_factory=dict)

    def gate_chain(self, provider: str) -> tuple[str, ...]:
        if provider not in self.settings.providers:
            return ()
        return provider_chain(self.settings, provider)

    def known(self, providers: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p for p in providers if p in self.settings.providers)

    def batch_size(self, provider: str) -> int:
        return self.ramp.get(provider, 1)

    def after_batch(self, provider: str, outcome: Literal["ok", "failed", "gated"]) -> None:
        current = self.batch_size(provider)
        self.ramp[provider] = next_batch_size(current, self.settings.enrichment.batch_size, outcome)

    def verdict(self, outcome: ChainOutcome) -> _Verdict:
        if outcome.served_by is not None:
            return "refreshed"
        if not outcome.attempted:
            return "gated"
        if any(a.retryable for a in outcome.attempts if a.outcome != "served"):
            return "rescheduled"
        return "failed"

    def pause(self, stats: RunStats) -> float:
        enrichment = self.settings.enrichment
        base = enrichment.batch_interval if stats.more_due else enrichment.poll_interval
        return base.total_seconds() * self.rng.uniform(0.8, 1.2)

    def delay(self, attempts: int) -> timedelta:
        return refresh_delay(attempts, self.settings.enrichment, self.rng)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def apply_verdict(
    session: Session,
    request: _store.LeasedRequest,
    *,
    verdict: _Verdict,
    outcome: ChainOutcome,
    plan: _Plan,
    now: datetime,
    metrics: Metrics,
    actor: str,
) -> int:
    """Store one refresh's outcome (one transaction); return the defects it resolved."""
    if verdict == "refreshed":
        assert outcome.served_by is not None
        assert outcome.data is not None
        resolved, _ = _store.record_success(
            session,
            request.key,
            served_by=outcome.served_by,
            data=outcome.data,
            fetched_at=now,
            now=now,
            actor=actor,
        )
        metrics.enrichment_requests.labels(provider=request.key.provider, result="refreshed").inc()
        return len(resolved)
    error = describe_attempts(outcome.attempts)
    if verdict == "rescheduled":
        _store.reschedule(
            session,
            request,
            next_attempt_at=now + plan.delay(request.attempts + 1),
            error=error,
            now=now,
        )
    elif verdict == "failed":
        _store.fail_request(session, request, error=error, now=now)
    return 0


class _Base:
    """Configuration and logging shared by both workers."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None,
        clock: Clock | None,
        worker_id: str | None,
        seed: int | None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or get_metrics()
        self.clock: Clock = clock or _UTCNow()
        self.worker_id = worker_id or _worker_id()
        self.actor = f"worker:{self.worker_id}"
        self._plan = _Plan(settings, self.worker_id, random.Random(seed))  # noqa: S311  # jitter, not crypto

    def _log_verdict(self, request: _store.LeasedRequest, verdict: _Verdict, resolved: int) -> None:
        if verdict == "refreshed":
            _log.info(
                "idis.enrichment.refreshed",
                msg="deferred enrichment refreshed after provider recovery",
                provider=request.key.provider,
                tenant_id=request.key.tenant_id,
                subject_id=request.key.subject_id,
                defects_resolved=resolved,
                worker=self.worker_id,
            )
        elif verdict == "rescheduled":
            _log.info(
                "idis.enrichment.refresh_rescheduled",
                msg="deferred enrichment failed again; retrying later with backoff",
                provider=request.key.provider,
                subject_id=request.key.subject_id,
                attempts=request.attempts + 1,
                worker=self.worker_id,
            )
        elif verdict == "failed":
            _log.warning(
                "idis.enrichment.refresh_rejected",
                msg="every provider rejected the deferred enrichment; its defect stays open",
                provider=request.key.provider,
                subject_id=request.key.subject_id,
                worker=self.worker_id,
            )

    @staticmethod
    def _count(stats: RunStats, verdict: _Verdict) -> None:
        if verdict == "refreshed":
            stats.refreshed += 1
        elif verdict == "rescheduled":
            stats.rescheduled += 1
        elif verdict == "failed":
            stats.failed += 1


class DeferredEnrichmentWorker(_Base):
    """Runs deferred enrichments in a thread, a loop, or one pass at a time.

    Example (inside a service)::

        worker = DeferredEnrichmentWorker(settings, gateway)
        worker.start()          # background thread
        ...
        worker.stop()

    Args:
        settings: Library settings (default: from the environment).
        gateway: Sync gateway (default: a new one, closed with the worker).
        engine: Database engine (default: one on ``settings.database_url``).
        metrics: Metrics to record into.
        clock: Time source (``.now()``).
        worker_id: Lease owner name (default: host:pid:random).
        seed: Seed for jitter (reproducible tests).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        gateway: Gateway | None = None,
        *,
        engine: Engine | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        worker_id: str | None = None,
        seed: int | None = None,
    ) -> None:
        settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
        super().__init__(settings, metrics=metrics, clock=clock, worker_id=worker_id, seed=seed)
        self._owned: list[Callable[[], None]] = []
        if engine is None:
            engine = create_db_engine(settings.database_url)
            self._owned.append(engine.dispose)
        if gateway is None:
            from ..resilience import Gateway

            auth = default_auth(settings, engine=engine)
            if auth is not None:
                self._owned.append(auth.close)
            gateway = Gateway(settings, metrics=self.metrics, auth=auth)
            self._owned.append(gateway.close)
        self._gateway = gateway
        self._engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.totals = RunStats()

    def run_once(self) -> RunStats:
        """One pass: at most one (slow-started) batch per provider with due requests."""
        stats = RunStats(passes=1)
        plan = self._plan
        with session_scope(self._engine) as session:
            providers = _store.due_providers(session, self.clock.now())
        for provider in providers:
            chain = plan.gate_chain(provider)
            if not any(self._gateway.available(name) for name in chain):
                stats.gated += 1
                plan.after_batch(provider, "gated")
                continue
            size = plan.batch_size(provider)
            with session_scope(self._engine) as session:
                leased = _store.lease(
                    session,
                    provider,
                    limit=size,
                    owner=self.worker_id,
                    now=self.clock.now(),
                    lease_for=self.settings.enrichment.lease,
                )
            stats.leased += len(leased)
            batch_outcome: Literal["ok", "failed", "gated"] = "ok"
            for index, request in enumerate(leased):
                outcome = try_chain(
                    self._gateway, plan.known(request.providers), request.key.subject_id
                )
                verdict = plan.verdict(outcome)
                if verdict == "gated":
                    batch_outcome = "gated"
                    rest = leased[index:]
                else:
                    with session_scope(self._engine) as session:
                        resolved = apply_verdict(
                            session,
                            request,
                            verdict=verdict,
                            outcome=outcome,
                            plan=plan,
                            now=self.clock.now(),
                            metrics=self.metrics,
                            actor=self.actor,
                        )
                    stats.defects_resolved += resolved
                    self._count(stats, verdict)
                    self._log_verdict(request, verdict, resolved)
                    if verdict != "rescheduled":
                        continue
                    batch_outcome = "failed"
                    rest = leased[index + 1 :]
                with session_scope(self._engine) as session:
                    _store.release(
                        session, [r.id for r in rest], owner=self.worker_id, now=self.clock.now()
                    )
                stats.released += len(rest)
                break
            if batch_outcome == "ok" and len(leased) == size:
                stats.more_due = True
            plan.after_batch(provider, batch_outcome)
        with session_scope(self._engine) as session:
            _store.refresh_gauges(session, self.metrics, self.settings.providers)
        self.totals.add(stats)
        return stats

    def drain(
        self, *, max_passes: int | None = None, stop: threading.Event | None = None
    ) -> RunStats:
        """Run passes until one does no work (``run-deferred --once``); return the totals."""
        event = stop or self._stop
        total = RunStats()
        while max_passes is None or total.passes < max_passes:
            stats = self.run_once()
            total.add(stats)
            if not stats.worked and not stats.more_due:
                break
            if event.wait(self._plan.pause(stats)) or self._stop.is_set():
                break
        return total

    def run(self, stop: threading.Event | None = None) -> RunStats:
        """Run passes until ``stop`` (or :meth:`stop`) is set; errors are logged, not raised.

        Returns:
            The accumulated counts.
        """
        event = stop or self._stop
        total = RunStats()
        while not event.is_set() and not self._stop.is_set():
            try:
                stats = self.run_once()
            except IntegrationError as exc:
                # A database or provider hiccup must not kill a long-running worker.
                _log.warning(
                    "idis.enrichment.worker_error",
                    msg="deferred enrichment pass failed; retrying after the poll interval",
                    error_type=type(exc).__name__,
                    error=str(exc),
                    worker=self.worker_id,
                )
                stats = RunStats(passes=1, errors=1)
                self.totals.add(stats)
            total.add(stats)
            pause = self._plan.pause(stats)
            if event.wait(pause) or self._stop.is_set():
                break
        return total

    def start(self) -> threading.Thread:
        """Run :meth:`run` in a daemon thread; :meth:`stop` ends it."""
        if self._thread is not None and self._thread.is_alive():
            return self._thread
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, name=f"idis-enrichment-{self.worker_id}", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the loop to stop after the current request and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop, then close what the worker created."""
        self.stop()
        for closer in reversed(self._owned):
            closer()
        self._owned.clear()

    def __enter__(self) -> DeferredEnrichmentWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDeferredEnrichmentWorker(_Base):
    """Async twin of :class:`DeferredEnrichmentWorker`, for an asyncio task in the service.

    Example::

        worker = AsyncDeferredEnrichmentWorker(settings, async_gateway)
        task = worker.start()   # asyncio task
        ...
        await worker.stop()
    """

    def __init__(
        self,
        settings: Settings | None = None,
        gateway: AsyncGateway | None = None,
        *,
        engine: AsyncEngine | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        worker_id: str | None = None,
        seed: int | None = None,
    ) -> None:
        settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
        super().__init__(settings, metrics=metrics, clock=clock, worker_id=worker_id, seed=seed)
        self._owned_gateway = gateway is None
        self._owned_engine = engine is None
        self._engine = engine or create_async_db_engine(settings.database_url)
        self._auth: Any = None
        if gateway is None:
            from ..resilience import AsyncGateway

            self._auth = default_auth(settings, async_engine=self._engine)
            gateway = AsyncGateway(settings, metrics=self.metrics, auth=self._auth)
        self._gateway = gateway
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[RunStats] | None = None
        self.totals = RunStats()

    async def _tx(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with storage_errors():
            async with self._sessions.begin() as session:
                return await session.run_sync(func, *args, **kwargs)

    async def run_once(self) -> RunStats:
        """One pass; see :meth:`DeferredEnrichmentWorker.run_once`."""
        stats = RunStats(passes=1)
        plan = self._plan
        providers = await self._tx(_store.due_providers, self.clock.now())
        for provider in providers:
            chain = plan.gate_chain(provider)
            if not any(self._gateway.available(name) for name in chain):
                stats.gated += 1
                plan.after_batch(provider, "gated")
                continue
            size = plan.batch_size(provider)
            leased: list[_store.LeasedRequest] = await self._tx(
                _store.lease,
                provider,
                limit=size,
                owner=self.worker_id,
                now=self.clock.now(),
                lease_for=self.settings.enrichment.lease,
            )
            stats.leased += len(leased)
            batch_outcome: Literal["ok", "failed", "gated"] = "ok"
            for index, request in enumerate(leased):
                outcome = await atry_chain(
                    self._gateway, plan.known(request.providers), request.key.subject_id
                )
                verdict = plan.verdict(outcome)
                if verdict == "gated":
                    batch_outcome = "gated"
                    rest = leased[index:]
                else:
                    resolved = await self._tx(
                        apply_verdict,
                        request,
                        verdict=verdict,
                        outcome=outcome,
                        plan=plan,
                        now=self.clock.now(),
                        metrics=self.metrics,
                        actor=self.actor,
                    )
                    stats.defects_resolved += resolved
                    self._count(stats, verdict)
                    self._log_verdict(request, verdict, resolved)
                    if verdict != "rescheduled":
                        continue
                    batch_outcome = "failed"
                    rest = leased[index + 1 :]
                await self._tx(
                    _store.release, [r.id for r in rest], owner=self.worker_id, now=self.clock.now()
                )
                stats.released += len(rest)
                break
            if batch_outcome == "ok" and len(leased) == size:
                stats.more_due = True
            plan.after_batch(provider, batch_outcome)
        await self._tx(_store.refresh_gauges, self.metrics, self.settings.providers)
        self.totals.add(stats)
        return stats

    async def _wait(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        return self._stop.is_set()

    async def drain(self, *, max_passes: int | None = None) -> RunStats:
        """Run passes until one does no work; return the totals."""
        total = RunStats()
        while max_passes is None or total.passes < max_passes:
            stats = await self.run_once()
            total.add(stats)
            if not stats.worked and not stats.more_due:
                break
            if await self._wait(self._plan.pause(stats)):
                break
        return total

    async def run(self) -> RunStats:
        """Run passes until :meth:`stop`; errors are logged, not raised."""
        total = RunStats()
        while not self._stop.is_set():
            try:
                stats = await self.run_once()
            except IntegrationError as exc:
                _log.warning(
                    "idis.enrichment.worker_error",
                    msg="deferred enrichment pass failed; retrying after the poll interval",
                    error_type=type(exc).__name__,
                    error=str(exc),
                    worker=self.worker_id,
                )
                stats = RunStats(passes=1, errors=1)
                self.totals.add(stats)
            total.add(stats)
            if await self._wait(self._plan.pause(stats)):
                break
        return total

    def start(self) -> asyncio.Task[RunStats]:
        """Run :meth:`run` as an asyncio task of the running loop."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"idis-enrichment-{self.worker_id}"
            )
        return self._task

    async def stop(self) -> None:
        """Ask the loop to stop after the current request and wait for the task."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def aclose(self) -> None:
        """Stop, then close what the worker created."""
        await self.stop()
        if self._owned_gateway:
            await self._gateway.aclose()
            self._owned_gateway = False
        if self._auth is not None:
            await self._auth.aclose()
            self._auth = None
        if self._owned_engine:
            await self._engine.dispose()
            self._owned_engine = False


@contextlib.contextmanager
def _stop_on_signals(event: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``event`` (main thread only); previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: FrameType | None) -> None:
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_deferred(
    settings: Settings | None = None,
    *,
    once: bool = False,
    gateway: Gateway | None = None,
    engine: Engine | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    worker_id: str | None = None,
) -> RunStats:
    """Run deferred enrichments (``idis-integrations enrichment run-deferred``).

    Args:
        settings: Library settings (default: from the environment).
        once: Drain what can run now, then return; otherwise run until ``stop`` is set
            or SIGTERM/SIGINT arrives (finishing the request in hand).
        gateway: Sync gateway (default: a new one).
        engine: Database engine (default: one on ``settings.database_url``).
        metrics: Metrics to record into.
        clock: Time source.
        stop: Event that ends a continuous run.
        worker_id: Lease owner name.

    Returns:
        The accumulated counts.
    """
    worker = DeferredEnrichmentWorker(
        settings, gateway, engine=engine, metrics=metrics, clock=clock, worker_id=worker_id
    )
    event = stop or threading.Event()
    try:
        with _stop_on_signals(event):
            if once:
                return worker.drain(stop=event)
            return worker.run(event)
    finally:
        worker.close()
