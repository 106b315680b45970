"""Delivery through the real gateway to the real simulator over HTTP: provider calls and webhooks.

Every clock here is one :class:`ManualClock` shared by the worker, the gateway
(breaker reset, backoff sleeps) and the simulator (webhook timestamp tolerance),
so a two-hour outage takes a few seconds and nothing waits on wall time.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.config import BreakerPolicy, RetryPolicy, Settings
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox._admin import queue_webhook_retries
from idis.integrations.outbox._enqueue import enqueue
from idis.integrations.outbox._messages import NewMessage
from idis.integrations.resilience import AsyncGateway
from idis.integrations.testing import RunningSimulator, run_simulator

from ..conftest import sample
from .conftest import (
    DrivenWorker,
    Loop,
    assert_applied_once,
    outbox_settings,
    provider_counts,
    put_messages,
    statuses,
    table,
)

CRM = "crm_provider"


@pytest.fixture
def sim(clock: ManualClock) -> Iterator[RunningSimulator]:
    """A simulator on 127.0.0.1 running on the test's manual clock."""
    with run_simulator(clock=clock.now, seed=4) as running:
        yield running


def _settings(sim: RunningSimulator, **provider: Any) -> Settings:
    settings = outbox_settings(sim.url, max_retries=10)
    if not provider:
        return settings
    return settings.with_providers(replace(settings.provider(CRM), **provider))


def _worker(
    loop: Loop,
    engine: Engine,
    settings: Settings,
    gateway: AsyncGateway,
    clock: ManualClock,
    **kw: Any,
) -> DrivenWorker:
    return loop.worker(
        engine,
        settings,
        gateway=gateway,
        providers=[CRM],
        clock=clock,
        rng=random.Random(8),
        **kw,
    )


def _provider_stats(sim: RunningSimulator) -> dict[str, Any]:
    with sim.state.lock:
        return sim.state.provider(CRM).stats()


def _check_applied_once_in_order(sim: RunningSimulator, expected: int) -> None:
    counts = provider_counts(sim, CRM)
    # 503s answer before the request reaches the provider: no send is repeated.
    assert_applied_once(counts, expected)
    for record_id, seqs in counts.writes.items():
        assert seqs == sorted(seqs), record_id


def test_provider_calls_carry_the_idempotency_key_and_apply_once(
    loop: Loop, engine: Engine, sim: RunningSimulator, clock: ManualClock
) -> None:
    """Each queued PUT reaches the provider with its Idempotency-Key, applied once, in key order."""
    settings = _settings(sim)
    put_messages(engine, 40, keys=5, clock=clock)
    sim.control.set_fault(CRM, "error", status=503, ratio=0.3)
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep, seed=3)
    worker = _worker(loop, engine, settings, gateway, clock)
    for _ in range(200):
        if worker.run_once().leased == 0:
            if statuses(engine) == {"delivered": 40}:
                break
            clock.advance(5)

    assert {"delivered": 40} == statuses(engine)
    _check_applied_once_in_order(sim, 40)
    keys = set(_provider_stats(sim)["idempotency"]["applications"])
    assert {r.idempotency_key for r in table(engine)} == keys


@pytest.mark.parametrize("step", [60.0])
def test_two_hour_outage_dead_letters_nothing_and_drains_after(
    loop: Loop, engine: Engine, sim: RunningSimulator, clock: ManualClock, step: float
) -> None:
    """A 2 h outage with max_retries=10 dead-letters nothing; afterwards everything is delivered."""
    settings = _settings(sim, breaker=BreakerPolicy(reset_timeout=30.0))
    put_messages(engine, 60, keys=6, clock=clock)
    sim.control.outage(CRM)
    end = clock.time() + 2 * 3600
    open_seen = 0
    cycles = 0
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep, seed=5)
    worker = _worker(loop, engine, settings, gateway, clock)
    while clock.time() < end:
        worker.run_once()
        cycles += 1
        open_seen += gateway.breaker_state(CRM) == "open"
        clock.advance(step)
    during = table(engine)
    sim.control.clear_faults(CRM)
    for _ in range(400):
        if worker.run_once().leased == 0:
            if statuses(engine) == {"delivered": 60}:
                break
            clock.advance(step)

    assert 0 == sum(r.status == "dead" for r in during)
    assert max(r.attempts for r in during) <= 2  # only attempts made before the breaker opened
    assert open_seen > cycles * 0.9  # the breaker really was open nearly all the time
    assert _provider_stats(sim)["requests"]["record"] > 100  # trials kept probing
    assert {"delivered": 60} == statuses(engine)
    _check_applied_once_in_order(sim, 60)


def _webhooks(engine: Engine, clock: ManualClock, event: str, count: int) -> None:
    with Session(engine) as session, session.begin():
        for n in range(count):
            message = NewMessage.webhook(
                CRM,
                event,
                {"deal_id": n, "stage": "won"},
                webhook_id=f"evt_{n}",
                occurred_at=clock.now(),
            )
            enqueue(session, message, now=clock.now())


def test_webhooks_are_signed_and_accepted_by_a_standard_webhooks_receiver(
    loop: Loop, sqlite_engine: Engine, sim: RunningSimulator, clock: ManualClock
) -> None:
    """The simulator's receiver verifies each signature and sees the stored body and webhook-id."""
    settings = _settings(sim)
    _webhooks(sqlite_engine, clock, "deal.won", 3)
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep)
    result = _worker(loop, sqlite_engine, settings, gateway, clock).run(until_idle=True)

    deliveries = sim.control.inbound_deliveries(CRM)
    inbound = _provider_stats(sim)["inbound"]
    stored = {r.payload["webhook_id"]: json.loads(r.payload["body"]) for r in table(sqlite_engine)}
    assert 3 == result.delivered
    assert (3, {}) == (inbound["accepted"], inbound["rejected"])
    assert {d["webhook_id"]: d["payload"] for d in deliveries} == stored
    assert {"type": "deal.won", "data": {"deal_id": 0, "stage": "won"}} == {
        k: v for k, v in stored["evt_0"].items() if k != "timestamp"
    }


def test_every_failed_webhook_attempt_is_counted(
    loop: Loop, sqlite_engine: Engine, sim: RunningSimulator, clock: ManualClock, metrics: Metrics
) -> None:
    """webhook_delivery_failures_total{provider} grows by one per failed attempt."""
    settings = _settings(sim, retry=RetryPolicy(max_attempts=1))
    sim.control.configure_receiver(CRM, mode="fail", fail_status=503, fail_ratio=1.0)
    _webhooks(sqlite_engine, clock, "deal.lost", 1)
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep)
    worker = _worker(loop, sqlite_engine, settings, gateway, clock)
    for _ in range(3):
        worker.run_once()
        clock.advance(60)
    failures = sample(metrics, "webhook_delivery_failures_total", provider=CRM)
    received = _provider_stats(sim)["inbound"]["received"]
    sim.control.configure_receiver(CRM, mode="accept")
    worker.run_once()

    assert (3.0, 3) == (failures, received)
    assert {"delivered": 1} == statuses(sqlite_engine)
    assert 3.0 == sample(metrics, "webhook_delivery_failures_total", provider=CRM)


def test_410_stops_deliveries_until_retries_are_queued(
    loop: Loop, engine: Engine, sim: RunningSimulator, clock: ManualClock, metrics: Metrics
) -> None:
    """After a 410 the receiver gets nothing more; queue_webhook_retries re-opens and re-queues."""
    settings = _settings(sim)
    sim.control.configure_receiver(CRM, mode="gone")
    _webhooks(engine, clock, "deal.won", 4)
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep)
    # One at a time: with concurrency N, up to N - 1 sends already in flight
    # beside the one that gets the 410 cannot be called back.
    worker = _worker(loop, engine, settings, gateway, clock, concurrency=1)
    stopped = worker.run(until_idle=True)
    received_while_gone = _provider_stats(sim)["inbound"]["received"]
    dead = [r.last_error or "" for r in table(engine)]
    sim.control.configure_receiver(CRM, mode="accept")
    requeued = queue_webhook_retries(CRM, 5, settings=settings, engine=engine, now=clock.now())
    resumed = worker.run(until_idle=True)

    assert (0, 4) == (stopped.delivered, stopped.dead)
    assert 1 == received_while_gone  # one 410, then nothing more was sent
    assert 1 == sum("HTTP 410" in e for e in dead)
    assert 3 == sum("receiver gone" in e for e in dead)
    assert 1.0 == sample(metrics, "webhook_delivery_failures_total", provider=CRM)
    assert (4, 1) == (requeued.dead, requeued.receivers_reactivated)
    assert 4 == resumed.delivered
    assert 4 == _provider_stats(sim)["inbound"]["accepted"]
