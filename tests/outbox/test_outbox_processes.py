"""Worker *processes* (``python -m idis.integrations outbox work``) against the simulator over HTTP.

Counted, not assumed: the simulator records how many times each idempotency key
was applied and the order of writes per record; the database says what was
delivered. Crash tests kill workers with SIGKILL mid-batch and restart
PostgreSQL mid-drain.

The PostgreSQL-restart test restarts a private cluster it starts itself
(initdb + pg_ctl on a free port), never the shared server other test runs use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from tests.conftest import unavailable

from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.testing import RunningSimulator, run_simulator

from .conftest import assert_applied_once, provider_counts, put_messages

CRM = "crm_provider"
#: Longest a test waits with nothing moving in the queue (a stall, not a timed assertion).
DRAIN_TIMEOUT = 120.0


def _env(db_url: str, sim: RunningSimulator, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_"))}
    prefix = "IDIS_PROVIDER_CRM_PROVIDER_"
    env.update(
        {
            "IDIS_DATABASE_URL": db_url,
            "IDIS_PROVIDERS": CRM,
            f"{prefix}KIND": "crm",
            f"{prefix}BASE_URL": sim.provider_url(CRM),
            f"{prefix}ENDPOINTS": "record=/records/{id},webhooks=/webhooks/inbound",
            f"{prefix}RETRY_BACKOFF": "5ms",
            f"{prefix}RETRY_MAX_BACKOFF": "50ms",
            f"{prefix}BREAKER_RESET_TIMEOUT": "200ms",
            f"{prefix}TIMEOUT": "5s",
            f"{prefix}DEADLINE": "10s",
            "IDIS_OUTBOX_BATCH_SIZE": "25",
            "IDIS_OUTBOX_LEASE": "3s",
            "IDIS_OUTBOX_POLL_INTERVAL": "20ms",
            "IDIS_OUTBOX_BACKOFF": "20ms",
            "IDIS_OUTBOX_MAX_BACKOFF": "200ms",
            "IDIS_OUTBOX_MAX_RETRIES": "50",
            "IDIS_LOG_LEVEL": "warning",
            "IDIS_LOG_FORMAT": "json",
        }
    )
    env.update(extra)
    return env


class Workers:
    """Worker processes started by a test; stopped (by PID) when it ends."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        # Output goes to files: a worker blocked on a full pipe would look like a hang.
        out = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "idis.integrations",
                "outbox",
                "work",
                "--worker-id",
                name,
                *args,
            ],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def terminate_all(self) -> list[int | None]:
        """SIGTERM every live worker and wait; return exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        return codes

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@contextmanager
def workers(env: dict[str, str], logs: Path) -> Iterator[Workers]:
    """Start workers inside; every one still running is stopped on the way out."""
    group = Workers(env, logs)
    try:
        yield group
    finally:
        for proc in group.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _counts(engine: Engine) -> dict[str, int]:
    """Messages per reported state (in flight: pending under an unexpired lease)."""
    row = OutboxMessageRow
    with engine.connect() as conn:
        counts = {
            str(status): int(count)
            for status, count in conn.execute(
                select(row.status, func.count()).group_by(row.status)
            ).all()
        }
        in_flight = conn.execute(
            select(func.count()).where(
                row.status == "pending", row.lease_expires_at > datetime.now(UTC)
            )
        ).scalar_one()
    if in_flight:
        counts["in_flight"] = int(in_flight)
        counts["pending"] -= int(in_flight)
    return {k: v for k, v in counts.items() if v}


def _wait_for(
    engine: Engine, done: Callable[[dict[str, int]], bool], procs: Workers, *, timeout: float
) -> dict[str, int]:
    """Wait until ``done(counts)``; fail when nothing moved for ``timeout`` seconds.

    A stall detector, not a timed assertion: a loaded machine drains slower, a wedged
    queue does not drain at all.
    """
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            latest = _counts(engine)
        except OperationalError:
            latest = {}  # the database is restarting; ask again
        if latest and done(latest):
            return latest
        if latest and latest != counts:
            counts = latest
            deadline = time.monotonic() + timeout
        dead = [p.args for p in procs.procs if p.poll() not in (None, 0, -signal.SIGKILL)]
        assert not dead, f"a worker crashed: {dead}"
        time.sleep(0.2)
    raise AssertionError(f"nothing moved for {timeout:.0f}s: {counts}")


def _assert_exactly_once_in_order(
    sim: RunningSimulator, total: int, keys: int, *, max_repeats: int = 0
) -> int:
    """Nothing lost, applied twice, sent again beyond ``max_repeats``, or out of order per key."""
    counts = provider_counts(sim, CRM)
    assert_applied_once(counts, total, max_repeats=max_repeats)
    assert keys == len(counts.writes)
    for record_id, seqs in counts.writes.items():
        assert seqs == sorted(seqs), f"{record_id} written out of order"
        assert total // keys == len(seqs)
    return counts.repeats


@pytest.mark.slow
@pytest.mark.parametrize(
    ("database", "processes", "total"),
    # The same 500 keys at a size the suite can afford (10,000 and 5,000 were its two
    # longest tests, 31 s and 27 s); scale is the fault soak's job (100,000 messages).
    [pytest.param("postgres", 4, 6_000, marks=pytest.mark.postgres), ("sqlite", 1, 3_000)],
)
def test_volume_every_message_applied_once_in_order(
    request: pytest.FixtureRequest, tmp_path: Path, database: str, processes: int, total: int
) -> None:
    """Thousands of messages over 500 keys, 30 % provider failures: each applied once, in order."""
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    engine = request.getfixturevalue("pg_engine" if database == "postgres" else "sqlite_engine")
    with run_simulator(seed=11) as sim:
        sim.control.set_fault(CRM, "error", status=503, ratio=0.3)
        put_messages(engine, total, keys=500)
        # 30 % random failures would often trip "5 consecutive failures"; the
        # breaker path has its own tests, this one is about delivery under churn.
        env = _env(url, sim, IDIS_PROVIDER_CRM_PROVIDER_BREAKER_FAILURE_THRESHOLD="12")
        with workers(env, tmp_path) as group:
            for n in range(processes):
                group.start(f"w{n}")

            counts = _wait_for(
                engine, lambda c: c.get("delivered") == total, group, timeout=DRAIN_TIMEOUT
            )
            codes = group.terminate_all()

        failed = sim.state.provider(CRM).faults_fired["error"]
        duplicates = _assert_exactly_once_in_order(sim, total, 500)
    _note(request, "failures_injected", failed)
    _note(request, "duplicate_sends", duplicates)
    assert {"delivered": total} == counts
    assert [0] * processes == codes
    assert failed > total // 4  # the 30 % really fired (about 0.43 x total attempts failed)


@pytest.mark.slow
@pytest.mark.parametrize(
    "database", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"]
)
def test_sigkill_mid_batch_loses_nothing(
    request: pytest.FixtureRequest, tmp_path: Path, database: str
) -> None:
    """A worker killed mid-batch: its leased messages return after the lease, delivered once."""
    url = request.getfixturevalue("pg_url" if database == "postgres" else "sqlite_url")
    engine = request.getfixturevalue("pg_engine" if database == "postgres" else "sqlite_engine")
    with run_simulator(seed=12) as sim:
        sim.control.set_fault(CRM, "latency", seconds=0.02)  # a batch of 25 takes ~0.5 s
        put_messages(engine, 1_000, keys=50)
        with workers(_env(url, sim), tmp_path) as group:
            victim = group.start("victim")
            _wait_for(
                engine,
                lambda c: c.get("delivered", 0) >= 100 and c.get("in_flight", 0) > 0,
                group,
                timeout=DRAIN_TIMEOUT,
            )
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
            with engine.connect() as conn:
                orphaned = conn.execute(
                    select(OutboxMessageRow.id, OutboxMessageRow.lease_expires_at).where(
                        OutboxMessageRow.status == "pending",
                        OutboxMessageRow.lease_owner == "victim",
                    )
                ).all()
            group.start("survivor")
            counts = _wait_for(
                engine, lambda c: c.get("delivered") == 1_000, group, timeout=DRAIN_TIMEOUT
            )
            codes = group.terminate_all()
        # A request the victim sent before dying may reach the provider again:
        # at most one repeat per lease it held.
        duplicates = _assert_exactly_once_in_order(sim, 1_000, 50, max_repeats=len(orphaned))
    with engine.connect() as conn:
        after = {
            row.id: row
            for row in conn.execute(
                select(OutboxMessageRow).where(OutboxMessageRow.id.in_([r.id for r in orphaned]))
            )
        }
    _note(request, "orphaned_leases", len(orphaned))
    _note(request, "duplicate_sends", duplicates)
    assert orphaned, "the worker was not killed mid-batch"
    assert {"delivered": 1_000} == counts
    assert [-signal.SIGKILL, 0] == codes
    for message_id, lease_expired_at in orphaned:
        row = after[message_id]
        assert "delivered" == row.status
        assert 2 == row.attempts  # the lost attempt stays counted
        assert row.delivered_at is not None
        assert row.delivered_at >= _aware(lease_expired_at)  # not before the lease lapsed


def _note(request: pytest.FixtureRequest, name: str, value: object) -> None:
    """Keep a count with the test's report (junit properties with junit_family=legacy)."""
    request.node.user_properties.append((name, value))


def _aware(value: Any) -> Any:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class PrivateCluster:
    """A PostgreSQL cluster of this test's own (initdb + pg_ctl), on a free loopback port.

    Restarting it disturbs no other test run on the machine, unlike restarting
    the shared server. As root the server runs as the ``postgres`` user (the
    server refuses to run as root).
    """

    def __init__(self, bindir: Path, data: Path, port: int) -> None:
        self.bindir, self.data, self.port = bindir, data, port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert 0 == done.returncode, f"{tool}: {done.stderr or done.stdout}"

    def pg_ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        log = str(self.data / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", action, *args)

    def initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    """A migrated PostgreSQL cluster started for this test and stopped (and removed) after it."""
    import glob
    import shutil
    import tempfile

    from idis.integrations.db._migrate import upgrade

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        unavailable("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) for a private cluster")
    # Not under pytest's tmp_path: as root that is private to root, and the
    # server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="idis-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    cluster = PrivateCluster(Path(bins[-1]).parent, data, _free_port())
    try:
        cluster.initdb()
        cluster.pg_ctl("start")
        try:
            upgrade(cluster.url)
            yield cluster
        finally:
            cluster.pg_ctl("stop", "-m", "immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restart_mid_drain(
    request: pytest.FixtureRequest, private_pg: PrivateCluster, tmp_path: Path
) -> None:
    """PostgreSQL restarted mid-drain: workers reconnect and finish; nothing lost or doubled."""
    from idis.integrations.db._engine import create_db_engine

    pg_url = private_pg.url
    pg_engine = create_db_engine(pg_url)
    with run_simulator(seed=13) as sim:
        # Slow enough that the drain (~7 s with two workers) outlasts the restart
        # even on an idle machine, so the restart always lands mid-drain.
        sim.control.set_fault(CRM, "latency", seconds=0.02)
        put_messages(pg_engine, 3_000, keys=100)
        with workers(_env(pg_url, sim), tmp_path) as group:
            group.start("w0")
            group.start("w1")
            _wait_for(
                pg_engine, lambda c: c.get("delivered", 0) >= 500, group, timeout=DRAIN_TIMEOUT
            )
            private_pg.pg_ctl("restart", "-m", "fast")
            pg_engine.dispose()  # the test's own pooled connections died with the server
            before_restart_done = _counts_retrying(pg_engine)
            counts = _wait_for(
                pg_engine, lambda c: c.get("delivered") == 3_000, group, timeout=DRAIN_TIMEOUT
            )
            codes = group.terminate_all()
            logs = group.log("w0") + group.log("w1")
        # Settlements the workers could not write while the server was down are
        # kept and written when it is back: nothing is sent again.
        duplicates = _assert_exactly_once_in_order(sim, 3_000, 100)
    pg_engine.dispose()
    _note(request, "delivered_when_back", before_restart_done.get("delivered", 0))
    _note(request, "duplicate_sends", duplicates)
    assert before_restart_done.get("delivered", 0) < 3_000  # the restart really was mid-drain
    assert {"delivered": 3_000} == counts
    assert [0, 0] == codes
    assert "idis.outbox.storage_error" in logs  # the workers saw the outage and rode it out


def _counts_retrying(engine: Engine) -> dict[str, int]:
    for _ in range(100):
        try:
            return _counts(engine)
        except OperationalError:
            time.sleep(0.1)
    raise AssertionError("PostgreSQL did not come back")


@pytest.mark.slow
def test_sigterm_finishes_the_delivery_and_releases_the_rest(
    sqlite_url: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    """SIGTERM: the worker exits 0 promptly, leaving no lease behind and nothing delivered twice."""
    with run_simulator(seed=14) as sim:
        sim.control.set_fault(CRM, "latency", seconds=0.05)
        put_messages(sqlite_engine, 200, keys=200)
        env = _env(sqlite_url, sim, IDIS_OUTBOX_LEASE="10m", IDIS_OUTBOX_BATCH_SIZE="100")
        with workers(env, tmp_path) as group:
            proc = group.start("w0")
            _wait_for(sqlite_engine, lambda c: c.get("delivered", 0) >= 5, group, timeout=60)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            output = group.log("w0")
        counts = _counts(sqlite_engine)
        sent = provider_counts(sim, CRM)
    assert 0 == code
    assert 0 == counts.get("in_flight", 0)  # released, not left to a 10-minute lease
    assert counts.get("pending", 0) > 0
    assert_applied_once(sent, counts["delivered"])
    assert "stopped:" in output


@pytest.mark.slow
def test_cli_worker_on_the_embedded_providers_with_oauth(
    sqlite_url: str, sqlite_engine: Engine, tmp_path: Path
) -> None:
    """`outbox work` on the default providers gets a token, delivers calls and webhooks."""
    from sqlalchemy.orm import Session

    from idis.integrations.outbox import NewMessage, enqueue

    with run_simulator(seed=15) as sim:
        sim.control.require_auth(CRM, True)
        with Session(sqlite_engine) as session, session.begin():
            for i in range(3):
                enqueue(
                    session,
                    NewMessage.request(
                        CRM,
                        "record",
                        method="PUT",
                        path_params={"id": f"r{i}"},
                        json={"data": {"seq": i}},
                        idempotency_key=f"cli-{i}",
                        ordering_key=f"r{i}",
                    ),
                )
            enqueue(session, NewMessage.webhook(CRM, "deal.won", {"id": 1}, webhook_id="evt_cli"))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_"))}
        env.update(
            {
                "IDIS_DATABASE_URL": sqlite_url,
                "IDIS_SIMULATOR_URL": sim.url,
                # The simulator's webhook secret is published: signing with it is opt-in.
                "IDIS_ALLOW_EMBEDDED_DEFAULTS": "true",
            }
        )
        result = subprocess.run(
            [sys.executable, "-m", "idis.integrations", "outbox", "work", "--until-idle"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        stats = sim.state.provider(CRM).stats()

    assert 0 == result.returncode, result.stderr
    assert "4 delivered" in result.stdout
    assert {"cli-0": 1, "cli-1": 1, "cli-2": 1} == stats["idempotency"]["applications"]
    assert {"cli-0": 1, "cli-1": 1, "cli-2": 1} == stats["idempotency"]["received"]
    assert (1, 0) == (stats["inbound"]["accepted"], stats["auth_failures"])
    assert {"delivered": 4} == _counts(sqlite_engine)
