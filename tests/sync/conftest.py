"""Shared helpers for sync tests: events, a host table written by handlers, engines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from idis.integrations.providers import ProviderEvent
from idis.integrations.sync._inbox import HandlerRegistry

T0 = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def make_event(
    seq: int,
    *,
    record_id: str | None = None,
    version: int = 1,
    type_: str = "record.updated",
    at: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> ProviderEvent:
    """An event shaped like the simulator's."""
    return ProviderEvent(
        id=f"evt_{seq}",
        seq=seq,
        type=type_,
        record_id=record_id or f"rec_{seq}",
        tenant_id="tenant_1",
        version=version,
        occurred_at=at or T0 + timedelta(seconds=seq),
        data=data if data is not None else {"n": seq},
    )


class HostTable:
    """A host-owned table the handlers write to, so tests see what was applied."""

    DDL = (
        "CREATE TABLE IF NOT EXISTS host_applied ("
        " id INTEGER PRIMARY KEY, event_id VARCHAR(64) NOT NULL, record_id VARCHAR(64),"
        " version INTEGER, source VARCHAR(16))"
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            conn.execute(
                text(self.DDL.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"))
                if engine.dialect.name == "postgresql"
                else text(self.DDL)
            )

    def handler(self, session: Session, event: ProviderEvent) -> None:
        session.execute(
            text("INSERT INTO host_applied (event_id, record_id, version) VALUES (:e, :r, :v)"),
            {"e": event.id, "r": event.record_id, "v": event.version},
        )

    def rows(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            return [
                (r[0], r[1], r[2])
                for r in conn.execute(
                    text("SELECT event_id, record_id, version FROM host_applied ORDER BY id")
                )
            ]

    def registry(self, *types: str) -> HandlerRegistry:
        registry = HandlerRegistry()
        for event_type in types or ("*",):
            registry.register(event_type, self.handler)
        return registry


@pytest.fixture
def host(engine: Engine) -> HostTable:
    """The host table on the test database."""
    return HostTable(engine)


@pytest.fixture
def sqlite_host(sqlite_engine: Engine) -> HostTable:
    """The host table on a SQLite test database (for tests the backend cannot change)."""
    return HostTable(sqlite_engine)


class OffsetClock:
    """Real time plus an offset that tests move forward (implements the library's Clock).

    Shared with the simulator (``run_simulator(clock=clock.now)``), so provider
    timestamps, webhook signatures and the library's thresholds agree while
    minutes of simulated time pass in milliseconds.
    """

    def __init__(self) -> None:
        import threading

        self._offset = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        import time as _time

        with self._lock:
            return _time.time() + self._offset

    def monotonic(self) -> float:
        import time as _time

        with self._lock:
            return _time.monotonic() + self._offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds


class Recorder:
    """A host handler that records every call (event id, record, version) thread-safely."""

    def __init__(self) -> None:
        import threading

        self.calls: list[tuple[str, str, int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, session: Session, event: ProviderEvent) -> None:
        with self._lock:
            self.calls.append((event.id, event.record_id, event.version, event.type))

    def registry(self) -> HandlerRegistry:
        registry = HandlerRegistry()
        registry.register("*", self)
        return registry
