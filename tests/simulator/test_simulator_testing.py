"""The public test helpers: run_simulator() and simulator_settings()."""

from __future__ import annotations

import threading

import pytest

from idis.integrations._http import httpx
from idis.integrations.config import RetryPolicy
from idis.integrations.exceptions import ConfigError, UsageError
from idis.integrations.testing import run_simulator, simulator_settings


def test_run_simulator_serves_on_real_time_and_leaves_no_thread() -> None:
    """run_simulator() serves on 127.0.0.1, and after the block no server thread remains."""
    before = set(threading.enumerate())
    with run_simulator() as running:
        health = httpx.get(running.provider_url("crm_provider") + "/health")
        assert running.url.startswith("http://127.0.0.1:")
        assert 200 == health.status_code

    assert set() == set(threading.enumerate()) - before


def test_run_simulator_uses_the_port_given() -> None:
    """An explicit port is the one served, and a busy port is a clear error."""
    with run_simulator() as first:
        port = first.port
        busy = run_simulator(port=port)
        with pytest.raises(UsageError, match=str(port)):
            busy.__enter__()
    with run_simulator(port=port) as second:
        assert port == second.port


def test_exit_does_not_wait_for_a_hanging_request() -> None:
    """Leaving the block releases a hanging request, so shutdown does not wait out the hang."""
    results: list[int] = []
    with run_simulator() as running:
        running.control.set_fault("crm_provider", "timeout", seconds=600)

        def call() -> None:
            results.append(
                httpx.get(running.url + "/p/crm_provider/health", timeout=60).status_code
            )

        worker = threading.Thread(target=call)
        worker.start()
        while not running.control.stats("crm_provider")["requests"]:
            pass
    worker.join(30)

    assert not worker.is_alive()


def test_simulator_settings_point_providers_at_the_simulator() -> None:
    """simulator_settings builds the three providers on the URL with their kinds."""
    settings = simulator_settings("http://127.0.0.1:9999/", database_url="sqlite:///x.db")

    assert {
        "crm_provider": "crm",
        "docs_provider": "docs",
        "enrichment_provider": "enrichment",
    } == {name: p.kind for name, p in settings.providers.items()}
    assert "http://127.0.0.1:9999/p/docs_provider" == settings.provider("docs_provider").base_url
    assert ("sqlite:///x.db", False) == (settings.database_url, settings.embedded_defaults)
    assert "/records/{id}" == settings.provider("crm_provider").endpoint_path("record")


def test_simulator_settings_apply_provider_overrides_to_every_provider() -> None:
    """A ProviderSettings field override applies to each provider."""
    retry = RetryPolicy(max_attempts=1)

    settings = simulator_settings("http://127.0.0.1:1", providers=("a_crm", "b_docs"), retry=retry)

    assert {"a_crm": retry, "b_docs": retry} == {n: p.retry for n, p in settings.providers.items()}


def test_simulator_settings_reject_an_unknown_override() -> None:
    """An override that is no settings field raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="retires"):
        simulator_settings("http://127.0.0.1:1", retires=3)


def test_simulator_settings_work_against_a_running_simulator(sim) -> None:
    """The settings' base URL and token URL reach the running simulator."""
    settings = simulator_settings(sim.url)
    provider = settings.provider("crm_provider")
    assert provider.auth.client_secret is not None

    token = httpx.post(
        provider.base_url + provider.auth.token_url,
        data={"grant_type": "client_credentials"},
        auth=(provider.auth.client_id, provider.auth.client_secret.get_secret_value()),
    )
    records = httpx.get(provider.base_url + provider.endpoint_path("records"))

    assert (200, 200) == (token.status_code, records.status_code)
