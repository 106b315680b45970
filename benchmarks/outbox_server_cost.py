"""PostgreSQL's own CPU per outbox message: where the server time of a drain goes.

    python -m benchmarks.outbox_server_cost [--messages 20000] [--rounds 3] [--batch 100]

The outbox benchmark (``benchmarks.outbox_bench``) finds 4 PostgreSQL workers bound by
the database server on this 2-CPU machine. This one measures the server side alone: one
connection drains a migrated outbox with the library's own lease and settle statements
(``outbox._queries``, compiled for psycopg, no worker around them), and the backend's CPU
time (``/proc/<backend pid>/stat``, so the load of other processes does not count) is
divided by the messages. In the same run, on the same server:

* **plain**: the plain loop of ``outbox_bench`` (``SELECT ... FOR UPDATE SKIP LOCKED``
  and ``UPDATE ... status = 'done'`` in one transaction), on its own table;
* **lease + settle**: what the worker runs today, the lease (a HOT update that counts the
  attempt and bumps the fencing generation, committed before any send) and the settle of
  the delivered messages, in two transactions; the two are also reported apart;
* **held lock** (a design not in the library): the lease's own candidate query as a
  ``SELECT ... FOR UPDATE SKIP LOCKED`` and one settle that counts the attempt, in one
  transaction held across the sends. It writes each message once, as the plain loop
  does. What it gives up is why it is not the library's: a worker killed mid-send leaves
  no trace of the attempt, so a message that kills every worker that sends it would never
  be dead-lettered without some other durable record of the attempt.

Linux only (``/proc``); the backend must run on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/outbox_server_cost.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.outbox_bench import (
    DEFAULT_PG,
    PROVIDER,
    _psycopg_url,
    fill_outbox,
    fill_plain,
    postgres_database,
)

_PLAIN_LEASE = (
    "SELECT id, payload FROM plain_jobs WHERE status = 'pending' "
    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_PLAIN_DONE = "UPDATE plain_jobs SET status = 'done', done_at = now() WHERE id = ANY(%s)"
#: The held-lock design's settle: the message delivered, its attempt counted, in one write.
_HELD_SETTLE = (
    "UPDATE outbox_messages SET status = 'delivered', delivered_at = now(), updated_at = now(), "
    "attempts = attempts + 1, lease_generation = lease_generation + 1, "
    "last_attempt_at = now() WHERE id = ANY(CAST(%(ids)s AS BIGINT[]))"
)


def backend_cpu(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _compiled(statement: Any) -> tuple[str, dict[str, Any], list[str]]:
    """SQL text for psycopg, its literal parameters, and its RETURNING column names."""
    from sqlalchemy.dialects import postgresql

    compiled = statement.compile(dialect=postgresql.psycopg.dialect())
    columns = [c[0] for c in getattr(compiled, "_result_columns", [])]
    return str(compiled), dict(compiled.params), columns


class Meter:
    """Backend CPU per message, split by the part of the cycle that spent it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.parts: dict[str, float] = {}

    def spend(self, part: str, run: Callable[[], Any]) -> Any:
        before = backend_cpu(self.pid)
        result = run()
        self.parts[part] = self.parts.get(part, 0.0) + backend_cpu(self.pid) - before
        return result


def drain_plain(conn: Any, meter: Meter, batch: int) -> int:
    done = 0

    def cycle() -> int:
        with conn.transaction():
            rows = conn.execute(_PLAIN_LEASE, (batch,)).fetchall()
            if rows:
                conn.execute(_PLAIN_DONE, ([r[0] for r in rows],))
        return len(rows)

    while n := meter.spend("total", cycle):
        done += n
    return done


def drain_ours(conn: Any, meter: Meter, batch: int) -> int:
    from idis.integrations.outbox._queries import lease_statement, settle_delivered_statement

    lease_sql, lease_params, columns = _compiled(lease_statement("postgresql", database_clock=True))
    settle_sql, settle_params, _ = _compiled(settle_delivered_statement("postgresql"))
    generation = columns.index("lease_generation")
    lease_params |= {
        "p_provider": PROVIDER,
        "p_limit": batch,
        "p_owner": "cost-bench",
        "p_lease": timedelta(minutes=5),
    }
    done = 0

    def lease() -> list[Any]:
        with conn.transaction():
            return list(conn.execute(lease_sql, lease_params).fetchall())

    def settle(rows: list[Any]) -> None:
        ids = "{" + ",".join(str(r[0]) for r in rows) + "}"
        gens = "{" + ",".join(str(r[generation]) for r in rows) + "}"
        with conn.transaction():
            conn.execute(
                settle_sql,
                settle_params | {"p_ids": ids, "p_gens": gens, "p_now": datetime.now(UTC)},
            )

    while rows := meter.spend("lease", lease):
        meter.spend("settle", lambda: settle(rows))
        done += len(rows)
    return done


def drain_held(conn: Any, meter: Meter, batch: int) -> int:
    from sqlalchemy.dialects import postgresql

    from idis.integrations.outbox._queries import lease_statement

    # The lease's own candidate query (its CTE: ``WHERE id = picked.id``), run on its own.
    cte = lease_statement("postgresql", database_clock=True).whereclause.right.table  # type: ignore[union-attr]
    picked = cte.element.compile(dialect=postgresql.psycopg.dialect())
    params = dict(picked.params) | {"p_provider": PROVIDER, "p_limit": batch}
    done = 0

    def cycle() -> int:
        with conn.transaction():
            rows = conn.execute(str(picked), params).fetchall()
            if rows:
                ids = "{" + ",".join(str(r[0]) for r in rows) + "}"
                conn.execute(_HELD_SETTLE, {"ids": ids})
        return len(rows)

    while n := meter.spend("total", cycle):
        done += n
    return done


def main(argv: list[str] | None = None) -> None:
    import psycopg

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--postgres-url", default=DEFAULT_PG)
    parser.add_argument(
        "--drop-index",
        action="append",
        default=[],
        metavar="NAME",
        help="what-if: drop this index of outbox_messages first (repeatable)",
    )
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {"plain": [], "ours": [], "held": []}
    drains = {"plain": drain_plain, "ours": drain_ours, "held": drain_held}
    with (
        postgres_database(args.postgres_url) as url,
        psycopg.connect(_psycopg_url(url), autocommit=True) as conn,
    ):
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        for index in args.drop_index:
            conn.execute(f'DROP INDEX "{index}"')
        for _ in range(args.rounds):
            for name, drain in drains.items():
                if name == "plain":
                    fill_plain(url, args.messages)
                else:
                    fill_outbox(url, args.messages, None)
                conn.execute("CHECKPOINT")
                meter = Meter(pid)
                done = drain(conn, meter, args.batch)
                assert done == args.messages, (name, done)
                results[name].append({k: v / done * 1e6 for k, v in meter.parts.items()})
    plain = statistics.median(r["total"] for r in results["plain"])
    if args.drop_index:
        print(f"what-if: outbox_messages without {', '.join(args.drop_index)}")
    print(
        f"PostgreSQL backend CPU per message, median of {args.rounds} rounds "
        f"({args.messages} messages, batches of {args.batch}):"
    )
    for name, label in (("plain", "plain loop"), ("ours", "lease + settle"), ("held", "held lock")):
        rows = results[name]
        parts = sorted({k for r in rows for k in r})
        total = statistics.median(sum(r.values()) for r in rows)
        split = ", ".join(
            f"{k} {statistics.median(r.get(k, 0.0) for r in rows):.1f}" for k in parts
        )
        print(f"  {label:<15} {total:6.1f} us  ({total / plain:.1f}x plain; {split})")


if __name__ == "__main__":
    main()
