"""Fixtures for the outbox tests: settings, a manual clock, a recording delivery.

Engines on real databases (``engine``, ``sqlite_engine``, ``pg_engine``) come from
the shared ``tests/conftest.py``.

The recording delivery is a delivery *strategy*, the worker's plug point (what
a service passes as ``deliver=``), not a mock of library code: the worker,
its SQL and its decisions run for real against SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.config import OutboxSettings, Settings
from idis.integrations.exceptions import ProviderUnavailable
from idis.integrations.outbox._enqueue import enqueue_many
from idis.integrations.outbox._messages import NewMessage, OutboxMessage
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.testing import simulator_settings

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
