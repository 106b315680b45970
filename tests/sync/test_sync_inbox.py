"""The inbox applies each event exactly once, in version order per record (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations.db._engine import async_session_factory, create_async_db_engine
from idis.integrations.exceptions import UsageError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.providers import ProviderEvent
from idis.integrations.sync._inbox import (
    ApplyOutcome,
    HandlerRegistry,
    apply_event,
    apply_event_async,
    apply_event_outcome,
    apply_event_outcome_async,
    get_registry,
    known_event_ids,
    set_registry,
)
from idis.integrations.sync._models import SyncInbox, SyncRecordVersion

from ..conftest import sample
from .conftest import HostTable, make_event

P = "crm_provider"


def _apply(
    engine: Engine, event: ProviderEvent, source: str, registry: HandlerRegistry
) -> ApplyOutcome:
    factory = sessionmaker(engine)
    with factory.begin() as session:
        return apply_event_outcome(session, P, event, source, registry=registry)


def _inbox(engine: Engine) -> dict[str, tuple[str, str, bool]]:
    with Session(engine) as session:
        return {
            row.event_id: (row.source, row.status, row.webhook_at is not None)
            for row in session.scalars(select(SyncInbox))
        }


def test_an_event_is_applied_once_whatever_the_channel(engine: Engine, host: HostTable) -> None:
    """The same event by webhook, poll and replay runs the handler once; the rest are duplicates."""
    registry = host.registry()
    event = make_event(1)

    outcomes = [_apply(engine, event, source, registry) for source in ("webhook", "poll", "replay")]

    assert [ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE, ApplyOutcome.DUPLICATE] == outcomes
    assert [("evt_1", "rec_1", 1)] == host.rows()
    assert {"evt_1": ("webhook", "applied", True)} == _inbox(engine)


def test_a_webhook_after_a_poll_is_recorded_as_webhook_delivery(
    sqlite_engine: Engine, sqlite_host: HostTable
) -> None:
    """A webhook duplicate of a polled event marks webhook_at (the sentinel's health evidence)."""
    registry = sqlite_host.registry()
    event = make_event(1)
    _apply(sqlite_engine, event, "poll", registry)
    assert {"evt_1": ("poll", "applied", False)} == _inbox(sqlite_engine)

    outcome = _apply(sqlite_engine, event, "webhook", registry)

    assert ApplyOutcome.DUPLICATE == outcome
    assert {"evt_1": ("poll", "applied", True)} == _inbox(sqlite_engine)


def test_an_older_version_never_overwrites_a_newer_one(engine: Engine, host: HostTable) -> None:
    """Version 2 arriving after version 3 is recorded as superseded and not applied."""
    registry = host.registry()
    v3 = make_event(3, record_id="deal_1", version=3)
    v2 = make_event(2, record_id="deal_1", version=2)
    v4 = make_event(4, record_id="deal_1", version=4)

    outcomes = [_apply(engine, e, "webhook", registry) for e in (v3, v2, v4)]

    assert [ApplyOutcome.APPLIED, ApplyOutcome.SUPERSEDED, ApplyOutcome.APPLIED] == outcomes
    assert [("evt_3", "deal_1", 3), ("evt_4", "deal_1", 4)] == host.rows()
    assert "superseded" == _inbox(engine)["evt_2"][1]
    with Session(engine) as session:
        assert 4 == session.scalar(select(SyncRecordVersion.version))


def test_records_are_ordered_independently(sqlite_engine: Engine, sqlite_host: HostTable) -> None:
    """An old version of one record is still applied when another record is far ahead."""
    registry = sqlite_host.registry()
    _apply(sqlite_engine, make_event(9, record_id="a", version=9), "poll", registry)

    outcome = _apply(sqlite_engine, make_event(10, record_id="b", version=1), "poll", registry)

    assert ApplyOutcome.APPLIED == outcome


def test_events_without_a_version_are_ordered_by_seq(
    sqlite_engine: Engine, sqlite_host: HostTable
) -> None:
    """Version 0 (none sent) falls back to the feed's seq for ordering."""
    registry = sqlite_host.registry()
    _apply(sqlite_engine, make_event(7, record_id="x", version=0), "poll", registry)

    outcome = _apply(sqlite_engine, make_event(5, record_id="x", version=0), "poll", registry)

    assert ApplyOutcome.SUPERSEDED == outcome


def test_an_event_type_without_a_handler_is_recorded_as_ignored(
    sqlite_engine: Engine, sqlite_host: HostTable
) -> None:
    """No handler for the type: nothing applied, the event recorded as ignored (and deduped)."""
    registry = sqlite_host.registry("record.created")

    first = _apply(sqlite_engine, make_event(1, type_="record.archived"), "webhook", registry)
    again = _apply(sqlite_engine, make_event(1, type_="record.archived"), "poll", registry)

    assert (ApplyOutcome.IGNORED, ApplyOutcome.DUPLICATE) == (first, again)
    assert [] == sqlite_host.rows()
    assert "ignored" == _inbox(sqlite_engine)["evt_1"][1]


def test_a_failing_handler_leaves_no_trace_and_the_event_applies_later(
    engine: Engine, host: HostTable
) -> None:
    """A handler that raises rolls back its savepoint: no inbox row, so a retry applies it."""
    calls: list[str] = []

    def flaky(session: Session, event: ProviderEvent) -> None:
        calls.append(event.id)
        host.handler(session, event)
        if len(calls) == 1:
            raise RuntimeError("host database hiccup")

    registry = HandlerRegistry()
    registry.register("*", flaky)
    factory = sessionmaker(engine)
    with factory.begin() as session:
        with pytest.raises(RuntimeError):
            apply_event(session, P, make_event(1), "webhook", registry=registry)
        # The caller's transaction survives; other events still apply in it.
        assert apply_event(session, P, make_event(2), "webhook", registry=registry)

    assert ["evt_2"] == [r[0] for r in host.rows()]
    assert ["evt_2"] == list(_inbox(engine))
    assert ApplyOutcome.APPLIED == _apply(engine, make_event(1), "poll", registry)


def test_events_applied_are_counted_only_after_commit(
    sqlite_engine: Engine, sqlite_host: HostTable, metrics: Metrics
) -> None:
    """events_applied counts by source on commit, and not at all when the caller rolls back."""
    registry = sqlite_host.registry()
    factory = sessionmaker(sqlite_engine)
    with factory() as session:
        with session.begin():
            apply_event(session, P, make_event(1), "poll", registry=registry)
            assert 0.0 == sample(
                metrics, "integration_events_applied_total", provider=P, source="poll"
            )
        with session.begin():
            apply_event(session, P, make_event(2), "poll", registry=registry)
            session.rollback()

    assert 1.0 == sample(metrics, "integration_events_applied_total", provider=P, source="poll")
    assert ["evt_1"] == list(_inbox(sqlite_engine))


def test_known_event_ids(sqlite_engine: Engine, sqlite_host: HostTable) -> None:
    """known_event_ids reports which ids the inbox holds, whatever their status."""
    registry = sqlite_host.registry("record.updated")
    _apply(sqlite_engine, make_event(1), "poll", registry)
    _apply(sqlite_engine, make_event(2, type_="record.other"), "poll", registry)

    with Session(sqlite_engine) as session:
        found = known_event_ids(
            session, P, ["evt_1", "evt_2", "evt_3", *(f"x{i}" for i in range(600))]
        )

    assert {"evt_1", "evt_2"} == found


def test_registry_rules() -> None:
    """Duplicate registration is refused, the decorator picks sync or async, '*' is the fallback."""
    registry = HandlerRegistry()

    @registry.on("record.updated")
    def sync_handler(session: Session, event: Any) -> None: ...

    @registry.on("record.updated")
    async def async_handler(session: AsyncSession, event: Any) -> None: ...

    def fallback(session: Session, event: Any) -> None: ...

    registry.register("*", fallback)
    with pytest.raises(UsageError, match="already registered"):
        registry.register("record.updated", fallback)
    registry.register("record.updated", fallback, replace=True)

    assert fallback is registry.handler_for("record.updated")
    assert async_handler is registry.async_handler_for("record.updated")
    assert fallback is registry.handler_for("record.deleted")
    assert ["*", "record.updated"] == registry.event_types()
    with pytest.raises(UsageError):
        registry.register("", fallback)


def test_default_registry_is_replaceable() -> None:
    """set_registry installs a process-wide registry and returns the previous one."""
    mine = HandlerRegistry()
    previous = set_registry(mine)
    try:
        assert mine is get_registry()
    finally:
        set_registry(previous)

    assert previous is get_registry()


def test_misuse_is_reported(sqlite_engine: Engine) -> None:
    """An unknown source, a non-event, or an async-only handler (sync driver) raise UsageError."""
    registry = HandlerRegistry()

    async def only_async(session: AsyncSession, event: Any) -> None: ...

    registry.register_async("record.updated", only_async)
    with Session(sqlite_engine) as session:
        with pytest.raises(UsageError, match="source"):
            apply_event(session, P, make_event(1), "carrier-pigeon", registry=registry)
        with pytest.raises(UsageError, match="not an event"):
            apply_event(session, P, {"id": "x"}, "poll", registry=registry)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="async"):
            apply_event(session, P, make_event(1), "poll", registry=registry)


@pytest.mark.postgres
def test_concurrent_deliveries_of_one_event_apply_once(pg_url: str) -> None:
    """Eight threads applying the same events at once on PostgreSQL run each handler once."""
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(pg_url, pool_size=8)
    host = HostTable(engine)
    registry = host.registry()
    factory = sessionmaker(engine)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for seq in range(1, 21):
                # Versions of one record interleave across threads too.
                event = make_event(seq, record_id=f"r{seq % 3}", version=seq)
                with factory.begin() as session:
                    apply_event(
                        session, P, event, ("webhook", "poll")[index % 2], registry=registry
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        rows = host.rows()
        with engine.connect() as conn:
            final = dict(
                conn.execute(text("SELECT record_id, version FROM sync_record_versions")).all()
            )
    finally:
        engine.dispose()

    assert [] == errors
    applied = [r[0] for r in rows]
    assert len(applied) == len(set(applied))
    assert {"r0": 18, "r1": 19, "r2": 20} == final
    for record in ("r0", "r1", "r2"):
        versions = [r[2] for r in rows if r[1] == record]
        assert sorted(versions) == versions


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_apply_with_async_and_sync_handlers(db_url: str, anyio_backend: str) -> None:
    """apply_event_async awaits async handlers, runs sync ones via run_sync, and dedupes."""
    engine = create_async_db_engine(db_url)
    seen: list[tuple[str, str]] = []

    async def on_update(session: AsyncSession, event: ProviderEvent) -> None:
        await session.execute(text("SELECT 1"))
        seen.append(("async", event.id))

    def on_create(session: Session, event: ProviderEvent) -> None:
        session.execute(text("SELECT 1"))
        seen.append(("sync", event.id))

    registry = HandlerRegistry()
    registry.register_async("record.updated", on_update)
    registry.register("record.created", on_create)
    factory = async_session_factory(engine)
    try:
        async with factory() as session, session.begin():
            first = await apply_event_async(session, P, make_event(1), "webhook", registry=registry)
            created = await apply_event_outcome_async(
                session, P, make_event(2, type_="record.created"), "poll", registry=registry
            )
        async with factory() as session, session.begin():
            again = await apply_event_outcome_async(
                session, P, make_event(1), "replay", registry=registry
            )
    finally:
        await engine.dispose()

    assert (True, ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE) == (first, created, again)
    assert [("async", "evt_1"), ("sync", "evt_2")] == seen
