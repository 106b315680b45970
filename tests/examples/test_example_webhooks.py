"""Inbound sync in the example service: the simulator's webhooks become ``deals`` rows."""

from __future__ import annotations

import json
import time

from sqlalchemy import Engine, func, select, text
from tests.conftest import sample
from tests.examples.conftest import CRM, RunningService, wait_for

from idis.integrations.observability._metrics import Metrics
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.sync._models import SyncInbox
from idis.integrations.testing import RunningSimulator
from idis.integrations.webhooks._signing import sign_headers


def _deals(service: RunningService) -> dict[str, dict[str, object]]:
    return {d["id"]: d for d in service.get("/deals").json()["deals"]}


def test_provider_changes_arrive_by_webhook_and_upsert_then_delete_deals(
    service: RunningService, sim: RunningSimulator, db: Engine, metrics: Metrics
) -> None:
    """Created, updated and deleted CRM records reach the deals table once each, by webhook."""
    events = sim.control.emit(CRM, 4, tenant_ids=["t1", "t2"])
    sim.control.mutate(
        CRM,
        events[0]["record_id"],
        {"name": "Renamed", "stage": "won", "amount": 7},
        event=True,
        webhook=True,
    )
    sim.control.mutate(CRM, events[1]["record_id"], {}, event=True, webhook=True, delete=True)
    assert sim.control.flush_webhooks(CRM)

    deals = wait_for(lambda: len(_deals(service)) == 3 and _deals(service), "3 deals")

    first, deleted = events[0]["record_id"], events[1]["record_id"]
    expected = {
        e["record_id"]: (
            e["tenant_id"],
            e["data"]["name"],
            e["data"]["stage"],
            e["data"]["amount"],
            1,
        )
        for e in events[2:]
    }
    expected[first] = (events[0]["tenant_id"], "Renamed", "won", 7, 2)
    actual = {
        d["id"]: (d["tenant_id"], d["name"], d["stage"], d["amount"], d["crm_version"])
        for d in deals.values()
    }
    assert expected == actual
    assert deleted not in deals
    assert {"SYNCED"} == {d["crm_sync_status"] for d in deals.values()}
    with db.connect() as conn:
        sources = conn.execute(
            select(SyncInbox.source, func.count()).group_by(SyncInbox.source)
        ).all()
    assert [("webhook", 6)] == [tuple(row) for row in sources]
    assert 6.0 == sample(
        metrics, "integration_webhooks_received_total", provider=CRM, outcome="accepted"
    )


def test_a_forged_webhook_is_refused_and_changes_nothing(
    service: RunningService, db: Engine
) -> None:
    """A delivery signed with a foreign secret gets 401 and changes nothing; a genuine one does."""
    body = json.dumps(
        {
            "type": "record.created",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": {
                "id": "evt_999",
                "seq": 999,
                "type": "record.created",
                "record_id": "rec_forged",
                "tenant_id": "t1",
                "version": 1,
                "occurred_at": "2026-01-01T00:00:00Z",
                "data": {"name": "Forged"},
            },
        }
    ).encode()
    forged_secret = "whsec_" + "Zm9yZ2VkLXNlY3JldC1ub3QtdGhlLXJlYWwtb25l"
    headers = sign_headers(forged_secret, body, msg_id="evt_999", timestamp=int(time.time()))

    forged = service.client.post(
        f"/webhooks/{CRM}", content=body, headers={**headers, "content-type": "application/json"}
    )
    genuine = service.client.post(
        f"/webhooks/{CRM}",
        content=body,
        headers={
            **sign_headers(DEFAULT_WEBHOOK_SECRET, body, msg_id="evt_999"),
            "content-type": "application/json",
        },
    )

    assert (401, "bad_signature") == (forged.status_code, forged.json()["status"])
    assert (200, "accepted") == (genuine.status_code, genuine.json()["status"])
    with db.connect() as conn:
        inbox = conn.execute(text("SELECT COUNT(*) FROM sync_inbox")).scalar_one()
    assert 1 == inbox
    assert "Forged" == service.deal("rec_forged")["name"]
