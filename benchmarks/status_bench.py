"""``/status`` latency while the outbox drains at full speed, beside an idle database.

    python -m benchmarks.status_bench [--messages 60000] [--db sqlite|postgres|both]
                                      [--idle-calls 200] [--update-docs]

What the example service's ``/status`` (and ``idis-integrations status``) runs
per request is :func:`~idis.integrations.ops._status.collect_status` without
probes: a fresh engine, the table check, the recorded health samples and last
breaker transition, and the sync, outbox and defect facts. This calls it back
to back, on a fresh migrated database holding a backlog of outbox messages:

* **idle**: nothing else touches the database;
* **draining**: ``AsyncOutboxWorker`` processes (1 on SQLite, its single writer; 4
  on PostgreSQL) drain the backlog with a no-op delivery, as fast as they go,
  while status is called until the last worker finishes;
* **draining, status in write transactions**: the same, with status's reads in
  ordinary (write) transactions, which on SQLite begin with ``BEGIN IMMEDIATE``
  and queue behind the worker: what 0.1 did (issue 16).

Each prints p50 / p99 / max in milliseconds and the drain's messages per second;
issue 16's target is p99 <= 100 ms while draining. A drain lasts a few seconds,
about 50 status calls on PostgreSQL, which would make p99 the single slowest call:
each draining row refills and drains again until it holds ``--min-calls`` calls.
``--statements`` also prints each statement's median time within a status call
on the idle database (where a call's time goes). ``--update-docs`` rewrites the
"## Status under load" section of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import update_docs_section

if __package__ in (None, ""):  # `python benchmarks/status_bench.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.outbox_bench import (
    DEFAULT_PG,
    PROVIDER,
    _ours_worker,
    fill_outbox,
    postgres_database,
    sqlite_database,
)

SECTION = "## Status under load"
COMMAND = "python -m benchmarks.status_bench --update-docs"
#: Issue 16: /status answers within this while the outbox drains at full speed (p99).
TARGET_P99_MS = 100.0
#: Workers that drain "at full speed": SQLite has one writer.
WORKERS = {"sqlite": 1, "postgres": 4}
BATCH = 100

Row = dict[str, Any]


def _settings(url: str) -> Any:
    from idis.integrations.config import ProviderSettings, Settings

    provider = ProviderSettings(name=PROVIDER, kind="crm", base_url="http://127.0.0.1:9")
    return Settings(providers={PROVIDER: provider}, database_url=url)


def status_once(settings: Any) -> tuple[float, float]:
    """One ``collect_status(probe=False)``: (wall, CPU) seconds. Raises on database trouble."""
    from idis.integrations.ops._status import collect_status

    cpu = time.process_time()
    start = time.perf_counter()
    statuses, notes = collect_status(settings, probe=False)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if notes or "outbox_pending" not in statuses[0].facts:
        raise RuntimeError(f"status reported trouble: {notes}")
    return elapsed, cpu


@contextmanager
def write_transactions() -> Iterator[None]:
    """Status's reads in ordinary transactions (BEGIN IMMEDIATE on SQLite), as in 0.1."""
    from idis.integrations.ops import _status

    names = vars(_status)
    original = names["_reader"]
    names["_reader"] = lambda engine: engine  # 0.1's behaviour: BEGIN, reads, ROLLBACK
    try:
        yield
    finally:
        names["_reader"] = original


def _percentiles(samples: list[tuple[float, float]]) -> tuple[float, float, float]:
    ordered = sorted(wall for wall, _cpu in samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1000, p99 * 1000, ordered[-1] * 1000


def _cpu_ms(samples: list[tuple[float, float]]) -> float:
    """Median CPU per call: what status costs, whatever else the machine runs."""
    return statistics.median(cpu for _wall, cpu in samples) * 1000


def idle(settings: Any, calls: int) -> list[tuple[float, float]]:
    """``calls`` status calls on a database nothing else uses."""
    status_once(settings)  # imports and first connection out of the measurement
    return [status_once(settings) for _ in range(calls)]


def draining(
    settings: Any, url: str, workers: int, messages: int
) -> tuple[list[tuple[float, float]], float]:
    """Status calls for as long as ``workers`` drain ``messages``; (latencies, drain msg/s)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_ours_worker, args=(url, BATCH, barrier, out)) for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    status_once(settings)
    barrier.wait(timeout=120)
    start = time.time()
    samples: list[tuple[float, float]] = []
    while any(proc.is_alive() for proc in procs) and out.qsize() < workers:
        samples.append(status_once(settings))
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(60)
    done = sum(r[0] for r in results)
    if done != messages:
        raise RuntimeError(f"drained {done} of {messages} messages")
    return samples, done / (max(r[1] for r in results) - start)


def statement_times(settings: Any, url: str, calls: int) -> list[tuple[float, str]]:
    """Median milliseconds of each statement of a status call (idle), slowest first."""
    from sqlalchemy import event

    from idis.integrations.ops._status import _engine_for

    status_once(settings)
    engine = _engine_for(url)
    times: dict[str, list[float]] = {}

    def before(
        _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        context._bench_start = time.perf_counter()

    def after(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, *_: Any
    ) -> None:
        elapsed = time.perf_counter() - context._bench_start
        times.setdefault(" ".join(statement.split())[:90], []).append(elapsed * 1000)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        for _ in range(calls):
            status_once(settings)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
    return sorted(((statistics.median(v), k) for k, v in times.items()), reverse=True)


def measure(kind: str, url: str, args: argparse.Namespace) -> list[Row]:
    """The three rows of one database."""
    settings = _settings(url)
    workers = WORKERS[kind]
    rows: list[Row] = []
    fill_outbox(url, args.messages, None)
    samples = idle(settings, args.idle_calls)
    rows.append({"db": kind, "load": "idle", "samples": samples, "rate": None})
    print(_line(rows[-1]), flush=True)
    if args.statements:
        for ms, statement in statement_times(settings, url, 30):
            print(f"    {ms:8.2f} ms  {statement}", flush=True)
    for label, context in (
        (f"outbox draining ({workers} worker(s))", _nothing),
        (
            f"outbox draining ({workers} worker(s)), status in write transactions",
            write_transactions,
        ),
    ):
        samples: list[tuple[float, float]] = []
        rates: list[float] = []
        while len(samples) < args.min_calls:
            fill_outbox(url, args.messages, None)
            with context():
                more, rate = draining(settings, url, workers, args.messages)
            samples += more
            rates.append(rate)
        row = {"db": kind, "load": label, "samples": samples, "rate": statistics.median(rates)}
        rows.append(row)
        print(_line(rows[-1]), flush=True)
    return rows


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _line(row: Row) -> str:
    p50, p99, worst = _percentiles(row["samples"])
    rate = f"   drain {row['rate']:,.0f} msg/s" if row["rate"] else ""
    return (
        f"  {row['db']:<9} {row['load']:<66} {len(row['samples']):>5} calls   "
        f"p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   max {worst:7.1f} ms   "
        f"CPU {_cpu_ms(row['samples']):5.1f} ms/call{rate}"
    )


def render(args: argparse.Namespace, rows: list[Row]) -> str:
    """The docs section."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND} --messages {args.messages}` ({platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load:.1f} "
        "at the end of the run).",
        "",
        "What `/status` of the example service and `idis-integrations status` run per request "
        "(`collect_status`, no provider probes) called back to back, on a fresh database with "
        f'{args.messages:,} outbox messages queued; "draining" while `AsyncOutboxWorker` processes '
        "drain them with a no-op delivery as fast as they go (1 on SQLite, 4 on PostgreSQL). "
        "The last row of each database puts status's reads back in write transactions "
        "(`BEGIN IMMEDIATE` on SQLite), as 0.1 did.",
        "",
        "| database | load | calls | p50 ms | p99 ms | max ms | CPU ms/call | drain msg/s "
        "| p99 <= 100 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p50, p99, worst = _percentiles(row["samples"])
        rate = f"{row['rate']:,.0f}" if row["rate"] else "-"
        met = "yes" if p99 <= TARGET_P99_MS else "no"
        lines.append(
            f"| {row['db']} | {row['load']} | {len(row['samples'])} | {p50:,.1f} | {p99:,.1f} | "
            f"{worst:,.1f} | {_cpu_ms(row['samples']):.1f} | {rate} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=60_000, help="outbox backlog to drain")
    parser.add_argument("--idle-calls", type=int, default=200)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--postgres-url", default=DEFAULT_PG)
    parser.add_argument(
        "--min-calls",
        type=int,
        default=200,
        help="status calls per draining row (drains again until reached)",
    )
    parser.add_argument(
        "--statements", action="store_true", help="each statement's time in an idle call"
    )
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.messages:,} outbox messages per drain",
        flush=True,
    )
    rows: list[Row] = []
    databases: list[tuple[str, Callable[[], Any]]] = []
    if args.db in ("sqlite", "both"):
        databases.append(("sqlite", sqlite_database))
    if args.db in ("postgres", "both"):
        databases.append(("postgres", lambda: postgres_database(args.postgres_url)))
    for kind, make in databases:
        with make() as url:
            rows += measure(kind, url, args)
    section = render(args, rows)
    print(section)
    if args.update_docs:
        update_docs_section(SECTION.removeprefix("## "), section)


if __name__ == "__main__":
    main()
