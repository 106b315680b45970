"""`status` reports what the running service recorded, and works on a fresh database."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

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
    """Without the library's tables, status stops (exit 2), says to run db upgrade, creates none."""
    fresh = tmp_path / "fresh.sqlite3"
    env = {"IDIS_DATABASE_URL": f"sqlite:///{fresh}"}

    result = _cli("status", "--no-probe", "--json", env=env)

    assert 2 == result.returncode, result.stderr
    assert "" == result.stdout
    assert "idis-integrations db upgrade" in result.stderr
    assert not fresh.exists()


def test_status_cli_on_a_migrated_database_lists_the_providers(tmp_path: Path) -> None:
    """After db upgrade, status lists every configured provider."""
    env = {"IDIS_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}"}
    _cli("db", "upgrade", env=env)

    result = _cli("status", "--no-probe", "--json", env=env)

    assert 0 == result.returncode, result.stderr
    data = json.loads(result.stdout)
    assert ["crm_provider", "docs_provider", "enrichment_provider"] == [
        p["provider"] for p in data["providers"]
    ]


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


def test_status_host_never_shows_credentials_of_a_base_url(sqlite_url: str) -> None:
    """A base URL with user info shows as its host alone (no user, no password)."""
    settings = Settings.from_env(
        {
            "IDIS_DATABASE_URL": sqlite_url,
            "IDIS_PROVIDERS": "crm",
            "IDIS_PROVIDER_CRM_KIND": "crm",
            "IDIS_PROVIDER_CRM_BASE_URL": "https://api-user:api-pass-123456@crm.example.com:8443/v2",
        }
    )

    statuses, notes = collect_status(settings, providers=["crm"], probe=False)

    (crm,) = statuses
    assert "crm.example.com:8443" == crm.host
    assert "api-pass-123456" not in repr(statuses) + repr(notes)


# --------------------------------------------------------------------------- width (issue 15)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LONG_HOST = "crm-provider-with-a-long-name.internal.example.com:8443"


def _recorded_database(tmp_path: Path) -> dict[str, str]:
    """A migrated database where crm_provider's breaker opened, on providers with long hosts."""
    url = f"sqlite:///{tmp_path / 'status.sqlite3'}"
    env = {
        "IDIS_DATABASE_URL": url,
        "IDIS_PROVIDERS": "crm_provider,docs_provider,enrichment_provider",
        "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": f"https://{_LONG_HOST}/api/v1",
        "IDIS_PROVIDER_DOCS_PROVIDER_BASE_URL": "https://docs.example.com",
        "IDIS_PROVIDER_ENRICHMENT_PROVIDER_BASE_URL": "https://enrich.example.com",
        "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
        "IDIS_PROVIDER_DOCS_PROVIDER_KIND": "docs",
        "IDIS_PROVIDER_ENRICHMENT_PROVIDER_KIND": "enrichment",
    }
    assert 0 == _cli("db", "upgrade", env=env).returncode
    recorder = HealthSampler(url)
    recorder.on_transition(
        BreakerTransition("crm_provider", "crm_provider", "closed", "open", "5 failures", 0.0)
    )
    snapshot = {"state": "open", "window_calls": 10, "window_failures": 6, "error_rate": 0.6}
    recorder.sample(lambda _p: {**snapshot, "in_flight": 0, "paused_for": 0.0}, ["crm_provider"])
    asyncio.run(recorder.flush())
    return env


def _on_terminal(columns: int, env: dict[str, str]) -> str:
    """Run ``status --no-probe`` with stdout on a real pseudo-terminal ``columns`` wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        [sys.executable, "-m", "idis.integrations", "status", "--no-probe"],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env={**base, "TERM": "xterm-256color", **env},
        close_fds=True,
    )
    os.close(slave)
    output = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    process.wait(timeout=60)
    os.close(master)
    return _ANSI.sub("", output.decode()).replace("\r", "")


def _check_fits(text: str, width: int) -> list[str]:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, "\n".join(lines)
    assert "…" not in text  # nothing was cut off
    for expected in (
        "crm_provider",
        "docs_provider",
        "enrichment_provider",
        "open (recorded by 1 replica(s))",
        "60% of 10 call(s)",
        "0 pending, 0 dead",
    ):
        assert expected in text, expected
    return lines


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_status_fits_the_real_terminal_width(tmp_path: Path, columns: int) -> None:
    """On an 80, 100 or 160-column terminal no line is wider, and no value is cut off."""
    env = _recorded_database(tmp_path)

    text = _on_terminal(columns, env)

    lines = _check_fits(text, columns)
    side_by_side = any("crm_provider (" in line and "docs_provider (" in line for line in lines)
    assert side_by_side == (columns >= 160)
    assert _LONG_HOST.split(".", maxsplit=1)[0] in text


def test_status_through_a_pipe_is_plain_and_100_columns(tmp_path: Path) -> None:
    """Piped (kubectl exec, logs), the output has no escape codes and fits 100 columns."""
    env = _recorded_database(tmp_path)
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}

    result = subprocess.run(
        [sys.executable, "-m", "idis.integrations", "status", "--no-probe"],
        capture_output=True,
        text=True,
        env={**base, **env},
        check=False,
        timeout=60,
    )

    assert 0 == result.returncode, result.stderr
    assert "\x1b[" not in result.stdout
    _check_fits(result.stdout, 100)


def test_status_blocks_have_no_empty_rows_and_no_raw_seconds() -> None:
    """With the sync service running, status showed 'sync override' and 'webhook signature
    spike at' with nothing after them, and 'webhook lag seconds 0.0': a row without a value
    reads as a missing value, and seconds as a float is not how the other rows say ages."""
    from idis.integrations.cli.status import status_fields
    from idis.integrations.ops._status import ProviderStatus

    status = ProviderStatus(
        provider="crm_provider",
        kind="crm",
        host="127.0.0.1:8765",
        facts={
            "sync_mode": "polling (breaker_open)",
            "last_webhook_age_seconds": 17.0,
            "sync_override": None,
            "webhook_lag_seconds": 95.0,
            "webhook_signature_spike_at": None,
        },
    )

    fields = dict(status_fields(status))

    assert "" not in fields.values()
    assert "sync override" not in fields
    assert "webhook signature spike at" not in fields
    assert "1m35s" == fields["webhook lag"]
    assert "polling (breaker_open); last webhook 17s ago" == fields["sync"]
