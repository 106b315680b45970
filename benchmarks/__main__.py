"""Run every benchmark in turn: ``python -m benchmarks`` (``make bench``).

Each benchmark compares the library with the bare alternative in the same run
and prints a table; ``docs/performance.md`` records the results with the
command that produced them. Needs the local PostgreSQL for the database ones.
"""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = (
    "benchmarks.pipeline_bench",
    "benchmarks.webhooks_bench",
    "benchmarks.outbox_bench",
    "benchmarks.status_bench",
    "benchmarks.reconcile_bench",
)

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"\n=== {name}", flush=True)
        sys.argv = [name]
        runpy.run_module(name, run_name="__main__")
