"""The call pipeline's healthy path against bare httpx, in one run.

    python -m benchmarks.pipeline_bench [--duration 1.0] [--rounds 6] [--only tcp|mock]

For each transport (loopback TCP to a uvicorn server in a subprocess; and
``httpx.MockTransport``, which isolates our own overhead), each flavour (sync
callers on threads; asyncio tasks) and 1 and 64 concurrent callers, it runs
bare httpx and the gateway (``get_json`` through one provider breaker) against
the same server, alternating them for ``--rounds`` rounds of ``--duration``
seconds, and prints requests/s (median of the rounds) and p50/p99 latency.

It then times the breaker itself around a no-op (pybreaker ``call()`` and
``calling()`` vs our ``admit()``/``record_success()``), and shows whether
calls through one breaker overlap when each one blocks.

Results for this repository are in ``docs/performance.md`` ("Call pipeline").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

BODY = b'{"items":[],"next_cursor":null}'
PROVIDER = "bench"
CONCURRENCY = (1, 64)


# --------------------------------------------------------------------------- server


async def _asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The trivial provider: every GET answers the same small JSON page."""
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def serve(port: int) -> None:
    """Serve the trivial app with uvicorn on 127.0.0.1:port until killed."""
    import uvicorn

    config = uvicorn.Config(
        _asgi_app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=False,
    )
    # IPPROTO_TCP on the listening socket makes asyncio set TCP_NODELAY on the
    # accepted ones; without it each response waits out a 40 ms delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    uvicorn.Server(config).run(sockets=[sock])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    """Start the server subprocess; return it and its base URL once it accepts connections."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.pipeline_bench", "--serve", str(port)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("benchmark server did not start")


# --------------------------------------------------------------------------- clients


def _settings(base_url: str) -> Any:
    from idis.integrations.config import ProviderSettings, Settings

    # Library defaults (bulkhead of 16 calls in flight, pool sized to it), except that
    # a caller may queue for a slot as long as it takes: 64 callers share 16 slots.
    provider = ProviderSettings(
        name=PROVIDER,
        kind="crm",
        base_url=base_url,
        endpoints={"records": "/records"},
        bulkhead_wait=60.0,
    )
    return Settings(providers={PROVIDER: provider})


def _limits() -> Any:
    import httpx

    from idis.integrations.config import ProviderSettings

    # Bare httpx gets the pool the gateway builds for one provider (its bulkhead size):
    # a pool of 64 connections was several times slower than 16 for both sides here.
    size = ProviderSettings(name=PROVIDER, kind="crm", base_url="http://x").max_concurrency
    return httpx.Limits(max_connections=size, max_keepalive_connections=size)


def _timeout() -> Any:
    import httpx

    return httpx.Timeout(connect=3.0, read=10.0, write=10.0, pool=5.0)


def _mock_transport(async_: bool) -> Any:
    import httpx

    headers = [("content-type", "application/json"), ("content-length", str(len(BODY)))]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, content=BODY)

    return httpx.MockTransport(handler)


def _metrics() -> Any:
    from prometheus_client import CollectorRegistry

    from idis.integrations.observability._metrics import Metrics

    return Metrics(CollectorRegistry())


@dataclass
class Pair:
    """Bare and pipeline callables for one transport and flavour."""

    bare: Callable[[], Any]
    pipeline: Callable[[], Any]
    close: Callable[[], Any]


def sync_pair(base_url: str, mock: bool) -> Pair:
    """``client.get(url).json()`` vs ``gateway.get_json(provider, "records")``."""
    import httpx

    from idis.integrations.resilience import Gateway

    url = base_url + "/records"
    transport = _mock_transport(False) if mock else None
    client = httpx.Client(transport=transport, limits=_limits(), timeout=_timeout())
    gateway = Gateway(
        _settings(base_url), metrics=_metrics(), transport=_mock_transport(False) if mock else None
    )

    def bare() -> Any:
        response = client.get(url)
        response.raise_for_status()
        return response.json()

    def pipeline() -> Any:
        return gateway.get_json(PROVIDER, "records")

    def close() -> None:
        client.close()
        gateway.close()

    return Pair(bare, pipeline, close)


def async_pair(base_url: str, mock: bool) -> Pair:
    """Async twin of :func:`sync_pair` (callables return coroutines)."""
    import httpx

    from idis.integrations.resilience import AsyncGateway

    url = base_url + "/records"
    client = httpx.AsyncClient(
        transport=_mock_transport(True) if mock else None, limits=_limits(), timeout=_timeout()
    )
    gateway = AsyncGateway(
        _settings(base_url), metrics=_metrics(), transport=_mock_transport(True) if mock else None
    )

    async def bare() -> Any:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()

    async def pipeline() -> Any:
        return await gateway.get_json(PROVIDER, "records")

    async def close() -> None:
        await client.aclose()
        await gateway.aclose()

    return Pair(bare, pipeline, close)


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One timed run: completed calls, elapsed seconds, client CPU seconds, latencies."""

    calls: int
    elapsed: float
    cpu: float
    latencies: list[float]
    #: Calls that raised (not counted in ``calls``), described.
    errors: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.calls / self.elapsed

    @property
    def cpu_per_call(self) -> float:
        return self.cpu / self.calls


def load_sync(call: Callable[[], Any], concurrency: int, duration: float) -> Sample:
    """``concurrency`` threads calling ``call`` in a loop for ``duration`` seconds."""
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    stop = [0.0]
    errors: list[BaseException] = []

    def worker(latencies: list[float]) -> None:
        clock = time.perf_counter
        barrier.wait()
        end = stop[0]
        while True:
            started = clock()
            if started >= end:
                return
            try:
                call()
            except Exception as exc:  # counted and reported, not timed
                errors.append(exc)
                continue
            latencies.append(clock() - started)

    threads = [threading.Thread(target=worker, args=(lat,)) for lat in per_thread]
    for thread in threads:
        thread.start()
    cpu = time.process_time()
    started = time.perf_counter()
    stop[0] = started + duration
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies = [x for lat in per_thread for x in lat]
    return Sample(len(latencies), elapsed, cpu, latencies, _describe(errors))


def _describe(errors: list[BaseException]) -> list[str]:
    return [f"{type(e).__module__}.{type(e).__name__}: {e}" for e in errors]


async def load_async(
    call: Callable[[], Awaitable[Any]], concurrency: int, duration: float
) -> Sample:
    """``concurrency`` tasks awaiting ``call`` in a loop for ``duration`` seconds."""
    per_task: list[list[float]] = [[] for _ in range(concurrency)]
    clock = time.perf_counter
    cpu = time.process_time()
    started = clock()
    end = started + duration

    errors: list[BaseException] = []

    async def worker(latencies: list[float]) -> None:
        while True:
            t0 = clock()
            if t0 >= end:
                return
            try:
                await call()
            except Exception as exc:  # counted and reported, not timed
                errors.append(exc)
                continue
            latencies.append(clock() - t0)

    await asyncio.gather(*(worker(lat) for lat in per_task))
    elapsed = clock() - started
    cpu = time.process_time() - cpu
    latencies = [x for lat in per_task for x in lat]
    return Sample(len(latencies), elapsed, cpu, latencies, _describe(errors))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    """One line of the results table; bare[i] and pipeline[i] ran back to back."""

    transport: str
    flavour: str
    concurrency: int
    bare: list[Sample]
    pipeline: list[Sample]

    @staticmethod
    def _rps(samples: list[Sample]) -> float:
        return statistics.median(s.rps for s in samples)

    @staticmethod
    def _lat(samples: list[Sample], q: float) -> float:
        return _percentile([x for s in samples for x in s.latencies], q) * 1e6

    @staticmethod
    def _cpu(samples: list[Sample]) -> float:
        return statistics.median(s.cpu_per_call for s in samples) * 1e6

    def ratio(self) -> float:
        """Median over rounds of pipeline/bare throughput (pairs ran back to back)."""
        return statistics.median(
            p.rps / b.rps for b, p in zip(self.bare, self.pipeline, strict=True)
        )

    def cells(self) -> list[str]:
        return [
            self.transport,
            self.flavour,
            str(self.concurrency),
            f"{self._rps(self.bare):,.0f}",
            f"{self._rps(self.pipeline):,.0f}",
            f"**{self.ratio():.0%}**",
            f"{self._lat(self.bare, 0.5):,.0f} / {self._lat(self.bare, 0.99):,.0f}",
            f"{self._lat(self.pipeline, 0.5):,.0f} / {self._lat(self.pipeline, 0.99):,.0f}",
            f"{self._cpu(self.bare):.0f} / {self._cpu(self.pipeline):.0f}",
        ]


def measure(transport: str, base_url: str, rounds: int, duration: float) -> list[Row]:
    """All flavours and concurrencies for one transport, bare and pipeline alternating."""
    mock = transport == "MockTransport"
    rows: list[Row] = []
    warmup = min(0.3, duration)
    pair = sync_pair(base_url, mock)
    try:
        for n in CONCURRENCY:
            row = Row(transport, "sync (threads)", n, [], [])
            load_sync(pair.bare, n, warmup)
            load_sync(pair.pipeline, n, warmup)
            for i in range(rounds):
                # Alternate which side goes first so drift in machine load cancels out.
                if i % 2:
                    row.pipeline.append(load_sync(pair.pipeline, n, duration))
                    row.bare.append(load_sync(pair.bare, n, duration))
                else:
                    row.bare.append(load_sync(pair.bare, n, duration))
                    row.pipeline.append(load_sync(pair.pipeline, n, duration))
            rows.append(row)
            _progress(row)
    finally:
        pair.close()

    async def run_async() -> None:
        apair = async_pair(base_url, mock)
        try:
            for n in CONCURRENCY:
                row = Row(transport, "async", n, [], [])
                await load_async(apair.bare, n, warmup)
                await load_async(apair.pipeline, n, warmup)
                for i in range(rounds):
                    if i % 2:
                        row.pipeline.append(await load_async(apair.pipeline, n, duration))
                        row.bare.append(await load_async(apair.bare, n, duration))
                    else:
                        row.bare.append(await load_async(apair.bare, n, duration))
                        row.pipeline.append(await load_async(apair.pipeline, n, duration))
                rows.append(row)
                _progress(row)
        finally:
            await apair.close()

    asyncio.run(run_async())
    return rows


def _progress(row: Row) -> None:
    print("  " + " | ".join(row.cells()), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- breaker


def breaker_micro() -> list[tuple[str, float]]:
    """Per-call cost of breaker bookkeeping around a no-op, in microseconds."""
    import pybreaker
    import tenacity

    from idis.integrations.config import BreakerPolicy
    from idis.integrations.resilience import Breaker

    def noop() -> None:
        return None

    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    ours = Breaker("bench", "bench", BreakerPolicy())
    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(3), reraise=True)
    metrics = _metrics()
    child = metrics.requests.labels("bench", "records", "success")

    def pb_call() -> None:
        cb.call(noop)

    def pb_calling() -> None:
        with cb.calling():
            noop()

    def admit_record() -> None:
        trial = ours.admit()
        noop()
        ours.record_success(trial)

    def tenacity_loop() -> None:
        retrying(noop)

    def labelled() -> None:
        metrics.requests.labels("bench", "records", "success").inc()

    def prebound() -> None:
        child.inc()

    cases = [
        ("no-op call (baseline)", noop),
        ("pybreaker `call(noop)`", pb_call),
        ("pybreaker `with calling(): noop()`", pb_calling),
        ("ours: `admit()`; noop(); `record_success()`", admit_record),
        ("tenacity `Retrying(...)(noop)` (not on our first attempt)", tenacity_loop),
        ("counter `.labels(...).inc()`", labelled),
        ("counter pre-bound child `.inc()` (what we do)", prebound),
    ]
    results = []
    for name, func in cases:
        timer = timeit.Timer(func)
        number, _ = timer.autorange()
        best = min(timer.repeat(repeat=5, number=number)) / number
        results.append((name, best * 1e6))
    return results


def breaker_overlap(threads: int = 8, hold: float = 0.05) -> list[tuple[str, float]]:
    """Wall time for ``threads`` calls that each block ``hold`` s, through one breaker."""
    import pybreaker

    from idis.integrations.config import BreakerPolicy
    from idis.integrations.resilience import Breaker

    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    ours = Breaker("bench", "bench", BreakerPolicy())

    def via_call() -> None:
        cb.call(time.sleep, hold)

    def via_calling() -> None:
        with cb.calling():
            time.sleep(hold)

    def via_ours() -> None:
        trial = ours.admit()
        time.sleep(hold)
        ours.record_success(trial)

    results = []
    for name, func in (
        ("pybreaker `call()`", via_call),
        ("pybreaker `calling()`", via_calling),
        ("ours (admit/record)", via_ours),
    ):
        workers = [threading.Thread(target=func) for _ in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        results.append((name, time.perf_counter() - started))
    return results


# --------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where this ran."""
    import httpx

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"httpx {httpx.__version__}, {platform.system()} {platform.release()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per cell")
    parser.add_argument("--only", choices=("tcp", "mock"), help="one transport only")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print raw numbers as JSON")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    from idis.integrations.observability._logs import configure_logging

    # Production logging (JSON, INFO) so that filtered calls cost what they cost in a service.
    configure_logging(fmt="json", level="INFO", stream=open(os.devnull, "w"))  # noqa: SIM115
    load_start = os.getloadavg()[0]  # other work on the machine skews every number
    rows: list[Row] = []
    if args.only in (None, "tcp"):
        proc, url = start_server()
        try:
            rows += measure("loopback TCP", url, args.rounds, args.duration)
        finally:
            proc.terminate()
            proc.wait(10)
    if args.only in (None, "mock"):
        rows += measure("MockTransport", "http://bench.invalid", args.rounds, args.duration)

    print(f"Machine: {machine()}")
    print(f"Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}\n")
    print(
        _table(
            [
                "transport",
                "callers",
                "concurrent",
                "bare httpx req/s",
                "pipeline req/s",
                "pipeline / bare",
                "bare p50 / p99 µs",
                "pipeline p50 / p99 µs",
                "client CPU µs/call bare / pipeline",
            ],
            [r.cells() for r in rows],
        )
    )
    failures = [
        (r, side, e)
        for r in rows
        for side, samples in (("bare", r.bare), ("pipeline", r.pipeline))
        for smp in samples
        for e in smp.errors
    ]
    if failures:
        print("\nFailed calls (excluded from the numbers above):")
        seen: dict[tuple[str, str, int, str, str], int] = {}
        for r, side, e in failures:
            key = (r.transport, r.flavour, r.concurrency, side, e)
            seen[key] = seen.get(key, 0) + 1
        for (transport, flavour, n, side, e), count in seen.items():
            print(f"- {transport}, {flavour}, {n} callers, {side}: {count} x {e}")
    print(
        "\npipeline / bare: median over rounds of the throughput ratio of back-to-back runs."
        "\nClient CPU: process CPU time of the benchmark process (the TCP server runs in"
        " another process) divided by calls."
    )
    print("\nBreaker bookkeeping around a no-op (best of 5, per call):\n")
    print(_table(["what", "µs/call"], [[n, f"{us:.2f}"] for n, us in breaker_micro()]))
    print("\n8 threads, each blocking 50 ms inside one breaker (wall time):\n")
    print(_table(["through", "seconds"], [[n, f"{s:.3f}"] for n, s in breaker_overlap()]))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "transport": r.transport,
                        "flavour": r.flavour,
                        "concurrency": r.concurrency,
                        "bare_rps": [s.rps for s in r.bare],
                        "pipeline_rps": [s.rps for s in r.pipeline],
                    }
                    for r in rows
                ]
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
