"""Fixtures for the example service's tests: a real simulator, the service served by uvicorn.

The service is configured the way it is in production: from environment
variables only (``create_app()`` reads ``os.environ``), with the providers
declared explicitly so that timeouts, backoffs and the breaker reset are short.
It is served by uvicorn on 127.0.0.1 in a thread, so the simulator can POST
its webhooks to it, and the RB-09 scripts run as subprocesses from
``examples/`` against the same database.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from sqlalchemy import Engine

from idis.integrations._http import httpx
from idis.integrations.db._engine import create_db_engine
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.testing import RunningSimulator, run_simulator, serve_asgi

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLIENT_ID = "idis-local"
CLIENT_SECRET = "local-simulator-secret"  # the simulator's public default client
CRM = "crm_provider"
ENRICH = "enrichment_provider"
ENDPOINTS = (
    "records=/records,record=/records/{id},changes=/changes,replay=/replay,"
    "enrich=/enrich/{id},webhooks=/webhooks/inbound"
)

#: Bearer tokens the service accepts in these tests (IDIS_SERVICE_API_TOKENS).
OPERATOR_TOKEN = "test-operator-token-0123456789abcdef"
TENANT_T1_TOKEN = "test-tenant-t1-token-0123456789abcdef"
METRICS_TOKEN = "test-metrics-token-0123456789abcdef"
API_TOKENS = json.dumps(
    [
        {"token": OPERATOR_TOKEN, "subject": "oncall", "tenants": "*", "roles": ["operator"]},
        {"token": TENANT_T1_TOKEN, "subject": "analyst-t1", "tenants": ["t1"]},
        {"token": METRICS_TOKEN, "subject": "prometheus", "tenants": [], "roles": ["metrics"]},
    ]
)

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 15.0) -> T:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last: {value!r}")
        time.sleep(0.05)


def service_env(sim: RunningSimulator, database_url: str, **extra: str) -> dict[str, str]:
    """The service's environment: providers on ``sim`` with short policies, fast loops."""
    env = {
        "IDIS_DATABASE_URL": database_url,
        "IDIS_SIMULATOR_URL": sim.url,
        "IDIS_PROVIDERS": f"{CRM},{ENRICH}",
        "IDIS_OUTBOX_POLL_INTERVAL": "100ms",
        "IDIS_OUTBOX_BACKOFF": "100ms",
        "IDIS_OUTBOX_MAX_BACKOFF": "1s",
        "IDIS_ENRICHMENT_POLL_INTERVAL": "100ms",
        "IDIS_ENRICHMENT_BATCH_INTERVAL": "50ms",
        "IDIS_ENRICHMENT_RETRY_BACKOFF": "100ms",
        "IDIS_ENRICHMENT_RETRY_MAX_BACKOFF": "500ms",
        "IDIS_SERVICE_SAMPLE_INTERVAL": "200ms",
        # The providers verify with the simulator's published webhook secret: opt in.
        "IDIS_ALLOW_EMBEDDED_DEFAULTS": "true",
        "IDIS_SERVICE_API_TOKENS": API_TOKENS,
    }
    for name, kind in ((CRM, "crm"), (ENRICH, "enrichment")):
        prefix = f"IDIS_PROVIDER_{name.upper()}_"
        env.update(
            {
                prefix + "KIND": kind,
                prefix + "BASE_URL": sim.provider_url(name),
                prefix + "ENDPOINTS": ENDPOINTS,
                prefix + "HEALTH_ENDPOINT": "/health",
                prefix + "WEBHOOK_SECRETS": DEFAULT_WEBHOOK_SECRET,
                prefix + "AUTH_GRANT": "client_credentials",
                prefix + "CLIENT_ID": CLIENT_ID,
                prefix + "CLIENT_SECRET": CLIENT_SECRET,
                prefix + "ROTATION_URL": "/oauth/rotate",
                prefix + "CONNECT_TIMEOUT": "1s",
                prefix + "TIMEOUT": "2s",
                prefix + "DEADLINE": "5s",
                prefix + "RETRY_BACKOFF": "10ms",
                prefix + "RETRY_MAX_BACKOFF": "50ms",
                prefix + "BREAKER_RESET_TIMEOUT": "1s",
            }
        )
    env.update(extra)
    return env


@dataclass
class RunningService:
    """The example service served on 127.0.0.1."""

    url: str
    client: httpx.Client
    database_url: str
    logs: io.StringIO

    def get(self, path: str, **kw: Any) -> httpx.Response:
        """GET ``path`` on the service."""
        return self.client.get(path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        """POST ``body`` as JSON to ``path`` on the service."""
        return self.client.post(path, json=body, **kw)

    def deal(self, deal_id: str) -> dict[str, Any]:
        """The deal as the API shows it; ``{}`` when it does not exist."""
        response = self.get(f"/deals/{deal_id}")
        return dict(response.json()) if response.status_code == 200 else {}

    def deal_status(self, deal_id: str) -> str | None:
        """The deal's ``crm_sync_status`` (None when the deal does not exist)."""
        return self.deal(deal_id).get("crm_sync_status")

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON log line the service wrote so far."""
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line.strip()]


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """A provider simulator on 127.0.0.1 for this test."""
    with run_simulator(seed=11) as running:
        yield running


@pytest.fixture
def start_service(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Any]:
    """``with start_service(env, **create_app_options) as svc:`` serves the app configured
    by exactly ``env``."""

    @contextmanager
    def start(env: dict[str, str], **app_options: Any) -> Iterator[RunningService]:
        from examples.integrations_service import create_app

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        logs = io.StringIO()
        app = create_app(log_stream=logs, **app_options)
        # lifespan="on": a start-up failure fails the test instead of serving without one.
        server = uvicorn.Server(
            uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, ws="none")
        )
        with (
            serve_asgi(app, name="example-service", server=server) as url,
            httpx.Client(
                base_url=url, timeout=30, headers={"authorization": f"Bearer {OPERATOR_TOKEN}"}
            ) as client,
        ):
            service = RunningService(url, client, env["IDIS_DATABASE_URL"], logs)
            health = client.get("/healthz")
            assert 200 == health.status_code, health.text
            yield service

    return start


@pytest.fixture
def service(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> Iterator[RunningService]:
    """The service on a SQLite file, with the simulator's CRM webhooks pointed at it."""
    with start_service(service_env(sim, sqlite_url)) as running:
        sim.control.set_webhook_target(
            CRM, f"{running.url}/webhooks/{CRM}", [DEFAULT_WEBHOOK_SECRET]
        )
        yield running


@pytest.fixture
def db(service: RunningService) -> Iterator[Engine]:
    """A sync engine on the service's database, for assertions."""
    engine = create_db_engine(service.database_url)
    yield engine
    engine.dispose()


def script_env(sim: RunningSimulator, database_url: str, **extra: str) -> dict[str, str]:
    """What an operator has in the service's container: the database, the simulator, handlers.

    The providers are the embedded defaults (``IDIS_SIMULATOR_URL``), which carry the same
    names, client and webhook secret as the service's.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    env.pop("ENRICHMENT_DEFER_ON_ERROR", None)
    env.update(
        {
            "IDIS_DATABASE_URL": database_url,
            "IDIS_SIMULATOR_URL": sim.url,
            # The scripts import the service's handlers (reconcile applies events with them).
            "IDIS_HANDLERS": "integrations_service.handlers:register",
            # verify-sync compares the service's deals (not the library's ledger) with the CRM.
            "IDIS_HOST_RECORDS": "integrations_service.host_records:deal_records",
            "PYTHONPATH": ".",
            "COLUMNS": "200",
        }
    )
    env.update(extra)
    return env


def run_script(
    command: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run an RB-09 command line as written, from ``examples/``."""
    import shlex

    argv = shlex.split(command)
    assert "python" == argv[0]
    return subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=EXAMPLES,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
