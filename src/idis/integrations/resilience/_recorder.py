"""Record breaker transitions and provider health in the database, off the hot path.

The gateway keeps breaker state and error rates in memory (and Redis). The
``status`` and ``postmortem`` commands run in other processes, later, so a
running service records what they need: every breaker transition it makes as
an audit row, and a health sample per provider every ``interval`` seconds.

:class:`HealthSampler` is an async background worker (the only implementation;
sync code runs it with ``asyncio.run``). The breaker hook only appends to a
bounded queue and never blocks; the worker writes through the async database
driver, so a slow or unreachable database delays the *record*, never a
provider call. When the queue is full, the oldest samples are dropped
(transitions are kept).

Samples say something only while their replica keeps reporting:
:func:`live_samples` counts a replica's latest sample only within two of that
replica's own sample intervals (issue 15: samples of replicas that had been
restarted kept a breaker "open (recorded by 4 replicas)" in ``status`` for 15
minutes). A replica that starts with its breaker closed while the audit trail
still says open records that closing too, so opening and closing both leave
audit rows, restarts included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Float, Index, Integer, String, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, Session, mapped_column

from .._audit import AuditEvent, audit_row
from .._clock import Clock, system_clock
from ..db._base import Base, BigIntPK, UTCDateTime
from ..exceptions import StorageError
from ..observability._logs import get_logger
from ._breaker import BreakerTransition

__all__ = [
    "DEFAULT_SAMPLE_INTERVAL",
    "HealthSample",
    "HealthSampler",
    "latest_samples",
    "live_samples",
    "replica_name",
    "timeline_of_live_samples",
]

_log = get_logger()

#: Seconds between two samples of one replica, unless configured otherwise.
DEFAULT_SAMPLE_INTERVAL = 15.0
#: A replica's sample counts while no more than this many of its intervals old.
LIVE_INTERVALS = 2.0


def replica_name() -> str:
    """``host:pid`` of this process, to tell replicas' samples apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


class HealthSample(Base):
    """A provider's health as one replica saw it at one moment."""

    __tablename__ = "provider_health_samples"
    __table_args__ = (
        Index("ix_provider_health_samples_provider_sampled_at", "provider", "sampled_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    sampled_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: ``host:pid`` of the replica that took the sample.
    replica: Mapped[str] = mapped_column(String(128), nullable=False)
    #: closed, half_open or open.
    breaker_state: Mapped[str] = mapped_column(String(16), nullable=False)
    #: Calls and failures in the breaker's window.
    calls: Mapped[int] = mapped_column(Integer, nullable=False)
    failures: Mapped[int] = mapped_column(Integer, nullable=False)
    error_rate: Mapped[float] = mapped_column(Float, nullable=False)
    in_flight: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Seconds left of a Retry-After pause.
    paused_for: Mapped[float] = mapped_column(Float, nullable=False)


Snapshot = Callable[[str], dict[str, Any]]


class HealthSampler:
    """Audits breaker transitions and samples provider health: an async background worker.

    Usage (the example service does this)::

        sampler = HealthSampler(settings.database_url, interval=15)
        gateway = AsyncGateway(settings, on_transition=[sampler.on_transition])
        task = asyncio.create_task(sampler.run(gateway.snapshot, settings.providers))
        ...
        task.cancel()            # writes what is queued, then ends
        await asyncio.gather(task, return_exceptions=True)

    Code on a manual clock (the drill) hooks :meth:`on_transition` and calls
    :meth:`sample` and :meth:`flush` itself, once per step of its clock.

    Args:
        database_url: Where to write (an async engine is made per event loop).
        engine: An async engine to write through instead (not disposed here).
        clock: Time of samples and audit rows.
        interval: Seconds between samples.
        replica: Name of this replica in samples and audit rows (``host:pid``).
        max_queue: Rows held while the database is slow; the oldest samples go first.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        engine: AsyncEngine | None = None,
        clock: Clock = system_clock,
        interval: float = DEFAULT_SAMPLE_INTERVAL,
        replica: str | None = None,
        max_queue: int = 10_000,
    ) -> None:
        if database_url is None and engine is None:
            raise ValueError("HealthSampler needs a database_url or an engine")
        if not interval > 0:
            raise ValueError(f"interval={interval!r}: expected seconds > 0")
        self._url = database_url
        self._engine = engine
        self._clock = clock
        self.interval = interval
        self.replica = replica or replica_name()
        self._max = max_queue
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        # Set (thread-safely) when a transition is queued, so it is written promptly.
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart_checked: set[str] = set()
        #: Rows given up on (queue full, or the database refused them).
        self.dropped = 0

    # ------------------------------------------------------------ producers

    def on_transition(self, event: BreakerTransition) -> None:
        """Breaker hook: queue one audit row. Never blocks; callable from any thread."""
        if event.observed:
            return  # the replica that made the change audits it
        self._audit(event.provider, event.breaker, event.from_state, event.to_state, event.reason)

    def _audit(self, provider: str, breaker: str, old: str, new: str, reason: str) -> None:
        """Queue the audit row of a breaker's change from ``old`` to ``new`` (kept first)."""
        row = audit_row(
            f"breaker.{new}",
            provider=provider,
            actor=f"replica:{self.replica}",
            subject_type="breaker",
            subject_id=breaker,
            details={"from": old, "to": new, "reason": reason},
            message=f"circuit breaker {old} -> {new}: {reason}",
            occurred_at=self._clock.now(),
        )
        self._put(("audit", row), keep=True)

    def sample(self, snapshot: Snapshot, providers: Iterable[str]) -> None:
        """Queue one health sample per provider from a gateway's (non-blocking) ``snapshot``."""
        now = self._clock.now()
        for provider in providers:
            snap = snapshot(provider)
            self._put(
                (
                    "sample",
                    {
                        "provider": provider,
                        "sampled_at": now,
                        "replica": self.replica,
                        "breaker_state": snap["state"],
                        "calls": int(snap["window_calls"]),
                        "failures": int(snap["window_failures"]),
                        "error_rate": float(snap["error_rate"]),
                        "in_flight": int(snap.get("in_flight", 0)),
                        "paused_for": float(snap.get("paused_for", 0.0)),
                    },
                ),
                keep=False,
            )

    def _put(self, item: tuple[str, dict[str, Any]], *, keep: bool) -> None:
        with self._lock:
            if len(self._queue) >= self._max:
                if not keep:
                    self.dropped += 1
                    return
                for index, (kind, _) in enumerate(self._queue):
                    if kind == "sample":  # make room by dropping the oldest sample
                        del self._queue[index]
                        break
                else:
                    self._queue.popleft()
                self.dropped += 1
            self._queue.append(item)
            wake, loop = self._wake, self._loop
        if keep and wake is not None and loop is not None and not loop.is_closed():
            try:
                if _running_loop() is loop:
                    wake.set()
                else:
                    loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass  # the loop is shutting down; flush() at the end writes the row

    # --------------------------------------------------------------- worker

    async def run(self, snapshot: Snapshot, providers: Iterable[str]) -> None:
        """Sample every ``interval`` seconds and write transitions as they come, until cancelled.

        The first sample is taken at once. On cancellation what is queued is
        written (as far as the database allows) before the task ends.
        """
        names = list(providers)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        engine, owned = self._engine_for_loop()
        try:
            next_sample = self._clock.monotonic()
            while True:
                now = self._clock.monotonic()
                if now >= next_sample:
                    self.sample(snapshot, names)
                    await self._check_restart(engine, snapshot, names)
                    next_sample = now + self.interval
                await self._write(engine)
                self._wake.clear()
                # Paced in real time (a worker), stamped with the clock (a manual clock
                # in the drill): transitions wake it at once.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), max(0.0, next_sample - self._clock.monotonic())
                    )
        finally:
            self._wake = None
            self._loop = None
            try:
                await asyncio.shield(self._write(engine))
            finally:
                if owned:
                    await engine.dispose()

    async def flush(self) -> None:
        """Write everything queued so far (with an engine of this event loop)."""
        engine, owned = self._engine_for_loop()
        try:
            await self._write(engine)
        finally:
            if owned:
                await engine.dispose()

    def _engine_for_loop(self) -> tuple[AsyncEngine, bool]:
        if self._engine is not None:
            return self._engine, False
        from ..db._engine import create_async_db_engine

        assert self._url is not None
        return create_async_db_engine(self._url), True

    async def _write(self, engine: AsyncEngine) -> None:
        while True:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(500, len(self._queue)))]
            if not batch:
                return
            audits = [row for kind, row in batch if kind == "audit"]
            samples = [row for kind, row in batch if kind == "sample"]
            try:
                async with engine.begin() as conn:
                    if audits:
                        await conn.execute(insert(AuditEvent), audits)
                    if samples:
                        await conn.execute(insert(HealthSample), samples)
            except Exception as exc:  # noqa: BLE001  # recording must never take the service down
                self.dropped += len(batch)
                _log.warning(
                    "idis.recorder.write_failed",
                    msg=f"could not record {len(batch)} breaker/health rows: {type(exc).__name__}",
                )
                return

    def _restart_closing(self, conn: Any, provider: str) -> tuple[str, str] | None:
        return _restart_closing(Session(bind=conn), provider, self._clock.now(), self.replica)

    async def _check_restart(
        self, engine: AsyncEngine, snapshot: Snapshot, providers: Sequence[str]
    ) -> None:
        """Audit the closing a restart made: our breaker is closed, the trail says open.

        Done once per provider, as soon as this replica knows the shared state
        (when it is shared). Skipped while a live replica still reports the
        breaker not closed: then it is not closed, whatever we think.
        """
        pending = [p for p in providers if p not in self._restart_checked]
        if not pending:
            return
        from ..db._engine import aread_only

        try:
            async with aread_only(engine).connect() as conn:
                for provider in pending:
                    snap = snapshot(provider)
                    if snap.get("shared") == "not read yet":
                        continue  # ask again at the next sample
                    self._restart_checked.add(provider)
                    if snap["state"] != "closed":
                        continue
                    row = await conn.run_sync(self._restart_closing, provider)
                    if row is not None:
                        old, reason = row
                        self._audit(provider, provider, old, "closed", reason)
        except Exception as exc:  # noqa: BLE001  # a check for the record only; never fatal
            _log.warning(
                "idis.recorder.check_failed",
                msg=f"could not read the breaker's audit trail: {type(exc).__name__}",
            )


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _restart_closing(
    session: Session, provider: str, now: datetime, replica: str
) -> tuple[str, str] | None:
    """(last audited state, reason) when a closing must be audited for ``replica``; else None."""
    last = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.provider == provider,
            AuditEvent.action.startswith("breaker."),
            AuditEvent.subject_id == provider,
        )
        .order_by(AuditEvent.occurred_at.desc(), AuditEvent.id.desc())
        .limit(1)
    ).first()
    if last is None or last.action == "breaker.closed":
        return None
    recent = session.scalars(
        select(HealthSample)
        .where(
            HealthSample.provider == provider,
            HealthSample.sampled_at >= now - SAMPLE_HORIZON,
            HealthSample.replica != replica,
        )
        .order_by(HealthSample.sampled_at, HealthSample.id)
    ).all()
    if any(s.breaker_state != "closed" for s in live_samples(recent, now)):
        return None
    old = last.action.removeprefix("breaker.")
    return old, f"replica {replica} started with the breaker closed (last recorded: {old})"


#: Samples older than this say nothing about the present, however a replica reports.
SAMPLE_HORIZON = timedelta(minutes=15)


class _Replicas:
    """Follows each replica's samples in time order: its latest one and its interval."""

    def __init__(self) -> None:
        self._latest: dict[str, HealthSample] = {}
        self._interval: dict[str, float] = {}

    def add(self, sample: HealthSample) -> None:
        before = self._latest.get(sample.replica)
        if before is not None and sample.sampled_at > before.sampled_at:
            self._interval[sample.replica] = (sample.sampled_at - before.sampled_at).total_seconds()
        self._latest[sample.replica] = sample

    def live(self, at: datetime) -> list[HealthSample]:
        horizon = SAMPLE_HORIZON.total_seconds()
        found = []
        for replica, sample in self._latest.items():
            limit = LIVE_INTERVALS * self._interval.get(replica, DEFAULT_SAMPLE_INTERVAL)
            if (at - sample.sampled_at).total_seconds() <= min(limit, horizon):
                found.append(sample)
        return _in_order(found)


def _in_order(samples: Iterable[HealthSample]) -> list[HealthSample]:
    return sorted(samples, key=lambda s: (s.sampled_at, s.id or 0))


def live_samples(samples: Iterable[HealthSample], at: datetime) -> list[HealthSample]:
    """The latest sample of each replica that was still reporting at ``at``.

    A replica's latest sample (at or before ``at``) counts while it is at most
    ``LIVE_INTERVALS`` of that replica's own intervals old (the spacing of its
    last two samples; ``DEFAULT_SAMPLE_INTERVAL`` for a replica with one sample), and
    never beyond ``SAMPLE_HORIZON``: a replica that stopped reporting
    (restarted, scaled down, crashed) stops counting within two intervals.
    """
    replicas = _Replicas()
    for sample in _in_order(samples):
        if sample.sampled_at <= at:
            replicas.add(sample)
    return replicas.live(at)


def timeline_of_live_samples(
    samples: Iterable[HealthSample],
) -> Iterator[tuple[datetime, list[HealthSample]]]:
    """At each sample time, the live sample of every replica (the postmortem's error rate)."""
    replicas = _Replicas()
    ordered = _in_order(samples)
    for index, sample in enumerate(ordered):
        replicas.add(sample)
        following = ordered[index + 1] if index + 1 < len(ordered) else None
        if following is None or following.sampled_at != sample.sampled_at:
            yield sample.sampled_at, replicas.live(sample.sampled_at)


def latest_samples(session: Session, provider: str, since: datetime) -> list[HealthSample]:
    """Health samples of ``provider`` since ``since``, oldest first."""
    query = (
        select(HealthSample)
        .where(HealthSample.provider == provider, HealthSample.sampled_at >= since)
        .order_by(HealthSample.sampled_at, HealthSample.id)
    )
    try:
        return list(session.scalars(query))
    except Exception as exc:
        raise StorageError(f"cannot read health samples: {type(exc).__name__}") from exc
