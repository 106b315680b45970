"""Record breaker transitions and provider health in the database, off the hot path.

The gateway keeps breaker state and error rates in memory (and Redis). The
``status`` and ``postmortem`` commands run in other processes, later, so a
running service records what they need: every breaker transition as an
audit row, and a health sample per provider every ``interval`` seconds.

All writes go through one background thread with a bounded queue: a slow or
unreachable database delays the *record*, never a provider call. When the
queue is full, the oldest samples are dropped (transitions are kept).
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Index, Integer, String, insert, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .._audit import AuditEvent, audit_row
from ..db._base import Base, BigIntPK, UTCDateTime
from ..db._engine import create_db_engine
from ..exceptions import StorageError
from ..observability._logs import get_logger
from ._breaker import BreakerTransition

__all__ = ["HealthSample", "StateRecorder", "latest_samples", "replica_name"]

_log = get_logger()


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


class StateRecorder:
    """Writes breaker transitions and health samples from a background thread.

    Usage::

        recorder = StateRecorder(settings.database_url)
        gateway = Gateway(settings, on_transition=[recorder.on_transition])
        recorder.start(gateway.snapshot, settings.providers, interval=15)
        ...
        recorder.stop()
    """

    def __init__(self, database_url: str, *, clock: Any = None, max_queue: int = 10_000) -> None:
        from .._clock import system_clock

        self._url = database_url
        self._clock = clock or system_clock
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._replica = replica_name()
        self.dropped = 0

    # ------------------------------------------------------------ producers

    def on_transition(self, event: BreakerTransition) -> None:
        """Breaker hook: queue one audit row (never blocks)."""
        if event.observed:
            return  # the replica that made the change audits it
        row = audit_row(
            f"breaker.{event.to_state}",
            provider=event.provider,
            actor=f"replica:{self._replica}",
            subject_type="breaker",
            subject_id=event.breaker,
            details={"from": event.from_state, "to": event.to_state, "reason": event.reason},
            message=f"circuit breaker {event.from_state} -> {event.to_state}: {event.reason}",
            occurred_at=self._clock.now(),
        )
        self._put(("audit", row), keep=True)

    def sample(self, snapshot: Callable[[str], dict[str, Any]], providers: Iterable[str]) -> None:
        """Queue one health sample per provider from a gateway's ``snapshot``."""
        now = self._clock.now()
        for provider in providers:
            snap = snapshot(provider)
            self._put(
                (
                    "sample",
                    {
                        "provider": provider,
                        "sampled_at": now,
                        "replica": self._replica,
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
        self._ensure_writer()
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if not keep:
                self.dropped += 1
                return
            try:  # make room by dropping the oldest item
                self._queue.get_nowait()
                self.dropped += 1
            except queue.Empty:
                pass
            self._queue.put_nowait(item)

    # --------------------------------------------------------------- writer

    def _ensure_writer(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._write_loop, name="idis-state-recorder", daemon=True
            )
            self._thread.start()

    def _write_loop(self) -> None:
        engine = create_db_engine(self._url)
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < 500:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._flush(engine, batch)
                        return
                    batch.append(nxt)
                self._flush(engine, batch)
        finally:
            engine.dispose()

    def _flush(self, engine: Any, batch: list[tuple[str, dict[str, Any]]]) -> None:
        audits = [row for kind, row in batch if kind == "audit"]
        samples = [row for kind, row in batch if kind == "sample"]
        try:
            with engine.begin() as conn:
                if audits:
                    conn.execute(insert(AuditEvent), audits)
                if samples:
                    conn.execute(insert(HealthSample), samples)
        except Exception as exc:  # noqa: BLE001  # recording must never take the service down
            self.dropped += len(batch)
            _log.warning(
                "idis.recorder.write_failed",
                msg=f"could not record {len(batch)} breaker/health rows: {type(exc).__name__}",
            )

    # ------------------------------------------------------------- sampling

    def start(
        self,
        snapshot: Callable[[str], dict[str, Any]],
        providers: Iterable[str],
        *,
        interval: float = 15.0,
    ) -> None:
        """Sample every provider every ``interval`` seconds until :meth:`stop`."""
        names = list(providers)

        def loop() -> None:
            while not self._stop.wait(interval):
                self.sample(snapshot, names)

        self._sampler = threading.Thread(target=loop, name="idis-health-sampler", daemon=True)
        self._sampler.start()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is written (or ``timeout``)."""
        done = threading.Event()
        if self._thread is None or not self._thread.is_alive():
            return
        deadline = self._clock.monotonic() + timeout
        while not self._queue.empty() and self._clock.monotonic() < deadline:
            done.wait(0.02)
        # The writer may still be inside _flush for the last batch.
        done.wait(0.05)

    def stop(self) -> None:
        """Stop sampling, write what is queued, and end the writer thread."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)


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
