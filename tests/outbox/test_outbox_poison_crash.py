"""A message that kills every worker that sends it spends only its own retries.

Real worker processes (``poison_worker.py``), killed with SIGKILL by their own
delivery, on SQLite and PostgreSQL. Every lease counts an attempt for each
message it takes, and a worker that dies leaves no word of which of its batch
it sent; sent again in batches, the poison would spend its neighbours' retries
with its own and dead-letter them all, most of them never sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import Engine
from tests.conftest import sleep_past

from idis.integrations.outbox._queries import SUSPECT

from .conftest import put_messages, table

WORKER = Path(__file__).with_name("poison_worker.py")
POISON = 5
#: Seconds a lease lasts: the crashed worker's messages come back after it. A live
#: worker renews its leases, so a slow process start cannot make one lapse under it.
LEASE = "2"


def _run(url: str, sends: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_"))}
    env["IDIS_LOG_LEVEL"] = "warning"
    done = subprocess.run(
        [sys.executable, str(WORKER), url, str(sends), LEASE, str(POISON)],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, -signal.SIGKILL), done.stderr.decode(errors="replace")
    return done.returncode


def _await_lapse(engine: Engine) -> None:
    """Wait until every lease has lapsed (they last ``LEASE`` seconds)."""
    sleep_past(row.lease_expires_at for row in table(engine))


@pytest.mark.slow
@pytest.mark.parametrize(
    "database", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"]
)
def test_a_message_that_kills_its_worker_is_dead_lettered_alone(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    engine = request.getfixturevalue("pg_engine" if database == "postgres" else "sqlite_engine")
    put_messages(engine, 40, max_retries=2)  # three attempts each
    sends = tmp_path / "sends"

    # Each run starts once every lease has lapsed, as a restarted worker whose back-off
    # outlasts the lease would (nothing here depends on a lease still holding).
    # 1: the first batch (seq 0-19) is leased; 0-4 are sent, the poison kills the worker.
    assert -signal.SIGKILL == _run(url, sends)
    _await_lapse(engine)
    # 2: the crashed batch comes back as suspects, sent one at a time: 0-4 (again),
    # then the poison (as many attempts as the rest: the lowest id goes first) kills
    # this worker too. 6-19 and the fresh 20-39 wait.
    assert -signal.SIGKILL == _run(url, sends)
    between = {row.id: row for row in table(engine)}
    _await_lapse(engine)
    # 3: 6-19 have fewer attempts than the poison: they go before it, which kills
    # the worker a third time.
    assert -signal.SIGKILL == _run(url, sends)
    assert {"delivered"} == {r.status for r in table(engine)[6:20]}
    _await_lapse(engine)
    # 4: the poison has spent its three attempts: dead-lettered without a fourth
    # send; the fresh messages go in batches.
    assert 0 == _run(url, sends)

    rows = table(engine)
    sent = Counter(int(line) for line in sends.read_text().split())
    assert {"dead"} == {r.status for r in rows if r.payload["json"]["data"]["seq"] == POISON}
    assert ["delivered"] * 39 == [
        r.status for r in rows if r.payload["json"]["data"]["seq"] != POISON
    ]
    assert 3 == sent[POISON]
    assert dict.fromkeys(range(5), 2) == {seq: sent[seq] for seq in range(5)}
    # Leased in the crashed batches but never sent until the poison was isolated: once.
    assert dict.fromkeys(range(6, 40), 1) == {seq: sent[seq] for seq in range(6, 40)}
    # Their attempts: the crashed batch's lease (lost with the worker) and the send.
    assert {2} == {rows[seq].attempts for seq in range(6, 20)}
    assert {1} == {rows[seq].attempts for seq in range(20, 40)}
    # While the poison's second lease held, its neighbours waited as suspects.
    assert {None} == {between[rows[seq].id].last_error for seq in range(20, 40)}
    assert {SUSPECT} == {between[rows[seq].id].last_error for seq in range(6, 20)}
