"""What a chain of answers means, against the real simulator, through both enricher faces.

A 404 "no match" is an answer, not an outage; a 503 (or a 429, a timeout, an
open breaker) is unavailability. A chain where no provider served is an outage
as soon as one provider was unavailable, whatever the others answered: the
subject is stale (deferred with a defect, or served from the cache), never
given up on. Only a chain where every provider answered without data raises
``ProviderRejected`` and records nothing (issue 15: a mixed chain treated as an
outage "only when all fail" used to pass every test).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from idis.integrations.exceptions import (
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    RateLimited,
)
from idis.integrations.simulator._app import enrichment_for

PRIMARY = "enrichment_provider"
FALLBACK = "backup_enrich"


def _answer(env: Any, provider: str, status: int) -> None:
    """Make ``provider``'s enrich endpoint answer ``status`` (200: healthy)."""
    if status == 429:
        env.sim.control.set_fault(provider, "rate_limit", endpoint="enrich", retry_after=30)
    elif status != 200:
        env.sim.control.set_fault(provider, "error", endpoint="enrich", status=status)


def _attempts(result: Any) -> list[tuple[str, str, str | None, bool]]:
    return [(a.provider, a.outcome, a.error_type, a.retryable) for a in result.attempts]


def _recorded(env: Any) -> tuple[int, int, list[tuple[str, bool]]]:
    """(open defects, pending requests, [(subject, stale)] of the cache)."""
    return (
        env.count(env.Defect, status="OPEN"),
        env.count(env.Request, status="pending"),
        [(row.subject_id, row.stale) for row in env.rows(env.Cache)],
    )


@pytest.mark.parametrize(
    ("primary", "fallback", "attempts"),
    [
        (
            404,
            503,
            [
                (PRIMARY, "failed", "client_error", False),
                (FALLBACK, "failed", "server_error", True),
            ],
        ),
        (
            503,
            404,
            [
                (PRIMARY, "failed", "server_error", True),
                (FALLBACK, "failed", "client_error", False),
            ],
        ),
        (
            503,
            500,
            [
                (PRIMARY, "failed", "server_error", True),
                (FALLBACK, "failed", "server_error", True),
            ],
        ),
    ],
    ids=["primary-404-fallback-503", "primary-503-fallback-404", "all-5xx"],
)
def test_a_chain_with_an_unavailable_provider_is_deferred(
    env: Any, mode: str, primary: int, fallback: int, attempts: list[Any]
) -> None:
    """No provider served and one was unavailable: deferred, stale, one defect and request."""
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    _answer(env, PRIMARY, primary)
    _answer(env, FALLBACK, fallback)

    result = env.enricher(settings, mode).enrich("claim-m", tenant_id="t1")

    assert ("deferred", True, True, None) == (
        result.status,
        result.stale,
        result.deferred,
        result.data,
    )
    assert attempts == _attempts(result)
    assert (1, 1, [("claim-m", True)]) == _recorded(env)
    assert [(PRIMARY, "claim-m", "OPEN")] == [
        (d.provider, d.subject_id, d.status) for d in env.rows(env.Defect)
    ]


@pytest.mark.parametrize(
    ("primary", "fallback", "raised", "status_code"),
    [
        (404, 503, ProviderUnavailable, 503),
        (503, 404, ProviderUnavailable, 503),
        (503, 500, ProviderUnavailable, 503),
    ],
    ids=["primary-404-fallback-503", "primary-503-fallback-404", "all-5xx"],
)
def test_without_deferral_an_outage_raises_unavailability_not_no_match(
    env: Any, mode: str, primary: int, fallback: int, raised: type, status_code: int
) -> None:
    """Deferral off: the first unavailability is raised (never a 404 "no match"), stale recorded."""
    settings = env.settings(
        enrichment=replace(env.FAST, defer_on_error=False), fallbacks={PRIMARY: (FALLBACK,)}
    )
    _answer(env, PRIMARY, primary)
    _answer(env, FALLBACK, fallback)

    with pytest.raises(ProviderError) as caught:
        env.enricher(settings, mode).enrich("claim-m", tenant_id="t1")

    assert (raised, status_code) == (type(caught.value), caught.value.status_code)
    assert (0, 0, [("claim-m", True)]) == _recorded(env)
    # A chain with an unavailable provider does not know: no "no match" is remembered.
    assert env.rows(env.Cache)[0].no_match_at is None


def test_every_provider_answering_no_match_raises_and_records_only_the_answer(
    env: Any, mode: str
) -> None:
    """All 404: the primary's ProviderRejected, even with deferral on; nothing stale, no defect.

    The only row written remembers the answer (``no_match_at``), not stale.
    """
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    _answer(env, PRIMARY, 404)
    _answer(env, FALLBACK, 404)

    with pytest.raises(ProviderRejected) as caught:
        env.enricher(settings, mode).enrich("claim-n", tenant_id="t1")

    assert (PRIMARY, 404) == (caught.value.provider, caught.value.status_code)
    assert (0, 0, [("claim-n", False)]) == _recorded(env)
    assert env.rows(env.Cache)[0].no_match_at is not None


def test_a_rate_limited_primary_falls_back_to_a_healthy_provider(env: Any, mode: str) -> None:
    """Primary 429, fallback 200: served from the fallback, fresh; nothing stale, no defect."""
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    _answer(env, PRIMARY, 429)
    enricher = env.enricher(settings, mode)

    first = enricher.enrich("claim-r", tenant_id="t1")
    # The 429's pause holds: the primary is skipped without a call, the fallback serves again.
    second = enricher.enrich("claim-s", tenant_id="t1")

    assert ("served_from_fallback", FALLBACK, False) == (first.status, first.provider, first.stale)
    assert enrichment_for("claim-r") == first.data
    assert [
        (PRIMARY, "failed", RateLimited.error_type, True),
        (FALLBACK, "served", None, True),
    ] == _attempts(first)
    assert [(PRIMARY, "skipped"), (FALLBACK, "served")] == [
        (a.provider, a.outcome) for a in second.attempts
    ]
    assert (0, 0, [("claim-r", False), ("claim-s", False)]) == _recorded(env)
    assert 1 == env.sim.control.stats(PRIMARY)["requests"]["enrich"]


def test_a_mixed_chain_serves_the_cached_copy_and_defers(env: Any, mode: str) -> None:
    """Primary 404 + fallback 503 with a cached copy: cached_stale, deferred, one defect."""
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    enricher = env.enricher(settings, mode)
    fresh = enricher.enrich("claim-c", tenant_id="t1")
    _answer(env, PRIMARY, 404)
    _answer(env, FALLBACK, 503)

    result = enricher.enrich("claim-c", tenant_id="t1")

    assert "enriched" == fresh.status
    assert ("cached_stale", True, fresh.data) == (result.status, result.deferred, result.data)
    assert (1, 1, [("claim-c", True)]) == _recorded(env)


def test_without_deferral_a_skipped_primary_raises_circuit_open(env: Any, mode: str) -> None:
    """Deferral off, breaker open: the primary is not called and CircuitOpen names it."""
    settings = env.settings(enrichment=replace(env.FAST, defer_on_error=False))
    env.outage(PRIMARY)
    enricher = env.enricher(settings, mode)
    raised = []
    for i in range(6):  # the 5th failure opens the breaker
        with pytest.raises(ProviderError) as caught:
            enricher.enrich(f"claim-{i}", tenant_id="t1")
        raised.append(type(caught.value).__name__)

    assert ["ProviderUnavailable"] * 5 + ["CircuitOpen"] == raised
    assert PRIMARY == caught.value.provider
    assert 5 == env.sim.control.stats(PRIMARY)["requests"]["enrich"]


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]"], ids=["not-json", "json-array"])
def test_a_malformed_answer_is_unavailability(env: Any, mode: str, body: bytes) -> None:
    """A 2xx whose body is not an object is the provider's fault: deferred like a 503."""
    from idis.integrations._http import httpx
    from idis.integrations.enrichment import AsyncEnricher, Enricher
    from idis.integrations.resilience import AsyncGateway, Gateway

    settings = env.settings()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    # An HTTP edge case the simulator does not play (a JSON array), hence a MockTransport.
    if mode == "sync":
        gateway = Gateway(settings, transport=httpx.MockTransport(handler), clock=env.clock)
        with Enricher(settings, gateway, engine=env.engine, clock=env.clock) as enricher:
            result = enricher.enrich("claim-x", tenant_id="t1")
        gateway.close()
    else:

        async def enrich() -> Any:
            gateway = AsyncGateway(settings, transport=httpx.MockTransport(handler))
            async with AsyncEnricher(settings, gateway, engine=env.async_engine) as enricher:
                answer = await enricher.enrich("claim-x", tenant_id="t1")
            await gateway.aclose()
            return answer

        result = env.run(enrich())

    assert "deferred" == result.status
    assert [(PRIMARY, "failed", "malformed_response", True)] == _attempts(result)


@pytest.mark.parametrize(
    ("subject_id", "tenant_id", "named"),
    [
        (" claim", "t1", "subject_id=' claim'"),
        ("claim", "", "tenant_id=''"),
        ("c" * 256, "t", "at most 255 characters"),
    ],
)
def test_a_bad_id_is_refused_before_any_call(
    env: Any, mode: str, subject_id: str, tenant_id: str, named: str
) -> None:
    """A blank, padded or oversized id raises UsageError naming it; nothing is called or stored."""
    from idis.integrations.exceptions import UsageError

    settings = env.settings()

    with pytest.raises(UsageError, match=named):
        env.enricher(settings, mode).enrich(subject_id, tenant_id=tenant_id)

    assert 0 == env.sim.control.stats(PRIMARY)["requests"].get("enrich", 0)
    assert (0, 0, []) == _recorded(env)


def test_a_face_built_from_settings_alone_closes_what_it_built(env: Any, mode: str) -> None:
    """Without a gateway or engine the face builds both (OAuth included) and closes them."""
    from idis.integrations.enrichment import AsyncEnricher, Enricher

    settings = env.settings()
    if mode == "sync":
        with Enricher(settings) as enricher:
            result = enricher.enrich("claim-b", tenant_id="t1")
            chosen = enricher.settings
        enricher.close()  # a second close is harmless
    else:

        async def enrich() -> Any:
            async with AsyncEnricher(settings) as enricher:
                answer = await enricher.enrich("claim-b", tenant_id="t1")
                assert settings is enricher.settings
            await enricher.aclose()
            return answer

        result = env.run(enrich())
        chosen = settings

    assert ("enriched", enrichment_for("claim-b")) == (result.status, result.data)
    assert settings is chosen
    assert [("claim-b", False)] == [(r.subject_id, r.stale) for r in env.rows(env.Cache)]
