"""Deals pushed to the CRM through the outbox: one transaction, one application, a status."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, create_engine, select, text
from tests.examples.conftest import CRM, RunningService, service_env, wait_for

from idis.integrations.outbox import OutboxMessageRow
from idis.integrations.testing import RunningSimulator


def _synced(service: RunningService, deal_id: str, revision: int) -> dict[str, Any] | None:
    deal = service.deal(deal_id)
    if deal and deal["crm_sync_status"] == "SYNCED" and deal["revision"] == revision:
        return deal
    return None


def _outbox(db: Engine) -> list[tuple[str, str, str | None]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(
                OutboxMessageRow.idempotency_key,
                OutboxMessageRow.status,
                OutboxMessageRow.ordering_key,
            ).order_by(OutboxMessageRow.id)
        ).all()
    return [tuple(row) for row in rows]


def test_a_posted_deal_is_pushed_once_with_its_idempotency_key_and_becomes_synced(
    service: RunningService, sim: RunningSimulator, db: Engine
) -> None:
    """POST /deals answers PENDING; the CRM gets one PUT keyed deal-<id>-r1; the deal is SYNCED."""
    created = service.post(
        "/deals", {"id": "d1", "tenant_id": "t1", "name": "Acme", "stage": "lead", "amount": 5000}
    )

    assert 201 == created.status_code, created.text
    assert ("PENDING", 1) == (created.json()["crm_sync_status"], created.json()["revision"])
    assert {"provider": CRM, "idempotency_key": "deal-d1-r1"} == created.json()["push"]
    synced = wait_for(lambda: _synced(service, "d1", 1), "deal d1 SYNCED")
    stats = sim.control.stats(CRM)
    assert {"deal-d1-r1": 1} == stats["idempotency"]["applications"]
    assert {"deal-d1-r1": 1} == stats["idempotency"]["received"]  # sent once, not replayed
    writes = stats["writes"]["d1"]
    assert [("deal-d1-r1", {"name": "Acme", "stage": "lead", "amount": 5000})] == [
        (w["idempotency_key"], w["data"]) for w in writes
    ]
    assert synced["crm_synced_at"] is not None
    # The worker settles the message in its next transaction, just after the deal is marked.
    wait_for(lambda: [("deal-d1-r1", "delivered", "d1")] == _outbox(db), "the push settled")


def test_edits_made_while_the_crm_fails_are_delivered_in_order_once_each(
    service: RunningService, sim: RunningSimulator, db: Engine
) -> None:
    """Two edits during a 5xx storm wait, go out in edit order after it, and end SYNCED at r2."""
    sim.control.set_fault(CRM, "error", status=503, endpoint="record")
    service.post("/deals", {"id": "d2", "tenant_id": "t2", "name": "Globex", "amount": 10})
    edited = service.post("/deals", {"id": "d2", "stage": "won", "amount": 20})
    wait_for(
        lambda: service.deal_status("d2") == "FAILED",
        "the failing push to mark d2 FAILED",
    )
    during = service.deal("d2")

    sim.control.clear_faults(CRM)
    final = wait_for(lambda: _synced(service, "d2", 2), "deal d2 SYNCED at revision 2", 20)

    assert 200 == edited.status_code
    assert ("FAILED", 2) == (during["crm_sync_status"], during["revision"])
    writes = sim.control.stats(CRM)["writes"]["d2"]
    assert [
        ("deal-d2-r1", {"name": "Globex", "stage": None, "amount": 10}),
        ("deal-d2-r2", {"name": "Globex", "stage": "won", "amount": 20}),
    ] == [(w["idempotency_key"], w["data"]) for w in writes]
    assert ("won", 20) == (final["stage"], final["amount"])
    wait_for(
        lambda: (
            [("deal-d2-r1", "delivered", "d2"), ("deal-d2-r2", "delivered", "d2")] == _outbox(db)
        ),
        "both pushes settled",
    )


BAD_DEALS: list[tuple[Any, str]] = [
    ({"tenant_id": "t1"}, "name is required"),
    ({"tenant_id": "t1", "name": "A", "amount": -5}, "amount=-5"),
    ({"tenant_id": "t1", "name": "A", "amount": "12"}, "amount='12'"),
    ({"tenant_id": " t1", "name": "A"}, "tenant_id=' t1'"),
    ({"id": "has space", "tenant_id": "t1", "name": "A"}, "id='has space'"),
    ({"tenant_id": "t1", "name": "A", "colour": "red"}, "unknown field(s) colour"),
    ({"id": "nope", "stage": "won"}, "deal 'nope' does not exist"),
    (["not", "an", "object"], "JSON list"),
]


def test_bad_deal_input_is_refused_naming_the_value_and_changes_nothing(
    service: RunningService, db: Engine
) -> None:
    """Each bad POST /deals answers 400 naming the field, and none writes a deal or a push."""
    answers = [service.post("/deals", body) for body, _ in BAD_DEALS]

    assert [(400, True)] * len(BAD_DEALS) == [
        (r.status_code, named in r.json()["error"])
        for r, (_, named) in zip(answers, BAD_DEALS, strict=True)
    ], [r.text for r in answers]
    with db.connect() as conn:
        counts = conn.execute(
            text("SELECT (SELECT COUNT(*) FROM deals), (SELECT COUNT(*) FROM outbox_messages)")
        ).one()
    assert (0, 0) == tuple(counts)


def test_a_deal_cannot_move_to_another_tenant(service: RunningService) -> None:
    """Updating a deal with a different tenant_id answers 409 and keeps the deal as it was."""
    service.post("/deals", {"id": "d3", "tenant_id": "t1", "name": "Initech"})

    moved = service.post("/deals", {"id": "d3", "tenant_id": "t9", "name": "Stolen"})

    assert 409 == moved.status_code
    assert "belongs to tenant 't1'" in moved.json()["error"]
    assert ("t1", "Initech", 1) == tuple(
        service.deal("d3")[k] for k in ("tenant_id", "name", "revision")
    )


def test_a_crm_change_never_overwrites_an_edit_that_is_not_pushed_yet(
    service: RunningService, sim: RunningSimulator
) -> None:
    """A webhook for a deal with a pending edit only records the CRM version; the edit wins."""
    sim.control.set_fault(CRM, "error", status=503, endpoint="record")
    service.post("/deals", {"id": "d5", "tenant_id": "t1", "name": "Local edit", "amount": 1})
    sim.control.mutate(
        CRM, "d5", {"name": "CRM edit", "amount": 2}, tenant_id="t1", event=True, webhook=True
    )
    assert sim.control.flush_webhooks(CRM)
    during = service.deal("d5")

    sim.control.clear_faults(CRM)
    final = wait_for(lambda: _synced(service, "d5", 1), "deal d5 SYNCED")

    assert ("Local edit", 1, 1) == (
        during["name"],
        during["amount"],
        during["crm_version"],
    )
    assert ("Local edit", 1) == (final["name"], final["amount"])
    record = sim.control.stats(CRM)["writes"]["d5"][-1]
    assert ({"name": "Local edit", "stage": None, "amount": 1}, "deal-d5-r1") == (
        record["data"],
        record["idempotency_key"],
    )


def test_a_push_waits_out_an_outage_of_the_token_endpoint_too(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """No token can be had while the CRM is down: the push waits, its attempts intact, then lands.

    Token failures were charged to the message, which was dead-lettered within seconds.
    """
    env = service_env(sim, sqlite_url, IDIS_PROVIDER_CRM_PROVIDER_BREAKER_FAILURE_THRESHOLD="2")
    # Down before the service starts: a background loop (the poller, the sentinel)
    # that fetched a token between start-up and the outage would leave the push a
    # valid token, and no token request would ever be refused (a flake under load).
    sim.control.outage(CRM)
    with start_service(env) as service:
        created = service.post("/deals", {"id": "t1", "tenant_id": "t3", "name": "Globex"})
        wait_for(
            lambda: sim.control.stats(CRM)["responses"].get("token:503", 0) >= 2,
            "token requests refused during the outage",
            90,
        )
        engine = create_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                during = conn.execute(text("SELECT status, attempts FROM outbox_messages")).all()
        finally:
            engine.dispose()
        sim.control.clear_faults(CRM)
        final = wait_for(
            lambda: _synced(service, "t1", created.json()["revision"]),
            "t1 SYNCED after the outage",
            90,
        )

    # A push sent with a token fetched before the outage may have counted one
    # attempt; the token failures after it count none (before: dead in seconds).
    assert 1 == len(during)
    assert "pending" == during[0][0]
    assert during[0][1] <= 1
    assert "SYNCED" == final["crm_sync_status"]


def test_a_deal_edited_while_the_crm_is_down_is_failed_until_delivered(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """Breaker open: an edit is FAILED at once (RB-09 Triage 5 counts it), SYNCED once through."""
    # A reset timeout long enough that the open breaker is seen whatever the load.
    # Two consecutive faults open it, so the first push's own retries open it soon
    # even on a loaded machine (the key's later edits wait behind that push).
    env = service_env(
        sim,
        sqlite_url,
        IDIS_PROVIDER_CRM_PROVIDER_BREAKER_RESET_TIMEOUT="10s",
        IDIS_PROVIDER_CRM_PROVIDER_BREAKER_FAILURE_THRESHOLD="2",
    )
    with start_service(env) as service:
        # Synced once first: the service holds a CRM token when the outage begins
        # (an outage that also takes the token endpoint down is the next test).
        created = service.post("/deals", {"id": "o1", "tenant_id": "t3", "name": "Initech"})
        wait_for(lambda: _synced(service, "o1", created.json()["revision"]), "o1 synced", 90)
        sim.control.outage(CRM)
        service.post("/deals", {"id": "o1", "amount": 5})
        # Edits go on; once the pushes' failures have opened the breaker, an edit is
        # written FAILED before any attempt is made for it.
        answer = wait_for(
            lambda: (
                (got := service.post("/deals", {"id": "o1", "amount": 7})).json()["crm_sync_status"]
                == "FAILED"
                and got.json()
            ),
            "an edit answered FAILED while the CRM is down",
            120,
        )
        engine = create_engine(sqlite_url)
        try:
            with engine.connect() as conn:
                counted = conn.execute(
                    text("SELECT COUNT(*) FROM deals WHERE crm_sync_status = 'FAILED'")
                ).scalar_one()
        finally:
            engine.dispose()
        sim.control.clear_faults(CRM)
        final = wait_for(
            lambda: _synced(service, "o1", answer["revision"]),
            "o1 SYNCED at its last revision",
            90,
        )

    assert 1 == counted
    assert (7, "SYNCED") == (final["amount"], final["crm_sync_status"])
