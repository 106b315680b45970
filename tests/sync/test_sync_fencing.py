"""Fencing: a poller deposed mid-poll, or racing an operator, never undoes a cursor rewind.

The leader checks its leadership once per tick, but one poll may read hundreds
of pages. Each leadership takes an epoch, and every page's cursor write is
compare-and-set on it (issue 11, "suspected": cursor writes had no
compare-and-set, so a late page of a deposed poller undid the new leader's
failover rewind).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog.testing
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations.config import SyncSettings
from idis.integrations.db._engine import (
    async_session_factory,
    create_async_db_engine,
    create_db_engine,
)
from idis.integrations.providers import AsyncProviderClient
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.sync._leader import LeaderLock
from idis.integrations.sync._mode import ModePolicy
from idis.integrations.sync._models import SyncCursor, SyncProviderState
from idis.integrations.sync._poller import Poller
from idis.integrations.sync._state import Fenced, fence, move_cursor, override_mode
from idis.integrations.testing import serve_asgi, simulator_settings

from .conftest import T0, FeedServer, HostTable, ServiceHarness, feed_event

P = "crm_provider"
#: Where a failover rewinds the cursor to: the last position webhooks were confirmed at.
REWIND = 5


def _settings(url: str, db_url: str) -> Any:
    return simulator_settings(
        url,
        providers=(P,),
        database_url=db_url,
        sync=SyncSettings(page_size=10, lock_timeout=timedelta(seconds=3)),
    )


def _feed_of_30() -> FeedServer:
    feed = FeedServer()
    start = datetime.now(UTC) - timedelta(seconds=40)  # inside the first poll's window
    for seq in range(1, 31):
        feed.append(feed_event(seq, f"deal_{seq % 4}", start + timedelta(seconds=seq), version=seq))
    return feed


def _cursor(engine: Engine) -> tuple[int | None, str | None, int]:
    with Session(engine) as session:
        cursor = session.scalar(select(SyncCursor))
        epoch = session.scalar(select(SyncProviderState.leader_epoch))
    assert cursor is not None
    return cursor.after_seq, cursor.moved_by, int(epoch or 0)


async def _poll_as_leader(settings: Any, db_url: str, registry: Any, replica: str) -> Any:
    """Take the leadership (epoch) and poll once under it, as the service's tick does."""
    engine = create_async_db_engine(db_url)
    sessions = async_session_factory(engine)
    gateway = AsyncGateway(settings)
    lock = LeaderLock(
        db_url, P, sessions=sessions, replica=replica, lock_timeout=timedelta(seconds=3)
    )
    try:
        epoch = await lock.acquire()
        assert epoch is not None
        poller = Poller(AsyncProviderClient(gateway, P), sessions, settings, P, registry=registry)
        return await poller.poll_once(epoch=epoch)
    finally:
        await lock.aclose()
        await gateway.aclose()
        await engine.dispose()


@pytest.mark.postgres
def test_a_poller_deposed_mid_poll_cannot_undo_the_new_leaders_rewind(pg_url: str) -> None:
    """Two pollers on PostgreSQL: A leads and polls; between its pages its lock connection
    drops, B takes over (a new epoch) and rewinds the cursor; A's next page changes nothing."""
    engine = create_db_engine(pg_url)
    host = HostTable(engine)
    feed = _feed_of_30()
    taken_over: list[int] = []

    def partition_then_takeover(params: dict[str, str]) -> None:
        if params.get("after") != "10" or taken_over:
            return
        # A's lock connection is gone (network partition, server restart): PostgreSQL
        # releases the advisory lock. A itself does not know until its next tick.
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name"
                ),
                {"name": f"idis-leader:sync:{P}"},
            )
        taken_over.append(asyncio.run(_take_over_and_rewind(settings, pg_url)))

    feed.on_request = partition_then_takeover
    try:
        with serve_asgi(feed.app()) as url:
            settings = _settings(url, pg_url)
            with pytest.raises(Fenced):
                asyncio.run(_poll_as_leader(settings, pg_url, host.registry(), "a"))
        after_seq, moved_by, epoch = _cursor(engine)
        applied = len(host.rows())
    finally:
        engine.dispose()

    assert [2] == taken_over  # B's epoch
    assert (REWIND, "failover", 2) == (after_seq, moved_by, epoch)
    assert 10 == applied  # A's first page only: its second changed nothing


async def _take_over_and_rewind(settings: Any, db_url: str) -> int:
    """Replica B: take the leadership and, like a failover, move the cursor back (fenced)."""
    engine = create_async_db_engine(db_url)
    sessions = async_session_factory(engine)
    lock = LeaderLock(db_url, P, sessions=sessions, replica="b", lock_timeout=timedelta(seconds=3))
    try:
        epoch = await lock.acquire()
        assert epoch is not None

        def rewind(session: Session) -> None:
            fence(session, P, epoch)
            move_cursor(
                session,
                P,
                after_seq=REWIND,
                watermark=T0 + timedelta(seconds=REWIND),
                now=T0,
                moved_by="failover",
            )

        async with sessions() as session, session.begin():
            await session.run_sync(rewind)
        return epoch
    finally:
        await lock.aclose()
        await engine.dispose()


def _operator_after_the_first_page(
    engine: Engine, setting: str, *, rewind: bool = False
) -> tuple[Any, list[bool]]:
    """A feed hook: once the first page (seq 1-10) is served, the operator runs
    `sync mode --set <setting>` (after confirming webhooks up to REWIND, with ``rewind``)."""
    done: list[bool] = []

    def operator(params: dict[str, str]) -> None:
        if params.get("after") != "10" or done:
            return
        if rewind:
            with sessionmaker(engine).begin() as session:
                row = session.scalar(select(SyncProviderState))
                assert row is not None
                row.confirmed_seq = REWIND
                row.confirmed_at = T0 + timedelta(seconds=REWIND)
        with sessionmaker(engine).begin() as session:
            override_mode(session, P, setting, policy=ModePolicy(), now=T0, actor="cli:operator")
        done.append(True)

    return operator, done


def test_an_operators_mode_change_fences_the_poll_in_flight(engine: Engine) -> None:
    """`sync mode --set polling` mid-poll moves the cursor to the confirmed position and bumps
    the epoch: the leader's next page is refused instead of overwriting the cursor."""
    db_url = engine.url.render_as_string(hide_password=False)
    host = HostTable(engine)
    feed = _feed_of_30()
    feed.on_request, _done = _operator_after_the_first_page(engine, "polling", rewind=True)
    with serve_asgi(feed.app()) as url:
        settings = _settings(url, db_url)
        with pytest.raises(Fenced):
            asyncio.run(_poll_as_leader(settings, db_url, host.registry(), "a"))

    assert (REWIND, "failover", 2) == _cursor(engine)
    assert 10 == len(host.rows())


def test_a_tick_deposed_mid_poll_is_fenced_and_writes_nothing_more(engine: Engine) -> None:
    """The service's tick polls; an operator's override lands between two pages: the tick
    ends fenced (leader=False, error "fenced") and the override's state stands."""
    db_url = engine.url.render_as_string(hide_password=False)
    host = HostTable(engine)
    feed = _feed_of_30()
    feed.on_request, done = _operator_after_the_first_page(engine, "webhook")
    with serve_asgi(feed.app()) as url:
        settings = _settings(url, db_url)
        settings = replace(settings, sync=replace(settings.sync, crm_mode="polling"))
        with ServiceHarness(settings, engine, registry=host.registry()) as service:
            report = service.tick(P)

    assert [True] == done
    assert (False, "fenced") == (report.leader, report.error)
    assert 10 == len(host.rows())  # the first page was applied; nothing after the override
    assert 10 == _cursor(engine)[0]


async def _notification_fetch(
    settings: Any, db_url: str, registry: Any, *, max_pages: int = 1000
) -> Any:
    """One replica's fetch of what a data-less notification announced (no leadership)."""
    engine = create_async_db_engine(db_url)
    gateway = AsyncGateway(settings)
    try:
        poller = Poller(
            AsyncProviderClient(gateway, P),
            async_session_factory(engine),
            settings,
            P,
            registry=registry,
            max_pages=max_pages,
            source="webhook",
        )
        return await poller.poll_once()
    finally:
        await gateway.aclose()
        await engine.dispose()


def test_two_replicas_notification_fetches_never_move_the_cursor_back(engine: Engine) -> None:
    """Replica B starts a notification fetch; before its first page comes back, replica A
    fetches the whole feed (30 events, to position 30). B's page (seq 1-10) then finds the
    cursor moved: it is not applied, B stops, and the cursor stays at 30 instead of going
    back to B's 10, then 20 (fetches run unfenced: every replica answers notifications)."""
    db_url = engine.url.render_as_string(hide_password=False)
    host = HostTable(engine)
    feed = _feed_of_30()
    first: list[Any] = []

    def the_other_replica_fetches_first(_params: dict[str, str]) -> None:
        if first:
            return
        first.append(None)
        first[0] = asyncio.run(_notification_fetch(settings, db_url, host.registry()))

    feed.on_request = the_other_replica_fetches_first
    with serve_asgi(feed.app()) as url, structlog.testing.capture_logs() as logs:
        settings = _settings(url, db_url)
        late = asyncio.run(_notification_fetch(settings, db_url, host.registry(), max_pages=2))
    with Session(engine) as session:
        cursor = session.scalar(select(SyncCursor).where(SyncCursor.stream == "notifications"))
    assert cursor is not None

    assert (True, 30) == (first[0].complete, first[0].applied)
    assert (False, 0, 1) == (late.complete, late.applied, late.pages)
    assert "30" == cursor.position
    assert 30 == len(host.rows())
    [overtaken] = [e for e in logs if e["event"] == "idis.sync.poll_overtaken"]
    assert (P, "notifications", None) == (
        overtaken["provider"],
        overtaken["stream"],
        overtaken["position"],
    )
