"""The pure decisions: provider chains, what to do when nobody served, backoff, slow start."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idis.integrations._backoff import set_testing
from idis.integrations.config import EnrichmentSettings, Settings
from idis.integrations.enrichment._decisions import (
    Attempt,
    describe_attempts,
    is_outage,
    next_batch_size,
    plan_failure,
    provider_chain,
    refresh_backoff,
    refresh_verdict,
)
from idis.integrations.exceptions import (
    AuthError,
    CircuitOpen,
    ConfigError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UnknownProviderError,
)

DOWN = Attempt("p", "failed", "server_error", retryable=True)
SKIPPED = Attempt("p", "skipped", "circuit_open")
GONE = Attempt("p", "failed", "client_error", retryable=False)


def _settings(**env: str) -> Settings:
    base = {
        "IDIS_PROVIDERS": "enrich_a,enrich_b,crm",
        "IDIS_PROVIDER_ENRICH_A_KIND": "enrichment",
        "IDIS_PROVIDER_ENRICH_A_BASE_URL": "http://127.0.0.1:1/a",
        "IDIS_PROVIDER_ENRICH_A_FALLBACKS": "enrich_b,crm",
        "IDIS_PROVIDER_ENRICH_B_KIND": "enrichment",
        "IDIS_PROVIDER_ENRICH_B_BASE_URL": "http://127.0.0.1:1/b",
        "IDIS_PROVIDER_CRM_KIND": "crm",
        "IDIS_PROVIDER_CRM_BASE_URL": "http://127.0.0.1:1/c",
    }
    return Settings.from_env({**base, **env})


def test_default_chain_is_first_enrichment_provider_and_its_fallbacks() -> None:
    """Without a name, the first provider of kind enrichment leads, followed by its fallbacks."""
    assert ("enrich_a", "enrich_b", "crm") == provider_chain(_settings())


def test_configured_primary_wins() -> None:
    """IDIS_ENRICHMENT_PROVIDER picks the primary when the caller names none."""
    assert ("enrich_b",) == provider_chain(_settings(IDIS_ENRICHMENT_PROVIDER="enrich_b"))


def test_explicit_list_is_deduplicated_in_order() -> None:
    """An explicit provider list keeps its order and drops repeats."""
    assert ("crm", "enrich_a") == provider_chain(_settings(), providers=["crm", "enrich_a", "crm"])


def test_unknown_provider_in_list_is_named() -> None:
    """A provider nobody declared fails with its name."""
    with pytest.raises(UnknownProviderError, match="'nope'"):
        provider_chain(_settings(), providers=["enrich_a", "nope"])


def test_empty_list_is_rejected() -> None:
    """An explicitly empty provider list is a configuration error."""
    with pytest.raises(ConfigError, match=r"providers=\[\]"):
        provider_chain(_settings(), providers=[])


def test_unknown_enrichment_provider_variable_fails_at_start() -> None:
    """IDIS_ENRICHMENT_PROVIDER naming no provider fails naming the variable and value."""
    with pytest.raises(ConfigError, match="IDIS_ENRICHMENT_PROVIDER='ghost'"):
        _settings(IDIS_ENRICHMENT_PROVIDER="ghost")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IDIS_ENRICHMENT_BATCH_SIZE", "0"),
        ("IDIS_ENRICHMENT_POLL_INTERVAL", "0s"),
        ("IDIS_ENRICHMENT_LEASE", "soon"),
        ("IDIS_ENRICHMENT_RETRY_BACKOFF", "-5s"),
        ("ENRICHMENT_DEFER_ON_ERROR", "maybe"),
    ],
)
def test_bad_enrichment_variables_fail_at_start(variable: str, value: str) -> None:
    """Each enrichment variable is validated at start, naming the variable and the value."""
    with pytest.raises(ConfigError, match=f"{variable}={value!r}"):
        _settings(**{variable: value})


def test_enrichment_variables_parse() -> None:
    """The enrichment variables reach EnrichmentSettings; unset ones keep their defaults."""
    settings = _settings(
        ENRICHMENT_DEFER_ON_ERROR="true",
        IDIS_ENRICHMENT_BATCH_SIZE="7",
        IDIS_ENRICHMENT_RETRY_MAX_BACKOFF="2m",
        IDIS_IMPACT_DEALS_TABLE="public.deals",
    )

    assert (True, 7, timedelta(minutes=2), "public.deals", timedelta(seconds=60)) == (
        settings.enrichment.defer_on_error,
        settings.enrichment.batch_size,
        settings.enrichment.retry_max_backoff,
        settings.enrichment.impact_deals_table,
        settings.enrichment.lease,
    )


def test_bad_deals_table_variable_fails_at_start() -> None:
    """IDIS_IMPACT_DEALS_TABLE must be a plain or schema-qualified table name."""
    with pytest.raises(ConfigError, match="IDIS_IMPACT_DEALS_TABLE='deals; drop'"):
        _settings(IDIS_IMPACT_DEALS_TABLE="deals; drop")


@pytest.mark.parametrize(
    ("serve_cached", "defer", "has_cache", "expected"),
    [
        (True, True, True, ("cached_stale", True)),
        (True, False, True, ("cached_stale", False)),
        (True, True, False, ("deferred", True)),
        (True, False, False, ("raise", False)),
        (False, True, True, ("deferred", True)),
        (False, False, True, ("raise", False)),
    ],
)
def test_plan_failure_table(
    serve_cached: bool, defer: bool, has_cache: bool, expected: tuple[str, bool]
) -> None:
    """Cache before deferral; a cached serve also defers when deferral is on."""
    settings = EnrichmentSettings(serve_cached=serve_cached, defer_on_error=defer)

    action = plan_failure([DOWN, SKIPPED], has_cache=has_cache, settings=settings)

    assert expected == (action.kind, action.defer)
    assert action.mark_stale


def test_every_provider_rejecting_is_raised_not_deferred() -> None:
    """A chain of final 4xx answers raises, defers nothing and marks nothing stale."""
    settings = EnrichmentSettings(defer_on_error=True)

    action = plan_failure([GONE, GONE], has_cache=True, settings=settings)

    assert ("raise", False, False) == (action.kind, action.defer, action.mark_stale)


@pytest.mark.parametrize(
    ("status", "retryable"), [(404, False), (400, False), (401, True), (403, True)]
)
def test_auth_failures_count_as_outages(status: int, retryable: bool) -> None:
    """401/403 are fixed by operators, not by the subject: they defer; 404/400 are final."""
    attempt = Attempt.from_error("p", ProviderRejected("x", provider="p", status_code=status))

    assert retryable == attempt.retryable


def test_describe_attempts_lists_failures_only() -> None:
    """The summary names each provider that did not serve and why."""
    attempts = [
        Attempt.from_error("a", ProviderUnavailable("x", provider="a", status_code=503)),
        Attempt("b", "skipped", "circuit_open"),
        Attempt("c", "served"),
    ]

    assert "a:server_error, b:circuit_open" == describe_attempts(attempts)


@given(attempts=st.integers(min_value=1, max_value=40), seed=st.integers(0, 2**32))
def test_refresh_delay_stays_within_its_doubling_cap(attempts: int, seed: int) -> None:
    """The delay lies in [cap/2, cap], the cap doubling per attempt up to the maximum."""
    settings = EnrichmentSettings(
        retry_backoff=timedelta(seconds=2), retry_max_backoff=timedelta(seconds=60)
    )
    cap = min(60.0, 2.0 * 2 ** (attempts - 1))

    delay = refresh_backoff(settings).delay(attempts, random.Random(seed))

    assert cap / 2 <= delay <= cap


def test_refresh_delays_of_many_subjects_spread_out() -> None:
    """Jitter: a hundred subjects failing together do not all retry at the same instant."""
    backoff = refresh_backoff(replace(EnrichmentSettings(), retry_backoff=timedelta(seconds=10)))
    rng = random.Random(5)

    delays = {round(backoff.delay(1, rng), 3) for _ in range(100)}

    assert len(delays) > 90


def test_a_maximum_below_the_first_backoff_caps_every_delay() -> None:
    """IDIS_ENRICHMENT_RETRY_MAX_BACKOFF below IDIS_ENRICHMENT_RETRY_BACKOFF still starts."""
    settings = EnrichmentSettings(
        retry_backoff=timedelta(seconds=30), retry_max_backoff=timedelta(seconds=10)
    )

    assert [10.0, 10.0] == [refresh_backoff(settings).cap(n) for n in (1, 5)]


def test_testing_mode_turns_the_refresh_backoff_off() -> None:
    """set_testing() reaches the refresh backoff like every other wait."""
    with set_testing():
        delay = refresh_backoff(EnrichmentSettings()).delay(3)

    assert 0.0 == delay


def _failed(status: int) -> Attempt:
    """The attempt record of a provider that answered ``status``."""
    if status == 429:
        return Attempt.from_error("p", RateLimited("x", provider="p", status_code=429))
    if status >= 500:
        return Attempt.from_error("p", ProviderUnavailable("x", provider="p", status_code=status))
    return Attempt.from_error("p", ProviderRejected("x", provider="p", status_code=status))


SERVED = Attempt("q", "served")


@pytest.mark.parametrize(
    ("chain", "outage", "verdict"),
    [
        # A 404 "no match" is an answer; a 503 is unavailability: mixed chains are outages.
        ([_failed(404), _failed(503)], True, "rescheduled"),
        ([_failed(503), _failed(404)], True, "rescheduled"),
        ([_failed(410), _failed(502)], True, "rescheduled"),
        ([_failed(404), SKIPPED], True, "rescheduled"),
        ([_failed(429), SERVED], False, "refreshed"),
        ([_failed(503), _failed(500)], True, "rescheduled"),
        ([_failed(429), _failed(429)], True, "rescheduled"),
        ([_failed(404), _failed(404)], False, "failed"),
        ([_failed(404), _failed(422)], False, "failed"),
        ([SKIPPED, SKIPPED], True, "gated"),
        ([], False, "gated"),
    ],
)
def test_what_a_chain_means(chain: list[Attempt], outage: bool, verdict: str) -> None:
    """An outage needs one unavailable provider; only answers from every provider are final."""
    assert (outage, verdict) == (is_outage(chain), refresh_verdict(chain))


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ProviderRejected("x", provider="p", status_code=404), False),
        (ProviderRejected("x", provider="p", status_code=410), False),
        (ProviderRejected("x", provider="p", status_code=409), True),
        (RateLimited("x", provider="p", status_code=429), True),
        (ProviderTimeout("x", provider="p"), True),
        (CircuitOpen("x", provider="p"), True),
        (AuthError("token refused"), True),
    ],
)
def test_which_answers_are_final(error: Exception, retryable: bool) -> None:
    """Only a provider's answer about the subject is final; unavailability never is."""
    assert retryable == Attempt.from_error("p", error).retryable  # type: ignore[arg-type]


def test_a_mixed_chain_is_deferred_not_raised() -> None:
    """Primary 404 + fallback 503 with deferral on: deferred and marked stale, not raised."""
    settings = EnrichmentSettings(defer_on_error=True)

    action = plan_failure([_failed(404), _failed(503)], has_cache=False, settings=settings)

    assert ("deferred", True, True) == (action.kind, action.defer, action.mark_stale)


def test_slow_start_doubles_then_resets() -> None:
    """Batches grow 1, 2, 4, 8 up to the maximum and fall back to 1 on failure or gating."""
    sizes = [1]
    for _ in range(5):
        sizes.append(next_batch_size(sizes[-1], 10, "ok"))

    assert [1, 2, 4, 8, 10, 10] == sizes
    assert 1 == next_batch_size(10, 10, "failed")
    assert 1 == next_batch_size(10, 10, "gated")
