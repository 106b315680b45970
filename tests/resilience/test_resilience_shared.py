"""Breaker state shared through Redis: across processes, versioned, surviving a Redis outage."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import unavailable

from idis.integrations._http import httpx
from idis.integrations.config import BreakerPolicy, RetryPolicy
from idis.integrations.exceptions import CircuitOpen, ProviderUnavailable
from idis.integrations.resilience import CLOSED, HALF_OPEN, OPEN, Breaker, ManualClock
from idis.integrations.resilience._shared import (
    RedisBreakerStores,
    SharedState,
    newer,
    read_shared_state,
)
from idis.integrations.testing import latency_proxy, simulator_settings

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
    from idis.integrations.resilience import system_clock

    h = make_harness(settings, clock=system_clock, advance=False)

    with pytest.raises(CircuitOpen) as info:
        h.get_json(provider_name, "records")

    assert info.value.retry_in is not None
    assert 0 < info.value.retry_in <= 300.0
    assert 0 == info.value.sent
    assert 2 == sim.control.stats(provider_name)["requests"]["records"]
    assert OPEN == h.gateway.breaker_state(provider_name)
    assert 2.0 == read_metric(
        "integration_circuit_breaker_state", provider=provider_name, breaker=provider_name
    )


@pytest.mark.redis
def test_a_breaker_opened_here_is_written_to_redis(
    sim: Any, make_harness: Any, redis_url: str, provider_name: str
) -> None:
    """Opening the breaker stores its versioned state and opened_at under the provider's key."""
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

    stored = read_shared_state(redis_url, provider_name)
    assert stored is not None
    assert (1, OPEN) == (stored.version, stored.state)
    assert h.clock.time() == pytest.approx(stored.opened_at)


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


# --------------------------------------------------------------------------- private Redis


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
        """Start the server (loading a snapshot saved by :meth:`save`) and wait for PING."""
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
        try:
            for _ in range(1000):  # a hang guard, not a timing
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.01)
            pytest.fail(f"private redis-server on port {self.port} did not answer PING")
        finally:
            client.close()

    def save(self) -> None:
        """Snapshot the data to disk, so a restart keeps it (a flap, not a wipe)."""
        import redis

        client = redis.Redis(port=self.port)
        client.save()
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


def _store_breaker(url: str, clock: ManualClock, **policy: Any) -> tuple[Breaker, Any]:
    stores = RedisBreakerStores(url, clock=clock)
    breaker = Breaker("p", "p", BreakerPolicy(**policy), clock=clock, store=stores("p", "p"))
    return breaker, stores


@pytest.mark.redis
def test_a_change_by_another_replica_is_seen_after_the_ttl_not_on_every_call(
    private_redis: PrivateRedis,
) -> None:
    """Between exchanges a breaker reads only its own memory; after the ttl it adopts the change."""
    clock = ManualClock()
    here, stores = _store_breaker(private_redis.url, clock, reset_timeout=60.0)
    there, other = _store_breaker(private_redis.url, clock, reset_timeout=60.0)
    here.share()
    there.force(OPEN, "tripped there")
    there.share()

    cached = (here.share_due(clock.monotonic()), here.state)
    clock.advance(0.6)
    due = here.share_due(clock.monotonic())
    here.share()

    stores.close()
    other.close()
    assert (False, CLOSED) == cached
    assert (True, OPEN) == (due, here.state)


@pytest.mark.redis
def test_publish_keeps_the_newest_version_in_both_directions(private_redis: PrivateRedis) -> None:
    """The Lua compare-and-set keeps a newer record and refuses an older one, atomically."""
    store = RedisBreakerStores(private_redis.url)("p", "p")

    first = store.exchange(SharedState(3, OPEN, 100.0))
    stale = store.exchange(SharedState(2, CLOSED, 0.0))
    tie = store.exchange(SharedState(3, CLOSED, 0.0))
    cautious_tie = store.exchange(SharedState(4, HALF_OPEN, 100.0))
    overtaken = store.exchange(SharedState(4, OPEN, 160.0))
    read = store.exchange(None)

    assert (True, SharedState(3, OPEN, 100.0)) == first
    assert (True, SharedState(3, OPEN, 100.0)) == stale
    assert (True, SharedState(3, OPEN, 100.0)) == tie
    assert (True, SharedState(4, HALF_OPEN, 100.0)) == cautious_tie
    assert (True, SharedState(4, OPEN, 160.0)) == overtaken
    assert (True, SharedState(4, OPEN, 160.0)) == read


def test_newer_prefers_the_version_then_the_more_cautious_state() -> None:
    """newer() is the same rule as the script: higher version, then open > half-open > closed."""
    assert newer(SharedState(2, CLOSED, 0), SharedState(1, OPEN, 5))
    assert not newer(SharedState(1, OPEN, 5), SharedState(2, CLOSED, 0))
    assert newer(SharedState(2, OPEN, 5), SharedState(2, HALF_OPEN, 5))
    assert not newer(SharedState(2, CLOSED, 0), SharedState(2, HALF_OPEN, 5))
    assert newer(SharedState(1, CLOSED, 0), None)
    assert not newer(None, SharedState(1, CLOSED, 0))


# --------------------------------------------------------------------------- the flap


def _replica(make_harness: Any, url: str, clock: ManualClock, handler: Callable[[Any], Any]) -> Any:
    settings = simulator_settings(
        "http://replica.test",
        providers=("crm_provider",),
        redis_url=url,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, minimum_calls=1000, reset_timeout=60.0),
    )
    return make_harness(settings, handler, clock=clock)


def _settle(h: Any) -> str:
    """A replica's breaker state once the exchange its read starts (async: in the background)
    has finished."""
    if h.runner is None:
        return str(h.gateway.breaker_state("crm_provider"))

    async def settled() -> str:
        h.gateway.breaker_state("crm_provider")  # starts the exchange if one is due
        await asyncio.gather(*h.gateway._tasks)
        return str(h.gateway.breaker_state("crm_provider"))

    return str(h.runner.run(settled()))


@pytest.mark.redis
def test_a_breaker_opened_during_a_redis_flap_stays_open_until_its_trial_succeeds(
    make_harness: Any, private_redis: PrivateRedis
) -> None:
    """Issue 11 item 4: the stale shared `closed` left in Redis never shuts a newer `open`.

    Two replicas share Redis. The breaker went open -> half-open -> closed once
    (Redis holds that `closed`), then Redis stops, replica A trips its breaker
    alone, and Redis comes back with its old data. A stays open, B adopts the
    open, and it closes again only through a successful trial after the reset
    timeout, on every replica.
    """
    clock = ManualClock()
    failing = {"a": True}

    def a_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if failing["a"] else 200, json={})

    def b_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ok": True})

    a = _replica(make_harness, private_redis.url, clock, a_handler)
    b = _replica(make_harness, private_redis.url, clock, b_handler)
    # One full cycle while Redis is up: A opens, B's trial closes it (Redis: closed).
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            a.get_json("crm_provider", "records")
    clock.advance(61)
    assert {"ok": True} == b.get_json("crm_provider", "records")
    assert CLOSED == _settle(b)
    clock.advance(1)
    assert CLOSED == _settle(a)
    before = read_shared_state(private_redis.url, "crm_provider")
    assert before is not None
    assert CLOSED == before.state

    private_redis.save()
    private_redis.stop()
    clock.advance(1)
    for _ in range(2):  # A trips alone while Redis is down
        with pytest.raises(ProviderUnavailable):
            a.get_json("crm_provider", "records")
    assert OPEN == a.gateway.breaker_state("crm_provider")
    private_redis.start()  # back, with the stale `closed` from before the outage
    clock.advance(6)  # past the 5 s local fallback

    with pytest.raises(CircuitOpen) as short:
        a.get_json("crm_provider", "records")
    a_state = _settle(a)  # A's newer `open` is published
    clock.advance(1)
    b_state = _settle(b)  # B's next exchange adopts it
    after = read_shared_state(private_redis.url, "crm_provider")

    assert (OPEN, OPEN) == (a_state, b_state)
    assert 0 == short.value.sent
    assert after is not None
    assert (OPEN, before.version + 1) == (after.state, after.version)
    assert 4 == len(a.requests)  # nothing went out while open

    # Only a successful trial closes it: before the reset timeout nothing does.
    clock.advance(30)
    with pytest.raises(CircuitOpen):
        b.get_json("crm_provider", "records")
    clock.advance(31)
    assert {"ok": True} == b.get_json("crm_provider", "records")
    clock.advance(1)
    assert (CLOSED, CLOSED) == (_settle(b), _settle(a))


@pytest.mark.redis
def test_a_redis_outage_costs_one_warning_and_its_end_is_logged(
    make_harness: Any, private_redis: PrivateRedis, logs: Any
) -> None:
    """While Redis is down the breaker works locally; one warning, then one line when it is back."""
    clock = ManualClock()
    a = _replica(make_harness, private_redis.url, clock, lambda r: httpx.Response(503))
    with pytest.raises(ProviderUnavailable):
        a.get_json("crm_provider", "records")
    _settle(a)
    private_redis.stop()
    clock.advance(1)

    with pytest.raises(ProviderUnavailable):  # trips: the publish fails, the call does not
        a.get_json("crm_provider", "records")
    for _ in range(3):
        clock.advance(1)
        with pytest.raises(CircuitOpen):
            a.get_json("crm_provider", "records")
    private_redis.start()
    clock.advance(6)
    with pytest.raises(CircuitOpen):
        a.get_json("crm_provider", "records")
    stored = read_shared_state(private_redis.url, "crm_provider")

    assert 1 == len(logs.events("idis.breaker.shared_state_unavailable"))
    assert 1 == len(logs.events("idis.breaker.shared_state_restored"))
    assert stored is not None
    assert OPEN == stored.state


@pytest.mark.redis
def test_redis_restarted_empty_gets_the_newest_state_back(
    make_harness: Any, private_redis: PrivateRedis
) -> None:
    """A Redis that lost its data is refilled from the replicas: the open breaker is kept."""
    clock = ManualClock()
    a = _replica(make_harness, private_redis.url, clock, lambda r: httpx.Response(503))
    b = _replica(make_harness, private_redis.url, clock, lambda r: httpx.Response(200, json={}))
    b.get_json("crm_provider", "records")
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            a.get_json("crm_provider", "records")
    private_redis.stop()
    private_redis.start()  # no snapshot: empty
    clock.advance(1)

    b.get_json("crm_provider", "records")  # B republishes nothing it did not change
    with pytest.raises(CircuitOpen):
        a.get_json("crm_provider", "records")
    clock.advance(1)
    _settle(a)
    stored = read_shared_state(private_redis.url, "crm_provider")

    assert stored is not None
    assert OPEN == stored.state
    assert OPEN == _settle(b)


# --------------------------------------------------------------------------- event loop

#: Socket methods that wait on the network when the socket is in blocking mode.
_SOCKET_IO = frozenset(
    {"accept", "connect", "connect_ex", "recv", "recv_into", "recvfrom", "recvmsg"}
    | {"send", "sendall", "sendto", "sendmsg", "sendfile"}
)


@pytest.mark.redis
def test_async_gateway_never_blocks_its_loop_on_a_slow_redis(
    private_redis: PrivateRedis, helpers: Any, metrics: Any
) -> None:
    """Issue 16: with a Redis 200 ms away no blocking socket call runs on the loop's thread.

    A profile hook on the loop thread records every socket method called on a
    socket in blocking mode (timeout other than 0); asyncio's own sockets are
    non-blocking, the blocking Redis client's are not. Shared state must still
    flow: the breaker this loop opens reaches Redis.
    """
    from idis.integrations.resilience import AsyncGateway

    blocking: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if (
            isinstance(owner, socket.socket)
            and arg.__name__ in _SOCKET_IO
            and owner.gettimeout() != 0.0
        ):
            blocking.append(f"{arg.__name__} on a blocking socket")

    provider = helpers.provider_settings(
        "crm_provider",
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=3, minimum_calls=1000, reset_timeout=600.0),
    )
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        return httpx.Response(503 if calls["n"] > 20 else 200, json={})

    async def scenario(url: str) -> list[str]:
        clock = ManualClock()
        gateway = AsyncGateway(
            helpers.settings_for(provider),
            clock=clock,
            metrics=metrics,
            transport=httpx.MockTransport(handler),
            # Redis is 200 ms away on a loaded machine: a timeout well above that.
            breaker_storage=RedisBreakerStores(url, clock=clock, socket_timeout=5.0),
        )
        outcomes = []
        sys.setprofile(profile)
        try:
            for _ in range(25):
                clock.advance(0.3)  # every other call finds the shared state due
                try:
                    await gateway.get_json("crm_provider", "records")
                    outcomes.append("ok")
                except ProviderUnavailable:
                    outcomes.append("503")
                except CircuitOpen:
                    outcomes.append("open")
            for _ in range(200):  # let background exchanges finish (a hang guard)
                if not gateway._tasks:
                    break
                await asyncio.sleep(0.01)
        finally:
            sys.setprofile(None)
            await gateway.aclose()
        return outcomes

    with latency_proxy(private_redis.port, 0.2) as proxy:
        outcomes = asyncio.run(scenario(f"redis://127.0.0.1:{proxy.port}/0"))

    stored = read_shared_state(private_redis.url, "crm_provider")
    assert [] == blocking
    assert ["ok"] * 20 + ["503"] * 3 + ["open"] * 2 == outcomes
    assert stored is not None
    assert OPEN == stored.state


@pytest.mark.redis
def test_async_breaker_exchange_and_accessors_never_wait_for_redis(
    private_redis: PrivateRedis, helpers: Any, metrics: Any
) -> None:
    """`await breaker.ashare()` adopts another replica's change; the async accessors only start
    an exchange in the background, and aclose() cancels one still pending."""
    from idis.integrations.resilience import AsyncGateway

    clock = ManualClock()
    there, stores = _store_breaker(private_redis.url, clock, reset_timeout=60.0)
    provider = helpers.provider_settings("p", retry=RetryPolicy(max_attempts=1))

    async def scenario() -> tuple[str, str, str, int]:
        gateway = AsyncGateway(
            helpers.settings_for(provider, redis_url=private_redis.url),
            clock=clock,
            metrics=metrics,
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})),
        )
        await gateway.get_json("p", "records")  # reads the shared state once
        there.force(OPEN, "tripped there")
        there.share()
        clock.advance(1)
        before = gateway.breaker_state("p")  # starts a background exchange, returns at once
        await gateway.breaker("p").ashare()  # the exchange in flight: returns at once too
        for _ in range(200):  # a hang guard, not a timing
            if not gateway._tasks:
                break
            await asyncio.sleep(0.01)
        after = gateway.breaker_state("p")
        there.force(CLOSED, "closed there")
        there.share()
        clock.advance(1)
        gateway.breaker_state("p")  # a background exchange that aclose() cancels
        pending = len(gateway._tasks)
        await gateway.aclose()
        direct = Breaker("p", "p", BreakerPolicy(), clock=clock, store=stores("p", "p"))
        await direct.ashare()
        await stores.aclose()
        return before, after, direct.state, pending

    before, after, direct, pending = asyncio.run(scenario())

    assert (CLOSED, OPEN, CLOSED, 1) == (before, after, direct, pending)


def test_gateways_of_one_process_share_breakers_through_memory(helpers: Any, metrics: Any) -> None:
    """A sync and an async gateway given one MemoryBreakerStores see each other's breaker at once,
    with the same newest-wins rule as Redis."""
    from idis.integrations.resilience import AsyncGateway, Gateway
    from idis.integrations.resilience._shared import MemoryBreakerStores

    clock = ManualClock()
    stores = MemoryBreakerStores()
    provider = helpers.provider_settings(
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, minimum_calls=1000, reset_timeout=30.0),
    )
    settings = helpers.settings_for(provider)
    failing = Gateway(
        settings,
        clock=clock,
        metrics=metrics,
        breaker_storage=stores,
        transport=httpx.MockTransport(lambda r: httpx.Response(503)),
    )
    healthy = httpx.MockTransport(lambda r: httpx.Response(200, json={}))

    async def scenario() -> tuple[str, str, str]:
        async with AsyncGateway(
            settings, clock=clock, metrics=metrics, breaker_storage=stores, transport=healthy
        ) as gateway:
            await gateway.get_json("crm", "records")
            with pytest.raises(ProviderUnavailable):
                failing.get_json("crm", "records")  # opens it, here and there
            with pytest.raises(CircuitOpen):
                await gateway.get_json("crm", "records")
            opened = gateway.breaker_state("crm")
            clock.advance(30)
            await gateway.get_json("crm", "records")  # the trial succeeds: closed for both
            return opened, gateway.breaker_state("crm"), failing.breaker_state("crm")

    try:
        assert (OPEN, CLOSED, CLOSED) == asyncio.run(scenario())
    finally:
        failing.close()


@pytest.mark.redis
def test_async_accessors_start_one_exchange_and_none_outside_a_loop(
    private_redis: PrivateRedis, helpers: Any, metrics: Any
) -> None:
    """An AsyncGateway's sync accessor with a due Redis exchange starts it in the background
    only inside a running loop, one at a time: a second accessor, or a call whose share is
    not urgent, finds it in flight and starts no other. Outside a loop it starts nothing."""
    from idis.integrations.resilience import AsyncGateway

    clock = ManualClock()
    provider = helpers.provider_settings("p", retry=RetryPolicy(max_attempts=1))
    gateway = AsyncGateway(
        helpers.settings_for(provider, redis_url=private_redis.url),
        clock=clock,
        metrics=metrics,
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={})),
    )

    async def due_again() -> tuple[int, int, dict[str, Any]]:
        await gateway.get_json("p", "records")  # the first exchange is urgent: awaited
        clock.advance(1)
        gateway.breaker_state("p")  # starts the due exchange in the background
        gateway.breaker_state("p")  # in flight: starts no other
        started = len(gateway._tasks)
        body = await gateway.get_json("p", "records")  # not urgent, in flight: no other
        during = len(gateway._tasks)
        await gateway.aclose()
        return started, during, body

    clock.advance(1)
    outside = gateway.breaker_state("p")  # no loop runs: nothing can be started
    assert (CLOSED, 0) == (outside, len(gateway._tasks))
    assert (1, 1, {}) == asyncio.run(due_again())


@pytest.mark.redis
def test_redis_stores_aclose_on_a_loop_that_never_made_a_client(
    private_redis: PrivateRedis,
) -> None:
    """aclose() on a loop where no async client was made closes nothing and raises nothing;
    the loop that made one has it closed (a later exchange on it opens a new one)."""
    clock = ManualClock()
    breaker, stores = _store_breaker(private_redis.url, clock)

    async def close_only() -> None:
        await stores.aclose()

    async def exchange_then_close() -> str:
        await breaker.ashare()
        await stores.aclose()
        clock.advance(60)
        await breaker.ashare()  # a fresh client on this loop
        await stores.aclose()
        return breaker.state

    asyncio.run(close_only())
    assert CLOSED == asyncio.run(exchange_then_close())


def test_memory_store_aexchange_keeps_the_newest_like_exchange() -> None:
    """MemoryBreakerStore.aexchange follows exchange's newest-wins rule (no I/O)."""
    import threading

    from idis.integrations.resilience._shared import MemoryBreakerStore

    store = MemoryBreakerStore({}, threading.Lock(), "p:p")
    opened = SharedState(version=2, state=OPEN, opened_at=1.0)
    stale = SharedState(version=1, state=CLOSED, opened_at=0.0)

    async def scenario() -> list[tuple[bool, SharedState | None]]:
        return [
            await store.aexchange(None),
            await store.aexchange(opened),
            await store.aexchange(stale),
        ]

    assert [(True, None), (True, opened), (True, opened)] == asyncio.run(scenario())
