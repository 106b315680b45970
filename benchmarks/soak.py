"""The fault soak: outbox messages and inbound events through 4 worker processes, faults at random.

    python -m benchmarks.soak [--messages 100000] [--events 100000] [--seed 1]
                              [--workers 4] [--duration 3600] [--drain 900] [--no-poison]
    make soak   (same, defaults)

Everything runs on this machine and is thrown away afterwards:

* a PRIVATE PostgreSQL cluster (``initdb``/``pg_ctl`` in a temp dir, its own port), so it can
  be restarted under the workers; a private ``redis-server`` (shared breaker state) likewise;
* the library's simulator as the provider, a real HTTP server on loopback, behind
  :class:`benchmarks.soak_model.ProviderFaults` (5xx and timeouts *after* the provider applied,
  slow sends, poison records, a provider whose feeds carry no record version);
* N worker processes, each running what the example service runs: an ``AsyncOutboxWorker``
  with ``AsyncGatewayDelivery`` on an ``AsyncGateway``, an ``AsyncWebhookReceiver`` served by
  uvicorn (the simulator's webhook target moves between live workers), and a ``Poller`` per
  inbound provider; this process enqueues, emits, and runs ``reconcile`` (replay) periodically.

Faults, drawn from ``--seed``: SIGKILL of a worker (restarted), lease expiry (leases of one
worker made to lapse), provider fault windows (5xx/timeout after apply, slow sends longer than
the lease), PostgreSQL restart, Redis restart, webhook target moves. Poison messages (records
the provider always refuses) and version-less events (``ORDER_BY=modified``) are always on.

Then the faults stop, the outbox drains, a last replay runs, and the reference model checks:
lost / applied twice / out of order per key / stuck (still pending 3 leases after the provider
is healthy). What the provider applied is read from the simulator's side. Exit 1 if any is
not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/soak.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.soak_model import (
    HostTable,
    ProviderFaults,
    check_inbound,
    check_outbox,
    provider_events,
    serve_simulator,
)

OUT, INV, MOD = "soak_out", "soak_in", "soak_mod"
LEASE = timedelta(seconds=5)
COMMAND = "python -m benchmarks.soak"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- private services


class PrivateCluster:
    """A PostgreSQL cluster of our own in a temp dir, so the soak may restart it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pg"
        self.port = free_port()
        self.log = root / "pg.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/soak"

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        self.dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir.parent, "postgres")
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._pg_ctl("start")
        import psycopg

        with psycopg.connect(self.url.replace("/soak", "/postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE soak")

    def _pg_ctl(self, action: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
            "-c synchronous_commit=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.dir), "-l", str(self.log), "-o", options, "-w", "-m", "fast",
            action,
        )  # fmt: skip

    def restart(self) -> None:
        self._pg_ctl("restart")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("stop")


class PrivateRedis:
    """A redis-server of our own on its own port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        time.sleep(0.5)
        self.start()


# --------------------------------------------------------------------------- settings


def soak_settings(sim_url: str, db_url: str, redis_url: str) -> Any:
    from idis.integrations.config import OutboxSettings, RetryPolicy, TimeoutPolicy
    from idis.integrations.testing import simulator_settings

    base = simulator_settings(
        sim_url,
        providers=(OUT, INV, MOD),
        database_url=db_url,
        redis_url=redis_url,
        retry=RetryPolicy(max_attempts=2, initial_backoff=0.05, max_backoff=0.2),
        timeouts=TimeoutPolicy(connect=2.0, read=1.0, write=2.0, pool=5.0, deadline=5.0),
    )
    settings = base.with_providers(replace(base.provider(MOD), order_by="modified"))
    return replace(
        settings,
        outbox=OutboxSettings(
            max_retries=6,
            batch_size=50,
            concurrency=8,
            lease=LEASE,
            poll_interval=timedelta(milliseconds=200),
            initial_backoff=timedelta(milliseconds=200),
            max_backoff=timedelta(seconds=2),
        ),
    )


# --------------------------------------------------------------------------- worker process


def worker_main(sim_url: str, db_url: str, redis_url: str, port: int) -> None:
    """One worker process: outbox worker, webhook receiver, pollers, on one event loop."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    asyncio.run(_worker(sim_url, db_url, redis_url, port))


async def _worker(sim_url: str, db_url: str, redis_url: str, port: int) -> None:
    import uvicorn

    from idis.integrations.db._engine import create_async_db_engine, create_db_engine
    from idis.integrations.outbox import AsyncGatewayDelivery, AsyncOutboxWorker
    from idis.integrations.providers import AsyncProviderClient
    from idis.integrations.resilience import AsyncGateway
    from idis.integrations.sync._poller import Poller
    from idis.integrations.webhooks import AsyncWebhookReceiver

    settings = soak_settings(sim_url, db_url, redis_url)
    engine = create_async_db_engine(db_url)
    registry = HostTable(create_db_engine(db_url)).registry()
    gateway = AsyncGateway(settings)
    outbox = AsyncOutboxWorker(
        engine,
        settings,
        deliver=AsyncGatewayDelivery(gateway, settings),
        gateway=gateway,
        providers=[OUT],
    )
    outbox_task = outbox.start()
    receiver = AsyncWebhookReceiver(settings, engine, registry=registry, providers=[INV, MOD])
    server = uvicorn.Server(
        uvicorn.Config(
            receiver.asgi_app(), host="127.0.0.1", port=port, log_level="error", access_log=False
        )
    )
    server_task = asyncio.ensure_future(server.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pollers = [
        Poller(AsyncProviderClient(gateway, name), engine, settings, name, registry=registry)
        for name in (INV, MOD)
    ]
    while not stop.is_set():
        for poller in pollers:
            with contextlib.suppress(Exception):  # a restarting database: next round
                await poller.poll_once()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    outbox.stop()
    with contextlib.suppress(Exception):
        await outbox_task
    server.should_exit = True
    await server_task
    await gateway.aclose()
    await engine.dispose()


class Workers:
    """The worker processes; a killed one is restarted on its own port."""

    def __init__(self, count: int, sim_url: str, db_url: str, redis_url: str) -> None:
        self.args = (sim_url, db_url, redis_url)
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[Any] = [None] * count
        self.ctx = mp.get_context("spawn")

    def start(self, i: int) -> None:
        proc = self.ctx.Process(
            target=worker_main, args=(*self.args, self.ports[i]), name=f"soak-worker-{i}"
        )
        proc.start()
        self.procs[i] = proc

    def start_all(self) -> None:
        for i in range(len(self.procs)):
            self.start(i)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            if proc is not None:
                proc.join(30)
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGKILL)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = root
        self.cluster = PrivateCluster(root)
        self.redis = PrivateRedis()
        self.faults = ProviderFaults(seed=args.seed, hang=1.5, slow=0.3)
        self.faults.versionless.add(MOD)
        self.expected: dict[str, list[str]] = {}
        self.poison_keys: set[str] = set()
        self.fault_counts: dict[str, int] = {}
        self.done_producing = threading.Event()
        self.stop_producing = threading.Event()
        self.enqueued: set[str] = set()
        #: Pending messages still moving when the drain budget ran out (not stuck: slow).
        self.unfinished = 0
        self.stop_replay = threading.Event()
        self.replays = 0
        self.errors: list[str] = []

    def log(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {text}", flush=True)

    # ------------------------------------------------------------------ load

    def plan_messages(self) -> list[tuple[str, str]]:
        """(record id, idempotency key) in enqueue order; ~20 messages per key."""
        count = self.args.messages
        keys = max(1, count // 20)
        poison = 0 if self.args.no_poison else max(1, keys // 500)
        plan: list[tuple[str, str]] = []
        for _i in range(count):
            k = self.rng.randrange(keys + poison)
            record = f"{OUT}:r{k}" if k < keys else f"{OUT}:poison{k - keys}"
            if k >= keys:
                self.faults.poison.add(record)
            seq = self.expected.setdefault(record, [])
            key = f"{record}:m{len(seq)}"
            seq.append(key)
            if k >= keys:
                self.poison_keys.add(key)
            plan.append((record, key))
        return plan

    def produce(self, engine: Any, state: Any, plan: list[tuple[str, str]]) -> None:
        from sqlalchemy.orm import Session

        from idis.integrations.outbox import NewMessage, enqueue_many

        events = self.args.events
        batches = max(1, (len(plan) + 499) // 500)
        per_batch_events = max(1, events // batches) if events else 0
        emitted = 0
        spread = self.args.duration * 0.5 / batches
        in_records = max(1, events // 25)
        for b in range(batches):
            if self.stop_producing.is_set():
                self.log(f"--duration reached: {b * 500} of {len(plan)} messages enqueued")
                break
            chunk = plan[b * 500 : (b + 1) * 500]
            messages = [
                NewMessage.request(
                    OUT,
                    "record",
                    method="PUT",
                    path_params={"id": record},
                    json={"data": {"key": key}},
                    idempotency_key=key,
                    ordering_key=record,
                )
                for record, key in chunk
            ]
            for attempt in range(60):
                try:
                    with Session(engine) as session, session.begin():
                        enqueue_many(session, messages)
                    break
                except Exception as exc:  # the cluster is restarting
                    if attempt == 59:
                        raise
                    self.log(f"enqueue retry: {type(exc).__name__}")
                    time.sleep(1)
            self.enqueued.update(key for _, key in chunk)
            n = min(per_batch_events, events - emitted)
            if b == batches - 1:
                n = events - emitted
            for provider, share in ((INV, n - n // 2), (MOD, n // 2)):
                if share:
                    records = [
                        f"{provider}:r{self.rng.randrange(in_records)}" for _ in range(share)
                    ]
                    state.emit(provider, share, record_ids=records)
            emitted += n
            time.sleep(spread)
        self.done_producing.set()

    def replay_loop(self, settings: Any, engine: Any, since: datetime) -> None:
        # The periodic runs replay the last two minutes (what an operator would after an
        # incident); the last run, after the storm, replays everything from the start.
        while not self.stop_replay.wait(10):
            recent = datetime.now(UTC) - timedelta(minutes=2)
            self.replay_all(settings, engine, max(since, recent))

    def replay_all(self, settings: Any, engine: Any, since: datetime) -> bool:
        from idis.integrations.reconciliation import reconcile

        ok = True
        for provider in (INV, MOD):
            try:
                summary = reconcile(
                    provider,
                    since,
                    settings=settings,
                    handlers=HostTable(engine).registry(provider),
                    engine=engine,
                    resume=False,
                    actor="soak",
                )
                self.replays += 1
                ok = ok and summary.ok
            except Exception as exc:  # a fault window: the next round retries
                ok = False
                self.log(f"replay {provider}: {type(exc).__name__}: {str(exc)[:120]}")
        return ok

    # ------------------------------------------------------------------ faults

    def inject(self, workers: Workers, state: Any, engine: Any) -> None:
        from sqlalchemy import text

        kind = self.rng.choice(
            ["kill", "kill", "lease", "provider", "provider", "postgres", "redis", "target"]
        )
        self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
        if kind == "kill":
            i = self.rng.randrange(len(workers.procs))
            workers.kill(i)
            self.log(f"fault: SIGKILL worker {i}")
            time.sleep(self.rng.uniform(0.2, 2))
            workers.start(i)
        elif kind == "lease":
            with contextlib.suppress(Exception), engine.begin() as conn:
                owner = conn.execute(
                    text(
                        "SELECT lease_owner FROM outbox_messages WHERE status = 'pending'"
                        " AND lease_owner IS NOT NULL LIMIT 1"
                    )
                ).scalar()
                if owner:
                    n = conn.execute(
                        text(
                            "UPDATE outbox_messages SET lease_expires_at = now() - interval '1s'"
                            " WHERE lease_owner = :o AND status = 'pending'"
                        ),
                        {"o": owner},
                    ).rowcount
                    self.log(f"fault: {n} leases of {owner} expired")
        elif kind == "provider":
            window = self.rng.uniform(2, 6)
            # Slow sends longer than the lease now and then: the lease must be renewed.
            self.faults.slow = self.rng.choice([0.3, 0.3, LEASE.total_seconds() * 1.4])
            self.faults.ratios = {"error_after": 0.08, "timeout_after": 0.03, "slow": 0.03}
            self.log(f"fault: provider window {window:.1f}s (slow={self.faults.slow}s)")
            time.sleep(window)
            self.faults.ratios = {}
        elif kind == "postgres":
            self.log("fault: PostgreSQL restart")
            self.cluster.restart()
        elif kind == "redis":
            self.log("fault: Redis restart")
            self.redis.restart()
        elif kind == "target":
            self.move_target(workers, state)

    def move_target(self, workers: Workers, state: Any) -> None:
        i = self.rng.randrange(len(workers.procs))
        for provider in (INV, MOD):
            with state.lock:
                state.provider(provider).set_webhook_target(f"{workers.url(i)}/{provider}")
        self.log(f"webhook target: worker {i}")

    # ------------------------------------------------------------------ main

    def run(self) -> int:
        from sqlalchemy import text

        from idis.integrations.db._engine import create_db_engine
        from idis.integrations.db._migrate import upgrade
        from idis.integrations.simulator import SimulatorState

        args = self.args
        started = time.monotonic()
        self.cluster.start()
        self.redis.start()
        upgrade(self.cluster.url)
        engine = create_db_engine(self.cluster.url)
        HostTable(engine)
        state = SimulatorState(seed=args.seed)
        plan = self.plan_messages()
        self.log(
            f"private PostgreSQL :{self.cluster.port}, Redis :{self.redis.port}; "
            f"{args.messages} messages over {len(self.expected)} keys "
            f"({len(self.poison_keys)} poison), {args.events} events, {args.workers} workers"
        )
        since = datetime.now(UTC) - timedelta(minutes=1)
        with serve_simulator(state, self.faults) as sim_url:
            settings = soak_settings(sim_url, self.cluster.url, self.redis.url)
            workers = Workers(args.workers, sim_url, self.cluster.url, self.redis.url)
            workers.start_all()
            time.sleep(2)
            self.move_target(workers, state)
            producer = threading.Thread(
                target=self.produce, args=(engine, state, plan), daemon=True
            )
            replayer = threading.Thread(
                target=self.replay_loop, args=(settings, engine, since), daemon=True
            )
            producer.start()
            replayer.start()
            deadline = started + args.duration
            try:
                while not self.done_producing.is_set() and time.monotonic() < deadline:
                    time.sleep(self.rng.uniform(1, 4))
                    self.inject(workers, state, engine)
                # The storm is over: a healthy provider, every worker alive.
                self.stop_producing.set()
                self.faults.disarm()
                for i, proc in enumerate(workers.procs):
                    if proc is None or not proc.is_alive():
                        workers.start(i)
                producer.join()
                healthy_at = time.monotonic()
                self.log("faults off; draining")
                self.drain(engine, healthy_at + args.drain)
                self.stop_replay.set()
                replayer.join()
                with state.lock:
                    for provider in (INV, MOD):
                        state.provider(provider).set_webhook_target(None)
                self.replay_all(settings, engine, since)
                time.sleep(2)  # the pollers' last round
            finally:
                workers.stop_all()
            drained = time.monotonic() - healthy_at
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT idempotency_key, status FROM outbox_messages")
                ).all()
            statuses: dict[str, str] = {str(key): str(status) for key, status in rows}
            writes = state.stats(OUT)["writes"]
            # Only what was enqueued before --duration ran out (enqueue order is plan order).
            expected = {
                record: [key for key in keys if key in self.enqueued]
                for record, keys in self.expected.items()
            }
            poison = self.poison_keys & self.enqueued
            out = check_outbox(expected, poison, writes, statuses, self.faults.log)
            inbound = {
                provider: check_inbound(
                    provider_events(state, provider), HostTable(engine).rows(provider)
                )
                for provider in (INV, MOD)
            }
        engine.dispose()
        elapsed = time.monotonic() - started
        # A poison message still pending is stuck too: it should have been dead-lettered.
        poison_pending = (
            out.poison
            - out.poison_dead
            - len([k for k in poison if statuses.get(k) == "delivered"])
        )
        # Messages still moving when --drain ran out are slow, not stuck.
        stuck = 0 if self.unfinished else out.pending + poison_pending
        lost = out.lost + sum(f.lost for f in inbound.values())
        twice = out.applied_twice + sum(f.applied_twice for f in inbound.values())
        disorder = out.out_of_order + sum(f.out_of_order for f in inbound.values())
        print()
        print(f"fault soak: seed {args.seed}, {elapsed:.0f} s, {args.workers} worker processes")
        print(f"  faults injected: {dict(sorted(self.fault_counts.items()))}")
        print(
            f"  outbox: {out.messages} messages, {out.applied} applied once by the provider, "
            f"{out.poison} poison ({out.poison_dead} dead-lettered), "
            f"{out.stale_sends} stale re-sends (harmless, idempotent), "
            f"drained {drained:.0f} s after the faults stopped"
        )
        for provider, f in inbound.items():
            print(
                f"  inbound {provider}: {f.events} events on {f.records} records, "
                f"{f.applications} applications"
            )
        print(f"  lost: {lost}")
        print(f"  applied twice: {twice}")
        print(f"  out of order per key: {disorder}")
        print(
            f"  stuck (pending past 3 leases with a healthy provider): {stuck}"
            f" ({out.pending} messages, {poison_pending} poison not dead-lettered)"
        )
        if self.unfinished:
            print(f"  unfinished (still moving when --drain ran out): {self.unfinished}")
        examples = out.examples + [e for f in inbound.values() for e in f.examples]
        for example in examples[:20]:
            print(f"    {example}")
        return 0 if not (lost or twice or disorder or stuck or self.unfinished) else 1

    def drain(self, engine: Any, budget_end: float) -> int:
        """Wait until nothing is pending, or nothing moved for 3 leases (those are stuck).

        Past ``budget_end`` (``--drain``) the rest is counted as unfinished, not stuck.
        """
        from sqlalchemy import text

        last, moved = -1, time.monotonic()
        while True:
            try:
                with engine.connect() as conn:
                    pending = int(
                        conn.execute(
                            text("SELECT count(*) FROM outbox_messages WHERE status = 'pending'")
                        ).scalar_one()
                    )
            except Exception:
                time.sleep(1)
                continue
            now = time.monotonic()
            if pending != last:
                last, moved = pending, now
                self.log(f"pending: {pending}")
            if pending == 0 or now - moved > 3 * LEASE.total_seconds() + 5:
                return pending
            if now > budget_end:
                self.unfinished = pending
                self.log(f"--drain reached with {pending} pending, still moving")
                return pending
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000, help="outbox messages")
    parser.add_argument("--events", type=int, default=100_000, help="inbound events")
    parser.add_argument("--seed", type=int, default=1, help="drives every random choice")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument(
        "--duration",
        type=float,
        default=3600,
        help="seconds of load and faults at most; enqueueing stops there (half of it paces it)",
    )
    parser.add_argument(
        "--no-poison",
        action="store_true",
        help="no poison messages (to see the other faults apart from a poison message's)",
    )
    parser.add_argument(
        "--drain", type=float, default=900, help="seconds the outbox gets to drain afterwards"
    )
    args = parser.parse_args(argv)
    for name in ("messages", "events", "workers"):
        if getattr(args, name) < (1 if name == "workers" else 0):
            parser.error(f"--{name}={getattr(args, name)} must be a positive count")
    for tool in ("initdb", "pg_ctl", "redis-server"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on PATH: the soak starts its own PostgreSQL and Redis")
    # Stopped early (Ctrl-C, or SIGTERM; a background shell ignores SIGINT): clean up anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="idis-soak-"))
    soak = Soak(args, root)
    try:
        return soak.run()
    finally:
        soak.redis.stop()
        soak.cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
