"""The RB-09 drill runs end to end, can fail, and its reports are built from real data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import unavailable

from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import ConfigError
from idis.integrations.ops._drill import SCENARIOS, DrillOptions, run_drill
from idis.integrations.ops._postmortem import build_postmortem


def _quiet(_line: str) -> None:
    return None


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "idis.integrations", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=240,
    )


def test_full_outage_drill_passes_and_writes_a_report(tmp_path: Path) -> None:
    """The default drill passes every check and writes a self-contained HTML timeline."""
    report_path = tmp_path / "report.html"

    result = run_drill(DrillOptions(report_path=report_path), echo=_quiet)

    failed = [c.name for c in result.report.checks if not c.ok]
    assert [] == failed
    names = {c.name for c in result.report.checks}
    assert {"Zero events lost", "Zero events applied twice"} <= names
    html = report_path.read_text()
    assert "<svg" in html
    assert "PASSED" in html
    for external in ("<script", "<link", "src=", "@import"):
        assert external not in html


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "full-outage"])
def test_every_scenario_passes(scenario: str, tmp_path: Path) -> None:
    """Rate-limit storm, token revocation and webhook-only failure each recover cleanly."""
    result = run_drill(
        DrillOptions(scenario=scenario, report_path=tmp_path / "r.html"), echo=_quiet
    )

    assert [] == [f"{c.name}: {c.actual}" for c in result.report.checks if not c.ok]


def test_a_broken_piece_fails_the_drill_and_the_exit_code(tmp_path: Path) -> None:
    """With reconciliation disabled the verification table fails and the CLI exits 1."""
    result = _cli("drill", "--break", "reconcile", "--report", "r.html", cwd=tmp_path)

    assert 1 == result.returncode, result.stdout + result.stderr
    assert "FAIL  Recovery 3" in result.stdout
    assert "drill FAILED" in result.stdout
    assert (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"scenario": "meteor"}, "--scenario"),
        ({"speed": 0.0}, "--speed"),
        ({"broken": frozenset({"everything"})}, "--break"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], flag: str) -> None:
    """A bad drill option raises ConfigError naming the flag."""
    with pytest.raises(ConfigError, match=flag):
        DrillOptions(**options)  # type: ignore[arg-type]


@pytest.mark.postgres
def test_drill_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """--database-url runs the same drill against PostgreSQL."""
    result = run_drill(
        DrillOptions(database_url=pg_url, report_path=tmp_path / "r.html"), echo=_quiet
    )

    assert [] == [f"{c.name}: {c.actual}" for c in result.report.checks if not c.ok]


def test_postmortem_rebuilds_the_incident_from_the_database(tmp_path: Path) -> None:
    """postmortem finds the breaker outage, the fallback, the defects and the queue drain."""
    url = f"sqlite:///{tmp_path / 'incident.sqlite3'}"
    result = run_drill(DrillOptions(database_url=url, report_path=None), echo=_quiet)
    engine = create_db_engine(url)
    try:
        report, facts = build_postmortem(engine, "crm_provider", result.report.started_at)
    finally:
        engine.dispose()

    assert facts.breaker_open_seconds > 0
    assert facts.fallback_seconds > 0
    assert facts.defects_created == facts.defects_resolved > 0
    assert facts.queue_peak > 0
    assert facts.queue_drain_seconds is not None
    assert report.ok


def test_postmortem_cli_markdown_and_bad_input(tmp_path: Path) -> None:
    """The CLI prints Markdown for a window, and rejects a bad --since naming it."""
    env_db = f"sqlite:///{tmp_path / 'pm.sqlite3'}"
    subprocess.run(
        [sys.executable, "-m", "idis.integrations", "db", "upgrade"],
        env={**os.environ, "IDIS_DATABASE_URL": env_db},
        check=True,
        capture_output=True,
    )
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "idis.integrations",
            "postmortem",
            "--provider",
            "crm_provider",
            "--since",
            "2 hours ago",
        ],
        env={**os.environ, "IDIS_DATABASE_URL": env_db},
        capture_output=True,
        text=True,
        check=False,
    )
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "idis.integrations",
            "postmortem",
            "--provider",
            "crm_provider",
            "--since",
            "last tuesday",
        ],
        env={**os.environ, "IDIS_DATABASE_URL": env_db},
        capture_output=True,
        text=True,
        check=False,
    )

    assert 0 == ok.returncode, ok.stderr
    assert ok.stdout.startswith("# RB-09 postmortem: crm_provider")
    assert 2 == bad.returncode
    assert "'last tuesday'" in bad.stderr


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The drill's HTML report renders in a real browser (a screenshot with content)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("chromium (Debian package chromium)")
    assert browser is not None
    report_path = tmp_path / "report.html"
    run_drill(DrillOptions(report_path=report_path), echo=_quiet)
    shot = tmp_path / "shot.png"

    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,1400",
            f"--screenshot={shot}",
            report_path.as_uri(),
        ],
        capture_output=True,
        check=False,
        timeout=120,
    )

    assert shot.exists()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG")
    # A blank page compresses to a few KB; the chart and tables do not.
    assert len(data) > 40_000
