"""The inbound webhook receiver: framework-free ``handle()`` and an ASGI app.

One request goes through: route (``/{provider}``, the whole path) → provider
lookup → body size limit and read deadline → the provider's verification scheme
(Standard Webhooks by default) → strict JSON → event(s) →
:func:`~idis.integrations.sync._inbox.apply_events` in a transaction.

**Pack-defined bodies.** A provider whose pack is not ``generic``
(``IDIS_PROVIDER_<NAME>_API=hubspot``) is verified with the pack's scheme
(``pack.webhook_scheme``, unless ``schemes=`` names another) and its body is
split by the pack (``pack.webhook_events``): HubSpot POSTs a JSON array of
events, and all of them are applied in one inbox batch, in the same
transaction (all or nothing). A batch that is not the pack's shape, or any
element that is not an event, is a 400 ``invalid_event`` naming the element
and the field, and nothing of it is applied. The answer of a batch counts its
outcomes (``{"status": "accepted", "events": {"accepted": 3, "duplicate": 1}}``).

**Data-less notifications.** A pack with ``webhook_triggers_fetch(headers)``
(Google Drive) sends no data: after verification the body is not read; a
``sync`` handshake is answered 200 ``ignored``, anything else runs one changes
fetch for the provider from its stored cursor (the poller's ``poll_once``,
source ``webhook``) with the adapter given in ``feeds=``, answered 200
``fetched`` with the outcomes counted, or 503 when the provider failed.
The answer makes providers behave:

* **2xx** for accepted events and for duplicates, superseded versions and
  event types without a handler (all acknowledged, none applied twice);
* **4xx** for what the provider must not retry as is: bad or missing
  signature headers, stale or absurd timestamps, oversized or malformed bodies
  (see :data:`~idis.integrations.webhooks._verify.REASON_STATUS`), unknown
  provider; **408** for a body that did not arrive within
  ``IDIS_WEBHOOK_BODY_TIMEOUT`` (a slow client never holds a connection forever);
* **5xx** only for our own transient faults (database down: 503; a host
  handler that raised: 500), so the provider retries and nothing is lost.

Every request is counted in ``integration_webhooks_received_total{provider,
outcome}``, rejections and internal errors included. Nothing secret is logged:
no header values except the delivery id, no body. Signature failures (bad
signature, stale timestamp) are also counted in a one-minute window per
provider; :meth:`WebhookReceiver.signature_failures` feeds the mode controller,
and crossing ``signature_failure_threshold`` is persisted so the replica
running the controller sees it too.

**Group commit.** Deliveries that arrive while a transaction runs are applied
together in the next one. One transaction runs at a time: on a CPU-bound
machine another concurrent one would split arrivals into batches of one or two
and pay a transaction's fixed cost for each. On PostgreSQL, whose commits
overlap, another starts beside it (up to :data:`PARALLEL_BATCHES`) when the
running ones cannot keep up: a full batch waits, or one has run longer than
:data:`SLOW_BATCH` (see :class:`_Pace`); SQLite has a single writer. While busy,
a group commit on an event loop (the ASGI apps, :class:`AsyncWebhookReceiver`)
waits up to ``IDIS_WEBHOOK_BATCH_LINGER`` for its next batch to be as large as
recent ones. Under load this replaces one transaction per webhook with one per
batch, the difference between a receiver that keeps up with a provider's burst
and one that does not; an idle receiver still commits each delivery at once.
When anything in a batch fails (a handler raises, the commit fails), the batch
is rolled back whole and its deliveries are applied one by one, so a failing
delivery fails alone (500 or 503) and the others are applied. A handler may
therefore run again for an event whose first run was rolled back, which is
harmless for handlers written, as they must be, as upserts of the event's state
inside the session (see ``docs/sync.md``). A redelivery of an event this
receiver already committed is answered from memory, without a transaction.

**Where a batch runs.** :class:`WebhookReceiver`: in a thread, on its engine.
:class:`AsyncWebhookReceiver`: a batch none of whose events has an async handler
runs whole in one hop to a thread, on a blocking twin of its engine
(``db._engine.blocking_twin`` with a pool of its own); one with an async handler
runs on the ``AsyncSession``. Either way the inbox's statements go to the
driver's cursor when nothing watches SQLAlchemy's execution (see
``sync._inbox._driver``). The twin pre-pings only connections idle for more
than :data:`PING_IDLE` (``db._engine.ping_idle_only``; the host's engine keeps
its own pre-ping); a delivery whose transaction lost its connection (a
restarted PostgreSQL) is retried once.

Both faces run the same flow (:meth:`_ReceiverBase._receive`), driven by
:func:`~idis.integrations._flow.drive` or :func:`~idis.integrations._flow.adrive`.

Mounting::

    receiver = WebhookReceiver(settings, engine)            # sync handlers
    app.mount("/webhooks", receiver.asgi_app())              # POST /webhooks/{provider}

    receiver = AsyncWebhookReceiver(settings, async_engine)  # async handlers
    app.mount("/webhooks", receiver.asgi_app())
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .._clock import Clock, system_clock
from .._flow import Effect, Flow, adrive, drive
from ..config import Settings
from ..db._engine import blocking_twin, ping_idle_only
from ..exceptions import (
    AuthError,
    ConfigError,
    ProviderError,
    StorageError,
    WebhookVerificationError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ..sync._events import event_from_payload, ordering_of
from ..sync._inbox import (
    ApplyOutcome,
    ApplyResult,
    HandlerRegistry,
    _CountingSession,
    apply_events,
    apply_events_async,
    get_registry,
)
from ._verify import (
    REASON_STATUS,
    InboundRequest,
    StandardWebhooksScheme,
    VerificationScheme,
    check_body_size,
    normalize_headers,
    parse_json_strict,
    parse_json_value,
)

__all__ = ["AsyncWebhookReceiver", "WebhookReceiver", "WebhookResult"]

_log = get_logger()

#: Rejections that count as signature failures for the mode controller.
SIGNATURE_FAILURE_REASONS = frozenset({"bad_signature", "stale_timestamp"})
_WINDOW = timedelta(minutes=1)
#: Most deliveries one transaction applies (a burst is split into batches of this size).
MAX_BATCH = 32
#: Batches in flight at once on PostgreSQL (its commits overlap); SQLite has one writer.
PARALLEL_BATCHES = 4
#: Batches whose largest size a lingering group commit waits for (see ``_LoopCommitter``).
RECENT_BATCHES = 8
#: Seconds a batch runs before another may start beside it (see :class:`_Pace`).
SLOW_BATCH = 0.05
#: Recently committed webhook events remembered per receiver, to answer redeliveries.
RECENT_EVENTS = 16_384
#: Seconds since the pool got a connection back within which the receiver's checkouts skip
#: the pre-ping (see ``db._engine.ping_idle_only``; a lost connection is retried once).
PING_IDLE = 1.0
#: Seconds a batch thread of an ASGI app waits for work before it ends (see ``_BatchThreads``).
_IDLE_THREAD = 10.0
#: The route under the mount point: one provider name, as config.py allows it.
_ROUTE = re.compile(r"/([a-z][a-z0-9_]{0,62})/?")

Headers = Mapping[str, str] | Iterable[tuple[bytes | str, bytes | str]]


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """What the receiver answered, and why."""

    #: HTTP status to send.
    status_code: int
    #: Bounded outcome, also the metric label: ``accepted``, ``duplicate``,
    #: ``superseded``, ``ignored``, a rejection reason, ``unknown_provider``,
    #: ``body_timeout``, ``unavailable``, ``handler_error`` or ``internal_error``.
    outcome: str
    #: The provider's event id, once the body was parsed.
    event_id: str | None = None
    #: The delivery's message id (``webhook-id``), once verified.
    message_id: str | None = None
    #: Human-readable detail (never a secret or the body).
    detail: str | None = None
    #: A batched body's outcomes, counted (``{"accepted": 3, "duplicate": 1}``).
    counts: Mapping[str, int] | None = None

    @property
    def ok(self) -> bool:
        """Whether the provider should consider the delivery done (2xx)."""
        return 200 <= self.status_code < 300

    def body(self) -> bytes:
        """The JSON response body."""
        doc: dict[str, Any] = {"status": self.outcome}
        if self.event_id is not None:
            doc["event_id"] = self.event_id
        if self.counts is not None:
            doc["events"] = dict(self.counts)
        if self.detail is not None and not self.ok:
            doc["error"] = self.detail
        return json.dumps(doc).encode()


@dataclass(frozen=True, slots=True)
class _Verified:
    provider: str
    #: The request's events: one, or a pack's batch (HubSpot), applied together.
    events: tuple[Any, ...]
    message_id: str | None
    now: datetime
    #: Whether the body was a batch (the answer then counts outcomes).
    batch: bool = False
    #: A data-less notification that means "fetch the changes feed now" (Google Drive).
    fetch: bool = False


class _Job:
    """One verified delivery waiting for (or holding) its place in a batch."""

    __slots__ = ("batch", "error", "finished", "outcome", "verified", "wake")

    def __init__(self, verified: _Verified) -> None:
        self.verified = verified
        self.outcome: list[ApplyOutcome] | None = None
        self.error: BaseException | None = None
        #: Thread committer: set when the job is done, or when its thread must lead.
        self.wake: threading.Event | None = None
        #: Thread committer: the batch this job's thread leads, once it leads.
        self.batch: list[_Job] | None = None
        #: Thread committer: set (before ``wake``) once another leader's batch ended.
        self.finished = False

    def result(self) -> list[ApplyOutcome]:
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise RuntimeError("the delivery's batch ended without an outcome")
        return self.outcome


class _SignatureWindow:
    """Signature failures per provider over the last minute (thread-safe)."""

    def __init__(self) -> None:
        self._times: dict[str, deque[datetime]] = {}
        self._lock = threading.Lock()

    def add(self, provider: str, now: datetime) -> int:
        with self._lock:
            times = self._times.setdefault(provider, deque())
            times.append(now)
            return self._trim(times, now)

    def count(self, provider: str, now: datetime) -> int:
        with self._lock:
            times = self._times.get(provider)
            return self._trim(times, now) if times else 0

    @staticmethod
    def _trim(times: deque[datetime], now: datetime) -> int:
        while times and times[0] <= now - _WINDOW:
            times.popleft()
        return len(times)


# --------------------------------------------------------------------------- group commit


class _Pace:
    """When a committer runs another transaction beside the running ones, and its counts.

    An idle committer starts a delivery's transaction at once. While one runs,
    arrivals wait and go together in the next batch: on a CPU-bound machine
    (the receiver, its HTTP clients and the database sharing a few cores)
    another concurrent transaction would split arrivals into small batches and
    pay a transaction's fixed cost (pool checkout, ``BEGIN``, statements,
    ``COMMIT``, a thread hop) once per one or two deliveries. Another one starts
    only when the running ones cannot keep up: a full batch (:data:`MAX_BATCH`)
    is waiting, or a running batch has taken longer than :data:`SLOW_BATCH`
    seconds (a lock wait on PostgreSQL), up to ``parallel`` at once.
    """

    __slots__ = ("_parallel", "_starts", "batches", "deliveries")

    def __init__(self, parallel: int) -> None:
        self._parallel = parallel
        #: Start times (monotonic) of the running batches, by a token per batch.
        self._starts: dict[object, float] = {}
        #: Batches run and deliveries they held (``deliveries / batches``: mean batch size).
        self.batches = 0
        self.deliveries = 0

    def more(self, running: int, waiting: int) -> bool:
        """Whether to start another transaction, ``running`` running and ``waiting`` queued."""
        if running == 0:
            return True
        if running >= self._parallel:
            return False
        if waiting >= MAX_BATCH:
            return True
        starts = self._starts
        return bool(starts) and time.monotonic() - min(starts.values()) > SLOW_BATCH

    def started(self, token: object, size: int) -> None:
        self._starts[token] = time.monotonic()
        self.batches += 1
        self.deliveries += size

    def ended(self, token: object) -> None:
        self._starts.pop(token, None)


class _ThreadCommitter:
    """Group commit for threads: leaders apply batches, the other threads wait.

    A delivery finding no leader leads: it takes the queue's head (its own job
    first) as one batch. The others wait, unless the running batches cannot
    keep up (see :class:`_Pace`): then, up to ``parallel`` threads lead. A
    leader that finishes wakes its batch's owners and, if deliveries are
    waiting, hands the lead to the oldest one with that one's batch already
    taken from the queue (so no thread serves others for long, and no two
    leaders share a job).
    """

    def __init__(self, run: Callable[[list[_Job]], None], parallel: int) -> None:
        self._run = run
        self.pace = _Pace(parallel)
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._leaders = 0

    def _take(self) -> list[_Job]:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
        self.pace.started(batch[0], len(batch))
        return batch

    def submit(self, job: _Job) -> None:
        """Apply ``job`` in some batch; return once its outcome or error is set."""
        job.wake = threading.Event()
        with self._lock:
            self._queue.append(job)
            if self.pace.more(self._leaders, len(self._queue)):
                # The queue's head leads: the oldest waiting delivery, with its company.
                self._leaders += 1
                head = self._queue[0]
                head.batch = self._take()
                if head is not job and head.wake is not None:
                    head.wake.set()
        while job.batch is None:
            job.wake.wait()
            job.wake.clear()
            if job.finished:
                return  # another leader applied it
        batch = job.batch
        try:
            self._run(batch)
        finally:
            with self._lock:
                self.pace.ended(batch[0])
                successor = self._queue[0] if self._queue else None
                if successor is not None:
                    successor.batch = self._take()
                else:
                    self._leaders -= 1
            for done in batch:
                if done is not job and done.wake is not None:
                    done.finished = True
                    done.wake.set()
            if successor is not None and successor.wake is not None:
                successor.wake.set()


class _LoopCommitter:
    """Group commit on one event loop: drain tasks apply batches (see :class:`_Pace`).

    The drain tasks belong to no request, so a cancelled request (a client that
    went away) never strands the other deliveries of its batch.
    """

    def __init__(
        self, run: Callable[[list[_Job]], Awaitable[None]], parallel: int, linger: float = 0.0
    ) -> None:
        self._run = run
        self.pace = _Pace(parallel)
        #: Seconds a busy drain waits for company (``IDIS_WEBHOOK_BATCH_LINGER``).
        self._linger = linger
        #: While a drain lingers: resolved once ``_wanted`` deliveries wait.
        self._gathering: asyncio.Future[None] | None = None
        self._wanted = 0
        #: Sizes of the last batches: a lingering drain waits for as many as the largest.
        self._sizes: deque[int] = deque(maxlen=RECENT_BATCHES)
        self._queue: deque[tuple[_Job, asyncio.Future[None]]] = deque()
        # Drain tasks running; counted down inside the task itself (not by a done
        # callback, which runs later: a delivery arriving in between would wait forever).
        self._draining = 0
        # Strong references: the loop keeps only weak ones to its tasks.
        self._drainers: set[asyncio.Task[None]] = set()

    async def submit(self, job: _Job) -> None:
        """Apply ``job`` in some batch; return once its outcome or error is set."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((job, done))
        gathering = self._gathering
        if gathering is not None and len(self._queue) >= self._wanted and not gathering.done():
            gathering.set_result(None)  # the lingering batch is as large as the last one
        if self.pace.more(self._draining, len(self._queue)):
            self._draining += 1
            task = loop.create_task(self._drain())
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)
        await done

    async def _gather(self, wanted: int) -> None:
        """Linger while busy: wait up to the linger for ``wanted`` deliveries to queue.

        Called only right after a batch committed, with some deliveries but fewer
        than the largest of the last :data:`RECENT_BATCHES` batches waiting:
        under a steady stream the next batch is then about as large as those
        instead of holding the one or two that arrived meanwhile (each
        transaction has a fixed cost). A receiver whose recent batches held one
        delivery each never lingers, nor does one with nothing waiting (its
        drain ends), so an idle receiver starts a delivery's transaction at once.
        """
        loop = asyncio.get_running_loop()
        gathering: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self._linger, _resolve, gathering)
        self._gathering, self._wanted = gathering, wanted
        try:
            await gathering
        finally:
            timer.cancel()
            self._gathering = None

    async def _drain(self) -> None:
        batch: list[tuple[_Job, asyncio.Future[None]]] = []
        token = object()
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
                # A delivery whose request was cancelled before its batch started is dropped.
                jobs = [job for job, done in batch if not done.cancelled()]
                if jobs:
                    self.pace.started(token, len(jobs))
                    try:
                        await self._run(jobs)
                    finally:
                        self.pace.ended(token)
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)
                batch = []
                self._sizes.append(len(jobs))
                if self._linger > 0 and self._gathering is None and self._queue:
                    # (Not while another drain lingers: one gathers for both.)
                    wanted = max(self._sizes)
                    if len(self._queue) < wanted:
                        await self._gather(wanted)
        finally:
            self._draining -= 1
            # Only on loop shutdown: no delivery may wait for a drain that is gone.
            for _, done in batch:
                done.cancel()
            if self._draining == 0:
                for _, done in self._queue:
                    done.cancel()
                self._queue.clear()


def _resolve(future: asyncio.Future[None], error: BaseException | None = None) -> None:
    """Settle ``future`` (with ``error`` raised, if given) unless it already is."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _BatchThreads:
    """Threads that run an event loop's batch transactions (``WebhookReceiver.asgi_app``).

    One hand-off each way per batch: a ``SimpleQueue.put`` to a waiting thread and
    one ``call_soon_threadsafe`` back. ``anyio.to_thread.run_sync`` costs about
    2.5 times as much CPU per call (a capacity limiter, a ``queue.Queue`` whose
    ``Condition`` wakes the worker, a cancel scope), paid on the loop once per batch.
    At most ``limit`` threads (the committer's parallel batches); one idle for
    :data:`_IDLE_THREAD` seconds ends, so an idle receiver holds no thread.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tasks: queue.SimpleQueue[
            tuple[Callable[[list[_Job]], None], list[_Job], asyncio.AbstractEventLoop, Any]
        ] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Threads alive, those waiting for a task, and tasks queued but not yet taken.
        self._threads = 0
        self._waiting = 0
        self._pending = 0

    async def run(self, fn: Callable[[list[_Job]], None], jobs: list[_Job]) -> None:
        """``fn(jobs)`` in one of the threads; raises what it raised."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._pending >= self._waiting and self._threads < self._limit:
                # Every waiting thread has a task already: one more thread.
                self._threads += 1
                self._waiting += 1
                try:
                    threading.Thread(
                        target=self._work, name="idis-webhook-batches", daemon=True
                    ).start()
                except BaseException:
                    # No thread to be had: nothing queued, the drain answers the error.
                    self._threads -= 1
                    self._waiting -= 1
                    raise
            self._pending += 1
            self._tasks.put((fn, jobs, loop, done))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # As anyio's run_sync: a cancelled caller (loop shutdown) still waits
            # for the transaction it started, so its outcome is never unknown.
            with contextlib.suppress(BaseException):
                await done
            raise

    def _work(self) -> None:
        while True:
            try:
                fn, jobs, loop, done = self._tasks.get(timeout=_IDLE_THREAD)
            except queue.Empty:
                with self._lock:
                    if not self._pending:
                        # Idle, and no queued task counts on this thread: end.
                        self._waiting -= 1
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._waiting -= 1
                self._pending -= 1
            error: BaseException | None = None
            try:
                fn(jobs)
            except BaseException as exc:  # noqa: BLE001  # handed to the awaiting drain
                error = exc
            with self._lock:
                self._waiting += 1
            # A closed loop (RuntimeError) has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done, error)
            del fn, jobs, done, error


# --------------------------------------------------------------------------- flow effects


@dataclass(frozen=True, slots=True)
class _Submit(Effect[list[ApplyOutcome]]):
    """Apply one verified delivery (all its events) through the io's committer (one transaction)."""

    verified: _Verified

    def run(self, io: Any) -> list[ApplyOutcome]:
        job = _Job(self.verified)
        io.committer.submit(job)
        return job.result()

    async def arun(self, io: Any) -> list[ApplyOutcome]:
        job = _Job(self.verified)
        await io.committer.submit(job)
        return job.result()


@dataclass(frozen=True, slots=True)
class _SaveSpike(Effect[None]):
    """Persist a signature-failure spike; a failure is logged, never raised."""

    provider: str
    at: datetime

    def run(self, io: Any) -> None:
        try:
            io.save_spike(self.provider, self.at)
        except Exception as exc:  # noqa: BLE001  # the in-process count still feeds the controller
            _log.warning("idis.webhooks.spike_not_saved", error_type=type(exc).__name__)

    async def arun(self, io: Any) -> None:
        try:
            await io.save_spike(self.provider, self.at)
        except Exception as exc:  # noqa: BLE001  # the in-process count still feeds the controller
            _log.warning("idis.webhooks.spike_not_saved", error_type=type(exc).__name__)


@dataclass(frozen=True, slots=True)
class _Fetch(Effect[Any]):
    """Fetch a provider's changes feed from its stored cursor and apply it (a ``PollResult``)."""

    provider: str

    def run(self, io: Any) -> Any:
        return io.fetch(self.provider)

    async def arun(self, io: Any) -> Any:
        return await io.fetch(self.provider)


@dataclass(frozen=True, slots=True)
class _Together(Effect[None]):
    """Apply deliveries in one transaction; the io is the face's ``_apply_together``."""

    jobs: list[_Job]

    def run(self, io: Any) -> None:
        io(self.jobs)

    async def arun(self, io: Any) -> None:
        await io(self.jobs)


@dataclass(frozen=True, slots=True)
class _IO:
    """What the flow's effects run against: a committer, a way to save a spike, a fetch."""

    committer: Any
    save_spike: Callable[[str, datetime], Any]
    fetch: Callable[[str], Any] | None = None


class _ReceiverBase:
    """Verification, the receive flow and bookkeeping shared by both receivers (no I/O)."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: HandlerRegistry | None,
        schemes: Mapping[str, VerificationScheme] | None,
        providers: Iterable[str] | None,
        clock: Clock | None,
        metrics: Metrics | None,
        feeds: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        #: Provider → the pack's adapter whose changes a data-less notification fetches.
        self.feeds: dict[str, Any] = dict(feeds or {})
        self.clock: Clock = clock or system_clock
        self._metrics = metrics
        names = list(providers) if providers is not None else None
        given = dict(schemes or {})
        self.schemes: dict[str, VerificationScheme] = {}
        candidates = names if names is not None else list(settings.providers)
        #: Providers whose pack defines the body (and, unless ``schemes`` says otherwise,
        #: the signature): HubSpot's batches. The generic pack's shape is the default.
        self.packs: dict[str, Any] = {}
        for name in candidates:
            pack = _pack_of(settings, name)
            if pack is not None:
                self.packs[name] = pack
            if name in given:
                self.schemes[name] = given[name]
                continue
            # Refuses the embedded simulator secret (published) without the opt-in.
            secrets = settings.checked_webhook_secrets(name, use="verify")
            if pack is not None:
                scheme = pack.webhook_scheme(settings.provider(name))
                if scheme is not None:
                    self.schemes[name] = scheme
                elif names is not None:
                    env = f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS"
                    if pack.capabilities.webhooks is None:
                        raise ConfigError(
                            f"provider {name!r} speaks the {pack.name} API, which sends no "
                            "webhooks: serve it by polling",
                            variable=f"IDIS_PROVIDER_{name.upper()}_API",
                        )
                    raise ConfigError(
                        f"provider {name!r} ({pack.name} pack) has no webhook secret: set {env}",
                        variable=env,
                    )
                continue
            if not secrets:
                if names is not None:
                    # Asked for explicitly: refuse to start rather than 4xx every delivery.
                    env = f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS"
                    raise ConfigError(
                        f"provider {name!r} has no webhook secret: set {env}", variable=env
                    )
                continue
            self.schemes[name] = StandardWebhooksScheme(
                secrets,
                tolerance=settings.webhooks.tolerance,
                label=f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS",
            )
        for name, given_scheme in given.items():
            self.schemes.setdefault(name, given_scheme)
            if name not in self.packs:
                pack = _pack_of(settings, name)
                if pack is not None:
                    self.packs[name] = pack
        self.max_body_bytes = settings.webhooks.max_body_bytes
        self.body_timeout = settings.webhooks.body_timeout.total_seconds()
        self.batch_linger = settings.webhooks.batch_linger.total_seconds()
        self.threshold = settings.sync.signature_failure_threshold
        self._signature_failures = _SignatureWindow()
        self._spike_noted: dict[str, datetime] = {}
        self._spike_lock = threading.Lock()
        self._spikes: deque[tuple[str, datetime]] = deque()
        # (provider, event id) of webhook deliveries this receiver committed: a
        # redelivery of one is a duplicate without a transaction. Only committed
        # events enter, so an answer from here is what the inbox would give.
        self._recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._recent_lock = threading.Lock()
        #: The group committers of ``handle()`` and of each ASGI app (their batch counts).
        self._committers: list[Any] = []

    def _batch_counts(self) -> tuple[int, int]:
        """Group-committed batches run so far and the deliveries they held (all faces)."""
        paces = [committer.pace for committer in self._committers]
        return sum(p.batches for p in paces), sum(p.deliveries for p in paces)

    @property
    def metrics(self) -> Metrics:
        """The metrics this component records into."""
        return self._metrics if self._metrics is not None else get_metrics()

    def _count(self, provider: str, outcome: str) -> None:
        """Count one answer in ``integration_webhooks_received_total``."""
        self.metrics.child("webhooks_received", provider, outcome).inc()

    def signature_failures(self, provider: str, now: datetime | None = None) -> int:
        """Bad signatures and stale timestamps for ``provider`` in the last minute."""
        return self._signature_failures.count(provider, now or self.clock.now())

    def _receive(
        self, provider: str, headers: Headers, body: bytes, method: str, uri: str | None
    ) -> Flow[WebhookResult]:
        """The one receive flow: verify, save a spike if one is due, apply, answer."""
        verified = self._verify(provider, headers, body, method, uri)
        spike = self._take_spike()
        if spike is not None:
            yield _SaveSpike(*spike)
        if isinstance(verified, WebhookResult):
            return verified
        if verified.fetch:
            if verified.provider not in self.feeds:
                return self._nothing(verified, unfed=True)
            try:
                polled = yield _Fetch(verified.provider)
            except Exception as exc:  # noqa: BLE001  # any failure is answered, never raised
                return self._failed(verified, exc)
            return self._fetched(verified, polled)
        if not verified.events:
            return self._nothing(verified)
        if self._seen(verified):
            return self._applied(verified, [ApplyOutcome.DUPLICATE] * len(verified.events))
        try:
            outcomes: list[ApplyOutcome] = yield _Submit(verified)
        except Exception as exc:  # noqa: BLE001  # any failure is answered, never raised
            return self._failed(verified, exc)
        return self._applied(verified, outcomes)

    def _verify(
        self, provider: str, headers: Headers, body: bytes, method: str, uri: str | None
    ) -> _Verified | WebhookResult:
        now = self.clock.now()
        scheme = self.schemes.get(provider)
        if scheme is None:
            return self._reject(provider, "unknown_provider", 404, "no such webhook provider")
        request = InboundRequest(
            method=method.upper(),
            uri=uri if uri is not None else f"/{provider}",
            headers=normalize_headers(headers),
            body=body,
        )
        message_id: str | None = None
        pack = self.packs.get(provider)
        try:
            check_body_size(body, self.max_body_bytes)
            message_id = scheme.verify(request, now)
            if pack is not None and callable(getattr(pack, "webhook_triggers_fetch", None)):
                # A data-less notification (Google Drive): the body is not read.
                fetch = bool(pack.webhook_triggers_fetch(request.headers))
                return _Verified(provider, (), message_id, now, batch=True, fetch=fetch)
            if pack is not None:
                # The pack's body shape (HubSpot: a JSON array of events), strictly parsed first.
                parse_json_value(body)
                events = _pack_events(pack, body, provider)
                return _Verified(provider, tuple(events), message_id, now, batch=True)
            payload = parse_json_strict(body)
            event = event_from_payload(payload, ordering=ordering_of(self.settings, provider))
        except WebhookVerificationError as exc:
            if exc.reason in SIGNATURE_FAILURE_REASONS:
                self._signature_failed(provider, now)
            status = REASON_STATUS.get(exc.reason, 400)
            return self._reject(provider, exc.reason, status, str(exc), message_id)
        return _Verified(provider, (event,), message_id, now)

    def _signature_failed(self, provider: str, now: datetime) -> None:
        count = self._signature_failures.add(provider, now)
        if count >= self.threshold:
            with self._spike_lock:
                last = self._spike_noted.get(provider)
                if last is None or now - last >= _WINDOW:
                    # Persisted at most once a minute per provider, so a flood of
                    # forged requests costs no more than one write a minute.
                    self._spike_noted[provider] = now
                    self._spikes.append((provider, now))

    def _take_spike(self) -> tuple[str, datetime] | None:
        try:
            return self._spikes.popleft()
        except IndexError:
            return None

    def _reject(
        self,
        provider: str,
        outcome: str,
        status: int,
        detail: str,
        message_id: str | None = None,
    ) -> WebhookResult:
        label = provider if provider in self.schemes else "unknown"
        self._count(label, outcome)
        _log.warning(
            "idis.webhooks.rejected",
            msg=f"webhook rejected: {detail}",
            provider=label,
            reason=outcome,
            status_code=status,
            webhook_id=message_id,
        )
        return WebhookResult(status, outcome, message_id=message_id, detail=detail)

    def _seen(self, verified: _Verified) -> bool:
        with self._recent_lock:
            return all((verified.provider, str(e.id)) in self._recent for e in verified.events)

    def _remember(self, verified: _Verified) -> None:
        with self._recent_lock:
            for event in verified.events:
                self._recent[(verified.provider, str(event.id))] = None
            while len(self._recent) > RECENT_EVENTS:
                self._recent.popitem(last=False)

    def _applied(self, verified: _Verified, outcomes: list[ApplyOutcome]) -> WebhookResult:
        # Whatever the outcome, the events' inbox rows are committed with their webhook stamp.
        self._remember(verified)
        provider = verified.provider
        labels = ["accepted" if o is ApplyOutcome.APPLIED else o.value for o in outcomes]
        # A batch is "accepted" when any of its events was applied, else its first outcome.
        label = "accepted" if "accepted" in labels else labels[0]
        self._count(provider, label)
        event_id = _first_id(verified)
        counts: dict[str, int] | None = None
        if verified.batch:
            counts = {}
            for name in labels:
                counts[name] = counts.get(name, 0) + 1
        _log.debug(
            "idis.webhooks.received",
            provider=provider,
            outcome=label,
            event_id=event_id,
            events=len(outcomes),
            webhook_id=verified.message_id,
        )
        return WebhookResult(
            200, label, event_id=event_id, message_id=verified.message_id, counts=counts
        )

    def _nothing(self, verified: _Verified, *, unfed: bool = False) -> WebhookResult:
        """A verified request that carries no event (a channel handshake): 200, nothing applied.

        ``unfed``: a notification that asks for a fetch, but the receiver was given no
        feed for the provider (``feeds=``); the poller and the sentinel still catch up.
        """
        self._count(verified.provider, "ignored")
        if unfed:
            _log.warning(
                "idis.webhooks.no_feed",
                msg="notification asks for a changes fetch, but the receiver has no feed for "
                "this provider (pass feeds=); the poller will catch up",
                provider=verified.provider,
            )
        return WebhookResult(200, "ignored", message_id=verified.message_id, counts={})

    def _fetched(self, verified: _Verified, polled: Any) -> WebhookResult:
        """A notification whose changes fetch ran: 200 with the fetch's outcomes counted."""
        counts = {
            "accepted": int(polled.applied),
            "duplicate": int(polled.duplicates),
            "superseded": int(polled.superseded),
            "ignored": int(polled.ignored),
        }
        label = "fetched"
        self._count(verified.provider, label)
        _log.debug(
            "idis.webhooks.fetched",
            provider=verified.provider,
            fetched=int(polled.fetched),
            applied=int(polled.applied),
            webhook_id=verified.message_id,
        )
        return WebhookResult(
            200,
            label,
            message_id=verified.message_id,
            counts={k: v for k, v in counts.items() if v},
        )

    def _failed(self, verified: _Verified, exc: BaseException) -> WebhookResult:
        provider = verified.provider
        event_id = _first_id(verified)
        transient = isinstance(
            exc, OperationalError | StorageError | ProviderError | AuthError
        ) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        outcome, status = ("unavailable", 503) if transient else ("handler_error", 500)
        self._count(provider, outcome)
        # The exception's type only: its text may quote the host's data.
        _log.error(
            "idis.webhooks.failed",
            msg="webhook not applied; the provider will retry",
            provider=provider,
            outcome=outcome,
            event_id=event_id,
            webhook_id=verified.message_id,
            error_type=type(exc).__name__,
        )
        return WebhookResult(
            status,
            outcome,
            event_id=event_id,
            message_id=verified.message_id,
            detail="temporarily unable to apply the event" if transient else "event not applied",
        )

    def _internal_error(self, provider: str, exc: BaseException) -> WebhookResult:
        # Last resort: a bug must not crash the app, and is counted like any answer.
        label = provider if provider in self.schemes else "unknown"
        self._count(label, "internal_error")
        _log.error("idis.webhooks.internal_error", provider=label, error_type=type(exc).__name__)
        return WebhookResult(500, "internal_error", detail="internal error")

    @staticmethod
    def _batch_flow(jobs: list[_Job]) -> Flow[None]:
        """Apply a batch of deliveries: together, or, when anything of it failed, one by one.

        Yields :class:`_Together` (one transaction) against the face's
        ``_apply_together``. A batch in which anything failed was rolled back
        whole; each delivery is then applied alone, so a failing one fails alone
        (its error answered 500 or 503 by the receive flow) and the others apply.
        """
        if len(jobs) > 1:
            try:
                yield _Together(jobs)
                return
            except Exception:  # noqa: BLE001, S110  # rolled back whole: each delivery alone below
                pass
        for job in jobs:
            for attempt in (1, 2):
                try:
                    yield _Together([job])
                except Exception as exc:  # noqa: BLE001  # answered by the flow (500 or 503)
                    if attempt == 1 and isinstance(exc, DBAPIError) and exc.connection_invalidated:
                        # A connection the server dropped (a restart): the pool connects
                        # afresh; nothing of the transaction was kept, or, if its COMMIT
                        # went through unacknowledged, the inbox answers duplicates.
                        continue
                    job.error = exc
                break

    async def _arun(
        self, io: _IO, provider: str, headers: Headers, body: bytes, *, method: str, uri: str | None
    ) -> WebhookResult:
        try:
            return await adrive(self._receive(provider, headers, body, method, uri), io)
        except Exception as exc:  # noqa: BLE001  # last resort, see _internal_error
            return self._internal_error(provider, exc)

    async def _notification_fetch(self, feed: Any, sessions: Any, provider: str) -> Any:
        """Fetch the changes a data-less notification announced, applied as the webhook channel."""
        from ..sync._poller import Poller

        poller = Poller(
            feed,
            sessions,
            self.settings,
            provider,
            registry=self.registry,
            clock=self.clock,
            metrics=self._metrics,
            source="webhook",
        )
        return await poller.poll_once()


class _InPlaceFeed:
    """A sync adapter as the poller's async feed, called in place (on a private loop)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        accepts = getattr(client, "accepts_cursor", None)
        if callable(accepts):
            self.accepts_cursor = accepts

    async def changes(self, **kwargs: Any) -> Any:
        return self._client.changes(**kwargs)


def _first_id(verified: _Verified) -> str | None:
    return str(verified.events[0].id) if verified.events else None


def _pack_of(settings: Settings, name: str) -> Any:
    """The provider's pack when it is not the generic one (whose shape is the default)."""
    config = settings.providers.get(name)
    if config is None or config.api == "generic":
        return None
    from ..providers._pack import pack_for

    return pack_for(config)


def _pack_events(pack: Any, body: bytes, provider: str) -> list[Any]:
    """The pack's events of one verified body; a malformed one is ``invalid_event`` (400)."""
    from ..exceptions import MalformedResponse

    try:
        return list(pack.webhook_events(body, provider))
    except MalformedResponse as exc:
        raise WebhookVerificationError(
            f"webhook body is invalid: {exc}", reason="invalid_event"
        ) from None


def _events(group: list[_Job]) -> list[Any]:
    return [event for job in group for event in job.verified.events]


def _by_provider(jobs: list[_Job]) -> list[tuple[str, list[_Job]]]:
    """``jobs`` grouped by provider, each group in arrival order.

    One inbox batch per provider: a handful of statements (one ledger read, one
    multi-row claim, one version upsert) for the whole group instead of a
    handful per delivery, the same decisions as applying them one by one.
    """
    groups: dict[str, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.verified.provider, []).append(job)
    return list(groups.items())


def _inbox_calls(
    jobs: list[_Job], registry: HandlerRegistry | None
) -> list[tuple[list[_Job], dict[str, Any]]]:
    """Each provider's jobs with the inbox batch that applies them (``apply_events``' arguments).

    The receiver's transaction is rolled back whole on any error: no savepoint
    (``atomic=False``).
    """
    return [
        (
            group,
            {
                "provider": provider,
                "events": _events(group),
                "source": "webhook",
                "registry": registry,
                "now": group[-1].verified.now,
                "atomic": False,
            },
        )
        for provider, group in _by_provider(jobs)
    ]


def _settle(results: list[tuple[list[_Job], ApplyResult]]) -> None:
    """Give each job its outcome, once the transaction committed."""
    for group, result in results:
        outcomes = list(result.outcomes)
        if len(outcomes) != sum(len(job.verified.events) for job in group):
            raise RuntimeError("the inbox answered a different number of outcomes than events")
        at = 0
        for job in group:
            taken = outcomes[at : at + len(job.verified.events)]
            at += len(taken)
            assert all(o is not None for o in taken)  # not isolated: a failure raised instead
            job.outcome = [o for o in taken if o is not None]


def _apply_blocking(
    sessions: Callable[[], Session],
    lock: threading.Lock | contextlib.nullcontext[None],
    jobs: list[_Job],
    registry: HandlerRegistry | None,
) -> None:
    """Apply ``jobs`` in one blocking ``Session`` transaction, or raise (nothing of them kept)."""
    with lock, sessions() as session, session.begin():
        results = [
            (group, apply_events(session, **call)) for group, call in _inbox_calls(jobs, registry)
        ]
    _settle(results)


def _plain_async_factory(sessions: Any) -> bool:
    """Whether ``sessions`` makes plain ``AsyncSession`` objects on a bound engine and
    nothing else (so a blocking ``Session`` on the same database is the same transaction
    for a sync handler): an ``AsyncEngine``, or ``async_sessionmaker(engine[,
    expire_on_commit=..., autoflush=...])``, as ``AsyncSyncService`` makes."""
    if isinstance(sessions, AsyncEngine):
        return True
    return (
        isinstance(sessions, async_sessionmaker)
        and sessions.class_ is AsyncSession
        and set(sessions.kw) <= {"bind", "expire_on_commit", "autoflush"}
    )


def _as_sessionmaker(target: Engine | sessionmaker[Session] | Callable[[], Session]) -> Any:
    if isinstance(target, Engine):
        return sessionmaker(target, class_=_CountingSession, expire_on_commit=False)
    return target


def _bound_engine(sessions: Any, kind: type[Any]) -> Any:
    bind = sessions if isinstance(sessions, kind) else getattr(sessions, "kw", {}).get("bind")
    return bind if isinstance(bind, kind) else None


class WebhookReceiver(_ReceiverBase):
    """Receives webhooks for every provider with a webhook secret; sync handlers.

    Args:
        settings: Library settings (providers' ``webhook_secrets``, ``webhooks``, ``sync``).
        sessions: An Engine or a session factory; each batch of deliveries gets its
            own transaction.
        registry: Handlers (default: the process-wide registry).
        schemes: Verification scheme per provider, overriding Standard Webhooks.
        providers: Serve only these providers (each must have a secret or a scheme).
        clock: Current time (injectable for tests).
        metrics: Metrics to count in (default: the process-wide set).
        feeds: Provider → its pack's sync adapter (``client_for(gateway, name)``), for
            providers whose notifications carry no data (Google Drive): a ``change``
            notification fetches the adapter's changes from the stored cursor.

    Raises:
        ConfigError: when a provider named in ``providers`` has no secret, a
            secret is malformed, or a secret is the embedded simulator's published
            one without ``IDIS_ALLOW_EMBEDDED_DEFAULTS=true``.

    ``handle()`` is thread-safe; the ASGI app verifies on the event loop and
    applies each batch in a worker thread.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: Engine | sessionmaker[Session] | Callable[[], Session],
        *,
        registry: HandlerRegistry | None = None,
        schemes: Mapping[str, VerificationScheme] | None = None,
        providers: Iterable[str] | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        feeds: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            settings,
            registry=registry,
            schemes=schemes,
            providers=providers,
            clock=clock,
            metrics=metrics,
            feeds=feeds,
        )
        self._sessions = _as_sessionmaker(sessions)
        bind = _bound_engine(sessions, Engine)
        # SQLite has one writer: concurrent batches would otherwise poll its
        # lock with growing sleeps; a Python lock queues them fairly instead.
        sqlite = bind is not None and bind.dialect.name == "sqlite"
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if sqlite else contextlib.nullcontext()
        )
        self._parallel = 1 if sqlite else PARALLEL_BATCHES
        # A notification's changes fetch runs the (async) poller on a private loop over
        # a pool-less async engine of the same database (see _fetch).
        self._db_url = None if bind is None else bind.url.render_as_string(hide_password=False)
        if self.feeds and self._db_url is None:
            raise ConfigError(
                "WebhookReceiver(feeds=...) needs an Engine (or a sessionmaker bound to one): "
                "a notification's changes fetch opens its own connections",
                variable="feeds",
            )
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._fetch_guard = threading.Lock()
        self._io = _IO(
            _ThreadCommitter(self._apply_batch, self._parallel), self._save_spike, self._fetch
        )
        self._committers.append(self._io.committer)

    def handle(
        self,
        provider: str,
        headers: Headers,
        body: bytes,
        *,
        method: str = "POST",
        uri: str | None = None,
    ) -> WebhookResult:
        """Verify and apply one webhook; never raises.

        Args:
            provider: Provider name (from the URL).
            headers: Request headers (mapping or ASGI byte pairs).
            body: The raw body.
            method: HTTP method (signed by some HMAC schemes).
            uri: Path and query as received (signed by some HMAC schemes).
        """
        try:
            return drive(self._receive(provider, headers, body, method, uri), self._io)
        except Exception as exc:  # noqa: BLE001  # last resort, see _internal_error
            return self._internal_error(provider, exc)

    def _apply_batch(self, jobs: list[_Job]) -> None:
        """Apply ``jobs``; set each job's outcome or error (see :meth:`_batch_flow`)."""
        drive(self._batch_flow(jobs), self._apply_together)

    def _apply_together(self, jobs: list[_Job]) -> None:
        """Apply ``jobs`` in one transaction, or raise (nothing of them kept)."""
        _apply_blocking(self._sessions, self._write_lock, jobs, self.registry)

    def _save_spike(self, provider: str, at: datetime) -> None:
        from ..sync._state import note_signature_spike

        with self._sessions() as session, session.begin():
            note_signature_spike(session, provider, at)

    def _fetch(self, provider: str) -> Any:
        """Fetch ``provider``'s changes from its stored cursor and apply them (one at a time).

        The poller is async only: it runs here on a private event loop (this is a
        worker thread: ``handle()``'s caller or the ASGI app's), with the sync feed
        called in place and an async engine without a pool, disposed at the end.
        """
        with self._fetch_guard:
            lock = self._fetch_locks.setdefault(provider, threading.Lock())
        with lock:
            return asyncio.run(self._poll_once(provider))

    async def _poll_once(self, provider: str) -> Any:
        from sqlalchemy.pool import NullPool

        from ..db._engine import create_async_db_engine

        assert self._db_url is not None
        engine = create_async_db_engine(self._db_url, poolclass=NullPool)
        try:
            return await self._notification_fetch(
                _InPlaceFeed(self.feeds[provider]), engine, provider
            )
        finally:
            await engine.dispose()

    def asgi_app(self, provider: str | None = None) -> Callable[..., Awaitable[None]]:
        """An ASGI app: ``POST /{provider}`` (or ``POST /`` for a fixed ``provider``).

        Verification runs on the event loop; each batch's transaction runs in a
        worker thread, so the loop never blocks on the database.
        """
        import anyio.to_thread

        threads = _BatchThreads(self._parallel)

        async def apply(jobs: list[_Job]) -> None:
            await threads.run(self._apply_batch, jobs)

        async def save_spike(name: str, at: datetime) -> None:
            await anyio.to_thread.run_sync(self._save_spike, name, at)

        async def fetch(name: str) -> Any:
            return await anyio.to_thread.run_sync(self._fetch, name)

        committer = _LoopCommitter(apply, self._parallel, self.batch_linger)
        self._committers.append(committer)
        return _make_asgi(self, _IO(committer, save_spike, fetch), provider)


class AsyncWebhookReceiver(_ReceiverBase):
    """The asyncio twin of :class:`WebhookReceiver` (``AsyncEngine``/``async_sessionmaker``).

    Async handlers are awaited; sync ones run through ``AsyncSession.run_sync``.
    One instance serves one event loop. ``feeds`` maps a provider to its pack's async
    adapter (``async_client_for``), as :class:`WebhookReceiver`'s sync ones.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: AsyncEngine | async_sessionmaker[AsyncSession] | Callable[[], AsyncSession],
        *,
        registry: HandlerRegistry | None = None,
        schemes: Mapping[str, VerificationScheme] | None = None,
        providers: Iterable[str] | None = None,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        feeds: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            settings,
            registry=registry,
            schemes=schemes,
            providers=providers,
            clock=clock,
            metrics=metrics,
            feeds=feeds,
        )
        self._sessions: Any = (
            async_sessionmaker(
                sessions, expire_on_commit=False, sync_session_class=_CountingSession
            )
            if isinstance(sessions, AsyncEngine)
            else sessions
        )
        bind = _bound_engine(sessions, AsyncEngine)
        # SQLite has one writer: queue this loop's batches instead of polling its lock.
        sqlite = bind is not None and bind.dialect.name == "sqlite"
        self._write_lock: asyncio.Lock | contextlib.nullcontext[None] = (
            asyncio.Lock() if sqlite else contextlib.nullcontext()
        )
        parallel = 1 if sqlite else PARALLEL_BATCHES
        # A batch whose handlers are all sync runs whole in one hop to a thread, on a
        # blocking twin of the engine (pysqlite, psycopg's blocking connection): aiosqlite
        # would hop to its thread and back for every statement, cursor call and COMMIT,
        # and an AsyncSession adds a greenlet switch per call. Async handlers need the
        # AsyncSession: their batches stay on the engine itself.
        twin = (
            blocking_twin(bind, pool_size=parallel)
            if bind is not None and _plain_async_factory(sessions)
            else None
        )
        if twin is not None:
            # Only the engine the receiver made itself skips pings: the host's engine
            # keeps its own settings for every other user of it.
            ping_idle_only(twin, PING_IDLE)
            # The twin's pooled connections close with the receiver.
            weakref.finalize(self, twin.dispose)
        self._blocking: Any = (
            None
            if twin is None
            else sessionmaker(
                twin,
                class_=_CountingSession,
                expire_on_commit=False,
                # As the host's factory: a handler's queries flush its pending writes, or not.
                autoflush=bool(getattr(sessions, "kw", {}).get("autoflush", True)),
            )
        )
        self._blocking_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if sqlite else contextlib.nullcontext()
        )
        self._threads = _BatchThreads(parallel)
        self._fetch_locks: dict[str, asyncio.Lock] = {}
        self._io = _IO(
            _LoopCommitter(self._apply_batch, parallel, self.batch_linger),
            self._save_spike,
            self._fetch,
        )
        self._committers.append(self._io.committer)

    async def handle(
        self,
        provider: str,
        headers: Headers,
        body: bytes,
        *,
        method: str = "POST",
        uri: str | None = None,
    ) -> WebhookResult:
        """Async twin of :meth:`WebhookReceiver.handle`; never raises."""
        return await self._arun(self._io, provider, headers, body, method=method, uri=uri)

    async def _apply_batch(self, jobs: list[_Job]) -> None:
        """Async twin of :meth:`WebhookReceiver._apply_batch` (the same flow).

        On the blocking twin, in one of the batch threads, when no event of the
        batch has an async handler (see ``__init__``); on the async engine otherwise.
        """
        if self._blocking is not None and self._sync_only(jobs):
            await self._threads.run(self._apply_batch_blocking, jobs)
            return
        await adrive(self._batch_flow(jobs), self._apply_together)

    def _sync_only(self, jobs: list[_Job]) -> bool:
        """Whether no event of ``jobs`` would be handed to an async handler."""
        registry = self.registry if self.registry is not None else get_registry()
        return not any(
            registry.async_handler_for(event.type) is not None
            for job in jobs
            for event in job.verified.events
        )

    def _apply_batch_blocking(self, jobs: list[_Job]) -> None:
        """:meth:`WebhookReceiver._apply_batch` on the blocking twin (a batch thread)."""
        drive(self._batch_flow(jobs), self._apply_together_blocking)

    def _apply_together_blocking(self, jobs: list[_Job]) -> None:
        _apply_blocking(self._blocking, self._blocking_lock, jobs, self.registry)

    async def _apply_together(self, jobs: list[_Job]) -> None:
        """Async twin of :meth:`WebhookReceiver._apply_together`."""
        async with self._write_lock, self._sessions() as session, session.begin():
            results = [
                (group, await apply_events_async(session, **call))
                for group, call in _inbox_calls(jobs, self.registry)
            ]
        _settle(results)

    async def _save_spike(self, provider: str, at: datetime) -> None:
        from ..sync._state import note_signature_spike

        async with self._sessions() as session, session.begin():
            await session.run_sync(lambda s: note_signature_spike(s, provider, at))

    async def _fetch(self, provider: str) -> Any:
        """Async twin of :meth:`WebhookReceiver._fetch`: the poller over this receiver's
        sessions and the provider's async adapter, one fetch per provider at a time."""

        lock = self._fetch_locks.setdefault(provider, asyncio.Lock())
        async with lock:
            return await self._notification_fetch(self.feeds[provider], self._sessions, provider)

    def asgi_app(self, provider: str | None = None) -> Callable[..., Awaitable[None]]:
        """An ASGI app: ``POST /{provider}`` (or ``POST /`` for a fixed ``provider``)."""
        return _make_asgi(self, self._io, provider)


# --------------------------------------------------------------------------- ASGI

_ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_ASGISend = Callable[..., Awaitable[None]]


async def _send_result(send: _ASGISend, result: WebhookResult, *, close: bool = False) -> None:
    body = result.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": result.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _route_provider(scope: MutableMapping[str, Any], fixed: str | None) -> str | None:
    """The provider the whole route names, or None when the route names none.

    ``/webhooks/x/crm`` and ``/webhooks/..%2f..%2fcrm`` (decoded by the server
    to ``/webhooks/../../crm``) name no provider: only ``/{name}`` under the
    mount point does.
    """
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    # Starlette >= 0.33 keeps the mount prefix in "path" and names it in "root_path".
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :]
    if fixed is not None:
        return fixed if path in ("", "/") else None
    match = _ROUTE.fullmatch(path)
    return match.group(1) if match else None


async def _read_body(receive: _ASGIReceive, limit: int) -> bytes | str:
    """The whole body, or ``"too_large"`` / ``"disconnect"``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return "disconnect"
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            # Stop reading: the rest of an oversized body is never buffered.
            return "too_large"
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _make_asgi(
    receiver: _ReceiverBase, io: _IO, fixed_provider: str | None
) -> Callable[..., Awaitable[None]]:
    limit = receiver.max_body_bytes
    deadline = receiver.body_timeout

    async def app(scope: MutableMapping[str, Any], receive: _ASGIReceive, send: _ASGISend) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("method") != "POST":
            await _send_result(send, WebhookResult(405, "method_not_allowed", detail="POST only"))
            return
        provider = _route_provider(scope, fixed_provider)
        if provider is None or provider not in receiver.schemes:
            # Answered before the body is read: an unknown route costs no buffering.
            result = receiver._reject(provider or "", "unknown_provider", 404, "no such route")
            await _send_result(send, result, close=True)
            return
        # Normalized once: verification reads the same dict (see normalize_headers).
        headers = normalize_headers(scope.get("headers", ()))
        declared = headers.get("content-length", "").strip()
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            result = receiver._reject(provider, "too_large", 413, "body too large")
            await _send_result(send, result, close=True)
            return
        # A client trickling its body (1 byte every few seconds) would otherwise
        # hold a connection and a task for as long as it likes.
        try:
            async with asyncio.timeout(deadline):
                body = await _read_body(receive, limit)
        except TimeoutError:
            body = "timeout"
        if body == "disconnect":
            return
        if body == "timeout":
            result = receiver._reject(
                provider, "body_timeout", 408, f"body not received within {deadline:g} s"
            )
            await _send_result(send, result, close=True)
            return
        if body == "too_large":
            result = receiver._reject(provider, "too_large", 413, "body too large")
            await _send_result(send, result, close=True)
            return
        assert isinstance(body, bytes)
        query = scope.get("query_string", b"")
        uri = str(scope.get("path", "")) + ("?" + query.decode("latin-1") if query else "")
        result = await receiver._arun(io, provider, headers, body, method="POST", uri=uri)
        await _send_result(send, result)

    return app
