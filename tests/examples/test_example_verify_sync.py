"""RB-09 Verification 3 as written, against the running example service's deals (issue 15).

The operator's container has ``IDIS_HOST_RECORDS`` pointing at the service's
host record source, so RB-09's ``verify_sync.py`` compares the service's deals
with the CRM's records: a deal changed by hand, a deal that never reached the
CRM and a CRM record the service never got are each reported; ``--repair=host``
and ``--repair=provider`` fix them, the latter through the service's own
outbox workers. SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from examples.integrations_service.models import Deal
from sqlalchemy import insert, update
from tests.examples.conftest import CRM, run_script, script_env, service_env, wait_for

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_db_engine
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.testing import RunningSimulator

# Verbatim from RB-09 (Verification 3).
VERIFY_SYNC = "python scripts/integrations/verify_sync.py --provider crm_provider --sample-size 20"
HOST_RECORDS = "integrations_service.host_records:deal_records"


def test_rb09_verify_sync_compares_the_service_deals_and_repairs_both_sides(
    sim: RunningSimulator, db_url: str, start_service: Callable[..., Any]
) -> None:
    """Found as written (exit 1), repaired on each side, clean as written (exit 0)."""
    with start_service(service_env(sim, db_url)) as svc:
        db = create_db_engine(db_url)
        ops = script_env(sim, db_url, IDIS_HOST_RECORDS=HOST_RECORDS)
        sim.control.set_webhook_target(CRM, f"{svc.url}/webhooks/{CRM}", [DEFAULT_WEBHOOK_SECRET])
        crm = sim.control.emit(CRM, 4, tenant_ids=["t1"])
        wait_for(lambda: all(svc.deal(e["record_id"]) for e in crm), "the CRM's deals")
        svc.post("/deals", {"id": "d_api", "tenant_id": "t1", "name": "Via the API", "amount": 9})
        wait_for(lambda: svc.deal_status("d_api") == "SYNCED", "d_api pushed")
        clean = run_script(VERIFY_SYNC, ops)

        tampered = crm[0]["record_id"]
        with db.begin() as conn:
            conn.execute(update(Deal).where(Deal.id == tampered).values(amount=1, stage="TAMPERED"))
            conn.execute(
                insert(Deal).values(
                    id="d_never_pushed",
                    tenant_id="t1",
                    name="Never pushed",
                    amount=5,
                    revision=1,
                    crm_sync_status="PENDING",
                    updated_at=utcnow(),
                )
            )
        crm_only = sim.control.emit(CRM, 1, record_ids=["rec_crm_only"], webhook=False)
        found = run_script(VERIFY_SYNC, ops)
        host = run_script(VERIFY_SYNC + " --repair=host", ops)
        provider = run_script(VERIFY_SYNC + " --repair=provider", ops)
        # The service's outbox delivers the push; the CRM's webhook for it updates the deal.
        wait_for(
            lambda: svc.deal("d_never_pushed").get("crm_version") is not None,
            "the pushed deal's CRM echo",
        )
        after = run_script(VERIFY_SYNC, ops)
        db.dispose()

    writes = sim.control.stats(CRM)["writes"]
    assert 0 == clean.returncode, clean.stdout + clean.stderr
    assert "5 checked, 5 match, 0 mismatch (5 sampled from the host's table" in clean.stdout
    assert 1 == found.returncode, found.stdout + found.stderr
    for expected in (tampered, "TAMPERED", "d_never_pushed", "missing_remote", "rec_crm_only"):
        assert expected in found.stdout, found.stdout
    assert "3 mismatch" in found.stdout
    # The host takes the CRM's versions; the never-pushed deal is not deleted.
    assert 1 == host.returncode, host.stdout
    assert "2 repaired" in host.stdout
    assert crm[0]["data"]["amount"] == svc_amount(db_url, tampered)
    assert crm_only[0]["data"]["name"] == svc_name(db_url, "rec_crm_only")
    assert 0 == provider.returncode, provider.stdout + provider.stderr
    assert "1 queued for crm_provider" in provider.stdout
    assert "Never pushed" == writes["d_never_pushed"][-1]["data"]["name"]
    assert 0 == after.returncode, after.stdout + after.stderr
    assert "0 mismatch" in after.stdout


def _deal(db_url: str, deal_id: str) -> Any:
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(Deal.__table__.select().where(Deal.id == deal_id)).one()
    finally:
        engine.dispose()


def svc_amount(db_url: str, deal_id: str) -> Any:
    """The deal's amount in the service's table."""
    return _deal(db_url, deal_id).amount


def svc_name(db_url: str, deal_id: str) -> Any:
    """The deal's name in the service's table."""
    return _deal(db_url, deal_id).name
