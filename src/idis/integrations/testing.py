"""Helpers for test suites: a real simulator on 127.0.0.1 and settings pointing at it.

Serve the simulator with uvicorn in a background thread, break it on purpose
through its control client, and point the library at it::

    from idis.integrations.testing import run_simulator, simulator_settings

    def test_breaker_opens_in_a_5xx_storm() -> None:
        with run_simulator(seed=1) as sim:
            settings = simulator_settings(sim.url, database_url=my_sqlite_url)
            sim.control.set_fault("crm_provider", "error", status=503)
            ...  # call through a Gateway(settings) and assert
            assert sim.control.stats("crm_provider")["requests"]["records"] == 5

* :func:`run_simulator` is a context manager yielding a :class:`RunningSimulator`
  with ``url``, ``port``, ``control`` (a :class:`~idis.integrations.simulator.SimulatorControl`)
  and ``state`` (the in-process :class:`~idis.integrations.simulator.SimulatorState`,
  for assertions or direct manipulation). It returns once the server accepts
  connections and, on exit, releases hanging requests, stops the server and
  joins its thread. Pass ``clock`` to run the simulator on simulated time.
* :func:`simulator_settings` builds :class:`~idis.integrations.config.Settings`
  whose providers (``crm_provider``, ``docs_provider``, ``enrichment_provider`` by
  default) live on that simulator, with test-friendly policies: short timeouts
  and backoffs, a quick breaker reset. Keyword overrides replace either a
  ``Settings`` field (``database_url=...``) or a field of every provider
  (``retry=RetryPolicy(max_attempts=1)``).

The simulator needs the ``simulator`` extra (uvicorn).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, replace
from typing import Any

from ._conformance import (
    AdapterHarness,
    CheckResult,
    ConformanceReport,
    check_adapter,
    simulator_harness,
)
from .config import (
    BreakerPolicy,
    ProviderSettings,
    RetryPolicy,
    Settings,
    TimeoutPolicy,
    _simulator_provider,
)
from .exceptions import ConfigError, UsageError
from .resilience._policy import set_testing
from .simulator._control import SimulatorControl
from .simulator._state import Clock, SimulatorState

__all__ = [
    "AdapterHarness",
    "CheckResult",
    "ConformanceReport",
    "LatencyProxy",
    "RunningSimulator",
    "check_adapter",
    "latency_proxy",
    "make_server",
    "run_simulator",
    "serve_asgi",
    "set_testing",
    "simulator_harness",
    "simulator_settings",
]

_DEFAULT_PROVIDERS = ("crm_provider", "docs_provider", "enrichment_provider")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RunningSimulator:
    """A simulator being served on 127.0.0.1."""

    #: Base URL, e.g. ``http://127.0.0.1:54321``.
    url: str
    #: The port it listens on.
    port: int
    #: Sync client of the control API.
    control: SimulatorControl
    #: The in-process state the server runs on.
    state: SimulatorState

    def provider_url(self, provider: str) -> str:
        """Base URL of one provider (``<url>/p/<provider>``)."""
        return f"{self.url}/p/{provider}"


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the provider simulator needs uvicorn: pip install 'idis-integrations[simulator]'"
        ) from exc
    return uvicorn


def _server_for(
    app: Any,
    *,
    log_level: str | None = None,
    graceful_timeout: float = 2.0,
    lifespan: str = "auto",
) -> Any:
    uvicorn = _uvicorn()
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level=log_level,
        access_log=False,
        lifespan=lifespan,
        http="h11",
        ws="none",
        proxy_headers=False,
        server_header=False,
        # Longer than httpx's 5 s pool keep-alive: the client drops an idle
        # connection before the server closes it. At uvicorn's default (5 s, the
        # same) a request could go out on a connection the server was closing and
        # fail with "connection reset by peer" (seen in a test's teardown).
        timeout_keep_alive=75,
        timeout_graceful_shutdown=graceful_timeout,
    )
    return uvicorn.Server(config)


def make_server(
    state: SimulatorState,
    *,
    log_level: str | None = None,
    graceful_timeout: float = 2.0,
    control_hosts: Sequence[str] = (),
) -> Any:
    """A ``uvicorn.Server`` for the simulator app over ``state`` (not started).

    ``control_hosts``: Host names the control API accepts besides loopback ones.
    """
    from .simulator._app import build_app

    return _server_for(
        build_app(state, control_hosts=control_hosts),
        log_level=log_level,
        graceful_timeout=graceful_timeout,
        lifespan="on",
    )


@contextmanager
def serve_asgi(
    app: Any,
    *,
    port: int | None = None,
    name: str = "idis-asgi",
    server: Any = None,
    before_stop: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a background thread; yield its URL.

    Used for the simulator, and for a webhook receiver the simulator posts to
    (the drill, the example service's tests).

    Raises:
        UsageError: the server did not start (port in use, ...).
    """
    server = server if server is not None else _server_for(app)
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only
    # when the listening socket says TCP, and without it every response waits
    # out the client's 40 ms delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port or 0))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from exc
    bound = int(sock.getsockname()[1])
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"{name}-{bound}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(_STOP_TIMEOUT)
            sock.close()
            raise UsageError(f"{name} did not start on 127.0.0.1:{bound}")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{bound}"
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        thread.join(_STOP_TIMEOUT)
        sock.close()
        if thread.is_alive():
            raise UsageError(f"the {name} server thread did not stop")


@contextmanager
def run_simulator(
    *,
    port: int | None = None,
    clock: Clock | None = None,
    seed: int = 0,
    state: SimulatorState | None = None,
) -> Iterator[RunningSimulator]:
    """Serve a simulator on 127.0.0.1 in a background thread for the ``with`` block.

    Args:
        port: TCP port; a free one by default.
        clock: returns the simulated aware UTC time; real time by default.
        seed: seeds fault ratios, fake data and webhook reordering.
        state: serve this existing state instead of a fresh one (``clock`` and
            ``seed`` are then ignored).

    Yields:
        The running simulator: ``url``, ``port``, ``control``, ``state``.

    Raises:
        UsageError: the server did not start (port in use, ...).
    """
    sim = state if state is not None else SimulatorState(clock=clock, seed=seed)

    def release_hangs() -> None:
        # Hanging requests poll these, so shutdown does not wait out a hang fault.
        sim.closing = True
        sim.hang_generation += 1

    with serve_asgi(
        None, port=port, name="idis-simulator", server=make_server(sim), before_stop=release_hangs
    ) as url:
        control = SimulatorControl(url)
        try:
            yield RunningSimulator(
                url=url, port=int(url.rsplit(":", 1)[1]), control=control, state=sim
            )
        finally:
            control.close()


def _kind(name: str) -> str:
    if "enrich" in name:
        return "enrichment"
    if "doc" in name:
        return "docs"
    return "crm"


def simulator_settings(
    url: str,
    *,
    providers: tuple[str, ...] | list[str] = _DEFAULT_PROVIDERS,
    **overrides: Any,
) -> Settings:
    """Settings whose providers live on the simulator at ``url``, with test-friendly policies.

    Args:
        url: the simulator's base URL (``RunningSimulator.url``).
        providers: provider names; kind is inferred (``*enrich*`` enrichment,
            ``*doc*`` docs, else crm).
        **overrides: ``Settings`` fields, or ``ProviderSettings`` fields applied
            to every provider.

    Raises:
        ConfigError: an override names neither kind of field.
    """
    settings_fields = {f.name for f in fields(Settings)}
    provider_fields = {f.name for f in fields(ProviderSettings)} - {"name", "base_url"}
    for key in overrides:
        if key not in settings_fields and key not in provider_fields:
            raise ConfigError(
                f"simulator_settings: unknown override {key!r}: expected a Settings field "
                f"({', '.join(sorted(settings_fields))}) or a ProviderSettings field "
                f"({', '.join(sorted(provider_fields))})",
                variable=key,
            )
    if isinstance(providers, str) or not providers:
        raise ConfigError(
            f"simulator_settings: providers={providers!r} must be a non-empty list of names",
            variable="providers",
        )
    base = url.rstrip("/")
    per_provider = {k: v for k, v in overrides.items() if k in provider_fields}
    top = {k: v for k, v in overrides.items() if k in settings_fields}
    built: dict[str, ProviderSettings] = {}
    for name in providers:
        provider = replace(
            _simulator_provider(name, _kind(name), base),
            timeouts=TimeoutPolicy(connect=2.0, read=2.0, write=2.0, pool=2.0, deadline=10.0),
            retry=RetryPolicy(
                max_attempts=3, initial_backoff=0.01, max_backoff=0.1, retry_after_cap=5.0
            ),
            breaker=BreakerPolicy(reset_timeout=1.0),
        )
        built[name] = replace(provider, **per_provider) if per_provider else provider
    # The simulator's webhook secret is published: only settings that talk to a
    # simulator alone may use it (config.Settings.checked_webhook_secrets).
    settings = Settings(
        providers=built, embedded_defaults=False, simulator_url=base, allow_embedded_defaults=True
    )
    return replace(settings, **top) if top else settings


class LatencyProxy:
    """A loopback TCP proxy that delays every chunk from the server by ``delay`` seconds.

    Put it between the library and a real Redis (or any TCP service) to make
    that service slow without touching it: the benchmark and the tests use it
    to show that a slow Redis never blocks the async gateway's event loop.
    Use :func:`latency_proxy`; ``port`` is where clients connect.
    """

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="idis-latency-proxy", daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        # accept() is not interrupted by close() from another thread: poll instead.
        self._listener.settimeout(0.05)
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, 0.0)
            self._spawn(self._pump, upstream, client, self.delay)

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while not self._closing.is_set():
                chunk = source.recv(65536)
                if not chunk:
                    break
                if delay:
                    self._closing.wait(delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting, close every connection and join the threads."""
        self._closing.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(_STOP_TIMEOUT)


@contextmanager
def latency_proxy(port: int, delay: float, host: str = "127.0.0.1") -> Iterator[LatencyProxy]:
    """Run a :class:`LatencyProxy` to ``host:port`` adding ``delay`` seconds to each reply."""
    proxy = LatencyProxy((host, port), delay)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
