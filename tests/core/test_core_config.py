"""Settings come from the environment alone, and a bad value is named and rejected."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from idis.integrations.config import Secret, Settings
from idis.integrations.exceptions import ConfigError, UnknownProviderError

BASE = {
    "IDIS_PROVIDERS": "crm,enrich",
    "IDIS_PROVIDER_CRM_KIND": "crm",
    "IDIS_PROVIDER_CRM_BASE_URL": "https://crm.example.com/api/",
    "IDIS_PROVIDER_ENRICH_KIND": "enrichment",
    "IDIS_PROVIDER_ENRICH_BASE_URL": "https://enrich.example.com",
}


def test_embedded_defaults_when_nothing_is_declared() -> None:
    """With no provider declared, the three simulator-backed providers are used."""
    settings = Settings.from_env({})

    assert settings.embedded_defaults
    assert ["crm_provider", "docs_provider", "enrichment_provider"] == sorted(settings.providers)
    assert "http://127.0.0.1:8765/p/crm_provider" == settings.provider("crm_provider").base_url


def test_rb09_switches_and_their_defaults() -> None:
    """CRM_MODE, CRM_POLL_INTERVAL and ENRICHMENT_DEFER_ON_ERROR parse; unset restores defaults."""
    pinned = Settings.from_env(
        {"CRM_MODE": "polling", "CRM_POLL_INTERVAL": "5m", "ENRICHMENT_DEFER_ON_ERROR": "true"}
    )
    default = Settings.from_env({})

    assert ("polling", timedelta(minutes=5), True) == (
        pinned.sync.crm_mode,
        pinned.sync.crm_poll_interval,
        pinned.enrichment.defer_on_error,
    )
    assert ("webhook", timedelta(minutes=5), False) == (
        default.sync.crm_mode,
        default.sync.crm_poll_interval,
        default.enrichment.defer_on_error,
    )


def test_providers_from_environment() -> None:
    """Per-provider variables fill the provider's policies."""
    env = {
        **BASE,
        "IDIS_PROVIDER_CRM_ENDPOINTS": "records=/records,record=/records/{id}",
        "IDIS_PROVIDER_CRM_TIMEOUT": "2s",
        "IDIS_PROVIDER_CRM_DEADLINE": "1m",
        "IDIS_PROVIDER_CRM_RETRY_MAX_ATTEMPTS": "4",
        "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE": "0.4",
        "IDIS_PROVIDER_CRM_BREAKER_PER_ENDPOINT": "yes",
        "IDIS_PROVIDER_CRM_RATE_LIMIT": "600/m",
        "IDIS_PROVIDER_CRM_CLIENT_SECRET": "s3cr3t-value",
        "IDIS_PROVIDER_CRM_REPLAY_RETENTION": "3d",
        "IDIS_PROVIDER_ENRICH_FALLBACKS": "crm",
    }
    crm = Settings.from_env(env).provider("crm")

    assert "https://crm.example.com/api" == crm.base_url
    assert {"records": "/records", "record": "/records/{id}"} == dict(crm.endpoints)
    assert (2.0, 60.0) == (crm.timeouts.read, crm.timeouts.deadline)
    assert 4 == crm.retry.max_attempts
    assert (0.4, True) == (crm.breaker.failure_rate, crm.breaker.per_endpoint)
    assert 10.0 == crm.rate_limit.rate
    assert Secret("s3cr3t-value") == crm.auth.client_secret
    assert timedelta(days=3) == crm.replay_retention


def test_providers_from_toml_file(tmp_path: Path) -> None:
    """A TOML file named by IDIS_CONFIG_FILE declares providers; env vars override it."""
    path = tmp_path / "idis.toml"
    path.write_text(
        """
[idis]
database_url = "sqlite:///from-file.db"

[providers.crm]
kind = "crm"
base_url = "https://crm.example.com"
endpoints = { records = "/records" }

[providers.crm.breaker]
failure_threshold = 3

[sync]
crm_poll_interval = "30s"
"""
    )
    settings = Settings.from_env(
        {"IDIS_CONFIG_FILE": str(path), "IDIS_PROVIDER_CRM_BREAKER_FAILURE_THRESHOLD": "7"}
    )

    assert "sqlite:///from-file.db" == settings.database_url
    assert 7 == settings.provider("crm").breaker.failure_threshold
    assert timedelta(seconds=30) == settings.sync.crm_poll_interval


@pytest.mark.parametrize(
    ("env", "variable", "value"),
    [
        ({"CRM_MODE": "pull"}, "CRM_MODE", "pull"),
        ({"CRM_POLL_INTERVAL": "5 parsecs"}, "CRM_POLL_INTERVAL", "5 parsecs"),
        ({"CRM_POLL_INTERVAL": "0s"}, "CRM_POLL_INTERVAL", "0s"),
        ({"ENRICHMENT_DEFER_ON_ERROR": "maybe"}, "ENRICHMENT_DEFER_ON_ERROR", "maybe"),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BASE_URL": "ftp://x"},
            "IDIS_PROVIDER_CRM_BASE_URL",
            "ftp://x",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BASE_URL": "not a url"},
            "IDIS_PROVIDER_CRM_BASE_URL",
            "not a url",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_MAX_CONCURRENCY": "-1"},
            "IDIS_PROVIDER_CRM_MAX_CONCURRENCY",
            "-1",
        ),
        ({**BASE, "IDIS_PROVIDER_CRM_TIMEOUT": "-5s"}, "IDIS_PROVIDER_CRM_TIMEOUT", "-5s"),
        ({**BASE, "IDIS_PROVIDER_CRM_KIND": "erp"}, "IDIS_PROVIDER_CRM_KIND", "erp"),
        (
            {**BASE, "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE": "1.5"},
            "IDIS_PROVIDER_CRM_BREAKER_FAILURE_RATE",
            "1.5",
        ),
        (
            {**BASE, "IDIS_PROVIDER_CRM_RATE_LIMIT": "10/fortnight"},
            "IDIS_PROVIDER_CRM_RATE_LIMIT",
            "10/fortnight",
        ),
        ({**BASE, "IDIS_PROVIDER_CRM_TIMEOUTT": "1s"}, "IDIS_PROVIDER_CRM_TIMEOUTT", "TIMEOUTT"),
        ({**BASE, "IDIS_PROVIDER_ERP_KIND": "crm"}, "IDIS_PROVIDER_ERP_KIND", "ERP"),
        ({"IDIS_DATABASE_URL": "mysql://db/x"}, "IDIS_DATABASE_URL", "mysql://db/x"),
        ({"IDIS_REDIS_URL": "http://x"}, "IDIS_REDIS_URL", "http://x"),
        ({"IDIS_LOG_FORMAT": "xml"}, "IDIS_LOG_FORMAT", "xml"),
        ({"IDIS_OUTBOX_MAX_RETRIES": "ten"}, "IDIS_OUTBOX_MAX_RETRIES", "ten"),
        ({"IDIS_PROVIDERS": "Bad-Name"}, "IDIS_PROVIDERS", "Bad-Name"),
        ({"IDIS_CONFIG_FILE": "/nonexistent/idis.toml"}, "IDIS_CONFIG_FILE", "/nonexistent"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(
    env: dict[str, str], variable: str, value: str
) -> None:
    """Each bad value fails at start with an error naming the variable and the value."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)

    assert variable in str(info.value)
    assert value in str(info.value)


def test_missing_required_field_names_the_variable() -> None:
    """A declared provider without a base URL says which variable to set."""
    env = {"IDIS_PROVIDERS": "crm", "IDIS_PROVIDER_CRM_KIND": "crm"}

    with pytest.raises(ConfigError, match="IDIS_PROVIDER_CRM_BASE_URL"):
        Settings.from_env(env)


def test_unknown_provider_lists_the_known_ones() -> None:
    """Asking for an undeclared provider names it and lists the declared ones."""
    settings = Settings.from_env(BASE)

    with pytest.raises(UnknownProviderError) as info:
        settings.provider("crm_provider")

    assert "'crm_provider'" in str(info.value)
    assert "crm, enrich" in str(info.value)


def test_unknown_fallback_provider_is_rejected() -> None:
    """A fallback naming an undeclared provider fails at start."""
    with pytest.raises(UnknownProviderError, match="'nope'"):
        Settings.from_env({**BASE, "IDIS_PROVIDER_CRM_FALLBACKS": "nope"})


def test_bad_encryption_key_is_named_without_echoing_it() -> None:
    """An invalid Fernet key is reported by position; the key itself never appears."""
    key = "definitely-not-a-fernet-key-but-secret"

    with pytest.raises(ConfigError) as info:
        Settings.from_env({"IDIS_ENCRYPTION_KEYS": key})

    assert "IDIS_ENCRYPTION_KEYS" in str(info.value)
    assert key not in str(info.value)


def test_secret_never_renders() -> None:
    """A Secret's repr, str and the settings' repr never show its value."""
    settings = Settings.from_env({**BASE, "IDIS_PROVIDER_CRM_CLIENT_SECRET": "topsecret-123"})

    assert "topsecret-123" not in repr(settings)
    assert "topsecret-123" not in str(settings.provider("crm").auth.client_secret)
    assert "topsecret-123" == settings.provider("crm").auth.client_secret.get_secret_value()  # type: ignore[union-attr]
