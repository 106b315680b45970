"""Fixtures for the simulator's tests: one real server per module, reset before each test.

The server runs on a frozen clock the tests move by hand, so nothing waits
on wall-clock time (token expiry, retention, fault durations, stop windows).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn

from idis.integrations._http import httpx
from idis.integrations.testing import RunningSimulator, run_simulator


class FrozenClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def _clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture(scope="module")
def _server(_clock: FrozenClock) -> Iterator[RunningSimulator]:
    with run_simulator(clock=_clock, seed=7) as running:
        yield running


@pytest.fixture
def clock(_clock: FrozenClock) -> FrozenClock:
    """The simulator's clock, back at its start time."""
    _clock.now = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
    return _clock


@pytest.fixture
def sim(_server: RunningSimulator, clock: FrozenClock) -> RunningSimulator:
    """A running simulator with no providers, faults or data."""
    _server.control.reset()
    return _server


@pytest.fixture
def http(sim: RunningSimulator) -> Iterator[httpx.Client]:
    """A plain HTTP client on the simulator's base URL."""
    with httpx.Client(base_url=sim.url, timeout=10.0) as client:
        yield client


# --------------------------------------------------------------------------- webhook sink


@dataclass
class Sink:
    """A real HTTP server that records webhook POSTs and answers scripted statuses."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    #: Statuses to answer, in order; 200 once exhausted.
    script: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        with self.lock:
            self.received.append((headers, body))
            status = self.script.pop(0) if self.script else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def ids(self) -> list[str]:
        with self.lock:
            return [h["webhook-id"] for h, _ in self.received]


@pytest.fixture(scope="module")
def _sink_server() -> Iterator[Sink]:
    sink = Sink()
    config = uvicorn.Config(sink, log_config=None, lifespan="off", http="h11", ws="none")
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sink.url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.005)
    yield sink
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def sink(_sink_server: Sink) -> Sink:
    """The webhook sink, emptied."""
    with _sink_server.lock:
        _sink_server.received.clear()
        _sink_server.script.clear()
    return _sink_server


def expected_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1 signature, computed independently of the simulator's code."""
    key = base64.b64decode(secret[len("whsec_") :])
    mac = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


@pytest.fixture
def signature() -> Any:
    """:func:`expected_signature`, for tests (conftest modules are not importable)."""
    return expected_signature
