"""Fixtures for the outbox tests: settings, a manual clock, a recording delivery.

Engines on real databases (``engine``, ``sqlite_engine``, ``pg_engine``) come from
the shared ``tests/conftest.py``.

The recording delivery is a delivery *strategy*, the worker's plug point (what
a service passes as ``deliver=``), not a mock of library code: the worker,
its SQL and its decisions run for real against SQLite and PostgreSQL.

The outbox worker is async only (``AsyncOutboxWorker``). ``loop`` gives a test
one event loop (``asyncio.Runner``) and :class:`DrivenWorker` drives a real
``AsyncOutboxWorker`` on it from sync test code, one coroutine at a time, so a
scenario reads as a script; a plain function passed as ``deliver`` is called
from the worker's coroutine (and awaited if it returns an awaitable).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.config import OutboxSettings, Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ProviderUnavailable
from idis.integrations.outbox._enqueue import enqueue_many
from idis.integrations.outbox._messages import NewMessage, OutboxMessage
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.outbox._worker import AsyncOutboxWorker, BatchResult
from idis.integrations.resilience import AsyncGateway
from idis.integrations.testing import simulator_settings

from ..conftest import dies_whole

#: Nothing listens here: settings for tests whose delivery never touches HTTP.
NO_SERVER = "http://127.0.0.1:9"


def outbox_settings(url: str = NO_SERVER, **outbox: Any) -> Settings:
    """Simulator-shaped settings with outbox overrides (short backoffs by default)."""
    base = OutboxSettings(
        max_retries=5,
        batch_size=50,
        lease=timedelta(seconds=30),
        poll_interval=timedelta(0),
        initial_backoff=timedelta(seconds=1),
        max_backoff=timedelta(seconds=60),
    )
    return simulator_settings(url, outbox=replace(base, **outbox))


@pytest.fixture
def clock() -> ManualClock:
    """A clock that moves only when told to."""
    return ManualClock()


def put_messages(
    engine: Engine,
    count: int,
    *,
    keys: int | None = None,
    provider: str = "crm_provider",
    prefix: str = "m",
    clock: ManualClock | None = None,
    max_retries: int | None = None,
) -> list[NewMessage]:
    """Enqueue ``count`` record PUTs, ordering key ``r<i % keys>``, data ``{"seq": i}``."""
    messages = [
        NewMessage.request(
            provider,
            "record",
            method="PUT",
            path_params={"id": f"r{i % keys}" if keys else f"u{i}"},
            json={"data": {"seq": i}},
            idempotency_key=f"{prefix}-{i}",
            ordering_key=f"r{i % keys}" if keys else None,
            max_retries=max_retries,
        )
        for i in range(count)
    ]
    with Session(engine) as session, session.begin():
        enqueue_many(session, messages, now=clock.now() if clock else None)
    return messages


def table(engine: Engine) -> list[OutboxMessageRow]:
    """Every outbox row, by id."""
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(select(OutboxMessageRow).order_by(OutboxMessageRow.id)))


def statuses(engine: Engine) -> dict[str, int]:
    """Count of rows per status."""
    counts: dict[str, int] = {}
    for row in table(engine):
        counts[row.status] = counts.get(row.status, 0) + 1
    return counts


@dataclass
class Recorder:
    """A delivery strategy that records every attempt and fails when told to.

    ``fail(message) -> Exception | None`` decides per attempt. ``order_violations``
    lists attempts made while an earlier message of the same key was not yet
    delivered: per-key FIFO means it stays empty.
    """

    fail: Callable[[OutboxMessage], BaseException | None] = lambda _m: None
    attempts: list[tuple[int, str | None, int]] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    order_violations: list[tuple[int, int]] = field(default_factory=list)
    known: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expect(self, engine: Engine) -> None:
        """Learn every message's key from the table, for the FIFO check."""
        for row in table(engine):
            if row.ordering_key is not None:
                self.known.setdefault(row.ordering_key, []).append(row.id)

    def __call__(self, message: OutboxMessage) -> None:
        with self.lock:
            self.attempts.append((message.id, message.ordering_key, message.attempts))
            done = set(self.delivered)
            for earlier in self.known.get(message.ordering_key or "", []):
                if earlier < message.id and earlier not in done:
                    self.order_violations.append((earlier, message.id))
        error = self.fail(message)
        if error is not None:
            raise error
        with self.lock:
            self.delivered.append(message.id)


def unavailable(message: OutboxMessage) -> ProviderUnavailable:
    """The error a 503 from the provider turns into."""
    return ProviderUnavailable(
        "crm_provider record: HTTP 503",
        provider=message.provider,
        endpoint="record",
        status_code=503,
    )


@dataclass(frozen=True)
class ProviderCounts:
    """What the simulated provider really did, per idempotency key (counted, not assumed)."""

    #: Key -> writes really applied under it.
    applications: dict[str, int]
    #: Key -> requests that reached the provider with it (faults answer before that).
    received: dict[str, int]
    #: Record id -> the ``seq`` of each write, in application order.
    writes: dict[str, list[int]]

    @property
    def repeats(self) -> int:
        """Requests beyond the first per key: sends the worker made again."""
        return sum(n - 1 for n in self.received.values() if n > 1)


def provider_counts(sim: Any, provider: str = "crm_provider") -> ProviderCounts:
    """Read the simulator's per-key counts under its lock."""
    with sim.state.lock:
        state = sim.state.provider(provider)
        return ProviderCounts(
            applications={k: e.applications for k, e in state.idempotency.items()},
            received={k: e.received for k, e in state.idempotency.items()},
            writes={
                rid: [w["data"].get("seq", -1) for w in ws] for rid, ws in state.writes.items()
            },
        )


def assert_applied_once(counts: ProviderCounts, total: int, *, max_repeats: int = 0) -> None:
    """Every key applied exactly once, and at most ``max_repeats`` sends repeated in all.

    The repeat bound is what makes "applied once" able to fail: the provider's
    idempotency store hides a message sent twice from ``applications``, never
    from ``received``.
    """
    assert total == len(counts.applications), "messages lost or unknown keys applied"
    assert [] == [k for k, n in counts.applications.items() if n != 1], "applied twice"
    assert counts.repeats <= max_repeats, (
        f"{counts.repeats} repeated sends, at most {max_repeats} allowed: "
        f"{sorted(k for k, n in counts.received.items() if n > 1)[:10]}"
    )


# --------------------------------------------------------------------------- the async worker


def as_async(deliver: Any) -> Any:
    """A delivery strategy the async worker can await: plain callables are called from it."""
    if deliver is None or inspect.iscoroutinefunction(deliver):
        return deliver

    async def call(message: OutboxMessage) -> Any:
        result = deliver(message)
        if inspect.isawaitable(result):
            return await result
        return result

    return call


class Loop:
    """One event loop for a test: async engines and gateways on it, closed at the end."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self._engines: dict[str, AsyncEngine] = {}
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the test's loop and return its result."""
        return self.runner.run(coro)

    def async_engine(self, engine: Engine) -> AsyncEngine:
        """The async engine on the same database as ``engine`` (one per database)."""
        url = engine.url.render_as_string(hide_password=False)
        if url not in self._engines:
            self._engines[url] = create_async_db_engine(url)
        return self._engines[url]

    def gateway(self, settings: Settings, **kw: Any) -> AsyncGateway:
        """An ``AsyncGateway`` closed when the test ends."""
        gateway = AsyncGateway(settings, **kw)
        self._closers.append(gateway.aclose)
        return gateway

    def worker(self, engine: Engine, settings: Settings, **kw: Any) -> DrivenWorker:
        """A real ``AsyncOutboxWorker`` on ``engine``'s database, driven from sync code."""
        if "deliver" in kw:
            kw["deliver"] = as_async(kw["deliver"])
        return DrivenWorker(
            self, engine, AsyncOutboxWorker(self.async_engine(engine), settings, **kw)
        )

    def close(self) -> None:
        for close in reversed(self._closers):
            self.run(close())
        for async_engine in self._engines.values():
            self.run(async_engine.dispose())


@pytest.fixture
def loop() -> Iterator[Loop]:
    """The test's event loop (see :class:`Loop`)."""
    with asyncio.Runner() as runner:
        running = Loop(runner)
        try:
            yield running
        finally:
            running.close()


class DrivenWorker:
    """An ``AsyncOutboxWorker`` whose coroutines a sync test runs on its :class:`Loop`.

    A delivery that raises a ``BaseException`` (a test's stand-in for the process
    dying mid-batch) ends the call, and the rest of the batch dies with it: its
    pending tasks are cancelled, as they would be with the process.
    """

    def __init__(self, loop: Loop, engine: Engine, worker: AsyncOutboxWorker) -> None:
        self.loop = loop
        self.engine = engine
        self.worker = worker

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    @property
    def config_errors(self) -> dict[str, str]:
        return self.worker.config_errors

    @property
    def stale_settles(self) -> int:
        return self.worker.stale_settles

    def stop(self) -> None:
        self.worker.stop()

    def run_once(self) -> BatchResult:
        return self.loop.run(dies_whole(self.worker.run_once()))  # type: ignore[no-any-return]

    def run(self, **kw: Any) -> BatchResult:
        return self.loop.run(dies_whole(self.worker.run(**kw)))  # type: ignore[no-any-return]


def work_once(engine: Engine, settings: Settings, *, until_idle: bool = False, **kw: Any) -> Any:
    """One ``run_once`` (or a ``run(until_idle=True)``) of a fresh worker on its own loop."""
    with asyncio.Runner() as runner:
        loop = Loop(runner)
        try:
            worker = loop.worker(engine, settings, **kw)
            return worker.run(until_idle=True) if until_idle else worker.run_once()
        finally:
            loop.close()
