"""One message the provider always refuses must not wedge the provider's outbox.

Real simulator over HTTP, real gateway (retries, breaker), real databases; one
:class:`ManualClock` drives everything, so hours of simulated time take seconds.

The poison message is a call to an endpoint the provider always answers 503
(its ``enrich`` endpoint under a fault), beside 90 record PUTs that the
provider accepts. Its failures alone open the breaker; the worker must still
deliver the 90, count the poison's attempts and dead-letter it, while a real
provider-wide outage (``test_outbox_delivery``) dead-letters nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox._enqueue import enqueue
from idis.integrations.outbox._messages import NewMessage
from idis.integrations.outbox._worker import AsyncOutboxWorker
from idis.integrations.resilience import AsyncGateway
from idis.integrations.testing import run_simulator

from ..conftest import sample
from .conftest import assert_applied_once, outbox_settings, provider_counts, put_messages, table

CRM = "crm_provider"
#: Simulated time the worker gets: issue 11 saw 1 of 90 delivered after 3 hours.
HOURS = 3


def _poison(engine: Engine, clock: ManualClock) -> None:
    message = NewMessage.request(
        CRM,
        "enrich",
        method="GET",
        path_params={"id": "poison"},
        idempotency_key="poison-1",
        ordering_key="poison",
    )
    with Session(engine) as session, session.begin():
        enqueue(session, message, now=clock.now())


def _run_async(engine: Engine, settings: Any, clock: ManualClock, step: Callable[[], bool]) -> None:
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))

    async def scenario() -> None:
        async with AsyncGateway(settings, clock=clock, sleep=clock.asleep, seed=7) as gateway:
            worker = AsyncOutboxWorker(
                async_engine,
                settings,
                gateway=gateway,
                providers=[CRM],
                clock=clock,
                rng=random.Random(3),
            )
            while not step():
                await worker.run_once()
        await async_engine.dispose()

    asyncio.run(scenario())


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_poison_message_is_dead_lettered_and_the_others_delivered(
    engine: Engine, clock: ManualClock, concurrency: int
) -> None:
    """One message always 5xx + 90 others: the 90 are delivered, the poison dead-lettered."""
    with run_simulator(clock=clock.now, seed=9) as sim:
        settings = outbox_settings(sim.url, max_retries=5, batch_size=10, concurrency=concurrency)
        sim.control.set_fault(CRM, "error", endpoint="enrich", status=503)
        _poison(engine, clock)
        put_messages(engine, 90, keys=30, clock=clock)
        end = clock.time() + HOURS * 3600

        def step() -> bool:
            rows = table(engine)
            if all(r.status != "pending" for r in rows) or clock.time() >= end:
                return True
            clock.advance(30)
            return False

        _run_async(engine, settings, clock, step)
        counts = provider_counts(sim, CRM)

    rows = {r.idempotency_key: r for r in table(engine)}
    poison = rows.pop("poison-1")
    stuck = sorted(k for k, r in rows.items() if r.status != "delivered")
    assert [] == stuck, f"{len(stuck)} of 90 not delivered after {HOURS} simulated hours"
    assert_applied_once(counts, 90)
    assert "dead" == poison.status
    assert poison.attempts == settings.outbox.max_retries + 1
    assert "503" in (poison.last_error or "")


@pytest.mark.parametrize("health", ["up", "down", "none"])
def test_poison_alone_is_dead_lettered_unless_the_health_endpoint_is_down_too(
    engine: Engine, clock: ManualClock, metrics: Metrics, health: str
) -> None:
    """Only poison left: a healthy health probe makes its failures count; a down one does not.

    Nothing else is queued for the provider, so no delivery can show that it
    works for others: the worker probes the provider's health endpoint. Up, the
    message's failures are its own and it is dead-lettered after max_retries;
    down too, it is an outage, and its attempts are given back (the outage
    test's rule: a provider-wide outage burns nothing). No health endpoint
    configured is no evidence either: given back.
    """
    with run_simulator(clock=clock.now, seed=9) as sim:
        settings = outbox_settings(sim.url, max_retries=5, batch_size=10)
        if health == "none":
            settings = settings.with_providers(
                replace(settings.provider(CRM), health_endpoint=None)
            )
        sim.control.set_fault(CRM, "error", endpoint="enrich", status=503)
        if health == "down":
            sim.control.set_fault(CRM, "error", endpoint="health", status=503)
        _poison(engine, clock)
        end = clock.time() + HOURS * 3600

        def step() -> bool:
            if table(engine)[0].status != "pending" or clock.time() >= end:
                return True
            clock.advance(30)
            return False

        _run_async(engine, settings, clock, step)

    poison = table(engine)[0]
    probes = {
        result: sample(
            metrics, "integration_outbox_health_probes_total", provider=CRM, result=result
        )
        for result in ("healthy", "unhealthy", "unknown")
    }
    if health == "up":
        assert "dead" == poison.status
        assert poison.attempts == settings.outbox.max_retries + 1
        assert "503" in (poison.last_error or "")
        assert probes["healthy"] >= 1
        assert (0, 0) == (probes["unhealthy"], probes["unknown"])
    else:
        assert "pending" == poison.status
        assert poison.attempts <= 2  # only attempts made before the breaker opened
        verdict = "unhealthy" if health == "down" else "unknown"
        assert probes[verdict] > 10  # probed again and again, never healthy
        assert 0 == probes["healthy"]
