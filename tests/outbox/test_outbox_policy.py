"""The outbox's pure decisions: backoff with full jitter, and what each failure does."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from idis.integrations.config import OutboxSettings, Secret
from idis.integrations.exceptions import (
    AuthError,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    MalformedResponse,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    ReauthorizationRequired,
    UsageError,
)
from idis.integrations.outbox._policy import (
    Action,
    backoff_delay,
    decide,
    describe_error,
    probe_decides,
)

NOW = datetime(2026, 1, 19, 9, 0, tzinfo=UTC)
SETTINGS = OutboxSettings(
    max_retries=10, initial_backoff=timedelta(seconds=1), max_backoff=timedelta(seconds=60)
)


def _decide(error: BaseException | None, **kw: object) -> tuple[Action, datetime | None]:
    args: dict[str, object] = {
        "kind": "request",
        "attempts": 1,
        "max_retries": 3,
        "provider_available": True,
        "now": NOW,
        "settings": SETTINGS,
        "rng": random.Random(1),
    }
    args.update(kw)
    d = decide(error, **args)  # type: ignore[arg-type]
    return d.action, d.next_attempt_at


def test_backoff_stays_within_the_doubling_cap() -> None:
    """The n-th delay is uniform in [0, min(max, initial * 2**(n-1))]: never above its cap."""
    rng = random.Random(7)
    for attempts in range(1, 12):
        cap = min(60.0, 2.0 ** (attempts - 1))
        samples = [backoff_delay(SETTINGS, attempts, rng).total_seconds() for _ in range(300)]

        assert all(0.0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8  # full jitter reaches near the cap, not a fixed delay
        assert min(samples) < cap * 0.2  # ...and near zero


def test_backoff_jitter_spreads_simultaneous_failures() -> None:
    """Many messages failing at the same moment do not all retry at the same moment."""
    rng = random.Random(3)

    delays = {backoff_delay(SETTINGS, 5, rng) for _ in range(100)}

    assert len(delays) > 90


def test_success_is_delivered() -> None:
    """An attempt that raised nothing delivers the message."""
    assert (Action.DELIVERED, None) == _decide(None)


def test_provider_fault_with_budget_left_retries_after_backoff() -> None:
    """A 503 while the provider is still available is retried after at most the cap."""
    action, when = _decide(unavailable_error(), attempts=3, max_retries=3)

    assert Action.RETRY == action
    assert when is not None
    assert NOW <= when <= NOW + timedelta(seconds=4)


def test_budget_spent_dead_letters() -> None:
    """One attempt more than the first plus max_retries is a dead letter."""
    assert Action.DEAD == _decide(unavailable_error(), attempts=4, max_retries=3)[0]
    assert Action.DEAD == _decide(ProviderTimeout("slow"), attempts=1, max_retries=0)[0]


@pytest.mark.parametrize(
    "error",
    [CircuitOpen("open", retry_in=12.0), BulkheadFull("full")],
    ids=["circuit_open", "bulkhead_full"],
)
def test_not_attempted_is_deferred_without_burning_budget(error: Exception) -> None:
    """A call the gateway never made waits (attempt given back) even with no budget left."""
    action, when = _decide(error, attempts=99, max_retries=0)

    assert Action.DEFER == action
    assert when is not None
    assert when > NOW


def test_circuit_open_waits_for_the_breaker() -> None:
    """A message short-circuited by an open breaker is due when the breaker lets trials through."""
    _, when = _decide(CircuitOpen("open", retry_in=12.0))

    assert NOW + timedelta(seconds=12) == when


@pytest.mark.parametrize(
    "error",
    [ProviderTimeout("t"), RateLimited("429", retry_after=5), MalformedResponse("junk")],
    ids=["timeout", "rate_limited", "malformed"],
)
def test_failure_that_leaves_the_provider_unavailable_is_the_outages(error: Exception) -> None:
    """A provider fault after which the breaker is open (or a 429 pause holds) burns no attempt."""
    assert Action.DEFER == _decide(error, attempts=11, max_retries=10, provider_available=False)[0]


def test_410_stops_a_webhook_receiver_but_dead_letters_a_request() -> None:
    """410 Gone marks a webhook receiver gone; on a provider call it is a plain rejection."""
    gone = ProviderRejected("gone", status_code=410)

    assert Action.GONE == _decide(gone, kind="webhook")[0]
    assert Action.DEAD == _decide(gone, kind="request")[0]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_rejections_dead_letter_at_once(status: int) -> None:
    """A 4xx we caused cannot succeed by resending: dead at the first attempt."""
    assert Action.DEAD == _decide(ProviderRejected("no", status_code=status), attempts=1)[0]


@pytest.mark.parametrize("status", [408, 409, 425, 429])
def test_transient_4xx_is_retried(status: int) -> None:
    """Timeout, conflict, too-early and rate-limit answers may succeed later."""
    assert Action.RETRY == _decide(ProviderRejected("later", status_code=status))[0]


def test_caller_bugs_dead_letter() -> None:
    """A UsageError dead-letters at once."""
    assert Action.DEAD == _decide(UsageError("no such kind"))[0]


@pytest.mark.parametrize("attempts", [1, 3, 4, 50])
def test_a_token_we_cannot_get_waits_with_the_attempt_given_back(attempts: int) -> None:
    """Token endpoint down or re-authorization required: never the message's fault, never dead.

    An outage that took the token endpoint down too used to dead-letter every push.
    """
    down = decide(
        AuthError("token refresh is failing"),
        kind="request",
        attempts=attempts,
        max_retries=3,
        provider_available=True,
        now=NOW,
        settings=SETTINGS,
        rng=random.Random(1),
    )
    stopped = decide(
        ReauthorizationRequired("invalid_grant"),
        kind="request",
        attempts=attempts,
        max_retries=3,
        provider_available=True,
        now=NOW,
        settings=SETTINGS,
    )
    assert (Action.DEFER, Action.DEFER) == (down.action, stopped.action)
    assert down.next_attempt_at is not None
    assert down.next_attempt_at > NOW
    assert stopped.next_attempt_at == NOW + min(timedelta(seconds=30), SETTINGS.max_backoff)


@pytest.mark.parametrize("attempts", [1, 6, 50])
def test_a_configuration_error_is_ours_never_the_messages(attempts: int) -> None:
    """ConfigError waits with the attempt given back, however many attempts: never dead."""
    action = _decide(ConfigError("IDIS_VAULT_ADDR is not set"), attempts=attempts)[0]
    assert Action.DEFER == action


def test_unknown_exceptions_from_a_custom_strategy_are_retried_then_dead() -> None:
    """A bug in a custom delivery strategy burns the budget like a failure, then dead-letters."""
    assert Action.RETRY == _decide(RuntimeError("boom"), attempts=1)[0]
    assert Action.DEAD == _decide(RuntimeError("boom"), attempts=4)[0]


def test_last_error_is_redacted_and_bounded() -> None:
    """``last_error`` never carries a registered secret, and is at most 500 characters."""
    secret = Secret("sk_live_" + "x" * 30)
    error = ProviderUnavailable(
        f"upstream said: token {secret.get_secret_value()} rejected " + "y" * 1000, status_code=502
    )

    text = describe_error(error)

    assert secret.get_secret_value() not in text
    assert text.startswith("ProviderUnavailable (HTTP 502): upstream said")
    assert len(text) <= 500


def unavailable_error() -> ProviderUnavailable:
    """A 503 from the provider."""
    return ProviderUnavailable("HTTP 503", status_code=503)


def _fault() -> ProviderUnavailable:
    return ProviderUnavailable("crm record: HTTP 503", provider="crm", status_code=503)


def test_a_healthy_probe_counts_a_failure_nothing_else_would() -> None:
    """Unavailable, nobody served: given back; with a healthy probe: counted, dead when spent."""
    quiet = {"provider_available": False, "served_others": False}
    assert probe_decides(_fault(), **quiet)  # type: ignore[arg-type]
    assert Action.DEFER == _decide(_fault(), **quiet)[0]
    assert Action.RETRY == _decide(_fault(), provider_healthy=True, **quiet)[0]
    assert Action.DEAD == _decide(_fault(), attempts=4, provider_healthy=True, **quiet)[0]


def test_a_probe_is_not_asked_when_other_evidence_decides() -> None:
    """Available provider, others served, a 429, a refusal, nothing sent: no probe."""
    limited = RateLimited("crm record: HTTP 429", provider="crm", status_code=429)
    cases = [
        (_fault(), {"provider_available": True, "served_others": False}),
        (_fault(), {"provider_available": False, "served_others": True}),
        (limited, {"provider_available": False, "served_others": False}),
        (
            CircuitOpen("open", provider="crm"),
            {"provider_available": False, "served_others": False},
        ),
        (
            ProviderRejected("400", provider="crm", status_code=400),
            {"provider_available": False, "served_others": False},
        ),
    ]
    assert [] == [e for e, kw in cases if probe_decides(e, **kw)]  # type: ignore[arg-type]
    # A rate limit is provider-wide: a healthy health endpoint never counts it.
    assert (
        Action.DEFER
        == _decide(limited, provider_available=False, provider_healthy=True, attempts=4)[0]
    )
