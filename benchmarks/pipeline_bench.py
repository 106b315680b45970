"""The call pipeline's healthy path against bare httpx, in one run; the event loop on a slow Redis.

    python -m benchmarks.pipeline_bench [--duration 1.0] [--rounds 6] [--only tcp|mock|loop]

For each transport (loopback TCP to a uvicorn server in a subprocess; and
``httpx.MockTransport``, which isolates our own overhead), each flavour (sync
callers on threads; asyncio tasks) and 1 and 64 concurrent callers, it runs
bare httpx and the gateway (``get_json`` through one provider breaker) against
the same server, alternating them for ``--rounds`` rounds of ``--duration``
seconds, and prints requests/s (median of the rounds), p50/p99 latency and the
ratios the targets are stated in (issue 16), then whether each target is met.

It then measures the event loop's lag (how late a 10 ms timer fires) while
an ``AsyncGateway`` sharing breaker state through a Redis 200 ms away (a
private ``redis-server`` behind ``testing.LatencyProxy``) serves calls, next to
the same loop doing what the gateway did before (a blocking Redis read on the
loop every 0.5 s), and times the breaker's bookkeeping around a no-op.

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

    def cpu_ratio(self) -> float:
        """Bare CPU per call over pipeline CPU per call: throughput per CPU-second, relative.

        On a machine shared with other work the wall-clock ratio moves with their load;
        this one does not (the calls are CPU-bound in this process over MockTransport).
        """
        return self._cpu(self.bare) / self._cpu(self.pipeline)

    def p99_ratio(self) -> float:
        """Pipeline p99 latency over bare p99 latency (all rounds pooled)."""
        return self._lat(self.pipeline, 0.99) / self._lat(self.bare, 0.99)

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
            f"{self.p99_ratio():.2f}x",
            f"{self.cpu_ratio():.0%}",
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
    from idis.integrations.config import BreakerPolicy
    from idis.integrations.resilience import Breaker
    from idis.integrations.resilience._bulkhead import ThreadBulkhead

    def noop() -> None:
        return None

    ours = Breaker("bench", "bench", BreakerPolicy())
    bulkhead = ThreadBulkhead(16)
    metrics = _metrics()
    child = metrics.requests.labels("bench", "records", "success")

    def admit_record() -> None:
        trial = ours.admit()
        noop()
        ours.record_success(trial)

    def slot() -> None:
        bulkhead.try_acquire()
        bulkhead.release()

    def labelled() -> None:
        metrics.requests.labels("bench", "records", "success").inc()

    def prebound() -> None:
        child.inc()

    cases = [
        ("no-op call (baseline)", noop),
        ("breaker: `admit()`; noop(); `record_success()`", admit_record),
        ("FIFO bulkhead: `try_acquire()` + `release()`", slot),
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


# --------------------------------------------------------------------------- event loop


@dataclass
class Lag:
    """How late a periodic 10 ms timer fired while calls ran, in milliseconds."""

    name: str
    calls: int
    lags: list[float]

    def cells(self) -> list[str]:
        return [
            self.name,
            f"{self.calls:,}",
            f"{_percentile(self.lags, 0.5):.1f}",
            f"{_percentile(self.lags, 0.99):.1f}",
            f"{max(self.lags):.1f}",
        ]


def _private_redis() -> tuple[subprocess.Popen[bytes], int] | None:
    import shutil
    import tempfile

    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="idis-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


async def _measure_lag(
    name: str, call: Callable[[], Awaitable[Any]], duration: float, side: Callable[[], Any] | None
) -> Lag:
    """Run ``call`` in 8 tasks for ``duration`` s while a 10 ms ticker records its lateness."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration
    lags: list[float] = []
    calls = 0

    async def ticker() -> None:
        while loop.time() < end:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append((loop.time() - before - 0.01) * 1000)

    async def worker() -> None:
        nonlocal calls
        while loop.time() < end:
            await call()
            calls += 1

    async def sidecar() -> None:
        # What the gateway did before: a blocking Redis read on the loop every 0.5 s.
        assert side is not None
        while loop.time() < end:
            side()
            await asyncio.sleep(0.5)

    tasks = [ticker(), *(worker() for _ in range(8))]
    if side is not None:
        tasks.append(sidecar())
    await asyncio.gather(*tasks)
    return Lag(name, calls, lags)


def loop_lag(duration: float) -> list[Lag] | str:
    """Event-loop lag with breaker state in a Redis 200 ms away: ours vs a blocking read."""
    from idis.integrations.config import ProviderSettings, Settings
    from idis.integrations.resilience import AsyncGateway
    from idis.integrations.testing import latency_proxy

    started = _private_redis()
    if started is None:
        return "skipped: no redis-server binary on this machine"
    proc, port = started
    try:
        with latency_proxy(port, 0.2) as proxy:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            provider = ProviderSettings(
                name=PROVIDER,
                kind="crm",
                base_url="http://bench.invalid",
                endpoints={"records": "/records"},
            )

            async def provider_call(request: Any) -> Any:
                import httpx

                await asyncio.sleep(0.001)  # a provider 1 ms away: the calls yield the loop
                return httpx.Response(200, content=BODY)

            async def run() -> list[Lag]:
                import httpx

                results = []
                control = AsyncGateway(
                    Settings(providers={PROVIDER: provider}),
                    metrics=_metrics(),
                    transport=httpx.MockTransport(provider_call),
                )

                async def local_call() -> Any:
                    return await control.get_json(PROVIDER, "records")

                results.append(
                    await _measure_lag(
                        "AsyncGateway, no Redis (control)", local_call, duration, None
                    )
                )
                await control.aclose()
                gateway = AsyncGateway(
                    Settings(providers={PROVIDER: provider}, redis_url=url),
                    metrics=_metrics(),
                    transport=httpx.MockTransport(provider_call),
                )
                try:

                    async def call() -> Any:
                        return await gateway.get_json(PROVIDER, "records")

                    await call()  # connects to Redis and reads the shared state once

                    results.append(
                        await _measure_lag(
                            "AsyncGateway, shared state via redis.asyncio", call, duration, None
                        )
                    )
                    import redis

                    blocking = redis.Redis.from_url(url, socket_timeout=1.0)
                    results.append(
                        await _measure_lag(
                            "same, plus a blocking Redis read on the loop every 0.5 s (before)",
                            call,
                            duration,
                            lambda: blocking.hmget(f"idis:breaker:{PROVIDER}:{PROVIDER}", "state"),
                        )
                    )
                    blocking.close()
                finally:
                    await gateway.aclose()
                return results

            return asyncio.run(run())
    finally:
        proc.terminate()
        proc.wait(10)


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


def _print_failures(rows: list[Row]) -> None:
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


def _targets(rows: list[Row]) -> list[list[str]]:
    """The issue-16 targets, measured in this run."""
    found: list[list[str]] = []
    for r in rows:
        if r.transport == "loopback TCP" and r.flavour.startswith("sync") and r.concurrency == 64:
            p99, rps = r.p99_ratio(), r.ratio()
            found.append(
                [
                    "TCP, 64 sync threads: p99 <= 1.5x bare p99, throughput >= bare",
                    f"p99 {p99:.2f}x, throughput {rps:.0%}",
                    "yes" if p99 <= 1.5 and rps >= 1.0 else "**no**",
                ]
            )
        if r.transport == "MockTransport" and r.flavour == "async":
            found.append(
                [
                    f"MockTransport, {r.concurrency} async caller(s): >= 90% of bare",
                    f"{r.ratio():.0%} (per CPU-second: {r.cpu_ratio():.0%})",
                    "yes" if r.ratio() >= 0.9 else "**no**",
                ]
            )
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per cell")
    parser.add_argument("--only", choices=("tcp", "mock", "loop"), help="one section only")
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
    if rows:
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
                    "p99 pipeline / bare",
                    "throughput per CPU-s pipeline / bare",
                    "client CPU µs/call bare / pipeline",
                ],
                [r.cells() for r in rows],
            )
        )
        _print_failures(rows)
        print(
            "\npipeline / bare: median over rounds of the throughput ratio of back-to-back runs."
            "\nClient CPU: process CPU time of the benchmark process (the TCP server runs in"
            " another process) divided by calls."
        )
        print("\nTargets (issue 16):\n")
        print(_table(["target", "measured", "met"], _targets(rows)))
    if args.only in (None, "loop"):
        lag = loop_lag(max(2.0, args.duration * 3))
        print("\nEvent-loop lag, breaker state shared through a Redis 200 ms away (ms late):\n")
        if isinstance(lag, str):
            print(lag)
        else:
            print(_table(["loop running", "calls", "p50", "p99", "max"], [x.cells() for x in lag]))
    print("\nBookkeeping around a no-op (best of 5, per call):\n")
    print(_table(["what", "µs/call"], [[n, f"{us:.2f}"] for n, us in breaker_micro()]))
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
