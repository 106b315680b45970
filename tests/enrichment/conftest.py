"""Fixtures for the enrichment tests: a real simulator, settings on it, engines, gateways.

Test modules cannot import this file under ``--import-mode=importlib``, so the
helpers come as one fixture, ``env``, an :class:`EnrichmentEnv`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from idis.integrations._timeparse import utcnow
from idis.integrations.config import EnrichmentSettings, RetryPolicy, Settings
from idis.integrations.db._engine import create_db_engine, session_scope
from idis.integrations.enrichment._models import Defect, EnrichmentCacheEntry, EnrichmentRequest
from idis.integrations.resilience import Gateway, ManualClock
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

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


@dataclass
class EnrichmentEnv:
    """A database, a simulator and a manual gateway clock, with small helpers."""

    db_url: str
    sim: RunningSimulator
    clock: ManualClock
    engine: Engine
    _closers: list[Any] = field(default_factory=list)

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

    def gateway(self, settings: Settings) -> Gateway:
        """A gateway on the manual clock (backoff sleeps advance it); closed after the test."""
        gateway = Gateway(settings, clock=self.clock, sleep=self.clock.sleep, seed=1)
        self._closers.append(gateway.close)
        return gateway

    def count(self, model: type, **where: object) -> int:
        """Rows of ``model`` matching the equality filters."""
        with session_scope(self.engine) as session:
            query = select(func.count()).select_from(model)
            for column, value in where.items():
                query = query.where(getattr(model, column) == value)
            return int(session.scalar(query) or 0)

    def rows(self, model: type, **where: object) -> list[Any]:
        """ORM rows of ``model`` matching the equality filters, by id."""
        with session_scope(self.engine) as session:
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
    environment = EnrichmentEnv(url, simulator, ManualClock(utcnow()), engine)
    yield environment
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
