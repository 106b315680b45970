"""Single-flight refresh across processes on PostgreSQL, and lock timeouts reported as such."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select
from tests.auth.conftest import env_for, make_settings
from tests.conftest import sample

from idis.integrations._audit import AuditEvent
from idis.integrations.auth._store import TABLE
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import AuthError, TokenLockTimeout
from idis.integrations.observability._metrics import Metrics
from idis.integrations.simulator import token_fingerprint
from idis.integrations.testing import RunningSimulator

pytestmark = pytest.mark.postgres
P = "crm_provider"

_WORKER = """
import json, sys, threading, time
from pathlib import Path
from typing import Any
from idis.integrations.config import Settings
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.db._engine import create_db_engine

ready, go = Path(sys.argv[1]), Path(sys.argv[2])
settings = Settings.from_env()
engine = create_db_engine(settings.database_url)
with engine.connect():  # connect before the race starts
    pass
generations = []
with TokenManager(settings, engine=engine) as manager:
    ready.touch()
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    def call():
        generations.append(manager.get_token("crm_provider").generation)
    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads: t.start()
    for t in threads: t.join()
print(json.dumps({"generations": sorted(set(generations)), "calls": len(generations)}))
"""


def test_two_processes_on_an_expired_token_make_one_refresh(
    sim: RunningSimulator, pg_url: str, fernet_key: str, tmp_path: Path
) -> None:
    """Two processes (ten threads each) racing on an expired token cause one refresh request."""
    settings = make_settings(sim, pg_url, fernet_key, grant="refresh_token")
    issued = sim.control.issue_tokens(P)
    with TokenManager(settings) as manager:
        manager.import_token(P, {**issued, "expires_in": -60})
    # Hold the winner inside its token request so the other process meets the row lock.
    sim.control.set_fault(P, "latency", endpoint="token", seconds=0.5)
    env = env_for(sim, pg_url, fernet_key, grant="refresh_token")
    go = tmp_path / "go"
    workers: list[tuple[Path, subprocess.Popen[str]]] = []
    outputs = []
    try:
        for index in range(2):
            ready = tmp_path / f"ready-{index}"
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(ready), str(go)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            workers.append((ready, process))
        deadline = time.monotonic() + 60
        while not all(ready.exists() for ready, _ in workers):
            for _, process in workers:
                if process.poll() is not None:
                    pytest.fail(f"worker exited early: {process.communicate()[1][-2000:]}")
            if time.monotonic() >= deadline:
                pytest.fail("the worker processes did not start within 60 s")
            time.sleep(0.01)
        go.touch()
        for _, process in workers:
            out, err = process.communicate(timeout=60)
            assert 0 == process.returncode, err
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for _, process in workers:
            if process.poll() is None:
                process.kill()
            process.communicate()

    engine = create_db_engine(pg_url)
    with engine.connect() as conn:
        refreshed = conn.execute(
            select(AuditEvent.__table__).where(AuditEvent.action == "token.refreshed")
        ).all()
        generation = conn.execute(select(TABLE.c.generation)).scalar_one()
    engine.dispose()
    oauth = sim.control.stats(P)["oauth"]
    assert 1 == oauth["refreshes"]
    assert {token_fingerprint(issued["refresh_token"]): 1} == oauth["refresh_requests"]
    assert [{"generations": [2], "calls": 10}] * 2 == outputs
    assert 1 == len(refreshed)
    assert 2 == generation


def test_a_held_row_lock_times_out_as_a_lock_timeout_not_bad_credentials(
    sim: RunningSimulator, pg_url: str, fernet_key: str, metrics: Metrics, tokens: Any
) -> None:
    """Waiting past lock_timeout raises TokenLockTimeout, sends nothing, and records no failure."""
    settings = make_settings(sim, pg_url, fernet_key, grant="refresh_token", lock_timeout=0.3)
    issued = sim.control.issue_tokens(P)
    tokens(settings).import_token(P, {**issued, "expires_in": -60})
    manager = tokens(settings)
    with psycopg.connect(pg_url, autocommit=False) as holder:
        holder.execute("SELECT 1 FROM oauth_tokens WHERE provider = %s FOR UPDATE", (P,))
        with pytest.raises(TokenLockTimeout) as caught:
            manager.get_token(P)
        holder.rollback()
        token = manager.get_token(P)

    engine = create_db_engine(pg_url)
    with engine.connect() as conn:
        row = conn.execute(select(TABLE)).mappings().one()
    engine.dispose()
    assert isinstance(caught.value, AuthError)
    assert "credentials may be fine" in str(caught.value)
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="lock_timeout"
    )
    assert 0 == row["consecutive_failures"]
    assert "ok" == row["state"]
    assert 2 == token.generation
    assert {token_fingerprint(issued["refresh_token"]): 1} == sim.control.stats(P)["oauth"][
        "refresh_requests"
    ]
