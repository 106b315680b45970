"""Outbox pushes in each pack's dialect: the pack's update call, delivered through the gateway,
retried across an outage, lands in the provider once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from idis.integrations._timeparse import utcnow
from idis.integrations.config import AuthSettings, Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.outbox._enqueue import enqueue
from idis.integrations.outbox._messages import NewMessage
from idis.integrations.outbox._worker import AsyncOutboxWorker, BatchResult
from idis.integrations.providers import pack_for
from idis.integrations.resilience import AsyncGateway, ManualClock
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator(seed=17) as running:
        yield running


def _settings(sim: RunningSimulator, url: str, api: str) -> Settings:
    return simulator_settings(
        sim.url, providers=(P,), database_url=url, auth=AuthSettings(), api=api
    )


@pytest.mark.parametrize("api", ["hubspot", "salesforce", "generic", "gdrive"])
def test_a_push_in_the_packs_dialect_lands_once(
    sim: RunningSimulator, sqlite_engine: Engine, api: str
) -> None:
    sim.control.emit(P, 1, record_ids=["deal_7"], data={"amount": 1}, webhook=False)
    settings = _settings(sim, str(sqlite_engine.url), api)
    call = pack_for(settings.provider(P)).update_call(
        settings.provider(P), "deal_7", {"amount": 2500}
    )
    clock = ManualClock(utcnow())
    with Session(sqlite_engine) as session, session.begin():
        enqueue(
            session,
            NewMessage.request(P, idempotency_key="deal_7-v2", **call),
            now=clock.now(),
        )
    sim.control.set_fault(P, "outage")
    async_engine = create_async_db_engine(str(sqlite_engine.url))

    async def scenario() -> tuple[BatchResult, list[BatchResult]]:
        async with AsyncGateway(settings, clock=clock) as gateway:
            worker = AsyncOutboxWorker(
                async_engine,
                settings,
                gateway=gateway,
                providers=[P],
                rng=random.Random(3),
                clock=clock,
            )
            first = await worker.run_once()
            sim.control.clear_faults(P)
            later = []
            for _ in range(3):
                clock.advance(3600)
                later.append(await worker.run_once())
        await async_engine.dispose()
        return first, later

    first, later = asyncio.run(scenario())

    with sim.state.lock:
        record = sim.state.provider(P).records["deal_7"]
        writes = len(sim.state.provider(P).writes["deal_7"])
    assert (1, 0) == (first.leased, first.delivered)
    assert 1 == sum(r.delivered for r in later)
    assert str(record.data["amount"]) == "2500"
    assert 2 == writes  # the emit, then the push: once
