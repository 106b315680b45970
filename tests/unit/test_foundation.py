"""The foundation layer: one flow driven sync and async, one backoff policy, one clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from idis.integrations._backoff import Backoff, effective_attempts, set_testing
from idis.integrations._clock import ManualClock
from idis.integrations._flow import (
    AsyncIO,
    Both,
    Flow,
    InSession,
    Sleep,
    SyncIO,
    Transaction,
    adrive,
    drive,
    perform,
)
from idis.integrations.db import create_async_db_engine, create_db_engine


@pytest.fixture(params=["sync", "async"])
def run(request: pytest.FixtureRequest) -> Any:
    """Run a flow through one of the two drivers (every flow test runs through both)."""

    def runner(flow: Flow[Any], *, clock: ManualClock, engine_url: str | None = None) -> Any:
        if request.param == "sync":
            engine = create_db_engine(engine_url) if engine_url else None
            try:
                return drive(flow, SyncIO(clock=clock, engine=engine))
            finally:
                if engine is not None:
                    engine.dispose()

        async def main() -> Any:
            engine = create_async_db_engine(engine_url) if engine_url else None
            try:
                return await adrive(flow, AsyncIO(clock=clock, engine=engine))
            finally:
                if engine is not None:
                    await engine.dispose()

        return asyncio.run(main())

    return runner


class Boom(Exception):
    """Raised by an effect on purpose."""


def _raise() -> None:
    raise Boom("effect failed")


async def _araise() -> None:
    raise Boom("effect failed")


def test_sleep_moves_a_manual_clock_instead_of_blocking(run: Any) -> None:
    """A flow's Sleep goes through the io's clock, in both drivers."""
    clock = ManualClock()
    start = clock.time()

    def flow() -> Flow[float]:
        yield from perform(Sleep(30.0))
        yield Sleep(15.0)
        return clock.time() - start

    assert 45.0 == run(flow(), clock=clock)


def test_an_effect_error_is_thrown_into_the_flow_which_may_handle_it(run: Any) -> None:
    """The flow sees the effect's exception at its yield and decides what happens next."""

    def flow() -> Flow[str]:
        try:
            yield Both(_raise, _araise)
        except Boom as exc:
            return f"handled: {exc}"
        return "not reached"

    assert "handled: effect failed" == run(flow(), clock=ManualClock())


def test_an_unhandled_effect_error_reaches_the_caller_after_finally(run: Any) -> None:
    """Whatever the flow does not handle propagates, and its finally blocks ran."""
    cleaned: list[str] = []

    def flow() -> Flow[None]:
        try:
            yield Both(_raise, _araise)
        finally:
            cleaned.append("released")

    with pytest.raises(Boom):
        run(flow(), clock=ManualClock())

    assert ["released"] == cleaned


def test_transactions_commit_and_roll_back_the_same_way(run: Any, tmp_path: Any) -> None:
    """A Transaction commits on success and rolls back when its work raises, in both drivers."""
    url = f"sqlite:///{tmp_path / 'flow.sqlite3'}"
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER)"))
    engine.dispose()

    def insert(value: int, fail: bool) -> Any:
        def work(session: Session) -> int:
            session.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
            if fail:
                raise Boom("rolled back")
            return value

        return work

    def count(session: Session) -> list[int]:
        return [row[0] for row in session.execute(text("SELECT v FROM t ORDER BY v"))]

    def flow() -> Flow[list[int]]:
        yield from perform(Transaction(insert(1, False)))
        with contextlib.suppress(Boom):
            yield from perform(Transaction(insert(2, True)))
        return (yield from perform(Transaction(count, write=False)))

    assert [1] == run(flow(), clock=ManualClock(), engine_url=url)


def test_in_session_runs_inside_the_callers_transaction(tmp_path: Any) -> None:
    """InSession uses the caller's session: nothing commits until the caller does."""
    url = f"sqlite:///{tmp_path / 'in.sqlite3'}"
    engine = create_db_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER)"))

    def flow() -> Flow[None]:
        yield InSession(lambda s: s.execute(text("INSERT INTO t (v) VALUES (7)")))

    with Session(engine) as session:
        drive(flow(), SyncIO(session=session))
        session.rollback()
    with engine.connect() as conn:
        assert 0 == conn.execute(text("SELECT COUNT(*) FROM t")).scalar()
    engine.dispose()


def test_cancellation_is_thrown_into_the_flow() -> None:
    """Cancelling the task driving a flow runs the flow's finally blocks."""
    cleaned: list[str] = []
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    def flow() -> Flow[None]:
        try:
            yield Both(lambda: None, hang)
        finally:
            cleaned.append("released")

    async def main() -> None:
        task = asyncio.create_task(adrive(flow(), AsyncIO()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())

    assert ["released"] == cleaned


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize("failures", range(1, 80))
def test_backoff_delay_stays_within_its_cap(failures: int) -> None:
    """Full jitter is uniform in [0, cap] and the cap never exceeds the maximum."""
    policy = Backoff(initial=0.2, maximum=10.0)
    delay = policy.delay(failures, random.Random(failures))

    assert 0.0 <= delay <= policy.cap(failures) <= 10.0


def test_backoff_cap_grows_exponentially_until_the_maximum() -> None:
    """The cap doubles per failure from ``initial`` until it reaches ``maximum``."""
    policy = Backoff(initial=0.5, maximum=5.0, multiplier=2.0)

    assert [0.5, 1.0, 2.0, 4.0, 5.0, 5.0] == [policy.cap(n) for n in range(1, 7)]


def test_equal_jitter_keeps_half_the_cap() -> None:
    """Equal jitter never waits less than half the cap, so a reconnect loop never spins."""
    policy = Backoff(initial=4.0, maximum=4.0, jitter="equal")
    rng = random.Random(3)

    assert all(2.0 <= policy.delay(1, rng) <= 4.0 for _ in range(200))
    assert 4.0 == Backoff(initial=4.0, maximum=4.0, jitter="none").delay(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": -1.0}, "initial=-1.0"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum=1.0"),
        ({"multiplier": 0.5}, "multiplier=0.5"),
        ({"jitter": "sometimes"}, "jitter='sometimes'"),
        ({"initial": float("nan")}, "initial=nan"),
    ],
)
def test_a_bad_backoff_names_the_value(kwargs: dict[str, Any], message: str) -> None:
    """An invalid backoff is refused with a message naming the bad field and value."""
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


def test_testing_mode_turns_every_backoff_off_and_restores_it() -> None:
    """Inside set_testing every Backoff waits 0 and attempts are capped; outside, not."""
    policy = Backoff(initial=1.0, maximum=1.0, jitter="none")

    with set_testing(attempts=2):
        assert 0.0 == policy.delay(5)
        assert 2 == effective_attempts(7)
    assert 1.0 == policy.delay(5)
    assert 7 == effective_attempts(7)
