"""`status` reports what the running service recorded, and works on a fresh database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from idis.integrations.config import Settings
from idis.integrations.ops._status import collect_status
from idis.integrations.resilience._breaker import BreakerTransition
from idis.integrations.resilience._recorder import HealthSampler


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idis.integrations", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=60,
    )


def test_status_shows_recorded_breaker_state_and_error_rate(sqlite_url: str) -> None:
    """Samples and transitions written by a service appear in another process's status."""
    settings = Settings.from_env({"IDIS_DATABASE_URL": sqlite_url})
    recorder = HealthSampler(sqlite_url)
    recorder.on_transition(
        BreakerTransition("crm_provider", "crm_provider", "closed", "open", "5 failures", 0.0)
    )
    snapshot = {
        "state": "open",
        "window_calls": 10,
        "window_failures": 6,
        "error_rate": 0.6,
        "in_flight": 0,
        "paused_for": 0.0,
    }
    recorder.sample(lambda _p: snapshot, ["crm_provider"])
    asyncio.run(recorder.flush())

    statuses, _ = collect_status(settings, providers=["crm_provider"], probe=False)

    (crm,) = statuses
    assert ("open", 0.6, "open") == (crm.breaker_state, crm.error_rate, crm.last_transition)


def test_status_cli_on_a_fresh_database_says_what_to_do(tmp_path: Path) -> None:
    """On an empty database, status still lists providers and says to run db upgrade."""
    env = {"IDIS_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}"}

    result = _cli("status", "--no-probe", "--json", env=env)

    assert 0 == result.returncode, result.stderr
    data = json.loads(result.stdout)
    assert ["crm_provider", "docs_provider", "enrichment_provider"] == [
        p["provider"] for p in data["providers"]
    ]
    assert any("db upgrade" in note for note in data["notes"])


def test_status_cli_rejects_unknown_provider(tmp_path: Path) -> None:
    """An unknown --provider exits 2 naming it, and creates nothing."""
    db = tmp_path / "untouched.sqlite3"

    result = _cli("status", "--provider", "nope", env={"IDIS_DATABASE_URL": f"sqlite:///{db}"})

    assert 2 == result.returncode
    assert "'nope'" in result.stderr
    assert not db.exists()


def test_db_upgrade_then_current_reports_up_to_date(tmp_path: Path) -> None:
    """`db upgrade` migrates a new SQLite file and `db current` says it is up to date."""
    env = {"IDIS_DATABASE_URL": f"sqlite:///{tmp_path / 'new.sqlite3'}"}

    upgraded = _cli("db", "upgrade", env=env)
    current = _cli("db", "current", env=env)

    assert 0 == upgraded.returncode, upgraded.stderr
    assert "up to date" in current.stdout


def test_db_current_on_unreachable_postgres_exits_3(tmp_path: Path) -> None:
    """An unreachable database is exit code 3 with a one-line error, no traceback."""
    env = {"IDIS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none"}

    result = _cli("db", "current", env=env)

    assert 3 == result.returncode
    assert "Traceback" not in result.stderr
    assert "unreachable" in result.stderr


def test_status_includes_every_capability(sqlite_url: str) -> None:
    """status shows sync mode, outbox queue, open defects and token state per provider."""
    settings = Settings.from_env({"IDIS_DATABASE_URL": sqlite_url})

    statuses, notes = collect_status(settings, providers=["crm_provider"], probe=False)

    (crm,) = statuses
    assert {"sync_mode", "outbox_pending", "open_defects", "token"} <= set(crm.facts), notes
    assert "missing" == crm.facts["token"]
    assert 0 == crm.facts["open_defects"]
