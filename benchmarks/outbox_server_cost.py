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
  be dead-lettered without some other durable record of the attempt;
* **held lock + journal** (a design not in the library): the held lock, plus that durable
  record: before the sends a second connection commits one journal row naming the batch,
  which the settle deletes in the rows' transaction. A worker killed mid-send leaves its
  row behind; the candidate query skips every id a journal row names, so a sweep can count
  the attempt before the rows are leased again (the sweep is not run here: nothing dies).
  Both backends' CPU is counted;
* **lease rows** (a design not in the library): the lease writes one row per batch (owner,
  expiry, ids) instead of a version of every message; leases of a provider take turns on
  an advisory transaction lock, so the candidate query (no row locks) sees every committed
  lease and skips the ids they name; the settle deletes the lease row and marks its
  messages delivered in one statement (a lapsed lease, already taken over, settles
  nothing).

Linux only (``/proc``); the backend must run on this machine.
"""

from __future__ import annotations

import argparse
import functools
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


#: The design sketches' own tables (not the library's).
_SKETCH_TABLES = (
    "CREATE TABLE outbox_journal_x (id bigserial PRIMARY KEY, owner text NOT NULL, "
    "ids bigint[] NOT NULL)",
    "CREATE TABLE outbox_lease_rows_x (id bigserial PRIMARY KEY, provider text NOT NULL, "
    "owner text NOT NULL, expires_at timestamptz NOT NULL, ids bigint[] NOT NULL)",
)
_LEASE_ROW_SETTLE = (
    "WITH gone AS (DELETE FROM outbox_lease_rows_x WHERE id = %(lease)s RETURNING ids) "
    "UPDATE outbox_messages SET status = 'delivered', delivered_at = now(), updated_at = now(), "
    "attempts = attempts + 1, lease_generation = lease_generation + 1, last_attempt_at = now() "
    "WHERE id IN (SELECT unnest(ids) FROM gone) AND status = 'pending'"
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
    """Backend CPU per message (every backend the drain uses), split by the part of the cycle."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.parts: dict[str, float] = {}

    def _cpu(self) -> float:
        return sum(backend_cpu(pid) for pid in self.pids)

    def spend(self, part: str, run: Callable[[], Any]) -> Any:
        before = self._cpu()
        result = run()
        self.parts[part] = self.parts.get(part, 0.0) + self._cpu() - before
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


def library_statements(
    batch: int, owner: str
) -> tuple[str, dict[str, Any], str, dict[str, Any], int]:
    """The worker's lease (with its parameters) and delivered settle, compiled for psycopg,
    and the position of ``lease_generation`` in the lease's rows."""
    from idis.integrations.outbox._queries import lease_statement, settle_delivered_statement

    lease_sql, lease_params, columns = _compiled(lease_statement("postgresql", database_clock=True))
    settle_sql, settle_params, _ = _compiled(settle_delivered_statement("postgresql"))
    lease_params |= {
        "p_provider": PROVIDER,
        "p_limit": batch,
        "p_owner": owner,
        "p_lease": timedelta(minutes=5),
    }
    return lease_sql, lease_params, settle_sql, settle_params, columns.index("lease_generation")


def drain_ours(conn: Any, meter: Meter, batch: int) -> int:
    lease_sql, lease_params, settle_sql, settle_params, generation = library_statements(
        batch, "cost-bench"
    )
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


def _candidates(batch: int, *, skip: str | None = None, locking: bool = True) -> tuple[str, Any]:
    """The lease's own candidate query (its CTE: ``WHERE id = picked.id``) and parameters;
    ``skip`` names a sketch table whose rows' ``ids`` it must not take."""
    from sqlalchemy.dialects import postgresql

    from idis.integrations.outbox._queries import lease_statement

    cte = lease_statement("postgresql", database_clock=True).whereclause.right.table  # type: ignore[union-attr]
    picked = cte.element.compile(dialect=postgresql.psycopg.dialect())
    sql = str(picked)
    tail = " ORDER BY cand.id \n LIMIT %(p_limit)s FOR UPDATE SKIP LOCKED"
    if not sql.endswith(tail):
        raise RuntimeError(f"the lease's candidate query changed shape: {sql[-80:]!r}")
    where = f" AND cand.id <> ALL(ARRAY(SELECT unnest(ids) FROM {skip}))" if skip else ""
    ending = tail if locking else tail.replace(" FOR UPDATE SKIP LOCKED", "")
    return sql[: -len(tail)] + where + ending, dict(picked.params) | {
        "p_provider": PROVIDER,
        "p_limit": batch,
    }


def drain_held(conn: Any, meter: Meter, batch: int, journal: Any = None) -> int:
    """The held lock; with ``journal`` (a second connection), its journal row per batch."""
    sql, params = _candidates(batch, skip="outbox_journal_x" if journal else None)
    done = 0

    def cycle() -> int:
        with conn.transaction():
            rows = conn.execute(sql, params).fetchall()
            if rows:
                ids = "{" + ",".join(str(r[0]) for r in rows) + "}"
                entry = None
                if journal is not None:
                    entry = journal.execute(
                        "INSERT INTO outbox_journal_x (owner, ids) VALUES ('cost-bench', %s) "
                        "RETURNING id",
                        (ids,),
                    ).fetchone()
                conn.execute(_HELD_SETTLE, {"ids": ids})
                if entry is not None:
                    conn.execute("DELETE FROM outbox_journal_x WHERE id = %s", (entry[0],))
        return len(rows)

    while n := meter.spend("total", cycle):
        done += n
    return done


def drain_lease_rows(conn: Any, meter: Meter, batch: int) -> int:
    sql, params = _candidates(batch, skip="outbox_lease_rows_x", locking=False)
    done = 0

    def lease() -> tuple[int, int]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('outbox:' || %s))", (PROVIDER,))
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return 0, 0
            ids = "{" + ",".join(str(r[0]) for r in rows) + "}"
            entry = conn.execute(
                "INSERT INTO outbox_lease_rows_x (provider, owner, expires_at, ids) VALUES "
                "(%s, 'cost-bench', now() + interval '5 minutes', %s) RETURNING id",
                (PROVIDER, ids),
            ).fetchone()
            return len(rows), entry[0]

    def settle(lease_id: int) -> None:
        with conn.transaction():
            conn.execute(_LEASE_ROW_SETTLE, {"lease": lease_id})

    while True:
        n, lease_id = meter.spend("lease", lease)
        if not n:
            break
        meter.spend("settle", functools.partial(settle, lease_id))
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
    names = ("plain", "ours", "held", "journal", "lease rows")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with (
        postgres_database(args.postgres_url) as url,
        psycopg.connect(_psycopg_url(url), autocommit=True) as conn,
        psycopg.connect(_psycopg_url(url), autocommit=True) as journal,
    ):
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        journal_pid = int(journal.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        drains: dict[str, Callable[[Meter], int]] = {
            "plain": lambda meter: drain_plain(conn, meter, args.batch),
            "ours": lambda meter: drain_ours(conn, meter, args.batch),
            "held": lambda meter: drain_held(conn, meter, args.batch),
            "journal": lambda meter: drain_held(conn, meter, args.batch, journal),
            "lease rows": lambda meter: drain_lease_rows(conn, meter, args.batch),
        }
        for index in args.drop_index:
            conn.execute(f'DROP INDEX "{index}"')
        for table in _SKETCH_TABLES:
            conn.execute(table)
        for _ in range(args.rounds):
            for name, drain in drains.items():
                if name == "plain":
                    fill_plain(url, args.messages)
                else:
                    fill_outbox(url, args.messages, None)
                    conn.execute("VACUUM ANALYZE outbox_journal_x")
                    conn.execute("VACUUM ANALYZE outbox_lease_rows_x")
                conn.execute("CHECKPOINT")
                meter = Meter(pid, journal_pid)
                done = drain(meter)
                assert done == args.messages, (name, done)
                results[name].append({k: v / done * 1e6 for k, v in meter.parts.items()})
    plain = statistics.median(r["total"] for r in results["plain"])
    if args.drop_index:
        print(f"what-if: outbox_messages without {', '.join(args.drop_index)}")
    print(
        f"PostgreSQL backend CPU per message, median of {args.rounds} rounds "
        f"({args.messages} messages, batches of {args.batch}):"
    )
    labels = ("plain loop", "lease + settle", "held lock", "held + journal", "lease rows")
    for name, label in zip(names, labels, strict=True):
        rows = results[name]
        parts = sorted({k for r in rows for k in r})
        total = statistics.median(sum(r.values()) for r in rows)
        split = ", ".join(
            f"{k} {statistics.median(r.get(k, 0.0) for r in rows):.1f}" for k in parts
        )
        print(f"  {label:<15} {total:6.1f} us  ({total / plain:.1f}x plain; {split})")


if __name__ == "__main__":
    main()
