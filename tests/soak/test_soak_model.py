"""The fault soak's reference model as a hypothesis state machine, on SQLite and PostgreSQL.

The library's real outbox worker and inbox paths (webhook receiver, poller, replay) run
against the real simulator over loopback HTTP, behind ``benchmarks.soak_model``'s fault
wrapper. Hypothesis interleaves enqueues, deliveries, failures after the provider applied,
killed workers whose leases lapse, webhook redeliveries, polls and replays; after every step
nothing may be applied twice or out of order per key, and at the end (faults cleared, the
outbox drained, a replay run) nothing may be lost.

``python -m benchmarks.soak`` runs the same model with 4 worker processes, at scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from benchmarks.soak_model import (
    HostTable,
    ProviderFaults,
    check_inbound,
    check_outbox,
    provider_events,
    serve_simulator,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from idis.integrations._backoff import set_testing
from idis.integrations.config import (
    BreakerPolicy,
    OutboxSettings,
    RetryPolicy,
    Settings,
    TimeoutPolicy,
)
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.outbox import (
    AsyncGatewayDelivery,
    AsyncOutboxWorker,
    BatchResult,
    NewMessage,
    enqueue_many,
)
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.providers import AsyncProviderClient, ProviderClient
from idis.integrations.reconciliation import reconcile
from idis.integrations.resilience import AsyncGateway, Gateway
from idis.integrations.simulator import SimulatorState
from idis.integrations.sync._poller import Poller
from idis.integrations.testing import simulator_settings
from idis.integrations.webhooks import WebhookReceiver
from idis.integrations.webhooks._signing import sign_headers

from ..conftest import dies_whole

SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLXdlYmhvb2s="  # the simulator's public default
KEYS = 3
RECORDS = 3
_names = itertools.count()


class Killed(BaseException):
    """A worker process dying right after its send reached the provider (SIGKILL)."""


class Env:
    """What every example shares: the simulator behind its fault wrapper, the database."""

    def __init__(self, url: str, sim_url: str, state: SimulatorState, faults: ProviderFaults):
        self.url, self.sim_url, self.state, self.faults = url, sim_url, state, faults


@pytest.fixture(scope="module")
def simulator() -> Iterator[tuple[str, SimulatorState, ProviderFaults]]:
    state = SimulatorState(seed=11)
    faults = ProviderFaults(seed=11, hang=2.0)
    with serve_simulator(state, faults) as url:
        yield url, state, faults


class SoakModel(RuleBasedStateMachine):
    """One example: fresh providers (names unique per example), the shared database."""

    env: Env

    def __init__(self) -> None:
        super().__init__()
        env = self.env
        n = next(_names)
        self.out, self.inv, self.mod = f"so{n}", f"si{n}", f"sm{n}"
        env.faults.versionless.add(self.mod)
        base = simulator_settings(
            env.sim_url,
            providers=(self.out, self.inv, self.mod),
            database_url=env.url,
            retry=RetryPolicy(max_attempts=1),
            timeouts=TimeoutPolicy(connect=2.0, read=0.5, write=2.0, pool=2.0, deadline=5.0),
            # The model is about the queue, not the breaker: no failure pattern opens it here.
            breaker=BreakerPolicy(failure_threshold=100_000, minimum_calls=100_000),
        )
        # No fault hangs the inbound feeds: their read timeout is generous, so a replay or
        # poll that a loaded CI machine slows is not mistaken for a fault the model plays.
        # Only the outbox's provider keeps a read timeout below the fault wrapper's hang.
        inbound = TimeoutPolicy(connect=2.0, read=10.0, write=2.0, pool=2.0, deadline=20.0)
        self.settings: Settings = base.with_providers(
            replace(base.provider(self.inv), timeouts=inbound),
            replace(base.provider(self.mod), order_by="modified", timeouts=inbound),
        )
        self.settings = replace(
            self.settings,
            outbox=OutboxSettings(
                max_retries=4,
                batch_size=4,
                concurrency=1,
                lease=timedelta(seconds=60),
                poll_interval=timedelta(0),
                initial_backoff=timedelta(milliseconds=1),
                max_backoff=timedelta(milliseconds=1),
            ),
        )
        self.engine: Engine = _engine(env.url)
        self.host = HostTable(self.engine)
        self.gateway = Gateway(self.settings)
        self.expected: dict[str, list[str]] = {f"{self.out}-k{k}": [] for k in range(KEYS)}
        # A record the provider always refuses: its messages are poison.
        self.poison_record = f"{self.out}-poison"
        env.faults.poison.add(self.poison_record)
        self.expected[self.poison_record] = []
        self.zombies: list[str] = []
        self.since = datetime.now(UTC) - timedelta(minutes=1)
        self.receivers = {
            name: WebhookReceiver(
                self.settings, self.engine, registry=self.host.registry(name), providers=[name]
            )
            for name in (self.inv, self.mod)
        }
        self.runner = asyncio.Runner()
        self.async_engine = create_async_db_engine(env.url)
        self.async_gateway = AsyncGateway(self.settings)
        self.worker = AsyncOutboxWorker(
            self.async_engine, self.settings, gateway=self.async_gateway, providers=[self.out]
        )

    # ----------------------------------------------------------------- outbox rules

    @rule(key=st.integers(0, KEYS), count=st.integers(1, 3))
    def enqueue(self, key: int, count: int) -> None:
        """Key ``KEYS`` is the poison record."""
        record = f"{self.out}-k{key}" if key < KEYS else self.poison_record
        keys = self.expected[record]
        messages = []
        for _ in range(count):
            idem = f"{record}-m{len(keys)}"
            keys.append(idem)
            messages.append(
                NewMessage.request(
                    self.out,
                    "record",
                    method="PUT",
                    path_params={"id": record},
                    json={"data": {"n": len(keys)}},
                    idempotency_key=idem,
                    ordering_key=record,
                )
            )
        with Session(self.engine) as session, session.begin():
            enqueue_many(session, messages)

    def _run_once(self, worker: AsyncOutboxWorker | None = None) -> BatchResult:
        """One cycle of ``worker`` (the outbox worker by default) on the machine's loop."""
        return self.runner.run(dies_whole((worker or self.worker).run_once()))

    @rule()
    def deliver(self) -> None:
        self._run_once()

    @rule(kind=st.sampled_from(["error_after", "timeout_after"]))
    def fail_after_apply(self, kind: str) -> None:
        self.env.faults.arm(self.out, kind)
        self._run_once()
        self.env.faults.disarm()

    @rule()
    def kill_a_lease(self) -> None:
        """A worker leases a batch, sends one message, dies; its leases are made to lapse."""
        real = AsyncGatewayDelivery(self.async_gateway, self.settings)

        async def send_then_die(message: Any) -> None:
            await real(message)
            raise Killed

        zombie = AsyncOutboxWorker(
            self.async_engine, self.settings, deliver=send_then_die, providers=[self.out]
        )
        with contextlib.suppress(Killed):
            self._run_once(zombie)
        self._expire(zombie.worker_id)

    def _expire(self, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(OutboxMessageRow)
                .where(OutboxMessageRow.lease_owner == owner)
                .values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
            )

    # ----------------------------------------------------------------- inbound rules

    @rule(provider=st.sampled_from(["inv", "mod"]), count=st.integers(1, 4))
    def provider_changes(self, provider: str, count: int) -> None:
        name = getattr(self, provider)
        records = [f"{name}-r{i}" for i in range(RECORDS)]
        self.env.state.emit(name, count, record_ids=records[: count % RECORDS + 1], webhook=False)

    @rule(provider=st.sampled_from(["inv", "mod"]), pick=st.integers(0, 10_000))
    def webhook(self, provider: str, pick: int) -> None:
        """Deliver (or redeliver: picks repeat) one of the provider's events by webhook."""
        name = getattr(self, provider)
        events = provider_events(self.env.state, name)
        if not events:
            return
        event = events[pick % len(events)]
        body = json.dumps(
            {"type": event["type"], "timestamp": event["occurred_at"], "data": event}
        ).encode()
        headers = sign_headers(SECRET, body, msg_id=event["id"], timestamp=datetime.now(UTC))
        self.receivers[name].handle(name, headers, body)

    @rule(provider=st.sampled_from(["inv", "mod"]))
    def poll(self, provider: str) -> None:
        name = getattr(self, provider)
        poller = Poller(
            AsyncProviderClient(self.async_gateway, name),
            self.async_engine,
            self.settings,
            name,
            registry=self.host.registry(name),
        )
        self.runner.run(poller.poll_once())

    @rule(provider=st.sampled_from(["inv", "mod"]))
    def replay(self, provider: str) -> None:
        self._replay(getattr(self, provider))

    def _replay(self, name: str) -> None:
        summary = reconcile(
            name,
            self.since,
            settings=self.settings,
            handlers=self.host.registry(name),
            engine=self.engine,
            client=ProviderClient(self.gateway, name),
            resume=False,
            actor="soak",
        )
        assert summary.ok, summary.failures

    # ----------------------------------------------------------------- invariants

    def _outbox(self) -> Any:
        stats = self.env.state.stats(self.out)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(OutboxMessageRow.idempotency_key, OutboxMessageRow.status).where(
                    OutboxMessageRow.provider == self.out
                )
            ).all()
        statuses: dict[str, str] = {str(key): str(status) for key, status in rows}
        return check_outbox(
            self.expected,
            self.expected[self.poison_record],
            stats["writes"],
            statuses,
            self.env.faults.log,
        )

    @invariant()
    def nothing_applied_twice_or_out_of_order(self) -> None:
        figures = self._outbox()
        assert figures.applied_twice == 0, figures.examples
        assert figures.out_of_order == 0, figures.examples
        for name in (self.inv, self.mod):
            inbound = check_inbound(
                provider_events(self.env.state, name), self.host.rows(name), final=False
            )
            assert inbound.applied_twice == 0, (name, inbound.examples)
            assert inbound.out_of_order == 0, (name, inbound.examples)

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            self.runner.run(self.async_gateway.aclose())
            self.runner.run(self.async_engine.dispose())
            self.runner.close()
            self.gateway.close()
            self.engine.dispose()

    def _finish(self) -> None:
        """Faults cleared and everything caught up: nothing lost."""
        self.env.faults.disarm()
        with self.engine.begin() as conn:
            conn.execute(
                update(OutboxMessageRow)
                .where(OutboxMessageRow.provider == self.out)
                .where(OutboxMessageRow.lease_owner != self.worker.worker_id)
                .values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
            )
        for _ in range(200):
            self._run_once()
            now = self._outbox()
            if now.pending == 0 and now.poison_dead == now.poison:
                break
        figures = self._outbox()
        assert figures.clean, figures.examples
        assert figures.pending == 0, figures
        # Poison is dead-lettered and wedged nothing (every other message was applied above).
        assert figures.poison_dead == figures.poison, figures
        for name in (self.inv, self.mod):
            self._replay(name)
            inbound = check_inbound(provider_events(self.env.state, name), self.host.rows(name))
            assert inbound.clean, (name, inbound.examples)


def _engine(url: str) -> Engine:
    from idis.integrations.db._engine import create_db_engine

    return create_db_engine(url)


def test_the_soak_model_holds(
    db_url: str, simulator: tuple[str, SimulatorState, ProviderFaults]
) -> None:
    """Random interleavings of deliveries, faults and inbound channels keep every invariant."""
    sim_url, state, faults = simulator

    class Bound(SoakModel):
        env = Env(db_url, sim_url, state, faults)

    with set_testing(attempts=1):
        run_state_machine_as_test(
            Bound,
            settings=settings(
                max_examples=8,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
            ),
        )
