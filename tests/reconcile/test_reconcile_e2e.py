"""RB-09 Recovery 3 end to end: webhooks over real HTTP, a stop window, replay, the timeline."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from idis.integrations._timeparse import parse_since, utcnow
from idis.integrations.config import Settings, SyncSettings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.reconciliation import timeline
from idis.integrations.sync._service import AsyncSyncService
from idis.integrations.testing import RunningSimulator, serve_asgi
from idis.integrations.webhooks import WebhookReceiver

from .conftest import PROVIDER, Host, audit_rows, count_inbox, settings_for

# The numbers on the embedded default (SQLite); a fifth of them on
# PostgreSQL, where 4,000 sequential webhook commits alone take about a minute
# on the 2-core CI machine. The replay path itself is the same code on both.
SIZES = {"sqlite": (1000, 500, 1000), "postgresql": (400, 200, 400)}


async def _sentinel_tick(settings: Settings, db_url: str, registry: Any) -> None:
    """One tick of the sync worker (async only): the sentinel confirms webhook coverage."""
    engine = create_async_db_engine(db_url)
    try:
        async with AsyncSyncService(
            settings, engine=engine, registry=registry, providers=[PROVIDER], receiver=False
        ) as service:
            await service.tick(PROVIDER)
    finally:
        await engine.dispose()


@pytest.mark.slow
def test_reconcile_applies_exactly_the_events_whose_webhooks_were_dropped(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """Of 2,500 changes whose webhooks skip 500, reconcile applies just those, audited, once."""
    head, hole, tail = SIZES[engine.dialect.name]
    total = head + hole + tail
    settings = settings_for(
        sim,
        db_url,
        # Keep the sync service from repairing the hole itself: this test is
        # about what reconcile does with it.
        sync=SyncSettings(lag_threshold=timedelta(hours=1)),
    )
    start = utcnow() - timedelta(seconds=1)
    receiver = WebhookReceiver(settings, engine, registry=host.registry, providers=[PROVIDER])
    with serve_asgi(receiver.asgi_app()) as receiver_url:
        sim.control.set_webhook_target(PROVIDER, f"{receiver_url}/{PROVIDER}")
        sim.control.emit(PROVIDER, head)
        sim.control.set_webhook_mode(PROVIDER, "stop")
        lost = sim.control.emit(PROVIDER, hole)
        sim.control.set_webhook_mode(PROVIDER, "deliver")
        sim.control.emit(PROVIDER, tail)
        assert sim.control.flush_webhooks(PROVIDER, timeout=120)
        # The sentinel confirms what webhooks delivered and records it in the timeline.
        asyncio.run(_sentinel_tick(settings, db_url, host.registry))
    end = utcnow()
    dropped = {e["id"] for e in lost}
    hole_start, hole_end = (parse_since(lost[i]["occurred_at"]) for i in (0, -1))
    assert head + tail == count_inbox(engine, source="webhook")
    # settle=0: the hole is seconds old here; by default the timeline would call
    # such a fresh trailing stretch "not confirmed yet" rather than a gap.
    strict = timedelta(0)
    before = timeline(PROVIDER, start, end, settings=settings, engine=engine, settle=strict)

    first = reconcile_any(PROVIDER, start, settings=settings, handlers=host.registry, engine=engine)
    second = reconcile_any(
        PROVIDER, start, settings=settings, handlers=host.registry, engine=engine
    )
    after = timeline(PROVIDER, start, end, settings=settings, engine=engine, settle=strict)

    applied = host.applied_ids()
    audited = audit_rows(engine, "reconcile.event_applied")
    assert any(g.start <= hole_start and hole_end <= g.end for g in before.gaps)
    assert (total, head + tail, hole, 0) == (
        first.fetched,
        first.already_applied,
        first.applied,
        first.failed,
    )
    assert dropped == set(applied[head + tail :])
    assert len(applied) == len(set(applied)) == total
    assert dropped == {row.details["event_id"] for row in audited}
    assert {"replay"} == {row.source for row in audited}
    assert {first.run_id} == {row.correlation_id for row in audited}
    assert (0, total) == (second.applied, second.already_applied)
    assert after.no_gaps, after.statement()
    assert hole == count_inbox(engine, source="replay")
