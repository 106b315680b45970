"""A "no match" (404/410 from every provider) is an answer: remembered, not asked again.

Within ``IDIS_ENRICHMENT_NO_MATCH_TTL`` the enricher answers the remembered
no-match itself (``ProviderRejected``, 404, ``details["cached"]``) without a
provider call, so a subject a provider does not know costs one call per TTL,
not one per page view. Nothing else is remembered: an invalid request (400),
a chain where one provider was unavailable, or a success (which clears it).
Both faces, against the real simulator; SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from idis.integrations.enrichment import NO_MATCH_RESOLUTION
from idis.integrations.exceptions import ProviderError, ProviderRejected
from idis.integrations.simulator._app import enrichment_for

PRIMARY = "enrichment_provider"
FALLBACK = "backup_enrich"


def _calls(env: Any, provider: str) -> int:
    return int(env.sim.control.stats(provider)["requests"].get("enrich", 0))


def _no_match(env: Any, provider: str, status: int = 404) -> None:
    env.sim.control.set_fault(provider, "error", endpoint="enrich", status=status)


def test_a_no_match_is_answered_from_the_cache_until_the_ttl_passes(env_db: Any, mode: str) -> None:
    env = env_db
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    _no_match(env, PRIMARY)
    _no_match(env, FALLBACK, 410)
    enricher = env.enricher(settings, mode)

    with pytest.raises(ProviderRejected) as first:
        enricher.enrich("person-x", tenant_id="t1")
    calls = (_calls(env, PRIMARY), _calls(env, FALLBACK))
    env.clock.advance(3600)
    with pytest.raises(ProviderRejected) as again:
        enricher.enrich("person-x", tenant_id="t1")

    assert (1, 1) == calls
    assert first.value.details is None or not first.value.details.get("cached")
    assert (PRIMARY, 404, {"cached": True}) == (
        again.value.provider,
        again.value.status_code,
        again.value.details,
    )
    # The second answer made no call.
    assert (1, 1) == (_calls(env, PRIMARY), _calls(env, FALLBACK))
    # No defect, no deferral, nothing stale: a no-match is not an outage.
    assert (0, 0) == (env.count(env.Defect), env.count(env.Request))
    assert [("person-x", False)] == [(r.subject_id, r.stale) for r in env.rows(env.Cache)]

    # Past the TTL the providers are asked again; a match now is served and clears it.
    env.sim.control.clear_faults(PRIMARY)
    env.clock.advance(settings.enrichment.no_match_ttl.total_seconds())
    served = enricher.enrich("person-x", tenant_id="t1")

    assert ("enriched", enrichment_for("person-x")) == (served.status, served.data)
    assert 2 == _calls(env, PRIMARY)
    assert [None] == [r.no_match_at for r in env.rows(env.Cache)]


def test_a_no_match_is_not_logged_as_a_failed_call(env: Any, mode: str) -> None:
    # A subject the provider does not know is an answer: no warning per subject.
    env_settings = env.settings()
    _no_match(env, PRIMARY)
    enricher = env.enricher(env_settings, mode)

    with capture_logs() as logs, pytest.raises(ProviderRejected):
        enricher.enrich("person-unknown", tenant_id="t1")

    failed = [e for e in logs if e["event"] == "idis.gateway.call_failed"]
    assert ["debug"] == [e["log_level"] for e in failed]
    assert not [e for e in logs if e["log_level"] in ("warning", "error")]


@pytest.mark.parametrize(
    ("primary", "fallback"),
    [(400, 400), (404, 503), (503, 404)],
    ids=["invalid-request", "no-match-beside-an-outage", "outage-beside-a-no-match"],
)
def test_only_a_chain_where_every_provider_said_no_match_is_remembered(
    env: Any, mode: str, primary: int, fallback: int
) -> None:
    settings = env.settings(fallbacks={PRIMARY: (FALLBACK,)})
    _no_match(env, PRIMARY, primary)
    _no_match(env, FALLBACK, fallback)
    enricher = env.enricher(settings, mode)

    for _ in range(2):
        # An invalid request raises; a mixed chain defers (deferral is on): both asserted
        # in test_enrichment_chains. Here only what is remembered matters.
        with contextlib.suppress(ProviderError):
            enricher.enrich("person-y", tenant_id="t1")

    assert 2 == _calls(env, PRIMARY)
    assert all(r.no_match_at is None for r in env.rows(env.Cache))


def test_a_zero_ttl_asks_every_time(env: Any, mode: str) -> None:
    settings = env.settings(enrichment=replace(env.FAST, no_match_ttl=timedelta(0)))
    _no_match(env, PRIMARY)
    enricher = env.enricher(settings, mode)

    for _ in range(3):
        with pytest.raises(ProviderRejected) as caught:
            enricher.enrich("person-z", tenant_id="t1")
        assert caught.value.details is None or not caught.value.details.get("cached")

    assert 3 == _calls(env, PRIMARY)


def test_a_deferred_refresh_answered_no_match_is_remembered(env: Any) -> None:
    """The worker's refresh that every provider answers 404 fails the request and remembers it."""
    settings = env.settings()
    env.outage(PROVIDER := PRIMARY)
    deferred = env.enricher(settings, "sync").enrich("person-w", tenant_id="t1")
    env.recover(PROVIDER)
    _no_match(env, PROVIDER)

    stats = env.run(env.worker(settings, clock=env.clock).run_once())

    assert ("deferred", 1) == (deferred.status, stats.failed)
    assert ["failed"] == [r.status for r in env.rows(env.Request)]
    # Never enriched: nothing stale is left, so its defect is resolved as a no-match.
    assert [("RESOLVED", NO_MATCH_RESOLUTION)] == [
        (d.status, d.resolution) for d in env.rows(env.Defect)
    ]
    assert [True] == [r.no_match_at is not None for r in env.rows(env.Cache)]
    calls = _calls(env, PROVIDER)
    with pytest.raises(ProviderRejected) as caught:
        env.enricher(settings, "async").enrich("person-w", tenant_id="t1")
    assert {"cached": True} == caught.value.details
    assert calls == _calls(env, PROVIDER)
