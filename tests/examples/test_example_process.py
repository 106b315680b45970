"""``python -m integrations_service``: served from the environment, stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port
from tests.examples.conftest import API_TOKENS, CRM, EXAMPLES, OPERATOR_TOKEN, wait_for

from idis.integrations._http import httpx
from idis.integrations.testing import RunningSimulator


def _environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    env.pop("ENRICHMENT_DEFER_ON_ERROR", None)
    env["PYTHONPATH"] = str(EXAMPLES)
    env["IDIS_SERVICE_API_TOKENS"] = API_TOKENS
    env.update(extra)
    return env


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_module_serves_on_the_default_database_and_stops_gracefully_on_sigterm(
    sim: RunningSimulator, tmp_path: Path
) -> None:
    """On the embedded defaults (and their opt-in) it uses ./idis-integrations.sqlite3, serves,
    stops cleanly."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "integrations_service"],
        cwd=tmp_path,
        env=_environment(
            IDIS_SIMULATOR_URL=sim.url,
            IDIS_SERVICE_PORT=str(port),
            IDIS_ALLOW_EMBEDDED_DEFAULTS="true",  # the simulator's webhook secret is public
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _healthy(url) or process.poll() is not None, "the service to answer")
        auth = {"authorization": f"Bearer {OPERATOR_TOKEN}"}
        # The sync service's first tick writes the mode row ("not started" until then).
        status = wait_for(
            lambda: (
                "not started"
                not in str(
                    answer := httpx.get(
                        f"{url}/status", params={"probe": "false"}, headers=auth, timeout=10
                    ).json()
                )
                and answer
            ),
            "the sync service's first tick",
        )
        deal = httpx.post(
            f"{url}/deals",
            json={"id": "p1", "tenant_id": "t1", "name": "Proc"},
            headers=auth,
            timeout=10,
        )
        synced = wait_for(
            lambda: (
                httpx.get(f"{url}/deals/p1", headers=auth, timeout=5).json()["crm_sync_status"]
                == "SYNCED"
            ),
            "deal p1 SYNCED",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)

    # uvicorn shuts down gracefully, then re-raises the signal so supervisors see it.
    assert -signal.SIGTERM == process.returncode, stderr
    assert (tmp_path / "idis-integrations.sqlite3").is_file()
    assert {"crm_provider", "docs_provider", "enrichment_provider"} == {
        p["provider"] for p in status["providers"]
    }
    assert "webhook (default)" == next(
        p["sync_mode"] for p in status["providers"] if p["provider"] == CRM
    )
    assert (201, True) == (deal.status_code, synced)
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    # Workers start before the "started" summary line and may log first (a leadership
    # taken, a first poll); "stopped" is the last word.
    assert "idis.example.started" in events[:-1], events
    assert "idis.example.stopped" == events[-1], events


def test_a_bad_environment_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    """CRM_POLL_INTERVAL=soon stops the start with exit 2 and names the variable and the value."""
    done = subprocess.run(
        [sys.executable, "-m", "integrations_service"],
        cwd=tmp_path,
        env=_environment(CRM_POLL_INTERVAL="soon"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert 2 == done.returncode
    assert "CRM_POLL_INTERVAL='soon'" in done.stderr
    assert not (tmp_path / "idis-integrations.sqlite3").exists()
