"""The inbox applies each event once, in order per record (SQLite, PostgreSQL, both faces)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations.db._engine import (
    async_session_factory,
    create_async_db_engine,
    create_db_engine,
)
from idis.integrations.exceptions import UsageError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.providers import BY_MODIFIED, OrderKey, ProviderEvent
from idis.integrations.sync import _inbox as inbox_module
from idis.integrations.sync._inbox import (
    ApplyOutcome,
    HandlerRegistry,
    apply_event,
    apply_event_async,
    apply_event_outcome_async,
    get_registry,
    known_event_ids,
    set_registry,
)
from idis.integrations.sync._models import SyncInbox, SyncRecordVersion
from idis.integrations.sync._sentinel import feed_position, inbox_status

from ..conftest import sample
from .conftest import T0, Faces, HostTable, make_event

P = "crm_provider"


def _inbox(engine: Engine) -> dict[str, tuple[str, str, bool]]:
    with Session(engine) as session:
        return {
            row.event_id: (row.source, row.status, row.webhook_at is not None)
            for row in session.scalars(select(SyncInbox))
        }


def _ledger(engine: Engine) -> dict[str, tuple[int, str, str]]:
    with Session(engine) as session:
        return {
            row.record_id: (row.order_major, row.order_minor, row.event_id)
            for row in session.scalars(select(SyncRecordVersion))
        }


def test_an_event_is_applied_once_whatever_the_channel(faces: Faces, host: HostTable) -> None:
    """The same event by webhook, poll and replay runs the handler once; the rest are duplicates."""
    registry = host.registry()
    one = make_event(1)

    outcomes = [faces.apply(one, source, registry) for source in ("webhook", "poll", "replay")]

    assert [ApplyOutcome.APPLIED, ApplyOutcome.DUPLICATE, ApplyOutcome.DUPLICATE] == outcomes
    assert [("evt_1", "rec_1", 1)] == host.rows()
    assert {"evt_1": ("webhook", "applied", True)} == _inbox(faces.engine)


def test_a_webhook_after_a_poll_is_recorded_as_webhook_delivery(
    sqlite_faces: Faces, sqlite_host: HostTable
) -> None:
    """A webhook duplicate of a polled event marks webhook_at (the sentinel's health evidence)."""
    registry = sqlite_host.registry()
    sqlite_faces.apply(make_event(1), "poll", registry)
    assert {"evt_1": ("poll", "applied", False)} == _inbox(sqlite_faces.engine)

    outcome = sqlite_faces.apply(make_event(1), "webhook", registry)

    assert ApplyOutcome.DUPLICATE == outcome
    assert {"evt_1": ("poll", "applied", True)} == _inbox(sqlite_faces.engine)


def test_an_older_version_never_overwrites_a_newer_one(faces: Faces, host: HostTable) -> None:
    """Version 2 arriving after version 3 is recorded as superseded and not applied."""
    registry = host.registry()
    v3 = make_event(3, record_id="deal_1", version=3)
    v2 = make_event(2, record_id="deal_1", version=2)
    v4 = make_event(4, record_id="deal_1", version=4)

    outcomes = [faces.apply(e, "webhook", registry) for e in (v3, v2, v4)]

    assert [ApplyOutcome.APPLIED, ApplyOutcome.SUPERSEDED, ApplyOutcome.APPLIED] == outcomes
    assert [("evt_3", "deal_1", 3), ("evt_4", "deal_1", 4)] == host.rows()
    assert "superseded" == _inbox(faces.engine)["evt_2"][1]
    assert {"deal_1": (4, "", "evt_4")} == _ledger(faces.engine)


def test_the_same_version_under_another_id_is_superseded(faces: Faces, host: HostTable) -> None:
    """Two events carrying one version carry one state: the second is not applied (issue 15)."""
    registry = host.registry()

    first = faces.apply(make_event(1, record_id="deal", version=5), "webhook", registry)
    second = faces.apply(make_event(2, record_id="deal", version=5), "poll", registry)

    assert (ApplyOutcome.APPLIED, ApplyOutcome.SUPERSEDED) == (first, second)
    assert ["evt_1"] == [r[0] for r in host.rows()]


def test_records_are_ordered_independently(sqlite_faces: Faces, sqlite_host: HostTable) -> None:
    """An old version of one record is still applied when another record is far ahead."""
    registry = sqlite_host.registry()
    sqlite_faces.apply(make_event(9, record_id="a", version=9), "poll", registry)

    outcome = sqlite_faces.apply(make_event(10, record_id="b", version=1), "poll", registry)

    assert ApplyOutcome.APPLIED == outcome


def test_an_event_with_no_order_key_is_refused_and_changes_nothing(
    sqlite_faces: Faces, sqlite_host: HostTable
) -> None:
    """No version and no adapter key: nothing can order it, so it is refused up front (issue 11:
    version 0 used to mean "order by seq", a key no record fetched by resync has)."""
    registry = sqlite_host.registry()

    with pytest.raises(UsageError, match="ORDER_BY=modified"):
        sqlite_faces.apply(make_event(7, record_id="x", version=0), "poll", registry)

    assert {} == _inbox(sqlite_faces.engine)


def test_a_provider_ordered_by_modification_time(faces: Faces, host: HostTable) -> None:
    """Version-less events keyed by their time (the modified rule): a later change wins,
    an earlier one arriving late is superseded, and equal times fall back to seq."""
    registry = host.registry()

    def modified(seq: int, second: int) -> ProviderEvent:
        base = make_event(seq, record_id="x", version=0)
        at = base.occurred_at.replace(second=second)
        key = BY_MODIFIED.event_key(event_id=base.id, seq=seq, version=None, occurred_at=at)
        return ProviderEvent(
            id=base.id,
            seq=seq,
            type=base.type,
            record_id="x",
            tenant_id="t",
            version=0,
            occurred_at=at,
            data={},
            order=key,
        )

    outcomes = [
        faces.apply(modified(7, 30), "webhook", registry),
        faces.apply(modified(5, 10), "poll", registry),  # older change, late
        faces.apply(modified(9, 30), "poll", registry),  # same microsecond, later in the feed
    ]

    assert [ApplyOutcome.APPLIED, ApplyOutcome.SUPERSEDED, ApplyOutcome.APPLIED] == outcomes
    assert "00000000000000000009:evt_9" == _ledger(faces.engine)["x"][1]


def test_an_event_type_without_a_handler_is_recorded_as_ignored(
    sqlite_faces: Faces, sqlite_host: HostTable
) -> None:
    """No handler for the type: nothing applied, the event recorded as ignored (and deduped)."""
    registry = sqlite_host.registry("record.created")

    first = sqlite_faces.apply(make_event(1, type_="record.archived"), "webhook", registry)
    again = sqlite_faces.apply(make_event(1, type_="record.archived"), "poll", registry)

    assert (ApplyOutcome.IGNORED, ApplyOutcome.DUPLICATE) == (first, again)
    assert [] == sqlite_host.rows()
    assert "ignored" == _inbox(sqlite_faces.engine)["evt_1"][1]


def test_a_failing_handler_leaves_no_trace_and_the_event_applies_later(
    faces: Faces, host: HostTable
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
    options = {"registry": registry}

    failed, applied = faces.transaction(
        [("one", make_event(1), "webhook", options), ("one", make_event(2), "webhook", options)]
    )

    assert isinstance(failed, RuntimeError)
    # The caller's transaction survived; the other event applied in it.
    assert ApplyOutcome.APPLIED == applied
    assert ["evt_2"] == [r[0] for r in host.rows()]
    assert ["evt_2"] == list(_inbox(faces.engine))
    assert ApplyOutcome.APPLIED == faces.apply(make_event(1), "poll", registry)


def test_a_batch_isolates_a_failing_handler(faces: Faces, host: HostTable) -> None:
    """apply_events(isolate=True): the failing event is left out, the rest of the batch applies."""
    registry = HandlerRegistry()

    def picky(session: Session, event: ProviderEvent) -> None:
        if event.id == "evt_2":
            raise ValueError("cannot map stage")
        host.handler(session, event)

    registry.register("*", picky)
    events = [make_event(n, record_id="deal", version=n) for n in (1, 2, 3)]

    result = faces.apply_events(events, "replay", registry, isolate=True)

    assert [ApplyOutcome.APPLIED, None, ApplyOutcome.APPLIED] == result.outcomes
    assert ["evt_2"] == [e.id for e, _error in result.failed]
    assert ["evt_1", "evt_3"] == [r[0] for r in host.rows()]
    assert {"deal": (3, "", "evt_3")} == _ledger(faces.engine)


def test_events_applied_are_counted_only_after_commit(
    sqlite_faces: Faces, sqlite_host: HostTable, metrics: Metrics
) -> None:
    """events_applied counts by source on commit, and not at all when the caller rolls back."""
    registry = sqlite_host.registry()
    options = {"registry": registry}

    sqlite_faces.transaction([("one", make_event(1), "poll", options)])
    sqlite_faces.transaction([("many", [make_event(2), make_event(3)], "poll", options)])
    sqlite_faces.transaction([("one", make_event(4), "poll", options)], commit=False)

    assert 3.0 == sample(metrics, "integration_events_applied_total", provider=P, source="poll")
    assert ["evt_1", "evt_2", "evt_3"] == list(_inbox(sqlite_faces.engine))


def test_the_commit_listener_is_on_the_library_s_sessions_only(
    sqlite_engine: Engine, sqlite_host: HostTable
) -> None:
    """Only a session the inbox applied through gets the after_commit listener; the host's
    other sessions, and the Session class, never do (issue 12)."""
    host_session = Session(sqlite_engine)
    used = Session(sqlite_engine)
    with used.begin():
        apply_event(used, P, make_event(1), "poll", registry=sqlite_host.registry())

    assert not event.contains(Session, "after_commit", inbox_module._count_after_commit)
    assert not event.contains(host_session, "after_commit", inbox_module._count_after_commit)
    assert event.contains(used, "after_commit", inbox_module._count_after_commit)
    host_session.close()
    used.close()


def test_known_event_ids(sqlite_faces: Faces, sqlite_host: HostTable) -> None:
    """known_event_ids reports which ids the inbox holds, whatever their status."""
    registry = sqlite_host.registry("record.updated")
    sqlite_faces.apply(make_event(1), "poll", registry)
    sqlite_faces.apply(make_event(2, type_="record.other"), "poll", registry)

    with Session(sqlite_faces.engine) as session:
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


def test_misuse_is_reported_and_changes_nothing(sqlite_faces: Faces) -> None:
    """An unknown source or a non-event raise UsageError, whichever face."""
    registry = HandlerRegistry()
    registry.register("*", lambda session, event: None)

    with pytest.raises(UsageError, match="source"):
        sqlite_faces.apply(make_event(1), "carrier-pigeon", registry)
    with pytest.raises(UsageError, match="not an event"):
        sqlite_faces.apply({"id": "x"}, "poll", registry)

    assert {} == _inbox(sqlite_faces.engine)


def test_the_sync_face_refuses_an_async_only_handler(sqlite_engine: Engine) -> None:
    """The sync face cannot await: an async-only type is refused before any write."""
    registry = HandlerRegistry()

    async def only_async(session: AsyncSession, event: Any) -> None: ...

    registry.register_async("record.updated", only_async)
    with Session(sqlite_engine) as session, pytest.raises(UsageError, match="async"):
        apply_event(session, P, make_event(1), "poll", registry=registry)

    assert {} == _inbox(sqlite_engine)


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
                one = make_event(seq, record_id=f"r{seq % 3}", version=seq)
                with factory.begin() as session:
                    apply_event(session, P, one, ("webhook", "poll")[index % 2], registry=registry)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        rows = host.rows()
        final = {k: v[0] for k, v in _ledger(engine).items()}
    finally:
        engine.dispose()

    assert [] == errors
    applied = [r[0] for r in rows]
    assert len(applied) == len(set(applied))
    assert {"r0": 18, "r1": 19, "r2": 20} == final
    for record in ("r0", "r1", "r2"):
        versions = [r[2] for r in rows if r[1] == record]
        assert sorted(versions) == versions


@pytest.mark.postgres
def test_concurrent_async_deliveries_apply_once(pg_url: str) -> None:
    """The async face under eight concurrent tasks on PostgreSQL: each event applied once."""
    from idis.integrations.db._engine import create_db_engine

    sync_engine = create_db_engine(pg_url)
    host = HostTable(sync_engine)
    registry = host.registry()

    async def main() -> None:
        engine = create_async_db_engine(pg_url, pool_size=8)
        factory = async_session_factory(engine)

        async def worker(index: int) -> None:
            for seq in range(1, 21):
                one = make_event(seq, record_id=f"r{seq % 3}", version=seq)
                async with factory() as session, session.begin():
                    await apply_event_async(
                        session, P, one, ("webhook", "poll")[index % 2], registry=registry
                    )

        try:
            await asyncio.gather(*(worker(i) for i in range(8)))
        finally:
            await engine.dispose()

    try:
        asyncio.run(main())
        rows = host.rows()
        final = {k: v[0] for k, v in _ledger(sync_engine).items()}
    finally:
        sync_engine.dispose()

    applied = [r[0] for r in rows]
    assert 20 == len(applied) == len(set(applied))
    assert {"r0": 18, "r1": 19, "r2": 20} == final


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


def test_order_keys_compare_by_code_point() -> None:
    """OrderKey orders as (major, minor), minor by code point: "B" < "a" < "b" < "é"."""
    keys = [OrderKey(2), OrderKey(1, "é"), OrderKey(1, "b"), OrderKey(1, "a"), OrderKey(1, "B")]

    assert [
        OrderKey(1, "B"),
        OrderKey(1, "a"),
        OrderKey(1, "b"),
        OrderKey(1, "é"),
        OrderKey(2),
    ] == sorted(keys)
    with pytest.raises(UsageError, match="64-bit"):
        OrderKey(2**63)


def test_the_sentinel_matches_derived_ids_by_record_and_time(faces: Faces, host: HostTable) -> None:
    """An API whose webhooks and feed name one change differently (HubSpot: a delta per
    property by webhook, a snapshot per record in search) is judged by record: a feed event is
    delivered by webhook when a webhook reported a change of its record at least as recent, and
    known when the record's applied key is at least its own. By id alone none would match."""
    registry = host.registry()

    def change(event_id: str, record_id: str, second: int) -> ProviderEvent:
        at = T0.replace(second=second)
        key = BY_MODIFIED.event_key(event_id=event_id, seq=None, version=None, occurred_at=at)
        return ProviderEvent(
            id=event_id,
            seq=0,
            type="record.updated",
            record_id=record_id,
            tenant_id="t",
            version=0,
            occurred_at=at,
            data={},
            order=key,
        )

    faces.apply(change("hs:delta:a:20:amount", "a", 20), "webhook", registry)
    faces.apply(change("hs:poll:b:20", "b", 20), "poll", registry)
    feed = [
        change("hs:poll:a:20", "a", 20),  # the webhook's change, seen by search
        change("hs:poll:a:10", "a", 10),  # an older state of a: covered too
        change("hs:poll:a:30", "a", 30),  # newer than anything a webhook said
        change("hs:poll:b:20", "b", 20),  # same id as the poll that applied it
        change("hs:poll:c:20", "c", 20),  # nobody has c
    ]

    with Session(faces.engine) as session:
        known, by_webhook = inbox_status(session, P, feed)

    assert {"hs:poll:a:20", "hs:poll:a:10"} == by_webhook
    assert {"hs:poll:a:20", "hs:poll:a:10", "hs:poll:b:20"} == known


def test_an_event_without_a_feed_position_has_none() -> None:
    """Generic feed events number from 1; a pack's seq=0 means "no integer position"."""
    assert (7, None) == (feed_position(make_event(7)), feed_position(replace(make_event(7), seq=0)))


def test_a_batch_writes_with_one_statement_after_its_two_reads(
    faces: Faces, host: HostTable
) -> None:
    """A batch of new, superseded, redelivered and re-handled events: same rows as one by one.

    On PostgreSQL everything a decided batch writes (new inbox rows, ledger moves,
    webhook stamps, dropped placeholders) goes in one statement after the ledger lock
    and the inbox read: three statements per batch whatever it holds (issue 16).
    """
    registry = host.registry("record.updated")
    faces.apply(make_event(1, record_id="rec_a", version=5), "poll", registry)
    # Recorded as ignored (no handler for its type then): a duplicate from here on.
    faces.apply(make_event(2, record_id="rec_b", type_="record.archived"), "poll", registry)
    registry.register("record.archived", host.handler)
    statements: list[str] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "sync_" in statement:  # the inbox's own (not the host handler's, not BEGIN)
            statements.append(statement)

    engine = faces.engine if faces.mode == "sync" else faces.async_engine.sync_engine
    event.listen(engine, "before_cursor_execute", executed)
    try:
        result = faces.apply_events(
            [
                make_event(1, record_id="rec_a", version=5),  # polled before: webhook stamp
                make_event(2, record_id="rec_b", type_="record.archived"),  # duplicate
                make_event(3, record_id="rec_a", version=4),  # older than rec_a's 5
                make_event(4, record_id="rec_c", version=1),  # new record
                make_event(5, record_id="rec_c", version=2),  # newer, same batch
            ],
            "webhook",
            registry,
        )
    finally:
        event.remove(engine, "before_cursor_execute", executed)

    D, S, A = ApplyOutcome.DUPLICATE, ApplyOutcome.SUPERSEDED, ApplyOutcome.APPLIED
    assert [D, D, S, A, A] == result.outcomes
    assert {
        "evt_1": ("poll", "applied", True),
        "evt_2": ("poll", "ignored", True),
        "evt_3": ("webhook", "superseded", True),
        "evt_4": ("webhook", "applied", True),
        "evt_5": ("webhook", "applied", True),
    } == _inbox(faces.engine)
    # rec_b's ledger row was only a lock placeholder (its event a duplicate): gone again.
    assert {"rec_a": (5, "", "evt_1"), "rec_c": (2, "", "evt_5")} == _ledger(faces.engine)
    assert [("evt_1", "rec_a", 5), ("evt_4", "rec_c", 1), ("evt_5", "rec_c", 2)] == host.rows()
    if faces.engine.dialect.name == "postgresql":
        assert 3 == len(statements), statements


def test_a_batch_larger_than_one_in_list_reads_in_chunks(
    sqlite_faces: Faces, sqlite_host: HostTable
) -> None:
    """More ids than one IN list takes (SQLite's parameter limit): the reads go in chunks.

    Below the limit a batch's ledger and inbox reads are one statement; above it
    they fall back to chunked reads, with the same decisions.
    """
    registry = sqlite_host.registry()
    events = [make_event(n, record_id=f"rec_{n % 700}", version=n) for n in range(1, 1202)]
    sqlite_faces.apply_events(events[:600], "poll", registry)

    result = sqlite_faces.apply_events(events, "webhook", registry)

    assert [ApplyOutcome.DUPLICATE] * 600 == result.outcomes[:600]
    # Events 701.. come back to records 1..501 with newer versions: applied.
    assert all(o is ApplyOutcome.APPLIED for o in result.outcomes[600:])
    assert 1201 == len(_inbox(sqlite_faces.engine))
    assert 700 == len(_ledger(sqlite_faces.engine))


@pytest.mark.postgres
@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
def test_a_batch_write_looks_up_the_ledger_by_key_at_any_size(pg_url: str, plan: str) -> None:
    """PostgreSQL's batch write finds the ledger rows it moves and drops by key.

    The planner takes a JSON set for 100 rows whatever it holds; against a
    large, analyzed ledger it then joined the moves and the drops to a
    sequential scan of the provider's whole ledger, twice per batch (its cost
    grew with the ledger). Each set sits under a LIMIT of its length, so the plan,
    custom or generic, probes the unique key instead.
    """
    import psycopg

    writes = inbox_module._Writes(
        claimed=[(make_event(1, record_id="rec_1"), ApplyOutcome.APPLIED)],
        webhook_at=T0,
        touch=["evt_9"],
        advance=[("rec_1", (OrderKey(1, ""), "evt_1"))],
        drop=["rec_2"],
    )
    engine = create_db_engine(pg_url)
    try:
        with engine.connect() as conn:
            sql = inbox_module._sql_of(inbox_module._PG_WRITE, conn)
    finally:
        engine.dispose()
    captured: list[dict[str, Any]] = []

    class _Capture:
        def execute(self, _stmt: Any, params: dict[str, Any]) -> Any:
            captured.append(params)
            return _Rows()

    class _Rows:
        def all(self) -> list[tuple[int, int]]:
            return [(1, 1)]

    batch = inbox_module._Batch("crm_provider", [], [], "webhook", T0, HandlerRegistry())
    inbox_module._pg_write(_Capture(), batch, writes)  # type: ignore[arg-type]
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as pg:
        pg.execute(
            "INSERT INTO sync_record_versions (provider, record_id, order_major, order_minor, "
            "event_id, updated_at) SELECT 'crm_provider', 'r' || n, n, '', 'e' || n, now() "
            "FROM generate_series(1, 20000) AS n"
        )
        pg.execute("ANALYZE sync_record_versions")
        pg.execute(f"SET plan_cache_mode = {plan}")
        plan_rows = pg.execute("EXPLAIN " + sql, captured[0], prepare=True).fetchall()
    shown = "\n".join(row[0] for row in plan_rows)
    assert "Seq Scan on sync_record_versions" not in shown, shown
    assert "uq_sync_record_versions_provider_record_id" in shown, shown
