"""The People Data Labs pack through the enrichment chain, against the simulator's PDL dialect."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx
import pytest
from tests.enrichment import conftest as _enrichment

from idis.integrations.config import Secret, Settings
from idis.integrations.exceptions import ProviderRejected, QuotaExhausted
from idis.integrations.providers import client_for
from idis.integrations.providers._pack import pack_auth
from idis.integrations.providers._pdl import read_rate_limit
from idis.integrations.resilience import Gateway

# The enrichment tests' fixtures (database, simulator, manual clock), shared.
env, mode, sim, simulator = (
    _enrichment.env,
    _enrichment.mode,
    _enrichment.sim,
    _enrichment.simulator,
)

PDL = "enrichment_provider"
FALLBACK = "backup_enrich"


def _settings(env: Any, *, fallback: bool) -> Settings:
    settings = env.settings(fallbacks={PDL: (FALLBACK,)} if fallback else None)
    provider = settings.provider(PDL)
    return settings.with_providers(
        replace(
            provider,
            api="pdl",
            api_token=Secret("pdl-key-123"),
            # No ENDPOINTS entry for enrich: the pack's own path is used.
            endpoints={k: v for k, v in provider.endpoints.items() if k != "enrich"},
        )
    )


def _control(env: Any, **body: Any) -> None:
    answer = httpx.post(f"{env.sim.url}/p/{PDL}/v5/_control", json=body, trust_env=False)
    assert 204 == answer.status_code


@pytest.fixture(autouse=True)
def _credits_restored(env: Any) -> Any:
    _control(env, credits=None)  # the simulator outlives a test
    yield
    _control(env, credits=None)


def _enrich(env: Any, settings: Settings, subject: str) -> Any:
    from idis.integrations.enrichment import Enricher

    gateway = env.gateway(settings)
    with Enricher(settings, gateway, engine=env.engine, clock=env.clock) as enricher:
        return enricher.enrich(subject, tenant_id="t1")


def test_a_match_is_served_from_pdl_with_the_api_key(env: Any) -> None:
    env.sim.control.emit(PDL, 1, record_ids=["person_1"], webhook=False)
    settings = _settings(env, fallback=True)
    result = _enrich(env, settings, "person_1")

    assert ("enriched", PDL) == (result.status, result.provider)
    assert "person_1" == result.data["id"]


def test_no_match_is_an_answer_no_breaker_count_no_defect(env: Any) -> None:
    """404 not_found: raised as the answer, never deferred, never a defect, breaker untouched."""
    settings = _settings(env, fallback=False)
    settings = settings.with_providers(replace(settings.provider(PDL), fallbacks=()))
    for _ in range(8):  # more than the breaker's threshold
        with pytest.raises(ProviderRejected) as caught:
            _enrich(env, settings, "nobody")

    assert 404 == caught.value.status_code
    assert (0, 0) == (env.count(env.Defect), env.count(env.Request))
    assert env.gateway(settings).available(PDL)


@pytest.mark.parametrize("refusal", ["credits", "rate_limit"])
def test_402_and_429_are_unavailability_fallback_then_stale_and_deferred(
    env: Any, refusal: str
) -> None:
    env.sim.control.emit(PDL, 2, record_ids=["person_1", "person_2"], webhook=False)
    settings = _settings(env, fallback=True)
    fresh = _enrich(env, _settings(env, fallback=False), "person_1")
    if refusal == "credits":
        _control(env, credits=0)
    else:
        env.sim.control.set_fault(PDL, "rate_limit", endpoint="enrich")
    served = _enrich(env, settings, "person_2")
    alone = settings.with_providers(replace(settings.provider(PDL), fallbacks=()))
    stale = _enrich(env, alone, "person_1")

    assert "enriched" == fresh.status
    assert ("served_from_fallback", FALLBACK) == (served.status, served.provider)
    assert ("cached_stale", True, True) == (stale.status, stale.stale, stale.deferred)
    defects = env.rows(env.Defect)
    assert [("person_1", "OPEN")] == [(d.subject_id, d.status) for d in defects]
    assert "STALE" in defects[0].defect_type.upper()


def test_the_client_reads_no_match_credits_and_limits(
    env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    env.sim.control.emit(PDL, 1, record_ids=["person_1"], webhook=False)
    settings = _settings(env, fallback=False)
    _control(env, credits=2)
    gateway = Gateway(settings, auth=pack_auth())
    try:
        client = client_for(gateway, PDL)
        found = client.enrich("person_1")
        remaining = client.rate_limit
        missing = client.enrich("nobody")
        client.enrich("person_1")
        spent_reading = client.rate_limit
        with pytest.raises(QuotaExhausted) as spent:
            client.enrich("person_1")
    finally:
        gateway.close()

    assert found is not None
    assert remaining is not None
    assert (99, 100) == (remaining.remaining, remaining.limit)
    assert missing is None
    assert spent_reading is not None
    assert spent_reading.exhausted
    assert "pdl-key-123" not in str(spent.value)
    logged = capsys.readouterr()
    assert "HTTP 402" in logged.out + logged.err  # the refusal was logged...
    assert "pdl-key-123" not in logged.out + logged.err  # ...without the key
    assert read_rate_limit(402, {}, None).exhausted  # type: ignore[union-attr]


def test_endpoints_may_send_the_subject_as_an_email(env: Any) -> None:
    env.sim.control.emit(PDL, 1, record_ids=["ada@example.com"], webhook=False)
    base = _settings(env, fallback=False)
    provider = base.provider(PDL)
    settings = base.with_providers(
        replace(provider, endpoints={"enrich": "/v5/person/enrich?email={id}"})
    )
    gateway = Gateway(settings, auth=pack_auth())
    try:
        found = client_for(gateway, PDL).enrich("ada@example.com")
    finally:
        gateway.close()

    assert found is not None
    assert "ada@example.com" == found["id"]


def test_nested_error_bodies_reach_the_details() -> None:
    """Google's and PDL's ``{"error": {...}}`` bodies: their fields (scalars only) are read."""
    from idis.integrations.resilience._errors import rejection_details

    google = rejection_details(
        b'{"error": {"code": 403, "message": "m", "errors": [{"reason": "userRateLimitExceeded"}]}}'
    )
    pdl = rejection_details(b'{"status": 402, "error": {"type": "payment_required", "x": [1]}}')

    assert google is not None
    assert (403, "userRateLimitExceeded") == (google["code"], google["reason"])
    assert {"status": 402, "type": "payment_required"} == pdl
