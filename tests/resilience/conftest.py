"""Fixtures for the call-pipeline tests: one harness drives the sync or the async gateway.

Every gateway test takes the ``mode`` fixture (``sync`` / ``async``) and builds
its gateway through ``make_harness``: the test body is written once and runs
against both :class:`Gateway` and :class:`AsyncGateway`. Time is a
:class:`ManualClock` that the fake sleep advances, and every requested sleep is
recorded, so backoff and Retry-After waits are asserted as values, never timed.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest

from idis.integrations._http import httpx
from idis.integrations.config import (
    BreakerPolicy,
    ProviderSettings,
    RetryPolicy,
    Settings,
    TimeoutPolicy,
)
from idis.integrations.observability._logs import configure_logging
from idis.integrations.observability._metrics import Metrics
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock

ENDPOINTS = {"records": "/records", "record": "/records/{id}", "health": "/health"}


def provider_settings(name: str = "crm", base_url: str = "http://crm.test", **kw: Any) -> Any:
    """A provider with fast, deterministic policies; keyword arguments override fields."""
    kw.setdefault("endpoints", ENDPOINTS)
    kw.setdefault(
        "retry",
        RetryPolicy(max_attempts=3, initial_backoff=0.2, max_backoff=2.0, budget_min_retries=100),
    )
    kw.setdefault("breaker", BreakerPolicy(failure_threshold=100, minimum_calls=1000))
    kw.setdefault("timeouts", TimeoutPolicy(deadline=30.0))
    return ProviderSettings(name=name, kind="crm", base_url=base_url, **kw)


def settings_for(*providers: ProviderSettings, **kw: Any) -> Settings:
    """Settings declaring exactly these providers."""
    return Settings(providers={p.name: p for p in providers}, **kw)


@dataclass
class Harness:
    """A gateway (sync or async) with a manual clock, a recording sleep and a request log."""

    mode: str
    gateway: Any
    #: A ManualClock normally; the system clock for cross-process tests.
    clock: Any
    sleeps: list[float]
    requests: list[httpx.Request]
    runner: asyncio.Runner | None = None
    closed: bool = field(default=False)

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call a gateway method by name, awaiting it on the async side."""
        result = getattr(self.gateway, name)(*args, **kwargs)
        if self.runner is not None and asyncio.iscoroutine(result):
            return self.runner.run(result)
        return result

    def get_json(self, *args: Any, **kwargs: Any) -> Any:
        """``gateway.get_json`` for either flavour."""
        return self.call("get_json", *args, **kwargs)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        """``gateway.request`` for either flavour."""
        return self.call("request", *args, **kwargs)

    def concurrently(self, n: int, name: str, /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run the same gateway call ``n`` times at once (threads, or tasks on the async side)."""
        if self.runner is None:
            with ThreadPoolExecutor(max_workers=n) as pool:
                futures = [
                    pool.submit(getattr(self.gateway, name), *args, **kwargs) for _ in range(n)
                ]
                return [f.result() for f in futures]

        async def gather() -> list[Any]:
            method = getattr(self.gateway, name)
            return list(await asyncio.gather(*(method(*args, **kwargs) for _ in range(n))))

        return self.runner.run(gather())

    def close(self) -> None:
        """Close the gateway (and the event loop on the async side)."""
        if self.closed:
            return
        self.closed = True
        if self.runner is not None:
            self.runner.run(self.gateway.aclose())
            self.runner.close()
        else:
            self.gateway.close()


HarnessFactory = Callable[..., Harness]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test once with :class:`Gateway` and once with :class:`AsyncGateway`."""
    return str(request.param)


@pytest.fixture
def make_harness(mode: str, metrics: Metrics) -> Iterator[HarnessFactory]:
    """Build a harness around a MockTransport handler (or real HTTP when handler is None).

    ``advance=False`` makes the fake sleep only record what was asked for, so
    several callers can each be seen waiting out the same pause.
    """
    made: list[Harness] = []

    def factory(
        settings: Settings,
        handler: Callable[[httpx.Request], Any] | None = None,
        *,
        clock: Any = None,
        advance: bool = True,
        **gateway_kwargs: Any,
    ) -> Harness:
        clock = clock or ManualClock()
        sleeps: list[float] = []
        seen: list[httpx.Request] = []

        def recording(request: httpx.Request) -> Any:
            seen.append(request)
            assert handler is not None
            return handler(request)

        gateway_kwargs.setdefault("metrics", metrics)
        gateway_kwargs.setdefault("seed", 7)
        if handler is not None:
            gateway_kwargs["transport"] = httpx.MockTransport(recording)
        if mode == "sync":

            def sleep(seconds: float) -> None:
                sleeps.append(seconds)
                if advance:
                    clock.advance(seconds)

            harness = Harness(
                mode,
                Gateway(settings, clock=clock, sleep=sleep, **gateway_kwargs),
                clock,
                sleeps,
                seen,
            )
        else:

            async def asleep(seconds: float) -> None:
                sleeps.append(seconds)
                if advance:
                    clock.advance(seconds)

            runner = asyncio.Runner()
            harness = Harness(
                mode,
                AsyncGateway(settings, clock=clock, sleep=asleep, **gateway_kwargs),
                clock,
                sleeps,
                seen,
                runner,
            )
        made.append(harness)
        return harness

    yield factory
    for harness in made:
        harness.close()


@dataclass
class LogCapture:
    """Rendered JSON log lines written while the fixture was active."""

    buffer: io.StringIO

    @property
    def text(self) -> str:
        """Everything rendered so far."""
        return self.buffer.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Parsed log events, optionally only those with this event name."""
        parsed = [json.loads(line) for line in self.text.splitlines() if line.strip()]
        return [e for e in parsed if name is None or e.get("event") == name]

    def grep(self, *needles: str) -> list[str]:
        """Lines containing any of ``needles``, case-insensitively (like ``grep -i 'a\\|b'``)."""
        lowered = [n.lower() for n in needles]
        return [line for line in self.text.splitlines() if any(n in line.lower() for n in lowered)]


@pytest.fixture
def logs() -> LogCapture:
    """Configure JSON logging (production format) into a buffer for this test."""
    buffer = io.StringIO()
    configure_logging(fmt="json", level="DEBUG", stream=buffer)
    return LogCapture(buffer)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of one sample (0.0 when it was never touched)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def read_metric(metrics: Metrics) -> Callable[..., float]:
    """``read_metric(name, **labels)`` on this test's registry."""

    def read(name: str, **labels: str) -> float:
        return metric(metrics, name, **labels)

    return read


@pytest.fixture(scope="session")
def simulator() -> Iterator[Any]:
    """One simulator on 127.0.0.1 for the resilience tests (reset before each use)."""
    from idis.integrations.testing import run_simulator

    with run_simulator(seed=11) as sim:
        yield sim


@pytest.fixture
def sim(simulator: Any) -> Any:
    """The shared simulator, with every fault, counter and record cleared."""
    simulator.control.reset()
    return simulator


@pytest.fixture
def helpers() -> Any:
    """Module-level helpers of this conftest (tests import nothing from conftest directly)."""
    import types

    return types.SimpleNamespace(
        provider_settings=provider_settings, settings_for=settings_for, Harness=Harness
    )
