"""The worker's fast constructions give exactly what the slow ones give."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

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
