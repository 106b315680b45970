"""Records, changes feed, replay with retention, idempotent writes and enrichment over HTTP."""

from __future__ import annotations

from datetime import timedelta

import pytest

CRM = "/p/crm_provider"


def test_records_pages_cover_every_record_once_in_write_order(sim, http) -> None:
    """Cursor pagination returns each record exactly once, in write order."""
    sim.control.emit("crm_provider", 25)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        page = http.get(f"{CRM}/records", params=params).json()
        seen.extend(item["id"] for item in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert [f"rec_{n}" for n in range(1, 26)] == seen
    assert 3 == pages


def test_updated_records_move_to_the_end_and_updated_since_filters(sim, http, clock) -> None:
    """An updated record is listed once, after older ones; updated_since skips older writes."""
    sim.control.emit("crm_provider", 3)
    clock.advance(60)
    since = clock.now.isoformat()
    sim.control.emit("crm_provider", 1, record_ids=["rec_1"])

    everything = http.get(f"{CRM}/records").json()["items"]
    recent = http.get(f"{CRM}/records", params={"updated_since": since}).json()["items"]

    assert ["rec_2", "rec_3", "rec_1"] == [r["id"] for r in everything]
    assert [("rec_1", 2)] == [(r["id"], r["version"]) for r in recent]


def test_get_record_returns_it_and_404_when_unknown(sim, http) -> None:
    """GET /records/{id} returns the record shape, or 404 for an unknown id."""
    sim.control.emit("crm_provider", 1, tenant_ids=["t9"])

    found = http.get(f"{CRM}/records/rec_1")
    missing = http.get(f"{CRM}/records/nope")

    assert 200 == found.status_code
    assert {"id", "tenant_id", "version", "updated_at", "data"} == set(found.json())
    assert "t9" == found.json()["tenant_id"]
    assert 404 == missing.status_code


def test_put_creates_then_updates_and_appends_events(sim, http) -> None:
    """PUT upserts: 201 then 200 with version 2, and each write appends an event."""
    first = http.put(f"{CRM}/records/d1", json={"tenant_id": "t1", "data": {"stage": "lead"}})
    second = http.put(f"{CRM}/records/d1", json={"data": {"stage": "won"}})
    events = http.get(f"{CRM}/changes").json()["events"]

    assert (201, 1) == (first.status_code, first.json()["version"])
    assert (200, 2, "t1") == (
        second.status_code,
        second.json()["version"],
        second.json()["tenant_id"],
    )
    assert ["record.created", "record.updated"] == [e["type"] for e in events]
    assert [{"stage": "lead"}, {"stage": "won"}] == [e["data"] for e in events]


def test_repeated_idempotency_key_is_applied_once(sim, http) -> None:
    """A repeated Idempotency-Key returns the first result and applies nothing new."""
    body = {"data": {"n": 1}}
    headers = {"Idempotency-Key": "key-1"}
    first = http.put(f"{CRM}/records/d1", json=body, headers=headers)
    again = [http.put(f"{CRM}/records/d1", json=body, headers=headers) for _ in range(3)]
    stats = sim.control.stats("crm_provider")

    assert all(r.json() == first.json() and r.status_code == 201 for r in again)
    assert all(r.headers["idempotent-replayed"] == "true" for r in again)
    assert {"key-1": 1} == stats["idempotency"]["applications"]
    assert {"key-1": 4} == stats["idempotency"]["received"]
    assert {"key-1": 3} == stats["idempotency"]["duplicates"]
    assert 1 == stats["events"]


def test_a_provider_that_ignores_keys_counts_every_application(sim, http) -> None:
    """honor_idempotency=False: a repeated key applies again, and applications says so."""
    sim.control.honor_idempotency("crm_provider", False)
    headers = {"Idempotency-Key": "key-1"}
    for n in range(3):
        http.put(f"{CRM}/records/d1", json={"data": {"n": n}}, headers=headers)
    stats = sim.control.stats("crm_provider")

    assert {"key-1": 3} == stats["idempotency"]["applications"]
    assert {"key-1": 3} == stats["idempotency"]["received"]
    assert 3 == len(stats["writes"]["d1"])
    assert (3, 3) == (stats["idempotency"]["applied_total"], stats["idempotency"]["received_total"])


def test_idempotency_key_reused_for_another_request_is_rejected(sim, http) -> None:
    """The same key with a different body is a 422 and changes nothing."""
    http.put(f"{CRM}/records/d1", json={"data": {"n": 1}}, headers={"Idempotency-Key": "k"})

    reused = http.put(
        f"{CRM}/records/d1", json={"data": {"n": 2}}, headers={"Idempotency-Key": "k"}
    )

    assert 422 == reused.status_code
    assert "idempotency_key_reused" == reused.json()["error"]
    assert {"n": 1} == http.get(f"{CRM}/records/d1").json()["data"]


def test_stats_record_write_order_per_record(sim, http) -> None:
    """Stats list each record's writes in the order applied, with their keys."""
    for n in range(3):
        http.put(f"{CRM}/records/a", json={"data": {"n": n}}, headers={"Idempotency-Key": f"a{n}"})
        http.put(f"{CRM}/records/b", json={"data": {"n": n}}, headers={"Idempotency-Key": f"b{n}"})

    writes = sim.control.stats("crm_provider")["writes"]

    assert ["a0", "a1", "a2"] == [w["idempotency_key"] for w in writes["a"]]
    assert [1, 2, 3] == [w["version"] for w in writes["b"]]


def test_put_with_bad_body_is_400_and_changes_nothing(sim, http) -> None:
    """A PUT without a data object is rejected naming the problem."""
    bad = http.put(f"{CRM}/records/d1", json={"tenant_id": "t1"})
    not_json = http.put(
        f"{CRM}/records/d1", content=b"{", headers={"content-type": "application/json"}
    )

    assert (400, "invalid_body") == (bad.status_code, bad.json()["error"])
    assert 400 == not_json.status_code
    assert 0 == sim.control.stats("crm_provider")["events"]


def test_changes_pages_by_seq_and_by_time(sim, http, clock) -> None:
    """/changes pages with after/next_after/has_more, and since= starts at a time."""
    sim.control.emit("crm_provider", 5)
    clock.advance(10)
    since = clock.now.isoformat()
    sim.control.emit("crm_provider", 2)

    first = http.get(f"{CRM}/changes", params={"limit": 4}).json()
    rest = http.get(f"{CRM}/changes", params={"after": first["next_after"]}).json()
    by_time = http.get(f"{CRM}/changes", params={"since": since}).json()
    idle = http.get(f"{CRM}/changes", params={"after": rest["next_after"]}).json()

    assert ([1, 2, 3, 4], 4, True) == (
        [e["seq"] for e in first["events"]],
        first["next_after"],
        first["has_more"],
    )
    assert ([5, 6, 7], False) == ([e["seq"] for e in rest["events"]], rest["has_more"])
    assert ["evt_6", "evt_7"] == [e["id"] for e in by_time["events"]]
    assert ([], 7) == (idle["events"], idle["next_after"])


def test_replay_pages_by_time_with_a_cursor(sim, http, clock) -> None:
    """/replay since a time pages through every later event with next_cursor."""
    sim.control.emit("crm_provider", 3)
    clock.advance(30)
    since = clock.now.isoformat()
    sim.control.emit("crm_provider", 7)
    seqs: list[int] = []
    cursor = None
    while True:
        params = {"since": since, "limit": 3} | ({"cursor": cursor} if cursor else {})
        page = http.get(f"{CRM}/replay", params=params).json()
        seqs.extend(e["seq"] for e in page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert list(range(4, 11)) == seqs


def test_replay_older_than_retention_is_422_naming_the_window(sim, http, clock) -> None:
    """A since older than the retention is refused with retention_exceeded."""
    sim.control.set_retention("crm_provider", 3600)
    too_old = (clock.now - timedelta(seconds=3601)).isoformat()

    refused = http.get(f"{CRM}/replay", params={"since": too_old})

    assert 422 == refused.status_code
    assert {"error": "retention_exceeded", "retention_seconds": 3600} == {
        k: refused.json()[k] for k in ("error", "retention_seconds")
    }


def test_events_older_than_retention_are_pruned_from_replay(sim, http, clock) -> None:
    """Events that aged out of the retention window are no longer returned."""
    sim.control.set_retention("crm_provider", 3600)
    sim.control.emit("crm_provider", 2)
    clock.advance(1800)
    sim.control.emit("crm_provider", 2)
    clock.advance(1801)
    oldest_allowed = (clock.now - timedelta(seconds=3600)).isoformat()

    replayed = http.get(f"{CRM}/replay", params={"since": oldest_allowed}).json()
    changes = http.get(f"{CRM}/changes").json()

    assert [3, 4] == [e["seq"] for e in replayed["events"]]
    assert ([3, 4], 3) == ([e["seq"] for e in changes["events"]], changes["oldest_seq"])


def test_a_feed_retention_shorter_than_replay_leaves_old_events_to_replay(sim, http, clock) -> None:
    """/changes stops serving events older than its own retention; /replay still has them."""
    sim.control.set_feed_retention("crm_provider", 600)
    sim.control.emit("crm_provider", 2)
    start = clock.now.isoformat()
    clock.advance(900)
    sim.control.emit("crm_provider", 2)

    changes = http.get(f"{CRM}/changes", params={"after": 0}).json()
    replayed = http.get(f"{CRM}/replay", params={"since": start}).json()
    stats = sim.control.stats("crm_provider", detail=False)

    assert ([3, 4], 3) == ([e["seq"] for e in changes["events"]], changes["oldest_seq"])
    assert [1, 2, 3, 4] == [e["seq"] for e in replayed["events"]]
    assert (600, 259200) == (stats["feed_retention_seconds"], stats["retention_seconds"])


def test_feed_retention_resets_and_rejects_bad_values(sim, http, clock) -> None:
    """None gives the feed the replay retention back; a bad value is a 400 naming it."""
    sim.control.set_feed_retention("crm_provider", 600)
    sim.control.emit("crm_provider", 1)
    clock.advance(900)

    refused = http.post("/_control/feed_retention", json={"provider": "crm_provider", "seconds": 0})
    sim.control.set_feed_retention("crm_provider", None)
    changes = http.get(f"{CRM}/changes").json()

    assert (400, "seconds") == (refused.status_code, refused.json()["parameter"])
    assert [1] == [e["seq"] for e in changes["events"]]
    assert sim.control.stats("crm_provider")["feed_retention_seconds"] is None


def test_replay_cursor_past_pruned_events_is_422(sim, http, clock) -> None:
    """Continuing a replay whose next events were pruned meanwhile is refused, not skipped."""
    sim.control.set_retention("crm_provider", 3600)
    sim.control.emit("crm_provider", 4)
    page = http.get(f"{CRM}/replay", params={"since": clock.now.isoformat(), "limit": 2}).json()
    clock.advance(3601)

    later = http.get(f"{CRM}/replay", params={"cursor": page["next_cursor"]})

    assert 422 == later.status_code


@pytest.mark.parametrize(
    ("path", "params", "parameter"),
    [
        ("records", {"limit": "abc"}, "limit"),
        ("records", {"limit": "0"}, "limit"),
        ("records", {"cursor": "zzz"}, "cursor"),
        ("changes", {"since": "yesterday-ish"}, "since"),
        ("changes", {"after": "-1"}, "after"),
        ("replay", {}, "since"),
        ("replay", {"cursor": "w5"}, "cursor"),
    ],
)
def test_bad_query_parameters_are_400_naming_them(sim, http, path, params, parameter) -> None:
    """A bad query parameter gets a 400 that names it."""
    response = http.get(f"{CRM}/{path}", params=params)

    assert 400 == response.status_code
    assert parameter == response.json()["parameter"]


def test_enrich_is_deterministic_per_subject(sim, http, clock) -> None:
    """/enrich returns the same data for the same subject, and names provider and time."""
    first = http.get("/p/enrichment_provider/enrich/acme_corp").json()
    again = http.get("/p/enrichment_provider/enrich/acme_corp").json()
    others = {
        str(http.get(f"/p/enrichment_provider/enrich/co_{n}").json()["data"]) for n in range(10)
    }

    assert first["data"] == again["data"]
    assert ("acme_corp", "enrichment_provider") == (first["subject_id"], first["provider"])
    assert "2026-01-19T10:00:00.000000Z" == first["fetched_at"]
    assert 1 < len(others)


def test_mutate_changes_a_record_without_event_or_webhook(sim, http, sink) -> None:
    """mutate changes the record silently: no event in the feed, no webhook."""
    sim.control.set_webhook_target("crm_provider", sink.url)
    sim.control.emit("crm_provider", 1)
    sim.control.flush_webhooks("crm_provider")

    changed = sim.control.mutate("crm_provider", "rec_1", {"stage": "changed"})
    sim.control.flush_webhooks("crm_provider")

    assert (2, {"stage": "changed"}) == (changed["version"], changed["data"])
    assert {"stage": "changed"} == http.get(f"{CRM}/records/rec_1").json()["data"]
    assert 1 == len(http.get(f"{CRM}/changes").json()["events"])
    assert ["evt_1"] == sink.ids()


def test_providers_are_isolated(sim, http) -> None:
    """Records, events and faults of one provider do not leak into another."""
    sim.control.emit("crm_provider", 2)
    sim.control.set_fault("crm_provider", "error")

    docs = http.get("/p/docs_provider/records")

    assert (200, []) == (docs.status_code, docs.json()["items"])
    assert 503 == http.get(f"{CRM}/records").status_code
