"""One ordering rule in one place: adapter-defined order keys, the same through every apply path.

Issue 11 item 1: the inbox treated version 0 as "order by seq", the batched
replay path used 0 as the key, and resync compared the seq-valued ledger with
record version 0. Here the key is the adapter's (``providers._order``), carried
on the event, and the batched and single-event paths share one decision.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations._clock import ManualClock
from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_db_engine
from idis.integrations.db._migrate import upgrade
from idis.integrations.exceptions import MalformedResponse
from idis.integrations.providers import (
    BY_MODIFIED,
    BY_VERSION,
    OrderKey,
    ProviderEvent,
    parse_event,
    parse_record,
)
from idis.integrations.sync._inbox import ApplyOutcome, HandlerRegistry, apply_event, apply_events
from idis.integrations.sync._models import SyncInbox, SyncRecordVersion
from idis.integrations.webhooks import WebhookReceiver
from idis.integrations.webhooks._signing import sign_headers

from .conftest import T0, Faces, HostTable

P = "crm_provider"


# --------------------------------------------------------------------------- the rules


def test_the_version_rule_keys_events_and_records_alike() -> None:
    """By version: an event and the record it produced have one key; no version is malformed."""
    raw = {
        "id": "evt_9",
        "seq": 9,
        "type": "record.updated",
        "record_id": "r",
        "version": 4,
        "occurred_at": "2026-01-19T10:00:00Z",
    }
    record = {"id": "r", "version": 4, "updated_at": "2026-01-19T10:00:00Z"}

    assert OrderKey(4) == parse_event(raw, P).order == parse_record(record, P).order
    with pytest.raises(MalformedResponse, match="ORDER_BY=modified"):
        parse_event({**raw, "version": None}, P)
    with pytest.raises(MalformedResponse, match="ORDER_BY=modified"):
        parse_record({"id": "r", "updated_at": "2026-01-19T10:00:00Z"}, P)


def test_the_modified_rule_keys_by_time_and_never_puts_a_record_after_its_event() -> None:
    """By modification time: microseconds, then seq and id; a fetched record with the same
    time is not newer than the event that produced it; a deletion comes after both."""
    at = "2026-01-19T10:00:00.000123+00:00"
    event = parse_event(
        {"id": "e7", "seq": 7, "type": "record.updated", "record_id": "r", "occurred_at": at},
        P,
        BY_MODIFIED,
    )
    record = parse_record({"id": "r", "updated_at": at}, P, BY_MODIFIED)
    micros = int(datetime.fromisoformat(at).timestamp()) * 1_000_000 + 123

    assert OrderKey(micros, "00000000000000000007:e7") == event.order
    assert record.order is not None
    assert event.order is not None
    assert record.order < event.order
    assert BY_MODIFIED.same_state(event.order, record.order)
    assert BY_MODIFIED.deletion_key(event.order, datetime.fromisoformat(at)) > event.order
    assert BY_VERSION.deletion_key(OrderKey(4), T0) == OrderKey(5)


def _signed(body: bytes, secret: str) -> dict[str, str]:
    return sign_headers(secret, body, msg_id=f"msg_{uuid.uuid4().hex[:6]}", timestamp=T0)


@pytest.mark.parametrize(("order_by", "status"), [("version", 400), ("modified", 200)])
def test_a_webhook_without_a_version_is_keyed_by_its_provider_s_rule(
    sqlite_engine: Engine, order_by: str, status: int
) -> None:
    """A version-less webhook: 400 naming the setting for a version-ordered provider (never a
    5xx the provider retries forever), applied for one ordered by modification time."""
    import json
    from dataclasses import replace

    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    base = Settings.from_env({"IDIS_DATABASE_URL": str(sqlite_engine.url)})
    provider = replace(base.provider(P), webhook_secrets=(Secret(secret),), order_by=order_by)
    settings = base.with_providers(provider)
    host = HostTable(sqlite_engine)
    receiver = WebhookReceiver(
        settings, sqlite_engine, registry=host.registry(), providers=[P], clock=ManualClock(T0)
    )
    body = json.dumps(
        {
            "id": "evt_1",
            "seq": 1,
            "type": "record.updated",
            "record_id": "r",
            "occurred_at": T0.isoformat(),
        }
    ).encode()

    result = receiver.handle(P, _signed(body, secret), body)

    assert status == result.status_code
    if status == 400:
        assert "invalid_event" == result.outcome
        assert "ORDER_BY=modified" in (result.detail or "")
    else:
        assert [("evt_1", "r", 0)] == host.rows()


# --------------------------------------------------------------------------- the example


def _unversioned(seq: int, record_id: str) -> ProviderEvent:
    """A change of a provider that sends no record version, keyed by the modified rule."""
    at = T0 + timedelta(seconds=seq)
    return ProviderEvent(
        id=f"s{seq}",
        seq=seq,
        type="record.updated",
        record_id=record_id,
        tenant_id="t",
        version=0,
        occurred_at=at,
        data={"seq": seq},
        order=BY_MODIFIED.event_key(event_id=f"s{seq}", seq=seq, version=None, occurred_at=at),
    )


def test_a_replay_page_of_unversioned_events_applies_every_newer_one(
    engine: Engine, host: HostTable, mode: str
) -> None:
    """Issue 11's example: deal_B s10 came by webhook, s20 was lost; the replay of deal_A
    s1, s2, s3 and deal_B s10, s20 applies 4, skips 1, and the host keeps s3 and s20.

    The old rule keyed these events 0 in the batched path: applied=1, superseded=3, and the
    host kept s1 and s10.
    """
    from idis.integrations.reconciliation import StaticReplaySource, reconcile, reconcile_async

    from ..reconcile.conftest import run_face

    registry = host.registry()
    with sessionmaker(engine).begin() as session:
        apply_event(session, P, _unversioned(10, "deal_B"), "webhook", registry=registry)
    page = [_unversioned(n, "deal_A") for n in (1, 2, 3)] + [
        _unversioned(n, "deal_B") for n in (10, 20)
    ]
    base = Settings.from_env({"IDIS_DATABASE_URL": engine.url.render_as_string(False)})

    source = StaticReplaySource(P, page)
    client: Any = source
    if mode == "async":

        class AsyncSource:  # the same pages behind the async face's await
            async def replay(self, *args: Any, **kwargs: Any) -> Any:
                return source.replay(*args, **kwargs)

        client = AsyncSource()
    summary = run_face(mode, reconcile, reconcile_async)(
        P,
        T0,
        settings=base,
        handlers=registry,
        client=client,
        engine=engine,
        clock=ManualClock(T0 + timedelta(minutes=1)),
    )

    newest = {}
    for event_id, record_id, _version in host.rows():
        newest[record_id] = event_id
    assert (5, 4, 1, 0) == (
        summary.fetched,
        summary.applied,
        summary.already_applied,
        summary.superseded,
    )
    assert {"deal_A": "s3", "deal_B": "s20"} == newest


# --------------------------------------------------------------------------- the property


@st.composite
def _streams(draw: Any) -> tuple[str, list[tuple[ProviderEvent, str]]]:
    """Deliveries of a few records' changes: gaps, duplicates, out of order, mixed channels."""
    rule = draw(st.sampled_from(["version", "modified"]))
    changes: list[ProviderEvent] = []
    seq = 0
    for record in ("a", "b", "c"):
        for version in range(1, draw(st.integers(1, 5)) + 1):
            seq += 1
            at = T0 + timedelta(seconds=draw(st.integers(0, 3)) + version * 10)
            key = (BY_VERSION if rule == "version" else BY_MODIFIED).event_key(
                event_id=f"evt_{seq}", seq=seq, version=version, occurred_at=at
            )
            changes.append(
                ProviderEvent(
                    id=f"evt_{seq}",
                    seq=seq,
                    type="record.updated",
                    record_id=record,
                    tenant_id="t",
                    version=version if rule == "version" else 0,
                    occurred_at=at,
                    data={"v": version},
                    order=key,
                )
            )
    # Some changes are never delivered (a lost webhook), some delivered twice, in any order.
    delivered = draw(st.lists(st.sampled_from(changes), min_size=1, max_size=25))
    channels = st.sampled_from(["webhook", "poll", "replay", "resync"])
    stream: list[tuple[ProviderEvent, str]] = []
    for event in delivered:
        channel = draw(channels)
        if channel == "resync":
            # A snapshot of the record at that change, as resync builds it.
            snapshot = ProviderEvent(
                id=f"resync:{event.record_id}:v{event.order}",
                seq=0,
                type="record.updated",
                record_id=event.record_id,
                tenant_id="t",
                version=event.version,
                occurred_at=event.occurred_at,
                data=dict(event.data),
                order=(BY_VERSION if rule == "version" else BY_MODIFIED).record_key(
                    version=event.version or None, updated_at=event.occurred_at
                ),
            )
            stream.append((snapshot, "poll"))
        else:
            stream.append((event, channel))
    return rule, stream


def _state(engine: Engine) -> tuple[Any, Any, Any]:
    with Session(engine) as session:
        inbox = {
            row.event_id: (row.status, row.source, row.webhook_at is not None)
            for row in session.scalars(select(SyncInbox))
        }
        ledger = {
            row.record_id: (row.order_major, row.order_minor, row.event_id)
            for row in session.scalars(select(SyncRecordVersion))
        }
    newest: dict[str, str] = {}
    for event_id, record_id, _version in HostTable(engine).rows():
        newest[record_id] = event_id
    return inbox, ledger, newest


def _reset(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("sync_inbox", "sync_record_versions", "host_applied"):
            conn.execute(text(f"DELETE FROM {table}"))  # constant names


@pytest.fixture
def two_databases(
    tmp_path_factory: pytest.TempPathFactory, sqlite_url: str
) -> Iterator[tuple[Engine, Engine]]:
    """Two migrated SQLite databases: one per apply path."""
    other = tmp_path_factory.mktemp("batched") / "batched.sqlite3"
    upgrade(f"sqlite:///{other}")
    engines = (create_db_engine(sqlite_url), create_db_engine(f"sqlite:///{other}"))
    for engine in engines:
        HostTable(engine)
    yield engines
    for engine in engines:
        engine.dispose()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=_streams(), cuts=st.lists(st.integers(1, 6), max_size=25), faces=st.data())
def test_batched_and_single_event_paths_agree(
    two_databases: tuple[Engine, Engine], stream: Any, cuts: list[int], faces: Any
) -> None:
    """For any stream, applying it event by event or in batches (either face) leaves the same
    inbox rows and ledger, and the host ends with the newest state of every record."""
    single_db, batched_db = two_databases
    _rule, deliveries = stream
    for engine in two_databases:
        _reset(engine)
    single = Faces(faces.draw(st.sampled_from(["sync", "async"])), single_db)
    batched = Faces(faces.draw(st.sampled_from(["sync", "async"])), batched_db)
    try:
        for event, channel in deliveries:
            single.apply(event, channel, HostTable(single_db).registry())
        # Batches are runs of one channel (a poll or replay page), cut at random sizes.
        index, cut = 0, iter(cuts)
        while index < len(deliveries):
            size = next(cut, len(deliveries))
            channel = deliveries[index][1]
            batch = []
            while index < len(deliveries) and len(batch) < size:
                if deliveries[index][1] != channel:
                    break
                batch.append(deliveries[index][0])
                index += 1
            batched.apply_events(batch, channel, HostTable(batched_db).registry())
    finally:
        single.close()
        batched.close()

    single_state, batched_state = _state(single_db), _state(batched_db)
    assert single_state == batched_state
    delivered_newest: dict[str, tuple[OrderKey, str]] = {}
    for event, _channel in deliveries:
        assert event.order is not None
        best = delivered_newest.get(event.record_id)
        if best is None or event.order > best[0]:
            delivered_newest[event.record_id] = (event.order, event.id)
    assert {record: best[1] for record, best in delivered_newest.items()} == batched_state[2]


# --------------------------------------------------------------------------- one lock order


@pytest.mark.postgres
def test_concurrent_replay_pages_and_webhooks_never_deadlock(pg_url: str) -> None:
    """A replay applying pages while webhooks apply the same events in another order: every
    event applied once, no deadlock (issue 11: the replay locked ledger rows, then inserted
    inbox rows; the inbox did the reverse)."""
    engine = create_db_engine(pg_url, pool_size=8)
    host = HostTable(engine)
    registry = host.registry()
    events = [
        ProviderEvent(
            id=f"evt_{n}",
            seq=n,
            type="record.updated",
            record_id=f"r{n % 15}",
            tenant_id="t",
            version=n,
            occurred_at=T0 + timedelta(seconds=n),
            data={},
        )
        for n in range(1, 301)
    ]
    factory = sessionmaker(engine)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def replay() -> None:
        try:
            start.wait()
            for at in range(0, len(events), 30):
                with factory.begin() as session:
                    apply_events(session, P, events[at : at + 30], "replay", registry=registry)
        except BaseException as exc:
            errors.append(exc)

    def webhooks(offset: int) -> None:
        try:
            start.wait()
            for event in reversed(events[offset::3]):
                with factory.begin() as session:
                    apply_event(session, P, event, "webhook", registry=registry)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replay)] + [
        threading.Thread(target=webhooks, args=(i,)) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        applied = [row[0] for row in host.rows()]
        with Session(engine) as session:
            finals = dict(
                session.execute(
                    select(SyncRecordVersion.record_id, SyncRecordVersion.order_major)
                ).all()
            )
    finally:
        engine.dispose()

    assert [] == [type(e).__name__ for e in errors]
    assert len(applied) == len(set(applied))
    assert {f"r{n % 15}": n for n in range(286, 301)} == finals


# --------------------------------------------------------------------------- storage


def test_the_migration_carries_existing_rows_over(sqlite_url: str, tmp_path: Any) -> None:
    """0008 keys a versioned row by its version, and a row that held a seq (no version) by
    the modified rule: the key the provider's events get once ORDER_BY=modified is set."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0004_sync")
    engine = create_db_engine(url)
    at = datetime(2026, 1, 19, 10, 0, 0, 5, tzinfo=UTC)
    try:
        with engine.begin() as conn:
            for event_id, seq, version, record in (("e1", 41, 3, "versioned"), ("e2", 42, 0, "t")):
                conn.execute(
                    text(
                        "INSERT INTO sync_inbox (provider, event_id, event_type, record_id, seq, "
                        "version, occurred_at, source, status, received_at) VALUES (:p, :e, "
                        "'record.updated', :r, :s, :v, :at, 'poll', 'applied', :at)"
                    ),
                    {
                        "p": P,
                        "e": event_id,
                        "r": record,
                        "s": seq,
                        "v": version,
                        "at": "2026-01-19 10:00:00.000005",
                    },
                )
                conn.execute(
                    text(
                        "INSERT INTO sync_record_versions (provider, record_id, version, "
                        "event_id, updated_at) VALUES (:p, :r, :k, :e, '2026-01-19 10:00:00')"
                    ),
                    {"p": P, "r": record, "k": version or seq, "e": event_id},
                )
        upgrade(url)
        with Session(engine) as session:
            carried = {
                row.record_id: (row.order_major, row.order_minor)
                for row in session.scalars(select(SyncRecordVersion))
            }
    finally:
        engine.dispose()

    assert {
        "versioned": (3, ""),
        "t": (
            BY_MODIFIED.event_key(event_id="e2", seq=42, version=None, occurred_at=at).major,
            "00000000000000000042:e2",
        ),
    } == carried


@pytest.mark.postgres
def test_keys_compare_by_code_point_whatever_the_database_collation(pg_url: str) -> None:
    """On a database whose default collation sorts "b" before "B" (ICU en-US), the ledger's
    tie-break still compares like Python: the column is COLLATE "C"."""
    import psycopg

    from ..conftest import POSTGRES_URL, _with_database

    name = f"idis_icu_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
            "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
    url = _with_database(POSTGRES_URL, name)
    try:
        upgrade(url)
        engine = create_db_engine(url)
        host = HostTable(engine)
        registry = host.registry()

        def keyed(seq: int, minor: str) -> ProviderEvent:
            return ProviderEvent(
                id=f"e{seq}",
                seq=seq,
                type="record.updated",
                record_id="r",
                tenant_id="t",
                version=0,
                occurred_at=T0,
                data={},
                order=OrderKey(5, minor),
            )

        try:
            with engine.connect() as conn:
                icu_order = conn.execute(text("SELECT 'B' < 'b'")).scalar()
                column = conn.execute(
                    text(
                        "SELECT collation_name FROM information_schema.columns "
                        "WHERE table_name = 'sync_record_versions' AND column_name = 'order_minor'"
                    )
                ).scalar()
            outcomes = []
            for event in (keyed(1, "B"), keyed(2, "b"), keyed(3, "a")):
                with sessionmaker(engine).begin() as session:
                    outcomes.append(
                        apply_event_outcome_sync(session, event, registry)  # python: B < a < b
                    )
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    assert icu_order is False  # the database's own collation disagrees with code points
    assert "C" == column
    assert [ApplyOutcome.APPLIED, ApplyOutcome.APPLIED, ApplyOutcome.SUPERSEDED] == outcomes


def apply_event_outcome_sync(session: Session, event: Any, registry: HandlerRegistry) -> Any:
    """The sync face's outcome (a helper, so the test above reads as a table)."""
    from idis.integrations.sync._inbox import apply_event_outcome

    return apply_event_outcome(session, P, event, "poll", registry=registry)
