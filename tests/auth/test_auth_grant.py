"""The token logic as pure functions: requests, response classification, decisions."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest

from idis.integrations._backoff import set_testing
from idis.integrations._http import httpx
from idis.integrations.auth._grant import (
    REFRESH_FAILURE_BACKOFF,
    AccessToken,
    Action,
    build_token_request,
    decide,
    lost_answer,
    parse_token_response,
    resolve_url,
)
from idis.integrations.auth._vault import ClientCredentials
from idis.integrations.config import AuthSettings, ProviderSettings, Secret
from idis.integrations.exceptions import (
    CredentialsRejected,
    MalformedResponse,
    ProviderUnavailable,
    RateLimited,
    ReauthorizationRequired,
    TokenRequestRejected,
)
from idis.integrations.resilience._errors import error_for_status, translate_httpx_error

NOW = datetime(2026, 1, 19, 9, 0, tzinfo=UTC)


def _provider(**auth: object) -> ProviderSettings:
    return ProviderSettings(
        name="crm_provider",
        kind="crm",
        base_url="http://sim.test/p/crm_provider",
        auth=AuthSettings(grant="client_credentials", client_id="app", **auth),  # type: ignore[arg-type]
    )


def _token(generation: int = 1, expires_in: float | None = 3600) -> AccessToken:
    return AccessToken(
        provider="crm_provider",
        access_token="at",
        token_type="Bearer",
        expires_at=None if expires_in is None else NOW + timedelta(seconds=expires_in),
        scopes=(),
        generation=generation,
    )


def test_relative_token_url_keeps_the_provider_path() -> None:
    """A token path is appended to the base URL's path; absolute URLs are kept."""
    assert "http://sim.test/p/x/oauth/token" == resolve_url("http://sim.test/p/x/", "/oauth/token")
    assert "https://auth.test/t" == resolve_url("http://sim.test/p/x", "https://auth.test/t")


def test_basic_client_auth_form_encodes_before_base64() -> None:
    """client_secret_basic url-encodes id and secret (RFC 6749 2.3.1), so ':' survives."""
    creds = ClientCredentials(client_id="app:1", client_secret=Secret("p@ss:w%rd+1"))

    prepared = build_token_request(_provider(scopes=("a", "b")), creds, "client_credentials")

    header = prepared.headers["Authorization"]
    decoded = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert "app%3A1:p%40ss%3Aw%25rd%2B1" == decoded
    assert {"grant_type": ["client_credentials"], "scope": ["a b"]} == parse_qs(prepared.body)
    assert "p@ss" not in repr(prepared)


def test_post_client_auth_puts_credentials_in_the_body() -> None:
    """client_secret_post sends client_id and client_secret as form fields."""
    creds = ClientCredentials(client_id="app", client_secret=Secret("s3cr3t-value"))
    prepared = build_token_request(
        _provider(client_auth="client_secret_post"), creds, "refresh_token", refresh_token="rt1"
    )

    form = parse_qs(prepared.body)

    assert ["refresh_token"] == form["grant_type"]
    assert ["rt1"] == form["refresh_token"]
    assert ["s3cr3t-value"] == form["client_secret"]
    assert "Authorization" not in prepared.headers


def test_refresh_grant_without_refresh_token_needs_reauthorization() -> None:
    """Refreshing with no refresh token raises ReauthorizationRequired naming import-token."""
    with pytest.raises(ReauthorizationRequired) as caught:
        build_token_request(_provider(), None, "refresh_token")

    assert "import-token" in str(caught.value)


def test_success_response_uses_our_clock_and_falls_back_to_requested_scopes() -> None:
    """expires_in is counted from the injected time; a missing scope means the requested one."""
    body = json.dumps({"access_token": "at_1", "expires_in": 120, "refresh_token": "rt_2"})

    token = parse_token_response(
        "p", 200, body.encode(), now=NOW, grant_type="refresh_token", requested_scopes=("r",)
    )

    assert NOW + timedelta(seconds=120) == token.expires_at
    assert ("r",) == token.scopes
    assert "rt_2" == token.refresh_token
    assert "Bearer" == token.token_type


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (400, {"error": "invalid_grant"}, ReauthorizationRequired),
        (401, {"error": "invalid_client"}, CredentialsRejected),
        (400, {"error": "unauthorized_client"}, CredentialsRejected),
        (400, {"error": "invalid_scope"}, TokenRequestRejected),
        (401, None, CredentialsRejected),
        (403, None, TokenRequestRejected),
        (503, None, ProviderUnavailable),
        (429, {"error": "slow_down"}, RateLimited),
        (200, {"token_type": "Bearer"}, MalformedResponse),
        (200, "not json", MalformedResponse),
    ],
)
def test_error_responses_are_classified(status: int, body: object, expected: type) -> None:
    """Each token endpoint failure maps to the error that says what to do about it."""
    content = (body if isinstance(body, str) else json.dumps(body)).encode() if body else b""

    with pytest.raises(expected):
        parse_token_response(
            "p", status, content, now=NOW, grant_type="refresh_token", requested_scopes=()
        )


def test_reauthorization_is_not_retryable_and_says_what_to_do() -> None:
    """invalid_grant is final (not retryable) and its message points at import-token."""
    body = json.dumps({"error": "invalid_grant", "error_description": "refresh token was revoked"})

    with pytest.raises(ReauthorizationRequired) as caught:
        parse_token_response(
            "crm_provider",
            400,
            body.encode(),
            now=NOW,
            grant_type="refresh_token",
            requested_scopes=(),
        )

    assert False is caught.value.retryable
    assert "revoked" in str(caught.value)
    assert "import-token --provider crm_provider" in str(caught.value)


def test_retry_after_is_carried_on_429() -> None:
    """A 429 from the token endpoint carries the Retry-After seconds it was given."""
    with pytest.raises(RateLimited) as caught:
        parse_token_response(
            "p",
            429,
            b"",
            now=NOW,
            grant_type="client_credentials",
            requested_scopes=(),
            retry_after=7.0,
        )

    assert 7.0 == caught.value.retry_after


def test_decide_uses_a_fresh_token_and_refreshes_inside_the_margin() -> None:
    """Fresh -> use; inside the refresh margin or expired -> refresh; none -> refresh."""

    def action(token: AccessToken | None) -> Action:
        return decide(
            mode="ensure",
            candidate=token,
            stored_state="ok",
            next_attempt_at=None,
            now=NOW,
            margin=300,
        ).action

    assert Action.USE == action(_token(expires_in=301))
    assert Action.USE == action(_token(expires_in=None))
    assert Action.REFRESH == action(_token(expires_in=299))
    assert Action.REFRESH == action(_token(expires_in=-5))
    assert Action.REFRESH == action(None)


def test_decide_after_401_uses_only_a_newer_token() -> None:
    """After a 401 the rejected generation is never handed out again; a newer one is."""

    def action(token: AccessToken) -> Action:
        return decide(
            mode="rejected",
            candidate=token,
            stored_state="ok",
            next_attempt_at=None,
            now=NOW,
            margin=300,
            rejected_generation=4,
        ).action

    assert Action.REFRESH == action(_token(generation=4))
    assert Action.USE == action(_token(generation=5))


def test_decide_backoff_keeps_a_valid_token_and_blocks_an_expired_one() -> None:
    """While failures hold refreshes off, a valid token is used and an expired one fails fast."""
    later = NOW + timedelta(seconds=40)

    valid = decide(
        mode="ensure",
        candidate=_token(expires_in=100),
        stored_state="refresh_failing",
        next_attempt_at=later,
        now=NOW,
        margin=300,
    )
    expired = decide(
        mode="ensure",
        candidate=_token(expires_in=-1),
        stored_state="refresh_failing",
        next_attempt_at=later,
        now=NOW,
        margin=300,
    )
    forced = decide(
        mode="force",
        candidate=_token(expires_in=-1),
        stored_state="reauthorization_required",
        next_attempt_at=later,
        now=NOW,
        margin=300,
    )

    assert (Action.USE, 40.0) == (valid.action, valid.retry_in)
    assert (Action.BACKOFF, 40.0) == (expired.action, expired.retry_in)
    assert Action.REFRESH == forced.action


def test_decide_stops_on_reauthorization_state() -> None:
    """A stored reauthorization_required state stops automatic refreshes even with no token."""
    decision = decide(
        mode="ensure",
        candidate=None,
        stored_state="reauthorization_required",
        next_attempt_at=None,
        now=NOW,
        margin=300,
    )

    assert Action.REAUTHORIZE == decision.action


def test_failure_backoff_is_the_shared_backoff_policy_and_testing_mode_reaches_it() -> None:
    """Refresh failures back off by the one Backoff value (5 s first, capped), jittered."""
    import random

    rng = random.Random(7)
    first = [REFRESH_FAILURE_BACKOFF.delay(1, rng) for _ in range(50)]
    capped = [REFRESH_FAILURE_BACKOFF.delay(60, rng) for _ in range(50)]
    with set_testing():
        in_testing = REFRESH_FAILURE_BACKOFF.delay(3)

    assert all(2.5 <= delay <= 5.0 for delay in first)  # equal jitter: never collapses to 0
    assert len(set(first)) > 1  # replicas that failed together spread out
    assert all(150.0 <= delay <= 300.0 for delay in capped)
    assert 0.0 == in_testing


def test_decide_reauthorization_keeps_a_valid_token_for_plain_callers() -> None:
    """After a refusal a still-valid token keeps calls going; a 401 or an expired token stops."""

    def action(mode: str, token: AccessToken | None) -> Action:
        return decide(
            mode=mode,  # type: ignore[arg-type]
            candidate=token,
            stored_state="reauthorization_required",
            next_attempt_at=None,
            now=NOW,
            margin=300,
            rejected_generation=1,
        ).action

    assert Action.USE == action("ensure", _token(expires_in=200))
    assert Action.REAUTHORIZE == action("ensure", _token(expires_in=-1))
    assert Action.REAUTHORIZE == action("rejected", _token(expires_in=200))
    assert Action.REFRESH == action("force", _token(expires_in=200))


def test_decide_outcome_unknown_stops_even_a_forced_refresh_outside_the_grace() -> None:
    """refresh_outcome_unknown: no resend (not even forced) unless the reuse grace is open."""

    def action(mode: str, token: AccessToken | None, reuse_until: datetime | None) -> Action:
        return decide(
            mode=mode,  # type: ignore[arg-type]
            candidate=token,
            stored_state="refresh_outcome_unknown",
            next_attempt_at=None,
            now=NOW,
            margin=300,
            reuse_until=reuse_until,
        ).action

    open_grace = NOW + timedelta(seconds=10)
    closed = NOW - timedelta(seconds=1)

    assert Action.OUTCOME_UNKNOWN == action("force", _token(expires_in=200), None)
    assert Action.OUTCOME_UNKNOWN == action("force", None, closed)
    assert Action.OUTCOME_UNKNOWN == action("ensure", _token(expires_in=-1), None)
    assert Action.USE == action("ensure", _token(expires_in=200), None)
    assert Action.REFRESH == action("force", None, open_grace)
    assert Action.REFRESH == action("ensure", _token(expires_in=-1), open_grace)


def _httpx_failure(exc: Exception) -> Exception:
    error = translate_httpx_error(exc, "p", "token")
    error.__cause__ = exc
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_httpx_failure(httpx.ReadTimeout("read")), "timeout"),
        (_httpx_failure(httpx.RemoteProtocolError("disconnected")), "connection"),
        (_httpx_failure(httpx.ReadError("reset")), "connection"),
        (error_for_status(500, "p", "token"), "server_error"),
        (error_for_status(502, "p", "token"), "server_error"),
        (MalformedResponse("2xx without access_token"), "malformed_response"),
        (MalformedResponse("2xx without access_token", status_code=200), "malformed_response"),
        (MalformedResponse("redirected", status_code=307), None),
        (_httpx_failure(httpx.ConnectTimeout("connect")), None),
        (_httpx_failure(httpx.ConnectError("refused")), None),
        (_httpx_failure(httpx.PoolTimeout("pool")), None),
        (_httpx_failure(httpx.WriteTimeout("write")), None),
        (_httpx_failure(httpx.WriteError("write")), None),
        (error_for_status(408, "p", "token"), None),
        (error_for_status(429, "p", "token"), None),
        (TokenRequestRejected("invalid_scope"), None),
    ],
)
def test_lost_answer_tells_a_sent_request_from_one_the_server_never_acted_on(
    error: Exception, expected: str | None
) -> None:
    """Timeouts and drops after sending, 5xx and unreadable 2xx are unknown; the rest are not."""
    assert expected == lost_answer(error)
