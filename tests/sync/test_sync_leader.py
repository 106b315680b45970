"""Poller leadership on PostgreSQL: one replica polls at a time; kill it and another takes over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.db._engine import (
    async_session_factory,
    create_async_db_engine,
    create_db_engine,
)
from idis.integrations.sync._leader import LeaderLock, lock_key, next_attempt
from idis.integrations.sync._models import SyncInbox
from idis.integrations.testing import RunningSimulator, run_simulator

P = "crm_provider"
REPLICA = Path(__file__).with_name("_sync_replica.py")
LOCK_TIMEOUT = 3.0
WAIT = 60.0


def test_lock_key_is_stable_and_distinct() -> None:
    """Keys are signed 64-bit, the same every run, and differ per name."""
    key = lock_key("sync:crm_provider")

    assert key == lock_key("sync:crm_provider")
    assert key != lock_key("sync:docs_provider")
    assert -(2**63) <= key < 2**63


def test_standbys_try_every_third_of_the_lock_timeout() -> None:
    """next_attempt allows a try at once, then every lock_timeout / 3."""
    timeout = timedelta(seconds=3)

    assert next_attempt(None, 100.0, timeout)
    assert not next_attempt(100.0, 100.9, timeout)
    assert next_attempt(100.0, 101.0, timeout)


@asynccontextmanager
async def _locks(url: str, *replicas: str, clock: Any = None) -> AsyncIterator[list[LeaderLock]]:
    """One LeaderLock per replica name for crm_provider, on their own async engine."""
    engine = create_async_db_engine(url)
    sessions = async_session_factory(engine)
    locks = [
        LeaderLock(
            url,
            P,
            sessions=sessions,
            replica=name,
            lock_timeout=timedelta(seconds=LOCK_TIMEOUT),
            clock=clock,
        )
        for name in replicas
    ]
    try:
        yield locks
    finally:
        for lock in locks:
            await lock.aclose()
        await engine.dispose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_leads_by_lease_and_fences_a_lapsed_leader(
    sqlite_url: str, anyio_backend: str
) -> None:
    """SQLite: one lease holder; a lapsed lease passes to another process with a new epoch,
    and the old leader's fenced writes are refused."""
    from idis.integrations.sync._state import Fenced, fence

    clock = ManualClock()
    async with _locks(sqlite_url, "a", "b", clock=clock) as (a, b):
        first = await a.acquire()
        assert first is not None
        assert await b.acquire() is None  # a holds an unexpired lease
        assert first == await a.acquire()  # renewed, same epoch
        clock.advance(LOCK_TIMEOUT + 1)  # a stalls past its lease
        second = await b.acquire()
        assert second is not None
        assert second > first
        assert await a.acquire() is None  # a notices it lost the lease
        async with a._sessions() as session:
            with pytest.raises(Fenced):
                await session.run_sync(lambda s: fence(s, P, first))
        await b.release()  # a clean stop lets the other lead at once
        assert await a.acquire() is not None


@pytest.mark.postgres
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_one_holder_at_a_time_and_release(pg_url: str, anyio_backend: str) -> None:
    """Two locks on PostgreSQL: the second fails while the first holds, succeeds after release;
    each leadership takes a new epoch."""
    async with _locks(pg_url, "a", "b") as (first, second):
        epoch = await first.acquire()
        assert epoch is not None
        assert await second.acquire() is None
        assert epoch == await first.acquire()  # still held: confirmed by a live connection
        await first.release()
        taken = await second.acquire()
        assert taken is not None
        assert taken > epoch
        assert await first.acquire() is None


class _Replica:
    """A replica subprocess and the JSON lines it prints, read on a thread."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(  # our own interpreter and script
            [sys.executable, str(REPLICA), name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def wait_for(self, predicate: Any, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = max(0, len(self.lines) - 1)
            if self.proc.poll() is not None and not self.lines[seen:]:
                break
            time.sleep(0.02)
        pytest.fail(f"replica {self.name} never got to: {what} (last: {self.lines[-1:]})")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """A simulator on 127.0.0.1."""
    with run_simulator() as running:
        yield running


def _advisory_locks(url: str) -> int:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                        "AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())"
                    )
                ).scalar()
                or 0
            )
    finally:
        engine.dispose()


def _inbox_count(url: str) -> int:
    engine = create_db_engine(url)
    try:
        with Session(engine) as session:
            return int(session.scalar(select(func.count()).select_from(SyncInbox)) or 0)
    finally:
        engine.dispose()


def _wait_for_inbox(url: str, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while _inbox_count(url) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"the inbox never reached {count} events")
        time.sleep(0.1)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_replicas_one_polls_and_the_other_takes_over_after_sigkill(
    pg_url: str, sim: RunningSimulator
) -> None:
    """Only the leader polls; SIGKILL it and the standby leads within one lock timeout (three
    attempts), and every event is applied exactly once across both."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_"))},
        "IDIS_DATABASE_URL": pg_url,
        "IDIS_SIMULATOR_URL": sim.url,
        "CRM_MODE": "polling",
        "CRM_POLL_INTERVAL": "200ms",
        "IDIS_SYNC_LOCK_TIMEOUT": f"{LOCK_TIMEOUT}s",
        "IDIS_SYNC_POLL_OVERLAP": "5s",
    }
    a = _Replica("a", env)
    b: _Replica | None = None
    try:
        a.wait_for(lambda line: line["leader"], "lead")
        b = _Replica("b", env)
        b.wait_for(lambda line: not line["leader"], "stand by")
        sim.control.emit(P, 20)
        a.wait_for(lambda line: line["polled"] and line["applied"] > 0, "poll")
        time.sleep(0.5)  # both keep ticking side by side
        locks_before = _advisory_locks(pg_url)
        assert not any(line["leader"] for line in b.lines)

        killed_at = time.time()
        a.kill()
        attempts_at_kill = max(line["attempts"] for line in b.lines)
        sim.control.emit(P, 20)
        took_over = b.wait_for(lambda line: line["leader"], "take over")
        b.wait_for(lambda line: line["leader"] and line["polled"], "poll as leader")
        sim.control.emit(P, 10)
        _wait_for_inbox(pg_url, 50)
        locks_after = _advisory_locks(pg_url)
    finally:
        a.kill()
        if b is not None:
            b.kill()

    engine = create_db_engine(pg_url)
    with Session(engine) as session:
        inbox = session.scalar(select(func.count()).select_from(SyncInbox))
        applied = session.scalar(
            select(func.count()).select_from(SyncInbox).where(SyncInbox.status == "applied")
        )
    engine.dispose()

    assert (1, 1) == (locks_before, locks_after)
    assert max(line["t"] for line in a.lines) < took_over["t"]
    assert killed_at < took_over["t"]
    # Standbys try every lock_timeout / 3: three tries span one lock timeout.
    assert took_over["attempts"] - attempts_at_kill <= 3
    assert not any(line["polled"] for line in b.lines if not line["leader"])
    assert (50, 50) == (inbox, applied)
    assert lock_key(f"sync:{P}") != 0
