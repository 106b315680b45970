"""The simulator's OAuth server: grants, refresh-token rotation, revocation, secret rotation."""

from __future__ import annotations

import pytest

from idis.integrations.simulator import token_fingerprint

CRM = "/p/crm_provider"
CLIENT = ("idis-local", "local-simulator-secret")


def _token(http, auth=CLIENT, **form):
    return http.post(
        f"{CRM}/oauth/token", data={"grant_type": "client_credentials", **form}, auth=auth
    )


def _refresh(http, refresh_token, auth=CLIENT):
    return http.post(
        f"{CRM}/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=auth,
    )


def test_client_credentials_by_basic_auth_and_by_form(sim, http) -> None:
    """The default client gets a bearer token with HTTP Basic or with form fields."""
    by_basic = _token(http)
    by_form = http.post(
        f"{CRM}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT[0],
            "client_secret": CLIENT[1],
            "scope": "records:read",
        },
    )

    assert (200, "Bearer", 3600) == (
        by_basic.status_code,
        by_basic.json()["token_type"],
        by_basic.json()["expires_in"],
    )
    assert (200, "records:read") == (by_form.status_code, by_form.json()["scope"])
    assert 2 == sim.control.stats("crm_provider")["oauth"]["tokens_issued"]


def test_wrong_client_secret_is_invalid_client(sim, http) -> None:
    """A wrong secret is a 401 invalid_client and issues nothing."""
    refused = _token(http, auth=("idis-local", "wrong"))

    assert (401, "invalid_client") == (refused.status_code, refused.json()["error"])
    assert 0 == sim.control.stats("crm_provider")["oauth"]["tokens_issued"]


def test_unsupported_grant_is_400(sim, http) -> None:
    """An unknown grant_type is refused with unsupported_grant_type."""
    refused = http.post(f"{CRM}/oauth/token", data={"grant_type": "password"}, auth=CLIENT)

    assert (400, "unsupported_grant_type") == (refused.status_code, refused.json()["error"])


def test_refresh_rotates_and_old_refresh_token_reuse_is_invalid_grant(sim, http) -> None:
    """Each refresh issues a new refresh token; sending the old one again is invalid_grant."""
    first = _token(http).json()["refresh_token"]
    rotated = _refresh(http, first)
    reused = _refresh(http, first)
    stats = sim.control.stats("crm_provider")["oauth"]

    assert 200 == rotated.status_code
    assert first != rotated.json()["refresh_token"]
    assert (400, "invalid_grant") == (reused.status_code, reused.json()["error"])
    assert (1, 1) == (stats["refreshes"], stats["reuse_detected"])
    assert {token_fingerprint(first): 2} == stats["refresh_requests"]
    assert 200 == _refresh(http, rotated.json()["refresh_token"]).status_code


def test_revoked_refresh_token_is_invalid_grant(sim, http) -> None:
    """After revocation a refresh token no longer refreshes."""
    refresh_token = _token(http).json()["refresh_token"]

    revoked = http.post(f"{CRM}/oauth/revoke", data={"token": refresh_token}, auth=CLIENT)
    after = _refresh(http, refresh_token)

    assert 200 == revoked.status_code
    assert (400, "invalid_grant") == (after.status_code, after.json()["error"])


def test_control_revoke_and_issue(sim, http) -> None:
    """Tokens minted by the control API work, and control revocation kills them."""
    pair = sim.control.issue_tokens("crm_provider", scope="records:read")

    revoked = sim.control.revoke_token("crm_provider", pair["refresh_token"])

    assert "records:read" == pair["scope"]
    assert True is revoked
    assert 400 == _refresh(http, pair["refresh_token"]).status_code


def test_require_auth_protects_data_endpoints_but_not_health(sim, http) -> None:
    """With require_auth, data endpoints need a bearer token; health stays open."""
    sim.control.require_auth("crm_provider")
    token = _token(http).json()["access_token"]

    anonymous = http.get(f"{CRM}/records")
    wrong = http.get(f"{CRM}/records", headers={"Authorization": "Bearer nope"})
    authorized = http.get(f"{CRM}/records", headers={"Authorization": f"Bearer {token}"})

    assert (401, "invalid_token") == (anonymous.status_code, anonymous.json()["error"])
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert 401 == wrong.status_code
    assert 200 == authorized.status_code
    assert 200 == http.get(f"{CRM}/health").status_code
    assert 2 == sim.control.stats("crm_provider")["auth_failures"]


def test_short_lived_access_token_expires_in_simulated_time(sim, http, clock) -> None:
    """A 2 s access token works, then is refused once simulated time passes its expiry."""
    sim.control.configure_oauth("crm_provider", access_token_lifetime=2)
    sim.control.require_auth("crm_provider")
    issued = _token(http).json()
    headers = {"Authorization": f"Bearer {issued['access_token']}"}
    before = http.get(f"{CRM}/changes", headers=headers).status_code
    clock.advance(2)

    after = http.get(f"{CRM}/changes", headers=headers).status_code

    assert 2 == issued["expires_in"]
    assert (200, 401) == (before, after)


def test_expire_tokens_makes_current_tokens_fail(sim, http) -> None:
    """expire_tokens ends every access token at once."""
    sim.control.require_auth("crm_provider")
    token = _token(http).json()["access_token"]

    sim.control.expire_tokens("crm_provider")

    assert (
        401 == http.get(f"{CRM}/records", headers={"Authorization": f"Bearer {token}"}).status_code
    )


def test_rotation_issues_a_new_secret_and_old_one_works_only_in_grace(sim, http, clock) -> None:
    """After rotation both secrets work during the grace period; then only the new one."""
    sim.control.configure_oauth("crm_provider", rotation_grace_seconds=60)
    rotated = http.post(f"{CRM}/oauth/rotate", auth=CLIENT)
    new_secret = rotated.json()["client_secret"]
    old_in_grace = _token(http).status_code
    clock.advance(61)

    old_after = _token(http)
    new_after = _token(http, auth=(CLIENT[0], new_secret))

    assert 200 == rotated.status_code
    assert CLIENT[1] != new_secret
    assert 200 == old_in_grace
    assert (401, 200) == (old_after.status_code, new_after.status_code)


def test_rotation_grace_can_be_limited_to_a_number_of_uses(sim, http) -> None:
    """With rotation_grace_uses=1 the old secret works exactly once more."""
    sim.control.configure_oauth("crm_provider", rotation_grace_uses=1)
    http.post(f"{CRM}/oauth/rotate", auth=CLIENT)

    assert [200, 401] == [_token(http).status_code for _ in range(2)]


def test_rotation_needs_the_current_credentials(sim, http) -> None:
    """Rotation with wrong credentials is refused and changes nothing."""
    refused = http.post(f"{CRM}/oauth/rotate", auth=("idis-local", "guess"))

    assert 401 == refused.status_code
    assert 200 == _token(http).status_code


def test_bad_oauth_settings_are_rejected(sim) -> None:
    """A non-positive token lifetime is refused naming it."""
    from idis.integrations.simulator import SimulatorInputError

    with pytest.raises(SimulatorInputError, match="access_token_lifetime"):
        sim.control.configure_oauth("crm_provider", access_token_lifetime=0)
