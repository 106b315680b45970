"""reconcile_async(): async handlers are awaited (the async face only), both databases."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncSession

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.reconciliation import reconcile_async
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.testing import RunningSimulator

from .conftest import PROVIDER, Host, audit_rows, count_inbox, reconcile_host, settings_for


def _async_registry(fail_on: str | None = None) -> HandlerRegistry:
    registry = HandlerRegistry()

    async def apply(session: AsyncSession, event: Any) -> None:
        if event.record_id == fail_on:
            raise RuntimeError(f"host cannot take {event.record_id}")
        await session.execute(
            text(
                f"INSERT INTO {reconcile_host.TABLE} (event_id, event_type, record_id, version) "
                "VALUES (:e, :t, :r, :v)"
            ),
            {"e": event.id, "t": event.type, "r": event.record_id, "v": event.version},
        )

    registry.register_async("*", apply)
    return registry


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_driver_applies_each_missing_event_once_through_async_handlers(
    sim: RunningSimulator, engine: Engine, host: Host, db_url: str, anyio_backend: str
) -> None:
    """Async handlers are awaited; a failing one loses only its event; a rerun applies it."""
    settings = settings_for(sim, db_url)
    since = utcnow() - timedelta(seconds=1)
    sim.control.emit(PROVIDER, 90, webhook=False)
    async_engine = create_async_db_engine(db_url)
    try:
        first = await reconcile_async(
            PROVIDER,
            since,
            settings=settings,
            handlers=_async_registry(fail_on="rec_40"),
            engine=async_engine,
            page_size=25,
        )
        second = await reconcile_async(
            PROVIDER, since, settings=settings, handlers=_async_registry(), engine=async_engine
        )
        dry = await reconcile_async(
            PROVIDER, since, settings=settings, engine=async_engine, dry_run=True
        )
    finally:
        await async_engine.dispose()

    applied = host.applied_ids()
    assert (90, 89, 1) == (first.fetched, first.applied, first.failed)
    assert (1, 89, True) == (second.applied, second.already_applied, second.ok)
    assert (0, 90) == (dry.applied, dry.already_applied)
    assert 90 == len(applied) == len(set(applied))
    assert 90 == count_inbox(engine, source="replay")
    assert 90 == len(audit_rows(engine, "reconcile.event_applied"))
    assert ["rec_40"] == [r.subject_id for r in audit_rows(engine, "reconcile.event_failed")]
