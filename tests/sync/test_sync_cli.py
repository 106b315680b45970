"""``idis-integrations sync status|poll|mode``: output, the audited override, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from idis.integrations._audit import list_audit_events
from idis.integrations.cli import main
from idis.integrations.db._engine import create_db_engine
from idis.integrations.sync._models import SyncCursor, SyncInbox, SyncProviderState
from idis.integrations.testing import RunningSimulator, run_simulator

P = "crm_provider"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """A simulator on 127.0.0.1."""
    with run_simulator() as running:
        yield running


@pytest.fixture
def env(sqlite_url: str, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """The embedded default providers on the running simulator, a migrated SQLite database."""
    monkeypatch.setenv("IDIS_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("IDIS_SIMULATOR_URL", sim.url)
    monkeypatch.setenv("IDIS_LOG_LEVEL", "warning")
    return sqlite_url


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_mode_set_polling_is_audited_and_shown(env: str) -> None:
    """`sync mode --set polling` pins polling, writes an audit row, and status shows it."""
    code, out, _ = _run("sync", "mode", "--provider", P, "--set", "polling")
    status_code, status_out, _ = _run("sync", "status", "--json")
    engine = create_db_engine(env)
    with Session(engine) as session:
        audit = list_audit_events(session, provider=P, action_prefix="sync.")
        cursor = session.scalar(select(SyncCursor))
    engine.dispose()

    assert 0 == code
    assert "crm_provider: polling (operator, override polling" in out
    assert 0 == status_code
    rows = json.loads(status_out)
    assert [("crm_provider", "polling", "operator", "polling")] == [
        (r["provider"], r["mode"], r["reason"], r["override"]) for r in rows
    ]
    assert ["sync.mode_changed"] == [a.action for a in audit]
    assert audit[0].actor.startswith("cli:")
    assert "operator" == audit[0].details["reason"]
    assert cursor is not None  # polling starts from a cursor, created at the switch


def test_mode_set_webhook_then_auto(env: str) -> None:
    """`--set webhook` switches back (audited); `--set auto` only clears the override (audited)."""
    _run("sync", "mode", "--provider", P, "--set", "polling")
    _, back, _ = _run("sync", "mode", "--provider", P, "--set", "webhook")
    _, auto, _ = _run("sync", "mode", "--provider", P, "--set", "auto")
    engine = create_db_engine(env)
    with Session(engine) as session:
        actions = [a.action for a in list_audit_events(session, provider=P)]
        override = session.scalar(select(SyncProviderState.override))
    engine.dispose()

    assert "crm_provider: webhook (operator, override webhook" in back
    assert "crm_provider: webhook (operator," in auto
    assert ["sync.mode_changed", "sync.mode_changed", "sync.mode_override"] == actions
    assert override is None


def test_bad_input_changes_nothing(env: str) -> None:
    """An unknown provider or mode setting exits 2 naming the value; no state row appears."""
    code, _, err = _run("sync", "mode", "--provider", "nobody", "--set", "polling")
    code2, _, err2 = _run("sync", "mode", "--provider", P, "--set", "sometimes")
    engine = create_db_engine(env)
    with Session(engine) as session:
        rows = session.scalar(select(func.count()).select_from(SyncProviderState))
    engine.dispose()

    assert (2, 2) == (code, code2)
    assert "nobody" in err
    assert "sometimes" in err2
    assert 0 == rows


def _dump(url: str) -> list[str]:
    """Every row of the SQLite database, as SQL."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
        return list(conn.iterdump())


@pytest.mark.parametrize(
    ("provider", "kind"), [("docs_provider", "docs"), ("enrichment_provider", "enrichment")]
)
@pytest.mark.parametrize("setting", ["polling", "webhook", "auto"])
def test_mode_set_refuses_a_provider_no_sync_service_syncs(
    env: str, provider: str, kind: str, setting: str
) -> None:
    """The documents and enrichment providers have no webhook/polling sync: `--set` exits 2
    naming the provider, its kind and the providers a mode applies to; the database is
    byte for byte the same (no state row, no audit row, no cursor)."""
    before = _dump(env)

    code, out, err = _run("sync", "mode", "--provider", provider, "--set", setting)

    assert (2, "") == (code, out)
    assert f"{provider} is a provider of kind {kind}" in err
    assert "a sync mode applies to providers of kind crm (crm_provider)" in err
    assert "nothing was changed" in err
    assert before == _dump(env)


def test_mode_set_accepts_a_docs_provider_a_sync_service_runs(env: str) -> None:
    """A documents provider the sync service syncs (Drive's, passed as providers=[...]) has a
    mode: once a service led it, `--set polling` pins polling like a crm provider's."""
    from datetime import timedelta

    from idis.integrations._timeparse import utcnow
    from idis.integrations.sync._mode import ModePolicy
    from idis.integrations.sync._state import release_epoch, take_epoch

    engine = create_db_engine(env)
    with Session(engine) as session, session.begin():
        epoch = take_epoch(
            session, "docs_provider", ModePolicy(), utcnow(), "svc", lease=timedelta(minutes=5)
        )
        assert epoch is not None
        row = session.scalars(select(SyncProviderState)).one()
        row.polled_at = utcnow()
        release_epoch(session, "docs_provider", "svc", epoch)
    engine.dispose()

    code, out, err = _run("sync", "mode", "--provider", "docs_provider", "--set", "polling")

    assert 0 == code, err
    assert "docs_provider: polling (operator, override polling" in out


def test_poll_once_applies_the_feed(env: str, sim: RunningSimulator) -> None:
    """`sync poll --once` reads the change feed into the inbox and reports what it did."""
    _run("sync", "poll", "--provider", P, "--once")  # sets the window start
    sim.control.emit(P, 4, webhook=False)

    code, out, _ = _run("sync", "poll", "--provider", P, "--once", "--json")
    engine = create_db_engine(env)
    with Session(engine) as session:
        inbox = session.scalar(select(func.count()).select_from(SyncInbox))
    engine.dispose()

    assert 0 == code
    report = json.loads(out)
    assert (4, 4, True) == (report["fetched"], report["ignored"], report["complete"])
    assert 4 == inbox


def test_poll_once_reports_an_unreachable_provider(env: str, sim: RunningSimulator) -> None:
    """A provider outage makes `sync poll --once` exit 3 with one line naming the failure."""
    sim.control.outage(P)

    code, _, err = _run("sync", "poll", "--provider", P, "--once")

    assert 3 == code
    assert "poll failed" in err


def test_status_lists_default_providers_before_anything_ran(env: str) -> None:
    """With no state yet, status shows the crm providers in their initial webhook mode."""
    code, out, _ = _run("sync", "status")

    assert 0 == code
    assert "crm_provider" in out
    assert "webhook" in out


def test_poll_once_refuses_while_another_replica_leads(env: str) -> None:
    """`sync poll --once` takes the provider's leadership first: while another replica's lease
    holds it, it exits 3 naming that, and writes nothing (no second poller, no cursor race)."""
    from datetime import timedelta

    from idis.integrations._timeparse import utcnow
    from idis.integrations.sync._mode import ModePolicy
    from idis.integrations.sync._state import take_epoch

    engine = create_db_engine(env)
    with Session(engine) as session, session.begin():
        take_epoch(session, P, ModePolicy(), utcnow(), "service-1", lease=timedelta(minutes=5))

    code, _, err = _run("sync", "poll", "--provider", P, "--once")

    with Session(engine) as session:
        cursor = session.scalar(select(SyncCursor))
    engine.dispose()
    assert 3 == code
    assert "another replica leads" in err
    assert cursor is None


def test_sync_run_runs_the_worker_until_sigterm(env: str, sim: RunningSimulator) -> None:
    """`idis-integrations sync run` is the async worker under asyncio.run: it polls (pinned
    polling here) and stops cleanly on SIGTERM, giving its leadership back."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    sim.control.emit(P, 3, webhook=False)
    environment = {
        **os.environ,
        "IDIS_DATABASE_URL": env,
        "IDIS_SIMULATOR_URL": sim.url,
        "CRM_MODE": "polling",
        "CRM_POLL_INTERVAL": "200ms",
        "IDIS_SYNC_POLL_OVERLAP": "1h",
        "IDIS_LOG_LEVEL": "warning",
    }
    cli = str(Path(sys.executable).with_name("idis-integrations"))
    proc = subprocess.Popen(  # our own console script
        [cli, "sync", "run", "--provider", P],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    engine = create_db_engine(env)
    try:
        deadline = time.monotonic() + 60
        inbox = 0
        while inbox < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            with Session(engine) as session:
                inbox = int(session.scalar(select(func.count()).select_from(SyncInbox)) or 0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        with Session(engine) as session:
            state = session.scalar(select(SyncProviderState))
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.dispose()

    assert 3 == inbox
    assert 0 == proc.returncode, err
    assert "syncing crm_provider" in out
    assert state is not None
    assert state.leader is None  # given back on a clean stop
