"""Against a real OAuth server with refresh-token rotation and reuse protection.

The server is django-oauth-toolkit (``ROTATE_REFRESH_TOKEN``,
``REFRESH_TOKEN_REUSE_PROTECTION``), started by the suite on 127.0.0.1
(``tests/auth/oauth_server``). Token answers are lost for real: the library
talks to the server through a loopback proxy that forwards the request, reads
the server's answer (the server has rotated the refresh token by then) and
drops the client's connection, or stays silent until the client's read
timeout. Every test runs through the sync and the async face.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.auth.conftest import OAuthServer
from tests.auth.loopback import LossyProxy
from tests.conftest import sample

from idis.integrations.auth._status import token_status
from idis.integrations.exceptions import RefreshOutcomeUnknown
from idis.integrations.observability._metrics import Metrics
from idis.integrations.resilience import ManualClock

P = "crm_provider"


def _body(raw: bytes) -> dict[str, Any]:
    return dict(json.loads(raw.partition(b"\r\n\r\n")[2]))


def test_refreshes_rotate_the_refresh_token_and_never_reuse_one(
    oauth_server: OAuthServer, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """The normal path: each refresh spends the refresh token the previous one returned."""
    family = oauth_server.new_family()
    settings = oauth_server.settings(oauth_server.url, sqlite_url, fernet_key)
    manager = tokens(settings)
    manager.import_token(P, family)

    seen = []
    for _ in range(3):
        clock.advance(3600)
        seen.append(manager.get_token(P))
    restarted = tokens(settings)  # another process picks up the newest pair from the row
    clock.advance(3600)
    latest = restarted.get_token(P)

    assert [2, 3, 4, 5] == [token.generation for token in (*seen, latest)]
    assert len({token.refresh_token for token in (*seen, latest)}) == 4
    assert 200 == oauth_server.resource_status(latest.access_token)
    # Had any refresh reused a rotated-out token, the server would have revoked the family.
    assert 403 == oauth_server.resource_status(family["access_token"])  # rotated away


@pytest.mark.parametrize("how", ["drop", "stall"])
def test_a_lost_refresh_answer_does_not_resend_the_rotated_out_refresh_token(
    how: str,
    oauth_server: OAuthServer,
    sqlite_url: str,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """Answer lost after the server rotated: no resend, family intact, state says re-authorize."""
    family = oauth_server.new_family()
    with LossyProxy(oauth_server.url, path_part="/o/token/") as proxy:
        settings = oauth_server.settings(proxy.url, sqlite_url, fernet_key)
        manager = tokens(settings)
        manager.import_token(P, family)
        proxy.lose(1, how)
        clock.advance(3600 - 120)  # inside the refresh margin: refresh ahead of expiry

        kept = manager.get_token(P)  # the refresh is lost; the still-valid token serves
        with pytest.raises(RefreshOutcomeUnknown) as forced:
            manager.refresh(P)  # RB-09 Recovery 1 does not resend it either
        status = token_status(settings, P, clock=clock)
        forwarded = proxy.forwarded
        lost = _body(proxy.lost[0])

    assert family["access_token"] == kept.access_token
    assert 1 == forwarded  # the refresh token was sent once, never again
    assert "refresh_outcome_unknown" == status.state
    line = str(status)
    assert line.startswith("crm_provider: token REFRESH OUTCOME UNKNOWN")
    assert "re-authorize" in line
    assert "re-authorize" in str(forced.value)
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="outcome_unknown"
    )
    assert 1.0 == sample(
        metrics,
        "integration_token_reauthorization_required",
        provider=P,
        reason="outcome_unknown",
    )
    # The server was never shown a rotated-out token: the family is intact, so the
    # pair it minted in the lost answer still works (a resend would have revoked it).
    assert 200 == oauth_server.resource_status(lost["access_token"])
    assert 200 == oauth_server.refresh_directly(lost["refresh_token"]).status_code


def test_after_a_lost_answer_reauthorizing_restores_refreshing(
    oauth_server: OAuthServer, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """Re-authorize (import a new token) and refreshing resumes; check_token says valid."""
    with LossyProxy(oauth_server.url, path_part="/o/token/") as proxy:
        settings = oauth_server.settings(proxy.url, sqlite_url, fernet_key)
        manager = tokens(settings)
        manager.import_token(P, {**oauth_server.new_family(), "expires_in": -1})
        proxy.lose(1, "drop")
        with pytest.raises(RefreshOutcomeUnknown):
            manager.get_token(P)  # no valid token left: the caller is told to re-authorize

        manager.import_token(P, oauth_server.new_family())
        clock.advance(3600)
        refreshed = manager.get_token(P)
        status = token_status(settings, P, clock=clock)

    assert "valid" == status.state
    assert 200 == oauth_server.resource_status(refreshed.access_token)


def test_a_provider_that_tolerates_reuse_gets_the_refresh_resent_inside_its_grace(
    oauth_server_factory: Any, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """REFRESH_REUSE_GRACE matching the server's grace: the lost refresh is resent and served."""
    server: OAuthServer = oauth_server_factory(60)  # REFRESH_TOKEN_GRACE_PERIOD_SECONDS=60
    family = server.new_family()
    with LossyProxy(server.url, path_part="/o/token/") as proxy:
        settings = server.settings(proxy.url, sqlite_url, fernet_key, refresh_reuse_grace=60.0)
        manager = tokens(settings)
        manager.import_token(P, {**family, "expires_in": -1})
        proxy.lose(1, "drop")

        token = manager.get_token(P)
        status = token_status(settings, P, clock=clock)
        forwarded = proxy.forwarded
        lost = _body(proxy.lost[0])

    assert 2 == forwarded  # sent again, inside the grace
    assert lost["access_token"] == token.access_token  # the server re-sent the same pair
    assert lost["refresh_token"] == token.refresh_token
    assert "valid" == status.state
    assert 200 == server.resource_status(token.access_token)
