"""The deferred-enrichment worker: refresh stale subjects once their providers recover.

One implementation, for asyncio (background workers are async only): the
example service runs it as a task, ``idis-integrations enrichment
run-deferred`` and :func:`run_deferred` run it with ``asyncio.run``, and the
drill runs the same class.

Each pass (:meth:`AsyncDeferredEnrichmentWorker.run_once`), per provider with
due requests:

1. **Gate.** Skip the provider while no provider of its chain is available
   (breaker open and not yet due for a trial, or a 429 pause): waiting burns
   no attempts and sends no traffic. An open breaker whose reset timeout has
   passed counts as available, so the worker's first call is the trial call.
2. **Lease** a batch (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), oldest due
   first. The batch slow-starts: 1 request after the provider was unavailable
   or failed, doubling per fully successful batch up to ``batch_size``. A lapsed
   lease met on the way is a worker that died holding it, perhaps killed by
   that very refresh: the lease counts the takeover before anything runs, puts
   the request behind the due ones as a suspect, refreshed alone, and gives it
   up (``failed``, defect OPEN) at ``max_takeovers``, so a refresh that kills
   its worker cannot crash-loop it in front of the provider's other requests
   (:func:`~._store.lease`). An outage never counts: its refreshes settle.
3. **Refresh** the batch one request at a time through the enricher's own
   chain flow (:func:`~._flow.ask_chain`) and decisions
   (:func:`~._decisions.refresh_verdict`). A success caches the data, clears
   the stale mark and resolves the subject's defects with 'Data refreshed after
   provider recovery', then calls the ``on_refreshed`` callbacks. The first
   outage failure stops the batch: that request is rescheduled after the
   refresh backoff, the rest go back untouched. A chain where every provider
   answered without data fails the request and leaves its defect OPEN. Once
   half the lease is gone the batch starts no more refreshes and hands the rest
   back, so its tail never lapses under a live worker.

Between passes the worker waits ``batch_interval`` while work remains, else
``poll_interval``, each jittered by ±20% so replicas drift apart. Waits go
through the clock, so a ``ManualClock`` advances instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from .._clock import Clock, system_clock
from .._flow import adrive
from .._signals import stop_on_signals
from ..config import Settings
from ..db._engine import async_session_scope
from ..exceptions import IntegrationError, UsageError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from . import _store
from ._decisions import (
    EnrichmentResult,
    RefreshVerdict,
    SubjectKey,
    describe_attempts,
    next_batch_size,
    provider_chain,
    refresh_backoff,
    refresh_verdict,
)
from ._enricher import async_parts
from ._flow import ChainOutcome, FlowIO, ask_chain, served_result

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ..resilience import AsyncGateway

__all__ = ["AsyncDeferredEnrichmentWorker", "RefreshedCallback", "RunStats", "run_deferred"]

_log = get_logger()
T = TypeVar("T")
_BatchOutcome = Literal["ok", "failed", "gated"]

#: Called after a deferred subject's refresh committed: ``(subject, fresh result)``.
#: A plain function or a coroutine function; see :meth:`AsyncDeferredEnrichmentWorker.on_refreshed`.
RefreshedCallback: TypeAlias = Callable[[SubjectKey, EnrichmentResult], Awaitable[None] | None]


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
    #: Requests every provider answered without data (404/410/400/422); defects stay OPEN.
    failed: int = 0
    #: Leased requests handed back untouched (the batch stopped early).
    released: int = 0
    #: Lapsed leases taken over (the worker holding them stopped without settling them);
    #: the requests were put back as suspects, refreshed alone.
    taken_over: int = 0
    #: Requests given up because their refresh kept stopping the worker
    #: (``IDIS_ENRICHMENT_MAX_TAKEOVERS`` takeovers); defects stay OPEN.
    given_up: int = 0
    #: Provider-passes skipped because no provider of the chain was available.
    gated: int = 0
    #: Defects resolved by refreshes.
    defects_resolved: int = 0
    #: Passes that failed (database or configuration error), logged and retried.
    errors: int = 0
    #: ``on_refreshed`` callbacks that raised (logged; the refresh stays committed).
    callback_errors: int = 0
    #: Whether a batch came back full (more may be due right away).
    more_due: bool = False

    @property
    def worked(self) -> bool:
        """Whether the pass refreshed, rescheduled, failed or gave up anything."""
        return bool(self.refreshed or self.rescheduled or self.failed or self.given_up)

    def add(self, other: RunStats) -> None:
        """Accumulate ``other`` into this one."""
        for item in fields(self):
            if item.name != "more_due":
                setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))
        self.more_due = other.more_due

    def as_dict(self) -> dict[str, int]:
        """Counts as a plain dict (for ``--json``)."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self) if f.name != "more_due"}


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _callback_name(callback: Callable[..., Any]) -> str:
    return str(getattr(callback, "__qualname__", None) or type(callback).__qualname__)


class AsyncDeferredEnrichmentWorker:
    """Refreshes deferred enrichments as their providers recover (an asyncio task).

    Example (inside a service)::

        worker = AsyncDeferredEnrichmentWorker(settings, async_gateway, engine=async_engine)

        @worker.on_refreshed
        async def copy_to_claim(subject: SubjectKey, result: EnrichmentResult) -> None:
            ...  # write result.data onto the host's row for subject.subject_id

        task = worker.start()
        ...
        await worker.stop()      # finishes the request in hand

    Scripts run it with ``asyncio.run`` (:func:`run_deferred`). Not thread-safe:
    use it from one event loop.

    Args:
        settings: Library settings (default: the gateway's, else from the environment).
        gateway: Async gateway (default: a new one, closed by :meth:`aclose`).
        engine: Async database engine (default: one on ``settings.database_url``).
        metrics: Metrics to record into.
        clock: Time source for due times, leases and the waits between passes.
        worker_id: Lease owner name (default: host:pid:random).
        seed: Seed for jitter (reproducible tests).
        on_refreshed: Callbacks called after each refresh committed (see :meth:`on_refreshed`).
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
        on_refreshed: Iterable[RefreshedCallback] = (),
    ) -> None:
        settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
        self.settings = settings
        self.metrics = metrics or get_metrics()
        self.clock: Clock = clock or system_clock
        self.worker_id = worker_id or _worker_id()
        self.actor = f"worker:{self.worker_id}"
        #: What the worker did since it was created.
        self.totals = RunStats()
        self._rng = random.Random(seed)  # noqa: S311  # jitter, not cryptography
        self._backoff = refresh_backoff(settings.enrichment)
        self._ramp: dict[str, int] = {}
        # A pass failed: leases this worker may still hold are given back at the start of
        # the next one (they are not a dead worker's, and must not count as takeovers).
        self._release_own = False
        self._callbacks: list[RefreshedCallback] = []
        for callback in on_refreshed:
            self.on_refreshed(callback)
        gateway, engine, self._closers = async_parts(settings, gateway, engine, self.metrics)
        self._gateway = gateway
        self._engine = engine
        self._io = FlowIO(gateway, engine, self.clock)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[RunStats] | None = None

    # ------------------------------------------------------------ callbacks

    def on_refreshed(self, callback: RefreshedCallback) -> RefreshedCallback:
        """Register ``callback(subject, result)``, called after a refresh committed.

        ``subject`` is the :class:`SubjectKey` (primary provider, tenant, type, id);
        ``result`` the fresh :class:`EnrichmentResult` (``enriched`` or
        ``served_from_fallback``, with ``data`` and ``fetched_at``). A coroutine
        function is awaited; a plain function runs on the event loop, so keep it
        short. Callbacks run in registration order, after the transaction that
        cached the data and resolved the defects, so a callback that raises is
        logged (``idis.enrichment.refreshed_callback_failed``, its error type only)
        and counted, never undoes or retries the refresh. A crash between the
        commit and the callback skips the callback: hosts that must not miss one
        catch up from the cache at start (the example service does).

        Returns ``callback``, so it works as a decorator.

        Raises:
            UsageError: ``callback`` is not callable.
        """
        if not callable(callback):
            raise UsageError(
                f"on_refreshed expects a callable (subject, result), got {type(callback).__name__}"
            )
        self._callbacks.append(callback)
        return callback

    async def _notify(self, key: SubjectKey, result: EnrichmentResult, stats: RunStats) -> None:
        for callback in self._callbacks:
            try:
                outcome = callback(key, result)
                if inspect.isawaitable(outcome):
                    await outcome
            except Exception as exc:  # noqa: BLE001  # the host's code: log it, keep refreshing
                stats.callback_errors += 1
                # Only the type: a host's exception text may carry anything, secrets included.
                _log.error(
                    "idis.enrichment.refreshed_callback_failed",
                    msg="an on_refreshed callback raised; the refresh itself is committed",
                    callback=_callback_name(callback),
                    error_type=type(exc).__name__,
                    **key.log_fields(),
                    worker=self.worker_id,
                )

    # ------------------------------------------------------------ one pass

    async def _tx(self, work: Callable[[Session], T], *, write: bool = True) -> T:
        async with async_session_scope(self._engine, write=write) as session:
            return await session.run_sync(work)

    def _gate_chain(self, provider: str) -> tuple[str, ...]:
        if provider not in self.settings.providers:
            return ()
        return provider_chain(self.settings, provider)

    def _lease_for(self, provider: str) -> timedelta:
        """How long a batch of ``provider`` is leased: ``IDIS_ENRICHMENT_LEASE``, and at
        least twice the longest a refresh of its chain may run (each provider's call
        deadline, one call each).

        Refreshes start only in the lease's first half, so one that runs to its chain's
        deadlines still ends before the lease lapses: a live refresh is never taken over
        by another worker and counted against its request as a worker that stopped.
        """
        chain = self._gate_chain(provider)
        slowest = sum(self.settings.provider(name).timeouts.deadline for name in chain)
        return max(self.settings.enrichment.lease, timedelta(seconds=2 * slowest))

    async def run_once(self) -> RunStats:
        """One pass: at most one (slow-started) batch per provider with due requests.

        Raises:
            StorageError: the database is unreachable (:meth:`run` logs and retries).
        """
        stats = RunStats(passes=1)
        try:
            await self._give_back_own()
            providers = await self._tx(
                partial(_store.due_providers, now=self.clock.now()), write=False
            )
            for provider in providers:
                if self._stop.is_set():
                    break
                outcome = await self._batch(provider, stats)
                current = self._ramp.get(provider, 1)
                maximum = self.settings.enrichment.batch_size
                self._ramp[provider] = next_batch_size(current, maximum, outcome)
            await self._tx(
                partial(
                    _store.refresh_gauges, metrics=self.metrics, providers=self.settings.providers
                )
            )
        except BaseException:
            self._release_own = True
            raise
        self.totals.add(stats)
        return stats

    async def _batch(self, provider: str, stats: RunStats) -> _BatchOutcome:
        """Gate, lease and refresh one provider's batch."""
        if not any(self._gateway.available(name) for name in self._gate_chain(provider)):
            stats.gated += 1
            return "gated"
        size = self._ramp.get(provider, 1)
        enrichment = self.settings.enrichment
        leased_at = self.clock.now()
        lease_for = self._lease_for(provider)
        lease = partial(
            _store.lease,
            provider=provider,
            limit=size,
            owner=self.worker_id,
            now=leased_at,
            lease_for=lease_for,
            max_takeovers=enrichment.max_takeovers,
        )
        taken = await self._tx(lease)
        self._log_takeovers(provider, taken, stats)
        leased = taken.requests
        stats.leased += len(leased)
        # Refreshes start only while at least half of the lease is left, so a slow batch
        # hands its tail back instead of letting it lapse (a lapsed lease is counted
        # against its request as a worker that stopped).
        start_before = leased_at + lease_for / 2
        for index, request in enumerate(leased):
            if self._stop.is_set():
                # Stopping: the request in hand is done; the rest go back for another worker.
                await self._release(leased[index:], stats)
                return "ok"
            if index and self.clock.now() >= start_before:
                await self._release(leased[index:], stats)
                stats.more_due = True
                return "ok"
            verdict = await self._refresh(request, stats)
            if verdict == "gated":
                await self._release(leased[index:], stats)
                return "gated"
            if verdict == "rescheduled":
                await self._release(leased[index + 1 :], stats)
                return "failed"
        if len(leased) == size or taken.cut:
            stats.more_due = True
        return "ok"

    def _log_takeovers(self, provider: str, taken: _store.LeaseResult, stats: RunStats) -> None:
        """Count and log the lapsed leases a lease took over, and the requests it gave up."""
        if taken.taken_over:
            stats.taken_over += len(taken.taken_over)
            _log.warning(
                "idis.enrichment.leases_taken_over",
                msg="a worker stopped while refreshing these deferred requests (their leases "
                "lapsed): each is refreshed alone from now on, so one that kills its worker "
                "holds no other behind it",
                provider=provider,
                requests=len(taken.taken_over),
                request_ids=[r.id for r in taken.taken_over],
                worker=self.worker_id,
            )
        for request in taken.given_up:
            stats.given_up += 1
            self.metrics.enrichment_requests.labels(provider=provider, result="given_up").inc()
            _log.error(
                "idis.enrichment.refresh_given_up",
                msg="the refresh of this deferred request stopped the worker every time it "
                "ran: given up; its defect stays open for a human",
                **request.key.log_fields(),
                request_id=request.id,
                takeovers=request.takeovers,
                worker=self.worker_id,
            )

    async def _give_back_own(self) -> None:
        """After a failed pass: give back, uncounted, the leases this worker still holds."""
        if self._release_own:
            owner = self.worker_id
            await self._tx(partial(_store.release_own, owner=owner, now=self.clock.now()))
            self._release_own = False

    async def _release(self, rest: list[_store.LeasedRequest], stats: RunStats) -> None:
        if rest:
            release = partial(
                _store.release,
                ids=[r.id for r in rest],
                owner=self.worker_id,
                now=self.clock.now(),
            )
            await self._tx(release)
        stats.released += len(rest)

    async def _refresh(self, request: _store.LeasedRequest, stats: RunStats) -> RefreshVerdict:
        """Ask the request's chain, store the verdict, then tell the callbacks."""
        chain = tuple(p for p in request.providers if p in self.settings.providers)
        outcome = await adrive(ask_chain(chain, request.key.subject_id), self._io)
        verdict = refresh_verdict(outcome.attempts)
        if verdict == "gated":
            return verdict
        now = self.clock.now()
        store = partial(
            self._store_verdict, request=request, verdict=verdict, outcome=outcome, now=now
        )
        resolved = await self._tx(store)
        stats.defects_resolved += resolved
        self._log_verdict(request, verdict, resolved)
        if verdict == "refreshed":
            stats.refreshed += 1
            await self._notify(request.key, served_result(request.key, outcome, now), stats)
        elif verdict == "rescheduled":
            stats.rescheduled += 1
        else:
            stats.failed += 1
        return verdict

    def _store_verdict(
        self,
        session: Session,
        *,
        request: _store.LeasedRequest,
        verdict: RefreshVerdict,
        outcome: ChainOutcome,
        now: datetime,
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
                actor=self.actor,
            )
            self.metrics.enrichment_requests.labels(
                provider=request.key.provider, result="refreshed"
            ).inc()
            return len(resolved)
        error = describe_attempts(outcome.attempts)
        if verdict == "rescheduled":
            delay = self._backoff.delay(request.attempts + 1, self._rng)
            _store.reschedule(
                session,
                request,
                next_attempt_at=now + timedelta(seconds=delay),
                error=error,
                now=now,
            )
        else:
            _store.fail_request(session, request, error=error, now=now)
            if outcome.no_match:
                return len(_store.record_no_match(session, request.key, now=now, actor=self.actor))
        return 0

    def _log_verdict(
        self, request: _store.LeasedRequest, verdict: RefreshVerdict, resolved: int
    ) -> None:
        key = request.key
        if verdict == "refreshed":
            _log.info(
                "idis.enrichment.refreshed",
                msg="deferred enrichment refreshed after provider recovery",
                **key.log_fields(),
                defects_resolved=resolved,
                worker=self.worker_id,
            )
        elif verdict == "rescheduled":
            _log.info(
                "idis.enrichment.refresh_rescheduled",
                msg="deferred enrichment failed again; retrying later with backoff",
                provider=key.provider,
                subject_id=key.subject_id,
                attempts=request.attempts + 1,
                worker=self.worker_id,
            )
        else:
            _log.warning(
                "idis.enrichment.refresh_rejected",
                msg="every provider answered the deferred enrichment without data; "
                "its defect stays open",
                provider=key.provider,
                subject_id=key.subject_id,
                worker=self.worker_id,
            )

    # ------------------------------------------------------------ loops

    def _pause_seconds(self, stats: RunStats) -> float:
        enrichment = self.settings.enrichment
        base = enrichment.batch_interval if stats.more_due else enrichment.poll_interval
        return base.total_seconds() * self._rng.uniform(0.8, 1.2)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` on the clock or until stopped; return whether stopped."""
        if self._stop.is_set():
            return True
        sleeping = asyncio.ensure_future(self.clock.asleep(seconds))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({sleeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (sleeping, stopping):
                waiter.cancel()
            await asyncio.gather(sleeping, stopping, return_exceptions=True)
        return self._stop.is_set()

    async def drain(self, *, max_passes: int | None = None) -> RunStats:
        """Run passes until one does no work (``run-deferred --once``); return the totals.

        Raises:
            StorageError: the database is unreachable.
        """
        total = RunStats()
        while max_passes is None or total.passes < max_passes:
            stats = await self.run_once()
            total.add(stats)
            if not stats.worked and not stats.more_due:
                break
            if await self._pause(self._pause_seconds(stats)):
                break
        return total

    async def run(self) -> RunStats:
        """Run passes until :meth:`stop`; a failed pass is logged and retried, not raised.

        Returns:
            The accumulated counts.
        """
        total = RunStats()
        while not self._stop.is_set():
            try:
                stats = await self.run_once()
            except IntegrationError as exc:
                # A database or configuration hiccup must not kill a long-running worker.
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
            if await self._pause(self._pause_seconds(stats)):
                break
        return total

    def start(self) -> asyncio.Task[RunStats]:
        """Run :meth:`run` as a task of the running loop (the same task if already running)."""
        if self._task is None or self._task.done():
            self._stop.clear()
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"idis-enrichment-{self.worker_id}"
            )
        return self._task

    def request_stop(self) -> None:
        """Ask :meth:`run` / :meth:`drain` to stop after the request in hand (signal-safe)."""
        self._stop.set()

    async def stop(self) -> None:
        """Ask the loop to stop after the request in hand and wait for the task."""
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def aclose(self) -> None:
        """Stop, then close the gateway and engine the worker created (not ones passed in).

        Leases a failed pass left with this worker are given back first (best effort: the
        database may still be down), so they do not lapse into takeovers counted against
        their requests as if the worker had died.
        """
        await self.stop()
        with contextlib.suppress(IntegrationError):  # best effort: the database may be down
            await self._give_back_own()
        while self._closers:
            await self._closers.pop()()

    async def __aenter__(self) -> AsyncDeferredEnrichmentWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def run_deferred(
    settings: Settings | None = None,
    *,
    once: bool = False,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
    worker_id: str | None = None,
    on_refreshed: Iterable[RefreshedCallback] = (),
) -> RunStats:
    """Run deferred enrichments under ``asyncio.run`` (``enrichment run-deferred``).

    Builds its own gateway and engine from ``settings``. Not for code already
    inside an event loop: run :class:`AsyncDeferredEnrichmentWorker` there.

    Args:
        settings: Library settings (default: from the environment).
        once: Drain what can run now, then return; otherwise run until SIGTERM/SIGINT
            (finishing the request in hand).
        metrics: Metrics to record into.
        clock: Time source.
        worker_id: Lease owner name.
        on_refreshed: Callbacks called after each refresh committed.

    Returns:
        The accumulated counts.

    Raises:
        StorageError: with ``once``, the database is unreachable.
    """

    async def main() -> RunStats:
        worker = AsyncDeferredEnrichmentWorker(
            settings, metrics=metrics, clock=clock, worker_id=worker_id, on_refreshed=on_refreshed
        )
        try:
            with stop_on_signals(worker.request_stop):
                return await (worker.drain() if once else worker.run())
        finally:
            await worker.aclose()

    return asyncio.run(main())
