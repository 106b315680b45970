"""`idis-integrations providers`: every pack, what it supports, who uses it; no secret shown."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from idis.integrations.cli import main

TOKEN = "pat-na1-secret-value-42"  # test value


def test_lists_every_pack_and_which_provider_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "IDIS_PROVIDERS": "crm,legacy",
        "IDIS_PROVIDER_CRM_KIND": "crm",
        "IDIS_PROVIDER_CRM_BASE_URL": "https://api.hubapi.com",
        "IDIS_PROVIDER_CRM_API": "hubspot",
        "IDIS_PROVIDER_CRM_API_TOKEN": TOKEN,
        "IDIS_PROVIDER_LEGACY_KIND": "crm",
        "IDIS_PROVIDER_LEGACY_BASE_URL": "http://127.0.0.1:9",
    }.items():
        monkeypatch.setenv(key, value)

    text = CliRunner().invoke(main, ["providers"])
    raw = CliRunner().invoke(main, ["providers", "--json"])

    assert 0 == text.exit_code, text.output
    assert "hubspot: HubSpot CRM deals" in text.output
    assert "X-HubSpot-Signature-v3" in text.output
    assert "salesforce:" in text.output
    parsed = json.loads(raw.output)
    assert {"crm": "hubspot", "legacy": "generic"} == parsed["providers"]
    assert {"generic", "hubspot", "salesforce"} <= {p["name"] for p in parsed["packs"]}
    assert TOKEN not in text.output + raw.output


def test_an_unknown_pack_is_a_usage_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDIS_PROVIDERS", "crm")
    monkeypatch.setenv("IDIS_PROVIDER_CRM_KIND", "crm")
    monkeypatch.setenv("IDIS_PROVIDER_CRM_BASE_URL", "https://example.com")
    monkeypatch.setenv("IDIS_PROVIDER_CRM_API", "pipedrive")

    result = CliRunner().invoke(main, ["providers"])

    assert 0 != result.exit_code
    assert "IDIS_PROVIDER_CRM_API='pipedrive'" in result.output
