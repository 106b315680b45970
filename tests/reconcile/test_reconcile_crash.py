"""A reconcile process killed with SIGKILL halfway resumes from its checkpoint: nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from idis.integrations._timeparse import utcnow
from idis.integrations.reconciliation._models import ReconcileCheckpoint
from idis.integrations.testing import RunningSimulator

from .conftest import HERE, PROVIDER, Host, audit_rows, count_inbox

EVENTS = 3000
PAGE = 100


def cli_env(sim: RunningSimulator, db_url: str) -> dict[str, str]:
    """Environment for a CLI subprocess: one provider on the simulator, the host's handlers."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IDIS_", "CRM_", "ENRICHMENT_", "VAULT_"))
    }
    env.update(
        {
            "IDIS_DATABASE_URL": db_url,
            "IDIS_PROVIDERS": PROVIDER,
            "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
            "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": sim.provider_url(PROVIDER),
            "IDIS_PROVIDER_CRM_PROVIDER_ENDPOINTS": (
                "records=/records,record=/records/{id},replay=/replay,changes=/changes"
            ),
            "IDIS_HANDLERS": "reconcile_host:register",
            "IDIS_LOG_LEVEL": "warning",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        }
    )
    return env


def checkpoint(engine: Engine) -> Any:
    """The newest checkpoint row (or None)."""
    with engine.connect() as conn:
        return conn.execute(
            select(ReconcileCheckpoint).order_by(ReconcileCheckpoint.id.desc()).limit(1)
        ).first()


@pytest.mark.slow
def test_sigkill_halfway_then_rerun_completes_without_applying_anything_twice(
    sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """A run killed mid-replay resumes after its last committed page and applies each event once."""
    since = (utcnow() - timedelta(seconds=1)).isoformat()
    sim.control.emit(PROVIDER, EVENTS, webhook=False)
    # Slow every replay page down so the kill lands mid-run.
    sim.control.set_fault(PROVIDER, "latency", endpoint="replay", seconds=0.15)
    command = [
        sys.executable,
        "-m",
        "idis.integrations",
        "reconcile",
        "--provider",
        PROVIDER,
        "--since",
        since,
        "--page-size",
        str(PAGE),
    ]
    env = cli_env(sim, db_url)
    victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = checkpoint(engine)
        if row is not None and row.pages >= 8:
            break
        assert victim.poll() is None, victim.communicate()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    killed = checkpoint(engine)
    applied_before = len(host.applied())
    sim.control.clear_faults(PROVIDER)

    rerun = subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=120
    )

    done = checkpoint(engine)
    applied = host.applied_ids()
    audited = [row.details["event_id"] for row in audit_rows(engine, "reconcile.event_applied")]
    assert -signal.SIGKILL == victim.returncode
    assert "running" == killed.status
    assert 0 < applied_before < EVENTS
    assert killed.applied == applied_before
    assert 0 == rerun.returncode, rerun.stderr
    assert "(resumed)" in rerun.stdout
    assert (killed.run_id, "completed") == (done.run_id, done.status)
    assert (EVENTS, EVENTS) == (len(applied), len(set(applied)))
    assert (EVENTS, EVENTS) == (len(audited), len(set(audited)))
    assert EVENTS == count_inbox(engine)
    assert EVENTS == done.applied
