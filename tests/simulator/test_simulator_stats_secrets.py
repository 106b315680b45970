"""The simulator's stats never show a token or a secret (issue 15): they get printed and pasted."""

from __future__ import annotations

import json

from idis.integrations.simulator import token_fingerprint

CRM = "/p/crm_provider"


def test_stats_show_no_token_or_secret_anywhere(sim, http) -> None:
    """After grants, refreshes, rotations and webhook setup, no secret appears in any stats."""
    sim.control.set_oauth_client("crm_provider", "app", "client-secret-VALUE-1234")
    granted = http.post(
        f"{CRM}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=("app", "client-secret-VALUE-1234"),
    ).json()
    refreshed = http.post(
        f"{CRM}/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]},
        auth=("app", "client-secret-VALUE-1234"),
    ).json()
    http.post(  # a reuse: the old refresh token is sent again
        f"{CRM}/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": granted["refresh_token"]},
        auth=("app", "client-secret-VALUE-1234"),
    )
    issued = sim.control.issue_tokens("crm_provider")
    webhook_secret = "whsec_c3RhdHMtbXVzdC1ub3Qtc2hvdy10aGlzLWtleQ=="
    sim.control.set_webhook_target(
        "crm_provider",
        "http://hook-user:url-PASSWORD-99@127.0.0.1:1/hook?access_token=query-TOKEN-42",
        [webhook_secret],
    )
    sim.control.configure_receiver("crm_provider", secrets=[webhook_secret])
    secrets = {
        "client secret": "client-secret-VALUE-1234",
        "access token": granted["access_token"],
        "refresh token": granted["refresh_token"],
        "rotated refresh token": refreshed["refresh_token"],
        "rotated access token": refreshed["access_token"],
        "issued refresh token": issued["refresh_token"],
        "issued access token": issued["access_token"],
        "webhook secret": webhook_secret,
        "webhook secret key": webhook_secret.removeprefix("whsec_"),
        "password in the target URL": "url-PASSWORD-99",
        "token in the target URL": "query-TOKEN-42",
        "default client secret": "local-simulator-secret",
    }

    texts = [
        json.dumps(sim.control.stats("crm_provider")),
        json.dumps(sim.control.stats()),
        json.dumps(sim.control.stats("crm_provider", detail=False)),
        http.get("/_control/stats", params={"provider": "crm_provider"}).text,
        json.dumps(sim.state.stats("crm_provider")),
    ]

    leaks = [name for name, value in secrets.items() for text in texts if value in text]
    assert [] == leaks
    oauth = sim.control.stats("crm_provider")["oauth"]
    assert {token_fingerprint(granted["refresh_token"]): 2} == oauth["refresh_requests"]
    assert "url-PASSWORD" not in sim.control.stats("crm_provider")["webhooks"]["url"]


def test_fingerprints_are_short_stable_and_distinct() -> None:
    """A fingerprint is ``sha256:`` + 12 hex digits, the same for the same token."""
    first, second = token_fingerprint("rt_a"), token_fingerprint("rt_b")

    assert first == token_fingerprint("rt_a")
    assert first != second
    assert first.startswith("sha256:")
    assert 12 == len(first.removeprefix("sha256:"))
