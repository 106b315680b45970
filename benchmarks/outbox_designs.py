"""Outbox lease designs side by side: 4 processes draining PostgreSQL, in one run.

    python -m benchmarks.outbox_designs [--messages 30000] [--rounds 3] [--workers 4]

``benchmarks.outbox_server_cost`` measures each design's server CPU on one connection;
this measures what it gives 4 processes sharing the machine with the server, in messages
per second beside the plain loop of ``benchmarks.outbox_bench`` (the issue 16 baseline),
each round running every drain back to back (alternating the order):

* **worker**: ``AsyncOutboxWorker``, as ``outbox_bench`` runs it;
* **statements**: the worker's own lease and settle statements (``outbox._queries``,
  compiled for psycopg) on a bare psycopg client: the settle of a batch and the lease of
  the next in one pipelined round trip, payloads left as text. What today's design
  reaches with a client that costs next to nothing;
* **lease rows**: the design sketched in ``outbox_server_cost`` (one lease row per batch
  under a per-provider advisory transaction lock, no write to the messages before the
  sends), on the same bare client.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/outbox_designs.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.outbox_bench import (
    DEFAULT_PG,
    PROVIDER,
    _ours_worker,
    _plain_worker,
    _psycopg_url,
    drain,
    fill_outbox,
    fill_plain,
    postgres_database,
)
from benchmarks.outbox_server_cost import (
    _LEASE_ROW_SETTLE,
    _SKETCH_TABLES,
    _candidates,
    library_statements,
)


def _statements_worker(url: str, batch: int, barrier: Any, out: Any) -> None:
    import psycopg

    lease_sql, lease_params, settle_sql, settle_params, generation = library_statements(
        batch, f"designs-{os.getpid()}"
    )
    conn = psycopg.connect(_psycopg_url(url), autocommit=True)
    done = 0
    settle: dict[str, Any] | None = None
    barrier.wait()
    cpu = time.process_time()
    while True:
        with conn.pipeline():
            if settle is not None:
                conn.execute(settle_sql, settle)
            cursor = conn.execute(lease_sql, lease_params)
        rows = cursor.fetchall()
        if not rows:
            break
        settle = settle_params | {
            "p_ids": "{" + ",".join(str(r[0]) for r in rows) + "}",
            "p_gens": "{" + ",".join(str(r[generation]) for r in rows) + "}",
            "p_now": datetime.now(UTC),
        }
        done += len(rows)
    out.put((done, time.time(), time.process_time() - cpu))
    conn.close()


def _lease_rows_worker(url: str, batch: int, barrier: Any, out: Any) -> None:
    import psycopg

    sql, params = _candidates(batch, skip="outbox_lease_rows_x", locking=False)
    conn = psycopg.connect(_psycopg_url(url), autocommit=True)
    owner = f"designs-{os.getpid()}"
    done = 0
    lease: int | None = None
    barrier.wait()
    cpu = time.process_time()
    while True:
        with conn.pipeline():
            if lease is not None:
                conn.execute(_LEASE_ROW_SETTLE, {"lease": lease})
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('outbox:' || %s))", (PROVIDER,))
            cursor = conn.execute(sql, params)
        rows = cursor.fetchall()
        if not rows:
            conn.execute("COMMIT")
            break
        ids = "{" + ",".join(str(r[0]) for r in rows) + "}"
        with conn.pipeline():
            entry = conn.execute(
                "INSERT INTO outbox_lease_rows_x (provider, owner, expires_at, ids) VALUES "
                "(%s, %s, now() + interval '5 minutes', %s) RETURNING id",
                (PROVIDER, owner, ids),
            )
            conn.execute("COMMIT")
        lease = int(entry.fetchone()[0])  # type: ignore[index]
        done += len(rows)
    out.put((done, time.time(), time.process_time() - cpu))
    conn.close()


def main(argv: list[str] | None = None) -> None:
    import psycopg

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--postgres-url", default=DEFAULT_PG)
    args = parser.parse_args(argv)
    drains = {
        "plain loop": _plain_worker,
        "worker": _ours_worker,
        "statements": _statements_worker,
        "lease rows": _lease_rows_worker,
    }
    rates: dict[str, list[float]] = {name: [] for name in drains}
    cpu: dict[str, list[float]] = {name: [] for name in drains}
    with (
        postgres_database(args.postgres_url) as url,
        psycopg.connect(_psycopg_url(url), autocommit=True) as conn,
    ):
        for table in _SKETCH_TABLES:
            conn.execute(table)
        for round_no in range(args.rounds):
            order = list(drains.items())
            for name, target in order if round_no % 2 == 0 else order[::-1]:
                if name == "plain loop":
                    fill_plain(url, args.messages)
                else:
                    fill_outbox(url, args.messages, None)
                    conn.execute("VACUUM ANALYZE outbox_lease_rows_x")
                rate, per_message = drain(target, url, args.workers, 100, args.messages)
                rates[name].append(rate)
                cpu[name].append(per_message)
            print(
                f"round {round_no + 1}: "
                + ", ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()),
                file=sys.stderr,
                flush=True,
            )
    plain = rates["plain loop"]
    print(
        f"{args.workers} processes, {args.messages:,} messages, median of {args.rounds} rounds "
        f"(ratio: median of the per-round ratios to the plain loop):"
    )
    for name, values in rates.items():
        ratio = statistics.median(v / p for v, p in zip(values, plain, strict=True))
        print(
            f"  {name:<11} {statistics.median(values):9,.0f} msgs/s  ratio {ratio:.2f}  "
            f"client CPU {statistics.median(cpu[name]):5.1f} us/msg"
        )


if __name__ == "__main__":
    main()
