"""The example service's own pieces that need no server: settings, event mapping, push keys."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from examples.integrations_service.config import ServiceSettings
from examples.integrations_service.delivery import idempotency_key, parse_idempotency_key
from examples.integrations_service.handlers import deal_fields
from tests.examples.conftest import API_TOKENS

from idis.integrations.exceptions import ConfigError


def test_service_settings_default_and_read_the_environment() -> None:
    """Unset variables give the defaults; set ones are parsed (durations like 250ms)."""
    default = ServiceSettings.from_env({"IDIS_SERVICE_AUTH": "off"})
    custom = ServiceSettings.from_env(
        {
            "IDIS_SERVICE_API_TOKENS": API_TOKENS,
            "IDIS_SERVICE_HOST": "0.0.0.0",
            "IDIS_SERVICE_PORT": "9000",
            "IDIS_SERVICE_SAMPLE_INTERVAL": "1m",
        }
    )

    assert ("127.0.0.1", 8000, timedelta(seconds=15)) == (
        default.host,
        default.port,
        default.sample_interval,
    )
    assert ("0.0.0.0", 9000, timedelta(minutes=1)) == (
        custom.host,
        custom.port,
        custom.sample_interval,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IDIS_SERVICE_PORT", "http"),
        ("IDIS_SERVICE_PORT", "70000"),
        ("IDIS_SERVICE_HOST", " "),
        ("IDIS_SERVICE_SAMPLE_INTERVAL", "often"),
        ("IDIS_SERVICE_SAMPLE_INTERVAL", "0s"),
    ],
)
def test_a_bad_service_variable_is_refused_naming_it(variable: str, value: str) -> None:
    """A bad value raises ConfigError naming the variable."""
    with pytest.raises(ConfigError) as caught:
        ServiceSettings.from_env({"IDIS_SERVICE_API_TOKENS": API_TOKENS, variable: value})

    assert variable == caught.value.variable
    assert variable in str(caught.value)


def test_deal_fields_keep_only_well_formed_values() -> None:
    """Missing or mistyped fields are left out, so an update keeps the row's value."""
    assert {"name": "Acme", "stage": "won", "amount": 12} == deal_fields(
        {"name": "Acme", "stage": "won", "amount": 12.7, "change": 3}
    )
    assert {} == deal_fields({"name": " ", "stage": 5, "amount": True})


def test_push_keys_round_trip_and_ignore_other_messages() -> None:
    """deal-<id>-r<revision> parses back, ids with dashes included; other keys are None."""
    assert ("deal-7", 3) == parse_idempotency_key(idempotency_key("deal-7", 3))
    assert parse_idempotency_key("evt_42") is None


def test_without_api_tokens_the_service_refuses_to_start() -> None:
    """No IDIS_SERVICE_API_TOKENS (and no explicit opt-out): ConfigError naming what to set."""
    with pytest.raises(ConfigError) as caught:
        ServiceSettings.from_env({})

    assert "IDIS_SERVICE_API_TOKENS" == caught.value.variable
    assert "IDIS_SERVICE_AUTH=off" in str(caught.value)


def test_auth_off_is_for_loopback_addresses_only() -> None:
    """IDIS_SERVICE_AUTH=off with a public listen address is refused."""
    local = ServiceSettings.from_env({"IDIS_SERVICE_AUTH": "off"})
    with pytest.raises(ConfigError) as caught:
        ServiceSettings.from_env({"IDIS_SERVICE_AUTH": "off", "IDIS_SERVICE_HOST": "0.0.0.0"})

    assert "off" == local.auth
    assert "IDIS_SERVICE_AUTH" == caught.value.variable


@pytest.mark.parametrize(
    "entries",
    [
        [{"token": "short-secret", "subject": "a", "tenants": ["t1"]}],
        [{"token": "long-enough-secret-0123456789", "subject": "", "tenants": ["t1"]}],
        [{"token": "long-enough-secret-0123456789", "subject": "a", "tenants": "t1"}],
        [{"token": "long-enough-secret-0123456789", "subject": "a", "tenants": [], "roles": ["x"]}],
        [{"token": "long-enough-secret-0123456789", "subject": "a", "tenants": [], "extra": 1}],
        [
            {"token": "long-enough-secret-0123456789", "subject": "a", "tenants": []},
            {"token": "long-enough-secret-0123456789", "subject": "b", "tenants": []},
        ],
        {"token": "long-enough-secret-0123456789"},
    ],
)
def test_bad_api_tokens_are_refused_without_quoting_a_token(entries: object) -> None:
    """Each malformed entry raises ConfigError naming the variable, never the token itself."""
    with pytest.raises(ConfigError) as caught:
        ServiceSettings.from_env({"IDIS_SERVICE_API_TOKENS": json.dumps(entries)})

    assert "IDIS_SERVICE_API_TOKENS" == caught.value.variable
    assert "-secret" not in str(caught.value)


def test_settings_keep_only_token_digests() -> None:
    """The settings' repr shows subjects and tenants, never a token."""
    settings = ServiceSettings.from_env({"IDIS_SERVICE_API_TOKENS": API_TOKENS})

    assert "test-operator-token" not in repr(settings)
    assert "oncall" in repr(settings)
    assert {"oncall", "analyst-t1", "prometheus"} == {
        t.principal.subject for t in settings.api_tokens
    }
