"""Fixtures for the enrichment tests: a real simulator, settings on it, engines, gateways.

Test modules cannot import this file under ``--import-mode=importlib``, so the
helpers come as one fixture, ``env``, an :class:`EnrichmentEnv`.

Every test of the enricher takes the ``mode`` fixture (``sync`` / ``async``) and
builds its enricher with ``env.enricher(settings, mode)``: the test body is
written once and runs through both faces, :class:`Enricher` and
:class:`AsyncEnricher`. The deferred worker is async only; ``env.run`` runs a
coroutine on the test's own event loop, where the async gateways live. The sync
and async gateways of one settings object share their breaker state (an
in-process breaker storage, as replicas share it through Redis), so a breaker
the sync enricher opened also holds the worker back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

import pybreaker
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from idis.integrations._timeparse import utcnow
from idis.integrations.config import EnrichmentSettings, RetryPolicy, Settings
from idis.integrations.db._engine import create_async_db_engine, create_db_engine, session_scope
from idis.integrations.enrichment import AsyncDeferredEnrichmentWorker, AsyncEnricher, Enricher
from idis.integrations.enrichment._models import Defect, EnrichmentCacheEntry, EnrichmentRequest
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

T = TypeVar("T")

#: Worker pacing for tests: short waits, so a recovery drains in well under a second.
FAST = EnrichmentSettings(
    defer_on_error=True,
    poll_interval=timedelta(milliseconds=20),
    batch_interval=timedelta(milliseconds=5),
    retry_backoff=timedelta(seconds=1),
    retry_max_backoff=timedelta(seconds=8),
    batch_size=8,
)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    """One simulator per module; ``simulator`` resets it around each test."""
    with run_simulator(seed=7) as running:
        yield running


@pytest.fixture
def simulator(sim: RunningSimulator) -> Iterator[RunningSimulator]:
    """The module's simulator, reset before and after the test."""
    sim.control.reset()
    yield sim
    sim.control.reset()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test once through :class:`Enricher` and once through :class:`AsyncEnricher`."""
    return str(request.param)


@dataclass
class Face:
    """An enricher of either face, called the same way (the async one on the test's loop)."""

    mode: str
    enricher: Enricher | AsyncEnricher
    env: EnrichmentEnv

    def enrich(self, subject_id: str, **kwargs: Any) -> Any:
        """``enricher.enrich(...)``, awaited on the test's loop for the async face."""
        if isinstance(self.enricher, AsyncEnricher):
            return self.env.run(self.enricher.enrich(subject_id, **kwargs))
        return self.enricher.enrich(subject_id, **kwargs)


@dataclass
class EnrichmentEnv:
    """A database, a simulator and a manual gateway clock, with small helpers."""

    db_url: str
    sim: RunningSimulator
    clock: ManualClock
    engine: Engine
    runner: asyncio.Runner
    _closers: list[Any] = field(default_factory=list)
    _async_closers: list[Any] = field(default_factory=list)
    _gateways: dict[tuple[int, str], Any] = field(default_factory=dict)
    _breakers: dict[tuple[str, str], Any] = field(default_factory=dict)
    _async_engine: AsyncEngine | None = None

    Defect = Defect
    Cache = EnrichmentCacheEntry
    Request = EnrichmentRequest
    FAST = FAST

    def settings(
        self,
        *,
        providers: tuple[str, ...] = ("crm_provider", "enrichment_provider", "backup_enrich"),
        enrichment: EnrichmentSettings = FAST,
        fallbacks: dict[str, tuple[str, ...]] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings on the simulator and the test database; one attempt per call."""
        overrides.setdefault("retry", RetryPolicy(max_attempts=1))
        settings = simulator_settings(
            self.sim.url,
            providers=providers,
            database_url=self.db_url,
            enrichment=enrichment,
            **overrides,
        )
        for name, chain in (fallbacks or {}).items():
            settings = settings.with_providers(replace(settings.provider(name), fallbacks=chain))
        return settings

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the test's event loop."""
        return self.runner.run(coroutine)

    def _storage(self, provider: str, breaker: str) -> Any:
        key = (provider, breaker)
        if key not in self._breakers:
            self._breakers[key] = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        return self._breakers[key]

    def gateway(self, settings: Settings) -> Gateway:
        """The sync gateway on the manual clock (backoff sleeps advance it); one per settings."""
        key = (id(settings), "sync")
        if key not in self._gateways:
            gateway = Gateway(
                settings,
                clock=self.clock,
                sleep=self.clock.sleep,
                seed=1,
                breaker_storage=self._storage,
            )
            self._closers.append(gateway.close)
            self._gateways[key] = gateway
        return self._gateways[key]  # type: ignore[no-any-return]

    def async_gateway(self, settings: Settings) -> AsyncGateway:
        """The async twin of :meth:`gateway`, sharing its breaker state; one per settings."""
        key = (id(settings), "async")
        if key not in self._gateways:
            gateway = AsyncGateway(
                settings,
                clock=self.clock,
                sleep=self.clock.asleep,
                seed=1,
                breaker_storage=self._storage,
            )
            self._async_closers.append(gateway.aclose)
            self._gateways[key] = gateway
        return self._gateways[key]  # type: ignore[no-any-return]

    @property
    def async_engine(self) -> AsyncEngine:
        """An async engine on the test database (disposed after the test)."""
        if self._async_engine is None:
            self._async_engine = create_async_db_engine(self.db_url)
            self._async_closers.append(self._async_engine.dispose)
        return self._async_engine

    def enricher(self, settings: Settings, mode: str, *, url: str | None = None) -> Face:
        """An enricher of face ``mode`` on the manual clock (on ``url`` instead of the test DB)."""
        enricher: Enricher | AsyncEnricher
        if mode == "sync":
            engine = self.engine
            if url is not None:
                engine = create_db_engine(url)
                self._closers.append(engine.dispose)
            enricher = Enricher(settings, self.gateway(settings), engine=engine, clock=self.clock)
        else:
            async_engine = self.async_engine
            if url is not None:
                async_engine = create_async_db_engine(url)
                self._async_closers.append(async_engine.dispose)
            enricher = AsyncEnricher(
                settings, self.async_gateway(settings), engine=async_engine, clock=self.clock
            )
        return Face(mode, enricher, self)

    def worker(self, settings: Settings, **kwargs: Any) -> AsyncDeferredEnrichmentWorker:
        """The deferred worker on the async gateway of ``settings`` and the test database."""
        kwargs.setdefault("engine", self.async_engine)
        return AsyncDeferredEnrichmentWorker(settings, self.async_gateway(settings), **kwargs)

    def count(self, model: type, **where: object) -> int:
        """Rows of ``model`` matching the equality filters."""
        with session_scope(self.engine, write=False) as session:
            query = select(func.count()).select_from(model)
            for column, value in where.items():
                query = query.where(getattr(model, column) == value)
            return int(session.scalar(query) or 0)

    def rows(self, model: type, **where: object) -> list[Any]:
        """ORM rows of ``model`` matching the equality filters, by id."""
        with session_scope(self.engine, write=False) as session:
            query = select(model).order_by(model.id)  # type: ignore[attr-defined]
            for column, value in where.items():
                query = query.where(getattr(model, column) == value)
            return list(session.scalars(query))

    def outage(self, provider: str) -> None:
        """Take a provider down (every endpoint 503)."""
        self.sim.control.outage(provider)

    def recover(self, provider: str) -> None:
        """Bring a provider back and let its breaker's reset timeout pass."""
        self.sim.control.clear_faults(provider)
        self.clock.advance(60)


def _environment(url: str, simulator: RunningSimulator) -> Iterator[EnrichmentEnv]:
    engine = create_db_engine(url)
    # Start at the real time so that relative windows ("1 hour ago") cover the test's rows.
    with asyncio.Runner() as runner:
        environment = EnrichmentEnv(url, simulator, ManualClock(utcnow()), engine, runner)
        yield environment
        for aclose in reversed(environment._async_closers):
            runner.run(aclose())
    for closer in reversed(environment._closers):
        closer()
    engine.dispose()


@pytest.fixture
def env(sqlite_url: str, simulator: RunningSimulator) -> Iterator[EnrichmentEnv]:
    """The enrichment test environment on SQLite."""
    yield from _environment(sqlite_url, simulator)


@pytest.fixture
def env_db(db_url: str, simulator: RunningSimulator) -> Iterator[EnrichmentEnv]:
    """The enrichment test environment on SQLite and on PostgreSQL (runs twice)."""
    yield from _environment(db_url, simulator)


@pytest.fixture
def env_pg(pg_url: str, simulator: RunningSimulator) -> Iterator[EnrichmentEnv]:
    """The enrichment test environment on PostgreSQL."""
    yield from _environment(pg_url, simulator)
