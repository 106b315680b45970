"""The soak's checks can fail: each one catches the fault it names."""

from __future__ import annotations

from benchmarks.soak_model import check_inbound, check_outbox

EXPECTED = {"k": ["k-m0", "k-m1", "k-m2"]}


def _writes(*keys: str) -> dict[str, list[dict[str, object]]]:
    return {"k": [{"idempotency_key": key} for key in keys]}


def test_outbox_check_counts_lost_doubled_out_of_order_and_pending() -> None:
    clean = check_outbox(EXPECTED, (), _writes("k-m0", "k-m1", "k-m2"), {})
    assert clean.clean
    assert clean.applied == 3

    doubled = check_outbox(EXPECTED, (), _writes("k-m0", "k-m0", "k-m1", "k-m2"), {})
    assert doubled.applied_twice == 1

    swapped = check_outbox(EXPECTED, (), _writes("k-m1", "k-m0", "k-m2"), {})
    assert swapped.out_of_order == 1

    statuses = {"k-m1": "delivered", "k-m2": "pending"}
    gone = check_outbox(EXPECTED, (), _writes("k-m0"), statuses)
    assert (gone.lost, gone.pending) == (1, 1)

    poisoned = check_outbox(EXPECTED, ["k-m1"], _writes("k-m0", "k-m2"), {"k-m1": "dead"})
    assert poisoned.clean
    assert (poisoned.poison, poisoned.poison_dead) == (1, 1)


def test_outbox_check_counts_a_stale_resend_without_calling_it_an_application() -> None:
    received = [
        ("p", "k", "k-m0", 201, ""),
        ("p", "k", "k-m1", 200, ""),
        ("p", "k", "k-m0", 201, ""),
    ]
    figures = check_outbox(EXPECTED, (), _writes("k-m0", "k-m1"), {}, received)
    assert figures.stale_sends == 1
    assert figures.applied_twice == 0


def test_inbound_check_counts_lost_doubled_and_out_of_order() -> None:
    events = [
        {"id": "e1", "seq": 1, "record_id": "a"},
        {"id": "e2", "seq": 2, "record_id": "a"},
        {"id": "e3", "seq": 3, "record_id": "b"},
    ]
    assert check_inbound(events, [("e1", "a", 1), ("e2", "a", 2), ("e3", "b", 3)]).clean
    assert check_inbound(events, [("e2", "a", 2), ("e3", "b", 3)]).clean  # e1 superseded

    lost = check_inbound(events, [("e1", "a", 1), ("e3", "b", 3)])
    assert lost.lost == 1
    doubled = check_inbound(events, [("e2", "a", 2), ("e2", "a", 2), ("e3", "b", 3)])
    assert doubled.applied_twice == 1
    backwards = check_inbound(events, [("e2", "a", 2), ("e1", "a", 1), ("e3", "b", 3)])
    assert backwards.out_of_order == 1
