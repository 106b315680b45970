"""Progress of long commands (issue 15): counts and rate on a terminal, log lines through a pipe.

reconcile's bar had no counts and showed nothing through a pipe; verify-sync over
2,000 records showed no progress and printed 2,000 "match" rows that buried a mismatch.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from idis.integrations._clock import ManualClock
from idis.integrations._timeparse import utcnow
from idis.integrations.cli._progress import progress
from idis.integrations.testing import RunningSimulator, run_simulator

RECONCILE_TESTS = Path(__file__).resolve().parents[1] / "reconcile"
PROVIDER = "crm_provider"


def test_pipe_form_prints_a_line_every_n_items_and_a_closing_line() -> None:
    """Through a pipe: a line after every_items, none in between, and 'done' with the rate."""
    out, clock = io.StringIO(), ManualClock()

    with progress(
        "reconciling crm",
        unit="events",
        stream=out,
        tty=False,
        clock=clock,
        every_items=1000,
        every_seconds=3600,
    ) as advance:
        for _ in range(5):
            clock.advance(1)
            advance(500)

    assert [
        "reconciling crm: 1,000 events (500/s, 2s)",
        "reconciling crm: 2,000 events (500/s, 4s)",
        "reconciling crm: done, 2,500 events in 5s (500/s)",
    ] == out.getvalue().splitlines()


def test_pipe_form_prints_a_line_every_n_seconds() -> None:
    """A slow trickle still gets a line every every_seconds, with the total when known."""
    out, clock = io.StringIO(), ManualClock()

    with progress(
        "verifying crm",
        unit="records",
        total=30,
        stream=out,
        tty=False,
        clock=clock,
        every_items=10_000,
        every_seconds=10,
    ) as advance:
        for _ in range(30):
            clock.advance(1)
            advance(1)

    lines = out.getvalue().splitlines()
    assert [
        "verifying crm: 10 of 30 records (1/s, 10s)",
        "verifying crm: 20 of 30 records (1/s, 20s)",
        "verifying crm: 30 of 30 records (1/s, 30s)",
        "verifying crm: done, 30 of 30 records in 30s (1/s)",
    ] == lines


def test_pipe_form_says_where_it_stopped_on_an_error() -> None:
    """An exception inside still prints how far the work got, then propagates."""
    out = io.StringIO()

    def work() -> None:
        with progress(
            "reconciling crm", unit="events", stream=out, tty=False, clock=ManualClock()
        ) as advance:
            advance(7)
            raise RuntimeError("provider down")

    with pytest.raises(RuntimeError):
        work()

    assert out.getvalue().startswith("reconciling crm: stopped after 7 events")


def test_terminal_form_shows_counts_and_rate() -> None:
    """On a terminal, rich's bar shows the description, the count of the total and a rate."""
    out = io.StringIO()

    with progress("reconciling crm", unit="events", total=40, stream=out, tty=True) as advance:
        advance(15)
        advance(25)

    text = out.getvalue()
    assert "reconciling crm" in text
    assert "40 of 40 events" in text
    assert "events/s" in text


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def sim() -> RunningSimulator:
    with run_simulator(seed=3) as running:
        yield running  # type: ignore[misc]  # a generator fixture


def _env(sim: RunningSimulator, sqlite_url: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    return {
        **base,
        "IDIS_DATABASE_URL": sqlite_url,
        "IDIS_PROVIDERS": PROVIDER,
        "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
        "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": sim.provider_url(PROVIDER),
        "IDIS_PROVIDER_CRM_PROVIDER_ENDPOINTS": (
            "records=/records,record=/records/{id},replay=/replay,changes=/changes"
        ),
        "IDIS_HANDLERS": "reconcile_host:register",
        "PYTHONPATH": str(RECONCILE_TESTS),
    }


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "idis.integrations", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_reconcile_and_verify_sync_through_a_pipe(sim: RunningSimulator, sqlite_url: str) -> None:
    """Piped: progress lines with counts on stderr; verify-sync prints the mismatch and a summary,
    not a row per matching record."""
    env = _env(sim, sqlite_url)
    since = (utcnow() - timedelta(seconds=1)).isoformat()
    sim.control.emit_bulk(PROVIDER, 1_200, webhook=False)

    reconciled = _cli(
        env, "reconcile", "--provider", PROVIDER, "--since", since, "--page-size", "500"
    )
    sim.control.mutate(PROVIDER, "rec_7", {"stage": "TAMPERED"})
    verified = _cli(env, "verify-sync", "--provider", PROVIDER, "--sample-size", "1200")

    assert 0 == reconciled.returncode, reconciled.stderr
    # A line every 1,000 items or 10 s, whichever comes first: under load the
    # clock may speak first, so the count on the line is not fixed.
    assert re.search(r"reconciling crm_provider: [\d,]+ events \(", reconciled.stderr)
    assert "reconciling crm_provider: done, 1,200 events in " in reconciled.stderr
    assert 1 == verified.returncode, verified.stderr
    assert re.search(r"verifying crm_provider: [\d,]+ records \(", verified.stderr)
    assert "verifying crm_provider: done, 1,200 records in " in verified.stderr
    assert "rec_7" in verified.stdout
    assert "│ match " not in verified.stdout  # no row per matching record
    assert verified.stdout.count("rec_") == 1
    assert "1200 checked, 1199 match, 1 mismatch" in verified.stdout
    assert len(verified.stdout.splitlines()) < 20
