"""Breaker state shared through Redis: across processes, and surviving a Redis outage."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import unavailable

from idis.integrations.config import BreakerPolicy, RetryPolicy
from idis.integrations.exceptions import CircuitOpen, ProviderUnavailable
from idis.integrations.resilience import CLOSED, OPEN, ManualClock, system_clock
from idis.integrations.resilience._shared import RedisBreakerStorage
from idis.integrations.testing import simulator_settings

#: Run in a child process: trip the breaker of argv[2] against the simulator at argv[1].
_TRIPPER = textwrap.dedent(
    """
    import sys
    from idis.integrations.config import BreakerPolicy, RetryPolicy
    from idis.integrations.exceptions import ProviderUnavailable
    from idis.integrations.resilience import Gateway
    from idis.integrations.testing import simulator_settings

    url, provider, redis_url = sys.argv[1:4]
    settings = simulator_settings(
        url,
        providers=(provider,),
        redis_url=redis_url,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=300.0),
    )
    with Gateway(settings) as gateway:
        for _ in range(2):
            try:
                gateway.get_json(provider, "records")
            except ProviderUnavailable:
                pass
        print("STATE=" + gateway.breaker_state(provider))
    """
)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def provider_name(redis_url: str) -> Iterator[str]:
    """A provider name unique to this test; its Redis keys are deleted afterwards."""
    import redis

    name = f"crm_{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"idis:breaker:{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.mark.redis
def test_two_processes_share_an_open_breaker(
    sim: Any, make_harness: Any, redis_url: str, provider_name: str, read_metric: Any
) -> None:
    """A breaker opened by another process is open here too: CircuitOpen, no request sent."""
    sim.control.set_fault(provider_name, "error", endpoint="records", status=503)
    child = subprocess.run(
        [sys.executable, "-c", _TRIPPER, sim.url, provider_name, redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == child.returncode, child.stderr
    assert "STATE=open" == child.stdout.strip().splitlines()[-1]
    sim.control.clear_faults(provider_name)
    settings = simulator_settings(
        sim.url,
        providers=(provider_name,),
        redis_url=redis_url,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=300.0),
    )
    h = make_harness(settings, clock=system_clock, advance=False)

    with pytest.raises(CircuitOpen) as info:
        h.get_json(provider_name, "records")

    assert info.value.retry_in is not None
    assert 0 < info.value.retry_in <= 300.0
    assert 2 == sim.control.stats(provider_name)["requests"]["records"]
    assert OPEN == h.gateway.breaker_state(provider_name)
    assert 2.0 == read_metric(
        "integration_circuit_breaker_state", provider=provider_name, breaker=provider_name
    )


@pytest.mark.redis
def test_a_breaker_opened_here_is_written_to_redis(
    sim: Any, make_harness: Any, redis_url: str, provider_name: str
) -> None:
    """Opening the breaker stores state and opened_at under the provider's key."""
    import redis

    settings = simulator_settings(
        sim.url,
        providers=(provider_name,),
        redis_url=redis_url,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000),
    )
    h = make_harness(settings)
    sim.control.set_fault(provider_name, "error", endpoint="records", status=500)

    with pytest.raises(ProviderUnavailable):
        h.get_json(provider_name, "records")

    client = redis.Redis.from_url(redis_url)
    key = f"idis:breaker:{provider_name}:{provider_name}"
    state, opened_at = client.mget(f"{key}:state", f"{key}:opened_at")
    client.close()
    assert b"open" == state
    assert isinstance(opened_at, bytes)
    assert h.clock.time() == pytest.approx(float(opened_at))


def test_redis_down_does_not_take_provider_calls_down(
    sim: Any, make_harness: Any, logs: Any
) -> None:
    """With Redis unreachable calls still succeed, the breaker still works locally, one warning."""
    settings = simulator_settings(
        sim.url,
        providers=("crm_provider",),
        redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000),
    )
    h = make_harness(settings)

    pages = [h.get_json("crm_provider", "records") for _ in range(5)]
    sim.control.set_fault("crm_provider", "error", endpoint="records", status=503)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            h.get_json("crm_provider", "records")
    with pytest.raises(CircuitOpen):
        h.get_json("crm_provider", "records")

    assert [{"items": [], "next_cursor": None}] * 5 == pages
    assert OPEN == h.gateway.breaker_state("crm_provider")
    warnings = logs.events("idis.breaker.shared_state_unavailable")
    assert 1 == len(warnings)
    assert "warning" == warnings[0]["level"]
    assert "Redis breaker state unavailable" in warnings[0]["msg"]


class PrivateRedis:
    """A redis-server of this test's own on a free port, which the test can stop and restart."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail("redis-server is not installed in CI")
            unavailable("the redis-server binary")
        self.binary = binary
        self.port = _closed_port()
        self.dir = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        client.close()

    def stop(self) -> None:
        """Stop the server (by its own PID)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started private Redis, stopped after the test."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.redis
def test_storage_caches_reads_for_ttl(private_redis: PrivateRedis) -> None:
    """A change made by another replica is seen once the ttl has passed, not on every call."""
    import redis

    clock = ManualClock()
    client = redis.Redis.from_url(private_redis.url)
    storage = RedisBreakerStorage(client, "idis:breaker:p:p", clock=clock, ttl=0.5)
    first = storage.state
    client.set("idis:breaker:p:p:state", "open")

    cached = storage.state
    clock.advance(0.6)
    fresh = storage.state
    client.close()

    assert (CLOSED, CLOSED, OPEN) == (first, cached, fresh)


@pytest.mark.redis
def test_redis_outage_mid_run_falls_back_then_recovers(
    sim: Any, make_harness: Any, private_redis: PrivateRedis, logs: Any
) -> None:
    """Redis dying mid-run costs one warning and no failed call; once back, shared state is read."""
    import redis

    settings = simulator_settings(
        sim.url,
        providers=("crm_provider",),
        redis_url=private_redis.url,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=600.0),
    )
    h = make_harness(settings)
    h.get_json("crm_provider", "records")
    private_redis.stop()

    during = []
    for _ in range(5):
        h.clock.advance(0.6)  # past the state cache's ttl, so each call wants Redis
        during.append(h.get_json("crm_provider", "records"))
    h.clock.advance(6)  # past the storage's 5 s local-fallback period
    private_redis.start()
    other_replica = redis.Redis.from_url(private_redis.url)
    key = "idis:breaker:crm_provider:crm_provider"
    other_replica.mset({f"{key}:state": "open", f"{key}:opened_at": repr(h.clock.time())})
    other_replica.close()

    with pytest.raises(CircuitOpen):
        h.get_json("crm_provider", "records")

    assert [{"items": [], "next_cursor": None}] * 5 == during
    assert 1 == len(logs.events("idis.breaker.shared_state_unavailable"))
    assert 6 == sim.control.stats("crm_provider")["requests"]["records"]
