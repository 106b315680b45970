"""The worker's fast constructions give exactly what the slow ones give."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from idis.integrations.db._engine import load_json
from idis.integrations.outbox._messages import OutboxMessage, leased_message


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
