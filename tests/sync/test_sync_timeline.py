"""Coverage intervals per provider and source: recorded, merged on write, read back clipped."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations.db._engine import async_session_factory, create_async_db_engine
from idis.integrations.exceptions import UsageError
from idis.integrations.sync._models import SyncCoverage
from idis.integrations.sync._timeline import (
    CoveredInterval,
    coverage,
    coverage_async,
    record_coverage,
    record_coverage_async,
)

from .conftest import T0

P = "crm_provider"


def _m(minutes: float) -> timedelta:
    return timedelta(minutes=minutes)


def test_touching_and_overlapping_intervals_merge_per_source(engine: Engine) -> None:
    """Sentinel confirmations that abut, and poll windows that overlap, become one row each."""
    factory = sessionmaker(engine)
    with factory.begin() as session:
        for start in range(10):
            record_coverage(session, P, "webhook", T0 + _m(start), T0 + _m(start + 1))
        record_coverage(session, P, "poll", T0 + _m(20), T0 + _m(25))
        record_coverage(session, P, "poll", T0 + _m(23), T0 + _m(30))
        record_coverage(session, P, "poll", T0 + _m(40), T0 + _m(45))
        record_coverage(session, "docs_provider", "poll", T0, T0 + _m(60))

    with Session(engine) as session:
        rows = session.scalar(select(func.count()).select_from(SyncCoverage))
        intervals = coverage(session, P, T0 - _m(5), T0 + _m(60))

    assert 4 == rows
    assert [
        CoveredInterval(T0, T0 + _m(10), "webhook"),
        CoveredInterval(T0 + _m(20), T0 + _m(30), "poll"),
        CoveredInterval(T0 + _m(40), T0 + _m(45), "poll"),
    ] == intervals


def test_an_interval_bridging_two_rows_merges_them(sqlite_engine: Engine) -> None:
    """Recording a stretch that spans a gap between two rows leaves a single row."""
    factory = sessionmaker(sqlite_engine)
    with factory.begin() as session:
        record_coverage(session, P, "replay", T0, T0 + _m(5))
        record_coverage(session, P, "replay", T0 + _m(10), T0 + _m(15))
    with factory.begin() as session:
        record_coverage(session, P, "replay", T0 + _m(4), T0 + _m(11))

    with Session(sqlite_engine) as session:
        assert [CoveredInterval(T0, T0 + _m(15), "replay")] == coverage(session, P, T0, T0 + _m(60))
        assert 1 == session.scalar(select(func.count()).select_from(SyncCoverage))


def test_coverage_is_clipped_and_filtered(sqlite_engine: Engine) -> None:
    """Intervals are clipped to the window and can be filtered by source."""
    factory = sessionmaker(sqlite_engine)
    with factory.begin() as session:
        record_coverage(session, P, "webhook", T0, T0 + _m(30))
        record_coverage(session, P, "poll", T0 + _m(10), T0 + _m(20))

    with Session(sqlite_engine) as session:
        clipped = coverage(session, P, T0 + _m(5), T0 + _m(15))
        polls = coverage(session, P, T0, T0 + _m(60), sources=["poll"])
        outside = coverage(session, P, T0 + _m(31), T0 + _m(60))

    assert [
        CoveredInterval(T0 + _m(5), T0 + _m(15), "webhook"),
        CoveredInterval(T0 + _m(10), T0 + _m(15), "poll"),
    ] == clipped
    assert [CoveredInterval(T0 + _m(10), T0 + _m(20), "poll")] == polls
    assert [] == outside


def test_bad_coverage_is_refused(sqlite_engine: Engine) -> None:
    """Unknown sources, naive times and reversed intervals raise UsageError and write nothing."""
    with Session(sqlite_engine) as session:
        with pytest.raises(UsageError, match="source"):
            record_coverage(session, P, "carrier", T0, T0 + _m(1))
        with pytest.raises(UsageError, match="before start"):
            record_coverage(session, P, "poll", T0 + _m(1), T0)
        with pytest.raises(UsageError, match="aware"):
            record_coverage(session, P, "poll", T0.replace(tzinfo=None), T0 + _m(1))
        assert [] == coverage(session, P, T0 - _m(10), T0 + _m(10))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_twins(sqlite_url: str, anyio_backend: str) -> None:
    """record_coverage_async and coverage_async behave like the sync functions."""
    engine = create_async_db_engine(sqlite_url)
    factory = async_session_factory(engine)
    try:
        async with factory() as session, session.begin():
            await record_coverage_async(session, P, "replay", T0, T0 + _m(2))
            await record_coverage_async(session, P, "replay", T0 + _m(2), T0 + _m(3))
        async with factory() as session:
            found = await coverage_async(session, P, T0, T0 + _m(10))
    finally:
        await engine.dispose()

    assert [CoveredInterval(T0, T0 + _m(3), "replay")] == found
