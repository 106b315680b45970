"""Where the receiver's transactions run, and what a server dropping its connections costs.

The async receiver's blocking twin pre-pings only connections idle for more than
``PING_IDLE`` (``db._engine.ping_idle_only``): a connection the pool got back a
moment ago is used without a ``SELECT 1`` first. PostgreSQL dropping every
connection (what a restart does to them) must still cost no delivery: the first
statement on a dead connection fails as a disconnect, the pool reconnects, the
delivery is retried. The host's engine (the sync receiver's) keeps its pre-ping;
no delivery may be lost there either.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from tests.sync.conftest import HostTable

from idis.integrations._clock import ManualClock
from idis.integrations.db._engine import async_session_factory, create_async_db_engine
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.webhooks._receiver import AsyncWebhookReceiver

from .conftest import NOW, Face, P, event_body, settings_for, signed


def _drop_connections(url: str) -> int:
    """Terminate every other session on ``url``'s database (a restart, as its clients see it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    with psycopg.connect(
        host=parsed.host, port=parsed.port, user=parsed.username, dbname=parsed.database
    ) as conn:
        conn.autocommit = True
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_dropped_connections_cost_no_delivery(kind: str, pg_url: str, pg_engine: Engine) -> None:
    """Every delivery after PostgreSQL dropped the receiver's connections is applied (200)."""
    host = HostTable(pg_engine)
    face = Face(kind, pg_engine, pg_url)
    try:
        receiver = face.build(settings_for(pg_url), host.registry(), providers=[P])
        first = face.send(receiver, signed(event_body(1), msg="m1"), event_body(1))
        assert (200, "accepted") == (first.status_code, first.outcome)

        # Within the twin's ping window: its pooled connection is reused without a ping.
        assert _drop_connections(pg_url) >= 1
        one = [
            face.send(receiver, signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in (2, 3)
        ]

        assert _drop_connections(pg_url) >= 1
        many = face.send_concurrently(
            receiver, [(signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in range(4, 20)]
        )
    finally:
        face.close()

    assert [(200, "accepted")] * 2 == [(r.status_code, r.outcome) for r in one]
    assert {(200, "accepted")} == {(r.status_code, r.outcome) for r in many}
    assert sorted(f"evt_{n}" for n in range(1, 20)) == sorted(row[0] for row in host.rows())


def _deliver_two(url: str, registry: HandlerRegistry) -> None:
    """Two deliveries through an ``AsyncWebhookReceiver`` on ``url`` (both applied)."""

    async def run() -> list[Any]:
        engine = create_async_db_engine(url)
        # The factory AsyncSyncService (and so the example service) hands the receiver.
        receiver = AsyncWebhookReceiver(
            settings_for(url),
            async_session_factory(engine),
            registry=registry,
            providers=[P],
            clock=ManualClock(NOW),
        )
        try:
            return [
                await receiver.handle(P, signed(event_body(n), msg=f"m{n}"), event_body(n))
                for n in (1, 2)
            ]
        finally:
            await engine.dispose()

    results = asyncio.run(run())
    assert [(200, "accepted")] * 2 == [(r.status_code, r.outcome) for r in results]


def test_sync_handlers_under_the_async_receiver_run_on_a_blocking_session(
    sqlite_url: str, sqlite_engine: Engine
) -> None:
    """Sync handlers: the batch runs on a blocking twin (a plain ``Session``, not an
    ``AsyncSession``'s facade); an async handler keeps the ``AsyncSession``. Both commit."""
    host = HostTable(sqlite_engine)
    seen: list[tuple[str, bool]] = []

    def sync_handler(session: Session, event: Any) -> None:
        seen.append(("sync", session.get_bind().dialect.is_async))
        host.handler(session, event)

    async def async_handler(session: Any, event: Any) -> None:
        seen.append(("async", session.get_bind().dialect.is_async))
        await session.execute(
            text("INSERT INTO host_applied (event_id, record_id, version) VALUES (:e, :r, :v)"),
            {"e": event.id, "r": event.record_id, "v": event.version},
        )

    sync_registry = HandlerRegistry()
    sync_registry.register("*", sync_handler)
    _deliver_two(sqlite_url, sync_registry)
    assert [("sync", False), ("sync", False)] == seen

    seen.clear()
    with sqlite_engine.begin() as conn:
        conn.execute(text("DELETE FROM sync_inbox"))
        conn.execute(text("DELETE FROM sync_record_versions"))
    async_registry = HandlerRegistry()
    async_registry.register_async("*", async_handler)
    _deliver_two(sqlite_url, async_registry)
    assert [("async", True), ("async", True)] == seen
    assert ["evt_1", "evt_2", "evt_1", "evt_2"] == [row[0] for row in host.rows()]
