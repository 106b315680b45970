"""Outbound Standard Webhooks (every delivery mode) and the inbound receiver."""

from __future__ import annotations

import base64
import json

import pytest

from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET

SECRET = "whsec_" + base64.b64encode(b"test-secret-for-simulator-hooks").decode()
OTHER = "whsec_" + base64.b64encode(b"second-secret-during-rotation").decode()


def _target(sim, sink, **kwargs) -> None:
    sim.control.set_webhook_target("crm_provider", sink.url, [SECRET], **kwargs)


def test_each_change_is_posted_once_with_a_valid_signature(sim, sink, clock, signature) -> None:
    """Every emitted event arrives once, signed as Standard Webhooks says."""
    _target(sim, sink)
    events = sim.control.emit("crm_provider", 3)

    assert sim.control.flush_webhooks("crm_provider")
    assert [e["id"] for e in events] == sink.ids()
    for (headers, body), event in zip(sink.received, events, strict=True):
        expected = signature(SECRET, headers["webhook-id"], headers["webhook-timestamp"], body)
        assert expected == headers["webhook-signature"]
        assert str(int(clock.now.timestamp())) == headers["webhook-timestamp"]
        assert {"type": event["type"], "timestamp": event["occurred_at"], "data": event} == (
            json.loads(body)
        )


def test_several_secrets_sign_one_entry_each(sim, sink, signature) -> None:
    """With two secrets, the signature header carries one valid v1 entry per secret."""
    sim.control.set_webhook_target("crm_provider", sink.url, [SECRET, OTHER])
    sim.control.emit("crm_provider", 1)
    sim.control.flush_webhooks("crm_provider")

    headers, body = sink.received[0]
    stamp = headers["webhook-timestamp"]

    assert [
        signature(SECRET, "evt_1", stamp, body),
        signature(OTHER, "evt_1", stamp, body),
    ] == headers["webhook-signature"].split(" ")


def test_stop_mode_drops_and_remembers_event_ids(sim, sink) -> None:
    """In stop mode nothing is sent and the dropped event ids are listed; deliver resumes."""
    _target(sim, sink)
    sim.control.set_webhook_mode("crm_provider", "stop")
    dropped = sim.control.emit("crm_provider", 3)
    sim.control.set_webhook_mode("crm_provider", "deliver")
    sent = sim.control.emit("crm_provider", 1)
    sim.control.flush_webhooks("crm_provider")

    stats = sim.control.stats("crm_provider")["webhooks"]

    assert [e["id"] for e in dropped] == stats["dropped_ids"]
    assert [sent[0]["id"]] == sink.ids()


def test_stop_window_drops_exactly_the_events_inside_it(sim, sink, clock) -> None:
    """A stop window in simulated time drops the events occurring in it and no others."""
    _target(sim, sink)
    sim.control.emit("crm_provider", 2)
    clock.advance(10)
    sim.control.stop_webhooks_window("crm_provider", duration=60)
    inside = sim.control.emit("crm_provider", 3)
    clock.advance(59)
    inside += sim.control.emit("crm_provider", 1)
    clock.advance(1)
    sim.control.emit("crm_provider", 2)
    sim.control.flush_webhooks("crm_provider")

    stats = sim.control.stats("crm_provider")["webhooks"]

    assert [e["id"] for e in inside] == stats["dropped_ids"]
    assert ["evt_1", "evt_2", "evt_7", "evt_8"] == sink.ids()


def test_duplicate_mode_sends_each_event_twice_with_the_same_id(sim, sink) -> None:
    """Duplicate mode delivers every event twice under one webhook-id."""
    _target(sim, sink)
    sim.control.set_webhook_mode("crm_provider", "duplicate")
    sim.control.emit("crm_provider", 2)
    sim.control.flush_webhooks("crm_provider")

    assert ["evt_1", "evt_1", "evt_2", "evt_2"] == sink.ids()
    assert 2 == sim.control.stats("crm_provider")["webhooks"]["duplicated"]


def test_reorder_mode_delivers_every_event_out_of_order(sim, sink) -> None:
    """Reorder mode shuffles within a batch: same set of events, different order."""
    _target(sim, sink)
    sim.control.set_webhook_mode("crm_provider", "reorder", batch=5)
    events = sim.control.emit("crm_provider", 5)
    sim.control.flush_webhooks("crm_provider")

    ids = sink.ids()

    assert sorted(e["id"] for e in events) == sorted(ids)
    assert [e["id"] for e in events] != ids


def test_corrupt_mode_sends_a_signature_that_does_not_verify(sim, sink, signature) -> None:
    """Corrupt mode delivers with a signature no configured secret produces."""
    _target(sim, sink)
    sim.control.set_webhook_mode("crm_provider", "corrupt")
    sim.control.emit("crm_provider", 1)
    sim.control.flush_webhooks("crm_provider")

    headers, body = sink.received[0]

    assert (
        signature(SECRET, "evt_1", headers["webhook-timestamp"], body)
        != (headers["webhook-signature"])
    )
    assert 1 == sim.control.stats("crm_provider")["webhooks"]["corrupted"]


def test_delay_mode_holds_deliveries_back(sim, sink) -> None:
    """In delay mode an event is still pending right after it happened."""
    _target(sim, sink)
    sim.control.set_webhook_mode("crm_provider", "delay", delay=600)
    sim.control.emit("crm_provider", 1)

    idle = sim.control.flush_webhooks("crm_provider", timeout=0.05)

    assert (False, []) == (idle, sink.ids())
    assert (
        1
        == sim.control.stats("crm_provider")["webhooks"]["pending"]
        + (sim.control.stats("crm_provider")["webhooks"]["in_flight"])
    )


def test_5xx_answers_are_retried_until_delivered(sim, sink) -> None:
    """A target answering 503 twice gets a third attempt that succeeds."""
    _target(sim, sink, retry_backoff=0.0)
    sink.script.extend([503, 503])
    sim.control.emit("crm_provider", 1)
    sim.control.flush_webhooks("crm_provider")

    stats = sim.control.stats("crm_provider")["webhooks"]

    assert ["evt_1"] * 3 == sink.ids()
    assert (3, 2, 1, 0) == (
        stats["attempts"],
        stats["retries"],
        stats["delivered"],
        stats["failed"],
    )


def test_deliveries_that_keep_failing_are_counted_as_failed(sim, sink) -> None:
    """After the last attempt fails, the event id is listed as failed; 4xx is not retried."""
    _target(sim, sink, retry_backoff=0.0, max_attempts=2)
    sink.script.extend([500, 500, 400])
    sim.control.emit("crm_provider", 2)
    sim.control.flush_webhooks("crm_provider")

    stats = sim.control.stats("crm_provider")["webhooks"]

    assert ["evt_1", "evt_1", "evt_2"] == sink.ids()
    assert ["evt_1", "evt_2"] == stats["failed_ids"]


def test_bad_webhook_settings_are_rejected(sim) -> None:
    """A non-whsec secret, a bad URL or an unknown mode is refused, naming it."""
    from idis.integrations.simulator import SimulatorInputError

    with pytest.raises(SimulatorInputError, match="whsec_"):
        sim.control.set_webhook_target("crm_provider", "http://127.0.0.1:1/x", ["plain"])
    with pytest.raises(SimulatorInputError, match="url="):
        sim.control.set_webhook_target("crm_provider", "ftp://x", [SECRET])
    with pytest.raises(SimulatorInputError, match="mode="):
        sim.control.set_webhook_mode("crm_provider", "sometimes")

    assert None is sim.control.stats("crm_provider")["webhooks"]["url"]


# --------------------------------------------------------------------------- inbound receiver


def _signed(signature, secret, msg_id, stamp, payload):
    body = json.dumps(payload).encode()
    return body, {
        "webhook-id": msg_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signature(secret, msg_id, str(stamp), body),
        "content-type": "application/json",
    }


def test_receiver_accepts_once_and_dedupes_by_webhook_id(sim, http, clock, signature) -> None:
    """A valid delivery is applied once; the same webhook-id again is a duplicate."""
    sim.control.configure_receiver("crm_provider", secrets=[SECRET])
    body, headers = _signed(signature, SECRET, "msg_1", int(clock.now.timestamp()), {"a": 1})
    url = "/p/crm_provider/webhooks/inbound"

    first = http.post(url, content=body, headers=headers)
    second = http.post(url, content=body, headers=headers)
    inbound = sim.control.stats("crm_provider")["inbound"]

    assert ("accepted", "duplicate") == (first.json()["status"], second.json()["status"])
    assert ({"msg_1": 2}, {"msg_1": 1}) == (inbound["received_per_id"], inbound["applied_per_id"])
    assert [{"a": 1}] == [d["payload"] for d in sim.control.inbound_deliveries("crm_provider")]


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ("signature", 401, "bad_signature"),
        ("stale", 401, "stale_timestamp"),
        ("missing", 400, "missing_headers"),
        ("body", 400, "malformed_body"),
    ],
)
def test_receiver_rejects_bad_deliveries(sim, http, clock, signature, change, status, reason):
    """Bad signature, stale timestamp, missing headers and non-JSON bodies are rejected."""
    stamp = int(clock.now.timestamp()) - (3600 if change == "stale" else 0)
    body, headers = _signed(signature, SECRET, "msg_1", stamp, {"a": 1})
    if change == "signature":
        headers["webhook-signature"] = signature(OTHER, "msg_1", str(stamp), body)
    if change == "missing":
        del headers["webhook-signature"]
    if change == "body":
        body = b"{not json"
        headers["webhook-signature"] = signature(SECRET, "msg_1", str(stamp), body)
    sim.control.configure_receiver("crm_provider", secrets=[SECRET])

    response = http.post("/p/crm_provider/webhooks/inbound", content=body, headers=headers)

    assert (status, reason) == (response.status_code, response.json()["error"])
    assert {} == sim.control.stats("crm_provider")["inbound"]["applied_per_id"]


def test_receiver_can_answer_gone_or_fail(sim, http, clock, signature) -> None:
    """Receiver modes gone and fail answer 410 and the configured 5xx, applying nothing."""
    body, headers = _signed(signature, SECRET, "m", int(clock.now.timestamp()), {})
    url = "/p/crm_provider/webhooks/inbound"
    sim.control.configure_receiver("crm_provider", secrets=[SECRET], mode="gone")
    gone = http.post(url, content=body, headers=headers).status_code
    sim.control.configure_receiver("crm_provider", mode="fail", fail_status=502)
    failed = http.post(url, content=body, headers=headers).status_code

    assert (410, 502) == (gone, failed)
    assert {} == sim.control.stats("crm_provider")["inbound"]["applied_per_id"]


def test_simulator_webhooks_verify_at_its_own_receiver_given_their_secret(sim) -> None:
    """The provider's webhooks verify at a receiver holding their secret, and only there.

    The receiver (for the library's outbound webhooks) defaults to a secret of its
    own: one key for both directions would let a captured delivery replay.
    """
    sim.control.set_webhook_target("crm_provider", f"{sim.url}/p/sink/webhooks/inbound")
    sim.control.emit("crm_provider", 2)
    sim.control.flush_webhooks("crm_provider")
    by_default = sim.control.stats("sink")["inbound"]
    sim.control.configure_receiver("sink", secrets=[DEFAULT_WEBHOOK_SECRET])
    sim.control.emit("crm_provider", 4)
    sim.control.flush_webhooks("crm_provider")

    inbound = sim.control.stats("sink")["inbound"]

    assert 0 == by_default["accepted"]
    assert 4 == inbound["accepted"]
