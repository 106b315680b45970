"""RB-09 as written, from ``examples/``, against the example service's database.

An incident on the CRM while the service runs: webhooks lost, a push
dead-lettered, a claim's enrichment failing. Each runbook command runs as a
subprocess exactly as RB-09 writes it, with what an operator has in the
service's container (``IDIS_DATABASE_URL``, ``IDIS_SIMULATOR_URL``, and
``IDIS_HANDLERS`` for the service's event handlers). On PostgreSQL, RB-09's
Triage 5 query and Recovery 4 update run verbatim too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, func, select, text
from tests.examples.conftest import (
    CRM,
    run_script,
    script_env,
    service_env,
    wait_for,
)

from idis.integrations._audit import AuditEvent
from idis.integrations.db._engine import create_db_engine
from idis.integrations.enrichment import RECOVERY_RESOLUTION, Defect
from idis.integrations.simulator._app import enrichment_for
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.testing import RunningSimulator

# Verbatim from RB-09 (Triage 5 and Recovery 4).
TRIAGE_5 = """
SELECT tenant_id, COUNT(*) as affected_deals
FROM deals
WHERE crm_sync_status = 'FAILED'
AND updated_at > NOW() - INTERVAL '1 hour'
GROUP BY tenant_id;
"""
RECOVERY_4 = """
UPDATE defects
SET status = 'RESOLVED',
    resolution = 'Data refreshed after provider recovery'
WHERE defect_type = 'STALE_ENRICHMENT'
AND provider = 'crm_provider'
AND created_at > NOW() - INTERVAL '4 hours';
"""

CREATE_STALE_DEFECTS = (
    'python scripts/create_stale_defects.py --provider crm_provider --since "1 hour ago"'
)
QUEUE_WEBHOOK_RETRIES = (
    "python scripts/queue_webhook_retries.py --provider crm_provider --max-retries 10"
)
REFRESH_TOKENS = "python scripts/integrations/refresh_tokens.py --provider crm_provider"
RECONCILE = 'python scripts/integrations/reconcile.py --provider crm_provider --since "2 hours ago"'
VERIFY_SYNC = "python scripts/integrations/verify_sync.py --provider crm_provider --sample-size 20"


def _defects(db: Engine) -> list[tuple[str, str, str, str | None]]:
    with db.connect() as conn:
        rows = conn.execute(
            select(Defect.subject_id, Defect.defect_type, Defect.status, Defect.resolution).where(
                Defect.provider == CRM
            )
        ).all()
    return [tuple(row) for row in rows]


def _replayed(db: Engine) -> int:
    with db.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == "reconcile.event_applied")
            ).scalar_one()
        )


def _run(command: str, env: dict[str, str]) -> str:
    done = run_script(command, env)
    assert 0 == done.returncode, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_rb09_command_runs_as_written_against_the_service_database(
    sim: RunningSimulator,
    db_url: str,
    start_service: Callable[..., Any],
) -> None:
    """Containment, recovery and verification commands each do their part on live service data."""
    postgres = db_url.startswith("postgresql")
    # Lost webhooks stay lost until the reconcile step (no automatic failover to polling).
    env = service_env(sim, db_url, IDIS_SYNC_AUTO_FAILOVER="false")
    with start_service(env) as svc:
        db = create_db_engine(db_url)
        ops = script_env(sim, db_url)
        sim.control.set_webhook_target(CRM, f"{svc.url}/webhooks/{CRM}", [DEFAULT_WEBHOOK_SECRET])
        healthy = sim.control.emit(CRM, 2, tenant_ids=["t1", "t2"])
        wait_for(lambda: all(svc.deal(e["record_id"]) for e in healthy), "the healthy deals")

        # The incident: changes whose webhooks never come, a push the CRM rejects,
        # and enrichment from the CRM failing for a claim.
        missed = sim.control.emit(CRM, 3, tenant_ids=["t1"], webhook=False)
        sim.control.set_fault(CRM, "error", status=400, endpoint="record", count=1)
        svc.post("/deals", {"id": "d_push", "tenant_id": "t1", "name": "Push", "amount": 1})
        wait_for(
            lambda: svc.deal_status("d_push") == "FAILED",
            "the rejected push to mark d_push FAILED",
        )
        sim.control.set_fault(CRM, "error", status=503, endpoint="enrich")
        svc.post("/claims", {"id": "c1", "tenant_id": "t1", "text": "Acme raised 10M"})
        enrich = svc.post("/claims/c1/enrich", {"provider": CRM})
        assert 503 == enrich.status_code, enrich.text

        if postgres:  # Triage 5
            with db.connect() as conn:
                affected = [tuple(row) for row in conn.execute(text(TRIAGE_5))]
            assert [("t1", 1)] == affected

        # Containment 3 and 4.
        stale = _run(CREATE_STALE_DEFECTS, ops)
        assert "1 defect(s) created" in stale
        assert [("c1", "STALE_ENRICHMENT", "OPEN", None)] == _defects(db)
        requeued = _run(QUEUE_WEBHOOK_RETRIES, ops)
        assert "re-queued 1 deliveries (1 dead-lettered" in requeued

        if postgres:  # Recovery 4, run while the defect is still OPEN
            with db.begin() as conn:
                changed = conn.execute(text(RECOVERY_4)).rowcount
            assert 1 == changed
            assert [("c1", "STALE_ENRICHMENT", "RESOLVED", RECOVERY_RESOLUTION)] == _defects(db)

        # Recovery: the provider is back.
        sim.control.clear_faults(CRM)
        refreshed = _run(REFRESH_TOKENS, ops)
        assert "crm_provider: refreshed" in refreshed
        wait_for(
            lambda: svc.deal_status("d_push") == "SYNCED",
            "the re-queued push to sync d_push",
        )
        claim = wait_for(
            lambda: (c := svc.get("/claims/c1").json())["enrichment_stale"] is False and c,
            "the deferred refresh of claim c1",
        )
        assert sim.control.flush_webhooks(CRM)
        assert [{}, {}, {}] == [svc.deal(e["record_id"]) for e in missed]

        reconciled = _run(RECONCILE, ops)

        assert re.search(r"applied\s*│\s*3\s", reconciled), reconciled
        assert 3 == _replayed(db)
        assert [(e["data"]["name"], e["data"]["amount"], "SYNCED") for e in missed] == [
            tuple(svc.deal(e["record_id"])[k] for k in ("name", "amount", "crm_sync_status"))
            for e in missed
        ]
        assert enrichment_for("c1") == claim["enrichment"]
        assert [("c1", "STALE_ENRICHMENT", "RESOLVED", RECOVERY_RESOLUTION)] == _defects(db)

        # Verification 3.
        verified = _run(VERIFY_SYNC, ops)
        assert "6 checked, 6 match, 0 mismatch" in verified, verified
        db.dispose()
