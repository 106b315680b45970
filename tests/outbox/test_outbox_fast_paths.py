"""The worker's fast constructions give exactly what the slow ones give."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from idis.integrations.db._engine import create_db_engine, load_json
from idis.integrations.outbox._messages import OutboxMessage, leased_message

from .conftest import Loop, outbox_settings, put_messages, table


def test_a_leased_message_is_the_constructors_message() -> None:
    now = datetime(2026, 1, 19, 9, 0, tzinfo=UTC)
    values = (7, "crm", "request", "k-7", {"a": [1]}, "r1", "t1", 2, 5, now, now, 3)
    fast = leased_message(*values)
    slow = OutboxMessage(*values)

    assert type(fast) is OutboxMessage
    assert fast == slow
    assert repr(fast) == repr(slow)
    assert dataclasses.astuple(fast) == dataclasses.astuple(slow)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.id = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "b": [true, null, "é"]}',
        ' {"a": 1} ',
        "[1.5e3]",
        '"x"',
        "NaN",
        "{}",
    ],
)
def test_load_json_decodes_as_json_loads(text: str) -> None:
    # Compared as JSON text: NaN is not equal to itself.
    assert json.dumps(load_json(text)) == json.dumps(json.loads(text))


@pytest.mark.parametrize("text", ['{"a": }', "", "{} x", "[1,]"])
def test_load_json_rejects_what_json_loads_rejects(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as fast:
        load_json(text)
    with pytest.raises(json.JSONDecodeError) as slow:
        json.loads(text)
    assert str(fast.value) == str(slow.value)


@pytest.mark.postgres
def test_postgres_leased_messages_carry_the_stored_payload_and_times_in_utc(
    pg_url: str, loop: Loop
) -> None:
    # The lease reads the payload as JSON text and its times as UTC wall
    # times (_queries.utc_wall); the session's zone must not show through.
    from sqlalchemy.engine import make_url

    engine = create_db_engine(pg_url)
    try:
        with engine.connect() as conn:
            name = make_url(pg_url).database
            conn.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET TimeZone = 'America/St_Johns'")
            conn.commit()
        engine.dispose()  # new connections take the database's zone
        sent = put_messages(engine, 3)
        seen: list[OutboxMessage] = []
        worker = loop.worker(
            engine,
            outbox_settings(),
            deliver=seen.append,
            worker_id="w-utc",
            lease=timedelta(minutes=5),
        )
        before = datetime.now(UTC)
        assert worker.run_once().delivered == 3
        rows = table(engine)
    finally:
        engine.dispose()
    assert [m.payload for m in seen] == [dict(m.payload) for m in sent]
    assert [m.created_at for m in seen] == [row.created_at for row in rows]
    for message in seen:
        assert message.created_at.tzinfo is UTC
        assert message.lease_expires_at is not None
        assert message.lease_expires_at.tzinfo is UTC
        # The lease's end follows the database's clock: about five minutes from now.
        assert timedelta(minutes=4) < message.lease_expires_at - before < timedelta(minutes=6)


@pytest.mark.parametrize(
    "naive",
    [
        datetime.min,
        datetime.max,
        datetime(1970, 1, 1),
        datetime(2026, 12, 7, 15, 3, 4, 123456),
        datetime(2024, 2, 29, 23, 59, 59, 999999),
    ],
)
def test_a_naive_utc_wall_time_becomes_the_aware_utc_time(naive: datetime) -> None:
    from idis.integrations.outbox._worker import _naive_utc

    aware = _naive_utc(naive)
    expected = naive.replace(tzinfo=UTC)
    assert aware == expected
    assert aware.tzinfo is UTC
    assert repr(aware) == repr(expected)
    assert aware.fold == expected.fold


def _core() -> Any:
    from idis.integrations.outbox._worker import _WorkerCore

    return _WorkerCore(
        outbox_settings(),
        providers=None,
        availability=None,
        worker_id="w-rows",
        clock=None,
        rng=None,
        metrics=None,
        batch_size=None,
        concurrency=None,
        lease=None,
        poll_interval=None,
        metrics_interval=None,
    )


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_leased_rows_become_the_constructors_messages(dialect: str) -> None:
    # Rows as each driver returns them (_queries._leased_columns): the payload
    # as JSON text; created_at as a naive UTC datetime on PostgreSQL, followed by
    # the statement's time, as UTC text on SQLite.
    from idis.integrations.outbox._queries import LEASE_EXPIRED, SUSPECT

    expires = datetime(2026, 1, 19, 9, 5, tzinfo=UTC)
    created = [datetime(2026, 1, 19, 8, 0, 0, 250 * i, tzinfo=UTC) for i in range(3)]
    payloads = [{"method": "PUT", "json": {"seq": i, "x": [1.5, None]}} for i in range(3)]

    def stored_time(moment: datetime) -> Any:
        naive = moment.replace(tzinfo=None)
        if dialect == "postgresql":
            return naive
        return naive.isoformat(sep=" ", timespec="microseconds")

    rows = [
        (
            10 + i,
            "crm",
            "webhook" if i == 1 else "request",
            f"k-{i}",
            json.dumps(payloads[i]),
            f"r{i}" if i else None,
            "t1" if i == 2 else None,
            i + 1,
            None if i == 0 else 2,
            stored_time(created[i]),
            7 + i,
            LEASE_EXPIRED if i == 2 else ("boom" if i == 1 else None),
        )
        + ((datetime(2026, 1, 19, 9, 0),) if dialect == "postgresql" else ())
        for i in range(3)
    ]
    core = _core()

    messages = core.to_messages(rows, expires, dialect)

    assert messages == [
        OutboxMessage(
            10 + i,
            "crm",
            "webhook" if i == 1 else "request",
            f"k-{i}",
            payloads[i],
            f"r{i}" if i else None,
            "t1" if i == 2 else None,
            i + 1,
            5 if i == 0 else 2,  # None: the configured max_retries
            created[i],
            expires,
            7 + i,
        )
        for i in range(3)
    ]
    assert all(type(m) is OutboxMessage for m in messages)
    assert [m.lease_expires_at for m in messages] == [expires] * 3
    assert [m.lease_generation for m in messages] == [7, 8, 9]
    assert all(m.created_at.tzinfo is UTC for m in messages)
    assert core.reclaimed == 1  # the lapsed lease's row
    assert core.suspects == [12]
    assert core.to_messages([], expires, dialect) == []

    # A suspect given back (``give_back_statement``) and leased again is still a
    # suspect, but its takeover was counted when it happened, not again.
    suspect = (*rows[2][:11], SUSPECT, *rows[2][12:])
    core.suspects.clear()
    core.to_messages([rows[0], suspect], expires, dialect)
    assert core.reclaimed == 1
    assert core.suspects == [12]


def test_load_json_column_decodes_each_as_load_json() -> None:
    from idis.integrations.db._engine import load_json_column

    texts = ['{"a": 1}', "[1, 2.5]", '"x"', "null", '{"b": {"c": [true]}}']
    assert list(load_json_column(texts)) == [json.loads(t) for t in texts]
    # One the scanner does not take whole: every one decoded as json.loads does.
    assert list(load_json_column([*texts, ' {"d": 4} '])) == [json.loads(t) for t in texts] + [
        {"d": 4}
    ]
    assert list(load_json_column([])) == []


@pytest.mark.parametrize("bad", ['{"a": }', "", "{} x"])
def test_load_json_column_raises_what_json_loads_raises(bad: str) -> None:
    from idis.integrations.db._engine import load_json_column

    with pytest.raises(json.JSONDecodeError) as fast:
        load_json_column(['{"ok": 1}', bad])
    with pytest.raises(json.JSONDecodeError) as slow:
        json.loads(bad)
    assert str(fast.value) == str(slow.value)


def test_load_json_values_decodes_each_as_json_loads() -> None:
    # Each text one JSON value, as PostgreSQL's json/jsonb output is.
    from idis.integrations.db._engine import load_json_values

    texts = ['{"a": 1, "k": {"a": [2]}}', '{"a": 3, "k": null}', "[1, 2.5]", '"x"', " 7 "]
    assert list(load_json_values(texts)) == [json.loads(t) for t in texts]
    assert list(load_json_values(['{"a": 1, "a": 2}'])) == [{"a": 2}]  # the last key wins
    assert list(load_json_values([])) == []


@pytest.mark.parametrize("bad", ['{"a": }', "", "{} x", "[1,]"])
def test_load_json_values_raises_what_json_loads_raises(bad: str) -> None:
    from idis.integrations.db._engine import load_json_values

    with pytest.raises(json.JSONDecodeError) as fast:
        load_json_values(['{"ok": 1}', bad, "[2]"])
    with pytest.raises(json.JSONDecodeError) as slow:
        json.loads(bad)
    assert str(fast.value) == str(slow.value)


def test_a_delivered_batch_is_counted_and_settled_per_message() -> None:
    # The all-delivered batch (the messages themselves as outcomes) against the
    # same batch with one settlement in it, which takes the general path.
    from prometheus_client import CollectorRegistry

    from idis.integrations.observability._metrics import Metrics
    from idis.integrations.outbox._policy import Action, Disposition
    from idis.integrations.outbox._worker import BatchResult, _Settlement, _WorkerCore

    from ..conftest import sample

    now = datetime(2026, 1, 19, 9, 0, tzinfo=UTC)
    batch = [
        leased_message(
            i,
            ("crm", "erp")[i % 2],
            ("request", "webhook")[i // 4],
            f"k{i}",
            {},
            None,
            None,
            1,
            5,
            now,
            now,
            10 + i,
        )
        for i in range(7)
    ]
    metrics = Metrics(CollectorRegistry())
    core = _WorkerCore(
        outbox_settings(),
        providers=None,
        availability=None,
        worker_id="w-obs",
        clock=None,
        rng=None,
        metrics=metrics,
        batch_size=None,
        concurrency=None,
        lease=None,
        poll_interval=None,
        metrics_interval=None,
    )
    result = BatchResult()
    core.observe(batch, result)
    assert result.delivered == 7
    counted = {
        (provider, kind): sample(
            metrics,
            "integration_outbox_deliveries_total",
            provider=provider,
            kind=kind,
            outcome="delivered",
        )
        for provider in ("crm", "erp")
        for kind in ("request", "webhook")
    }
    assert counted == {
        ("crm", "request"): 2,  # ids 0, 2
        ("erp", "request"): 2,  # 1, 3
        ("crm", "webhook"): 2,  # 4, 6
        ("erp", "webhook"): 1,  # 5
    }
    params, rows, receivers = core.write_params(batch, now, "postgresql")
    assert params == {
        "p_ids": "{0, 1, 2, 3, 4, 5, 6}",
        "p_gens": "{10, 11, 12, 13, 14, 15, 16}",
        "p_now": now,
    }
    assert rows == receivers == []
    # A delivered settlement among them: the same ids and generations.
    mixed = [
        *batch[:3],
        _Settlement(batch[3], Disposition(Action.DELIVERED, None, None)),
        *batch[4:],
    ]
    assert core.write_params(mixed, now, "postgresql") == (params, [], [])
    core.observe(mixed, result)
    assert result.delivered == 14
