"""A deferred refresh that kills its worker does not wedge its provider's refreshes.

Real worker processes (``poison_worker.py``: ``run_deferred(once=True)`` with
the provider served on a loopback HTTP server in the same process), killed with
SIGKILL while one subject's refresh is in flight, on SQLite and PostgreSQL.
Every restart in the test comes after the dead worker's leases lapsed, as a
crash-looping pod's restarts do once its back-off exceeds the lease. Before,
a lease that took over a lapsed lease counted nothing and the request kept its
place as the oldest due, so the first lease after every restart (slow start:
one request) took the killer again: the worker died before refreshing anything
else, for ever, and every other stale subject of the provider stayed stale.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from tests.conftest import sleep_past

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import session_scope
from idis.integrations.enrichment import SubjectKey, _store
from idis.integrations.enrichment._models import Defect, EnrichmentRequest

WORKER = Path(__file__).with_name("poison_worker.py")
PROVIDER = "enrichment_provider"
SUBJECTS = [f"s{i}" for i in range(10)]
#: Leased in the third batch (slow start 1, 2, 4: s0 | s1 s2 | s3 s4 s5 s6), after s3.
POISON = "s4"
#: Seconds a lease lasts: the dead worker's requests come back after it.
LEASE = "2"


def _defer(engine: Engine) -> None:
    """Defer every subject (s0 the oldest), as the enricher does during an outage."""
    start = utcnow() - timedelta(minutes=5)
    with session_scope(engine) as session:
        for i, subject in enumerate(SUBJECTS):
            _store.defer(
                session,
                SubjectKey(PROVIDER, "t1", "claim", subject),
                chain=[PROVIDER],
                now=start + timedelta(seconds=i),
                error="enrichment_provider:server_error",
                origin="deferred",
                actor="test",
            )


def _run(url: str, asks: Path) -> tuple[int, dict[str, int], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "ENRICHMENT_"))}
    env["IDIS_LOG_LEVEL"] = "warning"
    done = subprocess.run(
        [sys.executable, str(WORKER), url, str(asks), LEASE, POISON],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr.decode(errors="replace")
    out = done.stdout.decode(errors="replace")
    # The counts are the last line; log lines (warnings and up) come before them.
    counts = json.loads(out.splitlines()[-1]) if done.returncode == 0 else {}
    return done.returncode, counts, out


def _requests(engine: Engine) -> dict[str, EnrichmentRequest]:
    with session_scope(engine, write=False) as session:
        rows = session.scalars(select(EnrichmentRequest).order_by(EnrichmentRequest.id)).all()
        session.expunge_all()
    return {row.subject_id: row for row in rows}


def _defects(engine: Engine) -> dict[str, str]:
    with session_scope(engine, write=False) as session:
        return {
            row.subject_id: row.status
            for row in session.execute(select(Defect.subject_id, Defect.status))
        }


def _await_lapse(engine: Engine) -> None:
    """Wait until every lease has lapsed (they last ``LEASE`` seconds)."""
    sleep_past(r.lease_expires_at for r in _requests(engine).values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "database", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"]
)
def test_a_refresh_that_kills_its_worker_is_given_up_alone(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    engine = request.getfixturevalue("pg_engine" if database == "postgres" else "sqlite_engine")
    _defer(engine)
    asks = tmp_path / "asks"

    def asked() -> list[str]:
        return asks.read_text().split()

    # Batches of 1, 2, 4: s0 | s1 s2 | s3, then the poison kills the worker holding s4-s6.
    assert -signal.SIGKILL == _run(url, asks)[0]
    assert ["s0", "s1", "s2", "s3", POISON] == asked()
    _await_lapse(engine)

    # Restarted after the leases lapsed: the dead worker's requests are taken over (counted)
    # and go behind the others, which are refreshed; then the poison, alone, kills it again.
    assert -signal.SIGKILL == _run(url, asks)[0]
    rows = _requests(engine)
    assert {"done"} == {rows[s].status for s in SUBJECTS if s not in (POISON, "s5", "s6")}, (
        "the provider's refreshes are wedged behind the request that kills the worker"
    )
    assert {POISON: 1, "s5": 1, "s6": 1} == {s: rows[s].takeovers for s in (POISON, "s5", "s6")}
    assert ["s7", "s8", "s9", POISON] == asked()[5:]
    _await_lapse(engine)

    # Its neighbours, suspects since, go alone (and live); the poison goes last and kills again.
    assert -signal.SIGKILL == _run(url, asks)[0]
    assert ["s5", "s6", POISON] == asked()[9:]
    _await_lapse(engine)

    # The third worker it stopped: given up without a fourth ask, its defect left OPEN.
    code, counts, out = _run(url, asks)
    assert (0, 1, 0) == (code, counts["given_up"], counts["refreshed"])
    assert "idis.enrichment.refresh_given_up" in out
    rows = _requests(engine)
    poison = rows[POISON]
    assert ("failed", 3) == (poison.status, poison.takeovers)
    assert poison.last_error is not None
    assert "its refresh stopped the worker 3 times" in poison.last_error
    assert (None, None) == (poison.lease_owner, poison.lease_expires_at)
    assert {"done"} == {rows[s].status for s in SUBJECTS if s != POISON}
    assert {0} == {rows[s].takeovers for s in SUBJECTS if s not in (POISON, "s5", "s6")}
    defects = _defects(engine)
    assert "OPEN" == defects.pop(POISON)
    assert {"RESOLVED"} == set(defects.values())
    sent = Counter(asked())
    assert 3 == sent.pop(POISON)
    assert dict.fromkeys(sorted(set(SUBJECTS) - {POISON}), 1) == dict(sorted(sent.items()))
