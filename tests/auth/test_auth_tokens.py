"""Token refresh against the simulator over real HTTP: single flight, rotation, failures.

Every test of the token API runs twice, through :class:`TokenManager` and
:class:`AsyncTokenManager` (the ``mode`` fixture; ``tokens`` builds a manager
of that face). Time is a ManualClock passed to the managers, so "an hour
later" costs nothing and the waits between token requests advance it; the
simulator's own clock is real, and tokens it considers expired are made so
with its control API.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from tests.auth.conftest import Tokens, make_settings
from tests.conftest import sample

from idis.integrations._http import httpx
from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.auth._status import token_status
from idis.integrations.auth._store import TABLE
from idis.integrations.auth._tokens import TokenManager, reencrypt_tokens, refresh_tokens
from idis.integrations.config import Secret
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import (
    AuthError,
    ConfigError,
    ReauthorizationRequired,
    RefreshOutcomeUnknown,
    TokenLockTimeout,
)
from idis.integrations.observability._metrics import Metrics
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock
from idis.integrations.simulator import token_fingerprint
from idis.integrations.testing import RunningSimulator

P = "crm_provider"


def _oauth(sim: RunningSimulator) -> dict[str, Any]:
    return dict(sim.control.stats(P)["oauth"])


def _token_requests(sim: RunningSimulator) -> int:
    return int(sim.control.stats(P)["requests"].get("token", 0))


def _bootstrap_expired(sim: RunningSimulator, manager: Tokens | TokenManager) -> str:
    """Import a token pair from the simulator that is expired on both sides; return its RT."""
    issued = sim.control.issue_tokens(P)
    sim.control.expire_tokens(P)
    manager.import_token(P, {**issued, "expires_in": -60})
    return str(issued["refresh_token"])


def _row(url: str) -> dict[str, Any]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(select(TABLE).where(TABLE.c.provider == P)).mappings().one()
        return dict(row)
    finally:
        engine.dispose()


def _call_through_gateway(tokens: Tokens, settings: Any, metrics: Metrics) -> dict[str, Any]:
    """One ``records`` call through the Gateway of this face, authenticated by ``tokens``."""
    if tokens.mode == "sync":
        with Gateway(settings, auth=oauth_auth_factory(settings, manager=tokens.manager)) as gw:
            return dict(gw.get_json(P, "records"))

    async def call() -> dict[str, Any]:
        factory = oauth_auth_factory(settings, async_manager=tokens.manager)
        async with AsyncGateway(settings, auth=factory, metrics=metrics) as gateway:
            return dict(await gateway.get_json(P, "records"))

    return dict(tokens.run(call()))


def test_client_credentials_token_is_obtained_once_and_stored_encrypted(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, metrics: Metrics
) -> None:
    """The first call obtains a token, later calls reuse it, and the row holds only ciphertext."""
    manager = tokens(make_settings(sim, sqlite_url, fernet_key))

    first = manager.get_token(P)
    again = [manager.get_token(P) for _ in range(5)]

    row = _row(sqlite_url)
    assert 1 == _oauth(sim)["client_credentials_grants"]
    assert all(token is first for token in again)
    assert first.access_token not in str(row)
    assert row["access_token_enc"]
    assert 1 == row["generation"]
    assert 1.0 == sample(metrics, "integration_token_refreshes_total", provider=P, outcome="ok")
    assert 3600.0 == sample(metrics, "integration_token_expiry_seconds", provider=P)


def test_refreshes_ahead_of_expiry_and_keeps_a_valid_token_when_the_endpoint_fails(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """Inside the refresh margin a failing token endpoint fails no call: the old token stays."""
    manager = tokens(make_settings(sim, sqlite_url, fernet_key, refresh_margin=300.0))
    first = manager.get_token(P)

    clock.advance(3200)
    outside_margin = manager.get_token(P)
    clock.advance(101)  # 299 s left: inside the margin
    sim.control.set_fault(P, "error", endpoint="token", status=503)
    during_outage = manager.get_token(P)
    status = token_status(manager.settings, P, clock=clock)
    sim.control.clear_faults(P)
    clock.advance(10)  # past the first failure backoff (at most 5 s)
    recovered = manager.get_token(P)

    assert first is outside_margin
    assert first is during_outage
    assert "refresh_failing" == status.state
    assert "503" in (status.last_error or "")
    assert 2 == recovered.generation
    # one success, three attempts during the outage, one success after it
    assert 5 == _token_requests(sim)


def test_token_endpoint_outage_backs_off_instead_of_hammering(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """With no valid token and the token endpoint down, calls fail fast during the backoff."""
    manager = tokens(make_settings(sim, sqlite_url, fernet_key))
    sim.control.set_fault(P, "error", endpoint="token", status=503)

    with pytest.raises(AuthError) as first:
        manager.get_token(P)
    with pytest.raises(AuthError) as held:
        manager.get_token(P)
    requests_during_backoff = _token_requests(sim)
    sim.control.clear_faults(P)
    clock.advance(6)
    token = manager.get_token(P)

    assert not isinstance(first.value, ReauthorizationRequired)
    assert "503" in str(first.value)
    assert "next attempt in" in str(held.value)
    assert 3 == requests_during_backoff  # refresh_attempts, then nothing while backing off
    assert 1 == token.generation
    assert 1.0 == sample(metrics, "integration_token_refreshes_total", provider=P, outcome="failed")
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="backoff"
    )
    assert 3.0 == sample(
        metrics,
        "integration_errors_total",
        provider=P,
        endpoint="token",
        error_type="server_error",
    )


def test_hundred_concurrent_callers_on_an_expired_token_make_one_refresh(
    sim: RunningSimulator, db_url: str, fernet_key: str, tokens: Any, metrics: Metrics
) -> None:
    """100 threads (sync) or 100 coroutines (async) through the Gateway: exactly one refresh."""
    settings = make_settings(sim, db_url, fernet_key, grant="refresh_token")
    manager = tokens(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.require_auth(P)

    if manager.mode == "sync":
        factory = oauth_auth_factory(settings, manager=manager.manager)
        barrier = threading.Barrier(100)
        with Gateway(settings, auth=factory, metrics=metrics) as gateway:

            def call(_: int) -> int:
                barrier.wait()
                return len(gateway.get_json(P, "records")["items"])

            with ThreadPoolExecutor(max_workers=100) as pool:
                results = list(pool.map(call, range(100)))
    else:

        async def scenario() -> list[int]:
            factory = oauth_auth_factory(settings, async_manager=manager.manager)
            async with AsyncGateway(settings, auth=factory, metrics=metrics) as gateway:
                pages = await asyncio.gather(*(gateway.get_json(P, "records") for _ in range(100)))
            return [len(page["items"]) for page in pages]

        results = manager.run(scenario())

    oauth = _oauth(sim)
    stats = sim.control.stats(P)
    assert 100 == len(results)
    assert 1 == oauth["refreshes"]
    assert {token_fingerprint(original): 1} == oauth["refresh_requests"]
    assert 100 == stats["responses"].get("records:200")
    assert 0 == stats["auth_failures"]


def test_rotated_refresh_token_is_used_next_time_and_the_old_one_never_again(
    sim: RunningSimulator, db_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """Each refresh uses the refresh token the previous one returned, also after a restart."""
    settings = make_settings(sim, db_url, fernet_key, grant="refresh_token")
    manager = tokens(settings)
    original = _bootstrap_expired(sim, manager)

    first = manager.get_token(P)
    clock.advance(3600)
    second = manager.get_token(P)
    manager.close()
    clock.advance(3600)
    restarted = tokens(settings)  # a new process: only the database remembers
    third = restarted.get_token(P)

    oauth = _oauth(sim)
    assert [2, 3, 4] == [first.generation, second.generation, third.generation]
    assert 3 == oauth["refreshes"]
    assert 0 == oauth["reuse_detected"]
    assert 3 == len(oauth["refresh_requests"])
    assert {1} == set(oauth["refresh_requests"].values())
    assert 1 == oauth["refresh_requests"][token_fingerprint(original)]


def test_revoked_refresh_token_needs_reauthorization_without_endless_retry(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """invalid_grant stops refreshing: later calls (and processes) fail fast until re-import."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    manager = tokens(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.revoke_token(P, original)

    failures = []
    for _ in range(5):
        with pytest.raises(ReauthorizationRequired) as caught:
            manager.get_token(P)
        failures.append(str(caught.value))
        clock.advance(600)
    with pytest.raises(ReauthorizationRequired):
        tokens(settings).get_token(P)  # another process
    status = token_status(settings, P, clock=clock)
    stopped = sample(
        metrics, "integration_token_reauthorization_required", provider=P, reason="invalid_grant"
    )
    manager.import_token(P, sim.control.issue_tokens(P))
    healed = manager.get_token(P)
    after_import = token_status(settings, P, clock=clock)

    assert {token_fingerprint(original): 1} == _oauth(sim)["refresh_requests"]
    assert "reauthorization_required" == status.state
    assert "REAUTHORIZATION REQUIRED" in str(status)
    assert "import-token" in str(status)
    assert all("import-token --provider crm_provider" in text for text in failures)
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="invalid_grant"
    )
    assert 1.0 == stopped
    assert 0.0 == sample(
        metrics, "integration_token_reauthorization_required", provider=P, reason="invalid_grant"
    )
    assert "valid" == after_import.state
    assert 2 == healed.generation


def test_a_refusal_ahead_of_expiry_keeps_calls_going_on_the_valid_token(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """invalid_grant inside the margin: the still-valid token serves callers until it expires."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    manager = tokens(settings)
    issued = sim.control.issue_tokens(P)
    current = manager.import_token(P, issued)
    sim.control.revoke_token(P, issued["refresh_token"])

    clock.advance(3600 - 120)  # inside the refresh margin, still valid
    kept = [manager.get_token(P) for _ in range(3)]
    status = token_status(settings, P, clock=clock)
    clock.advance(121)
    with pytest.raises(ReauthorizationRequired):
        manager.get_token(P)

    assert all(token.access_token == current.access_token for token in kept)
    assert "reauthorization_required" == status.state
    assert 1 == sum(_oauth(sim)["refresh_requests"].values())  # tried once, then stopped


def test_refresh_token_grant_outage_backs_off_and_recovers(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, clock: ManualClock
) -> None:
    """429s on the token endpoint (not processed: safe to resend) back off, then recover."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    manager = tokens(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.set_fault(P, "rate_limit", endpoint="token", status=429)

    errors = []
    for _ in range(2):
        with pytest.raises(AuthError) as failed:
            manager.get_token(P)
        errors.append(failed.value)
    sim.control.clear_faults(P)
    clock.advance(10)
    token = manager.get_token(P)

    assert not isinstance(errors[0], ReauthorizationRequired)
    assert "429" in str(errors[0])
    assert "next attempt in" in str(errors[1])
    assert 2 == token.generation
    assert (
        1 == _oauth(sim)["refresh_requests"][token_fingerprint(original)]
    )  # the 429s were never processed


def test_a_refresh_whose_answer_times_out_is_not_resent(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """A read timeout on a refresh: one request, state refresh_outcome_unknown, no resend."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    provider = settings.provider(P)
    settings = settings.with_providers(
        replace(provider, timeouts=replace(provider.timeouts, read=0.5))
    )
    manager = tokens(settings)
    _bootstrap_expired(sim, manager)
    sim.control.set_fault(P, "timeout", endpoint="token", seconds=5)

    with pytest.raises(RefreshOutcomeUnknown) as lost:
        manager.get_token(P)
    sim.control.clear_faults(P)
    clock.advance(600)
    with pytest.raises(RefreshOutcomeUnknown) as forced:
        manager.refresh(P)  # even refresh-tokens will not resend it
    with pytest.raises(RefreshOutcomeUnknown):
        tokens(settings).get_token(P)  # nor another process
    status = token_status(settings, P, clock=clock)

    assert 1 == _token_requests(sim)
    assert "timeout" == lost.value.reason
    assert "import-token --provider crm_provider" in str(lost.value)
    assert "REFRESH_REUSE_GRACE" in str(lost.value)
    assert "re-authorize" in str(forced.value)
    assert "refresh_outcome_unknown" == status.state
    assert str(status).startswith("crm_provider: token REFRESH OUTCOME UNKNOWN")
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="outcome_unknown"
    )
    assert 1.0 == sample(
        metrics,
        "integration_token_reauthorization_required",
        provider=P,
        reason="outcome_unknown",
    )


def test_with_a_reuse_grace_a_lost_answer_is_resent_inside_the_grace(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any
) -> None:
    """REFRESH_REUSE_GRACE: a provider that tolerates reuse gets the same refresh token again."""
    settings = make_settings(
        sim, sqlite_url, fernet_key, grant="refresh_token", refresh_reuse_grace=60.0
    )
    manager = tokens(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.set_fault(P, "error", endpoint="token", status=502, count=1)

    token = manager.get_token(P)

    assert 2 == token.generation
    assert {token_fingerprint(original): 1} == _oauth(sim)[
        "refresh_requests"
    ]  # the 502 never reached the grant
    assert 2 == _token_requests(sim)


def test_refresh_tokens_retries_a_reauthorization_state_on_demand(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, clock: ManualClock, metrics: Metrics
) -> None:
    """refresh_tokens (RB-09 Recovery 1) tries once even in the stopped state, and reports it."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    with TokenManager(settings, clock=clock, metrics=metrics) as manager:
        sim.control.set_oauth_client(P, "idis-local", "another-secret-entirely")
        with pytest.raises(ReauthorizationRequired):
            manager.get_token(P)
        sim.control.set_oauth_client(P, "idis-local", "local-simulator-secret")

        results = refresh_tokens(P, settings=settings, manager=manager)

    assert ["refreshed"] == [r.outcome for r in results]
    assert str(results[0]).startswith("crm_provider: refreshed, expires in 3600s")
    assert "valid" == token_status(settings, P, clock=clock).state


def test_refresh_tokens_all_reports_each_provider(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, clock: ManualClock
) -> None:
    """--all refreshes every OAuth provider and reports failures per provider without stopping."""
    from idis.integrations.testing import simulator_settings

    settings = simulator_settings(
        sim.url,
        providers=("crm_provider", "docs_provider", "enrichment_provider"),
        database_url=sqlite_url,
        encryption_keys=(Secret(fernet_key),),
    )
    docs = settings.provider("docs_provider")
    enrich = settings.provider("enrichment_provider")
    settings = settings.with_providers(
        replace(docs, auth=replace(docs.auth, client_secret=Secret("wrong-secret-value"))),
        replace(enrich, auth=replace(enrich.auth, grant="none")),
    )

    with TokenManager(settings, clock=clock) as manager:
        results = refresh_tokens(all=True, settings=settings, manager=manager)

    by_name = {r.provider: r for r in results}
    assert "refreshed" == by_name["crm_provider"].outcome
    assert "failed" == by_name["docs_provider"].outcome
    assert "CredentialsRejected" == by_name["docs_provider"].error_type
    assert "skipped" == by_name["enrichment_provider"].outcome
    with pytest.raises(ConfigError):
        refresh_tokens(settings=settings)


def test_a_401_refreshes_once_and_retries_once(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, metrics: Metrics
) -> None:
    """A token the provider stopped accepting is replaced once and the request sent again."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    manager = tokens(settings)
    manager.get_token(P)
    sim.control.require_auth(P)
    sim.control.expire_tokens(P)  # valid in our view, rejected by the provider

    page = _call_through_gateway(manager, settings, metrics)

    stats = sim.control.stats(P)
    assert "items" in page
    assert 1 == stats["responses"].get("records:401")
    assert 1 == stats["responses"].get("records:200")
    assert 2 == stats["oauth"]["client_credentials_grants"]


def test_a_second_401_is_returned_not_retried_again(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any
) -> None:
    """If the provider also refuses the new token, the 401 reaches the caller after one retry."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    manager = tokens(settings)
    seen: list[str] = []

    def always_401(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(401, json={"error": "invalid_token"})

    if manager.mode == "sync":
        auth = oauth_auth_factory(settings, manager=manager.manager)(settings.provider(P))
        with httpx.Client(transport=httpx.MockTransport(always_401), auth=auth) as client:
            status = client.get("http://resource.test/records").status_code
    else:

        async def call() -> int:
            factory = oauth_auth_factory(settings, async_manager=manager.manager)
            transport = httpx.MockTransport(always_401)
            async with httpx.AsyncClient(
                transport=transport, auth=factory(settings.provider(P))
            ) as c:
                return (await c.get("http://resource.test/records")).status_code

        status = manager.run(call())

    assert 401 == status
    assert 2 == len(seen)
    assert seen[0] != seen[1]
    assert 2 == _oauth(sim)["client_credentials_grants"]


def test_without_a_key_tokens_stay_in_memory_and_metadata_is_stored(
    sim: RunningSimulator, sqlite_url: str, tokens: Any, clock: ManualClock
) -> None:
    """No IDIS_ENCRYPTION_KEYS: client_credentials works, nothing secret is written."""
    settings = make_settings(sim, sqlite_url, None)
    token = tokens(settings).get_token(P)

    row = _row(sqlite_url)
    status = token_status(settings, P, clock=clock)

    assert None is row["access_token_enc"]
    assert None is row["refresh_token_enc"]
    assert token.access_token not in str(row)
    assert "valid" == status.state
    assert "memory only: IDIS_ENCRYPTION_KEYS is unset" in str(status)
    with pytest.raises(ConfigError) as caught:
        tokens(make_settings(sim, sqlite_url, None, grant="refresh_token")).get_token(P)
    assert "IDIS_ENCRYPTION_KEYS" == caught.value.variable


def test_key_rotation_reencrypts_stored_tokens(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any
) -> None:
    """After reencrypt_tokens a manager holding only the new key reads the stored token."""
    from idis.integrations.auth._crypto import generate_key

    old_settings = make_settings(sim, sqlite_url, fernet_key)
    first = tokens(old_settings).get_token(P)
    new_key = generate_key()
    both = replace(old_settings, encryption_keys=(Secret(new_key), Secret(fernet_key)))

    count = reencrypt_tokens(settings=both)
    only_new = make_settings(sim, sqlite_url, new_key)
    reread = tokens(only_new).get_token(P)

    assert 1 == count
    assert first.access_token == reread.access_token
    assert 1 == _oauth(sim)["client_credentials_grants"]


def test_a_token_copied_into_another_providers_row_is_never_handed_out(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any
) -> None:
    """Ciphertext is bound to its provider: a copied token is refused, not sent elsewhere."""
    from idis.integrations.testing import simulator_settings

    settings = simulator_settings(
        sim.url,
        providers=("crm_provider", "docs_provider"),
        database_url=sqlite_url,
        encryption_keys=(Secret(fernet_key),),
    )
    manager = tokens(settings)
    crm = manager.get_token("crm_provider")
    manager.get_token("docs_provider")
    engine = create_db_engine(sqlite_url)
    with engine.begin() as conn:
        stolen = conn.execute(
            select(TABLE.c.access_token_enc, TABLE.c.generation).where(TABLE.c.provider == P)
        ).one()
        conn.execute(
            update(TABLE)
            .where(TABLE.c.provider == "docs_provider")
            .values(access_token_enc=stolen[0], generation=stolen[1] + 10)
        )
    engine.dispose()

    docs = tokens(settings).get_token("docs_provider")  # a new process reads the row

    assert crm.access_token != docs.access_token
    assert 2 == sim.control.stats("docs_provider")["oauth"]["client_credentials_grants"]


def test_import_token_rejects_malformed_documents_naming_the_field(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any
) -> None:
    """A bad token document fails naming the field, and changes nothing."""
    manager = tokens(make_settings(sim, sqlite_url, fernet_key, grant="refresh_token"))

    with pytest.raises(ConfigError) as missing:
        manager.import_token(P, {"token_type": "Bearer"})
    with pytest.raises(ConfigError) as bad_expiry:
        manager.import_token(P, {"access_token": "at_x", "expires_in": "soon"})

    assert "access_token" == missing.value.variable
    assert "expires_in" == bad_expiry.value.variable
    assert "missing" == token_status(manager.settings, P).state


def test_credentials_rotated_into_vault_but_no_vault_settings_name_the_variables(
    sim: RunningSimulator, sqlite_url: str, tokens: Any
) -> None:
    """After a rotation into Vault, a process without VAULT_* gets a message naming them."""
    settings = make_settings(sim, sqlite_url, None)
    engine = create_db_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(
            TABLE.insert().values(
                provider=P,
                grant_type="client_credentials",
                state="ok",
                generation=3,
                scopes=[],
                consecutive_failures=0,
                credential_source="vault",
                credential_version=2,
                client_id="idis-local",
                updated_at=ManualClock().now(),
            )
        )
    engine.dispose()

    with pytest.raises(ConfigError) as caught:
        tokens(settings).get_token(P)

    text = str(caught.value)
    assert "VAULT_ADDR" == caught.value.variable
    assert "rotated into Vault (secret/idis/integrations/crm_provider version 2)" in text
    assert "set VAULT_ADDR and VAULT_TOKEN (or VAULT_ROLE_ID and VAULT_SECRET_ID" in text


class _OtherProcessFirst(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """A token endpoint that fails (503) after another process refreshed meanwhile."""

    def __init__(self, meanwhile: Any) -> None:
        self._meanwhile = meanwhile

    def _answer(self) -> httpx.Response:
        if self._meanwhile is not None:
            self._meanwhile()
            self._meanwhile = None
        return httpx.Response(503, json={"error": "temporarily_unavailable"})

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._answer()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self._answer()


def test_a_failed_refresh_that_lost_the_race_adopts_the_other_processs_token(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """SQLite: our refresh fails while another process refreshed; its token is used, no failure."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    other = TokenManager(settings, clock=clock)
    try:
        manager = tokens(settings, transport=_OtherProcessFirst(lambda: other.get_token(P)))

        token = manager.get_token(P)
    finally:
        other.close()

    row = _row(sqlite_url)
    assert 1 == token.generation
    assert "ok" == row["state"]
    assert 0 == row["consecutive_failures"]
    assert 1.0 == sample(metrics, "integration_token_refreshes_total", provider=P, outcome="reused")


def test_a_caller_waiting_past_lock_timeout_in_process_gets_a_lock_timeout(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, tokens: Any, metrics: Metrics
) -> None:
    """The provider's lock in this process (a thread's, a task's) held past lock_timeout:
    TokenLockTimeout (an AuthError that says the credentials may be fine), nothing sent."""
    settings = make_settings(sim, sqlite_url, fernet_key, lock_timeout=0.2)
    manager = tokens(settings)
    provider = settings.provider(P)

    async def while_held_async() -> BaseException:
        async with manager.manager._lock(provider):
            with pytest.raises(TokenLockTimeout) as caught:
                await manager.manager.get_token(P)
        return caught.value

    if manager.mode == "sync":
        with manager.manager._lock(provider), pytest.raises(TokenLockTimeout) as caught:
            manager.get_token(P)
        error: BaseException = caught.value
    else:
        error = manager.run(while_held_async())
    grants_while_held = _oauth(sim)["client_credentials_grants"]
    token = manager.get_token(P)

    assert isinstance(error, AuthError)
    assert "credentials may be fine" in str(error)
    assert 0 == grants_while_held
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="lock_timeout"
    )
    assert 1 == token.generation


def test_async_token_manager_as_a_context_manager_closes_its_client(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str
) -> None:
    """``async with AsyncTokenManager(...) as manager`` yields the manager, which works inside
    and has its HTTP client closed on the way out, as the sync ``with`` does."""
    from idis.integrations.auth._tokens import AsyncTokenManager

    settings = make_settings(sim, sqlite_url, fernet_key)

    async def scenario() -> tuple[bool, bool, bool]:
        made = AsyncTokenManager(settings)
        async with made as manager:
            token = await manager.get_token(P)
            inside = manager._http.is_closed
        return manager is made and bool(token), inside, manager._http.is_closed

    assert (True, False, True) == asyncio.run(scenario())


def test_a_seed_repeats_the_waits_after_a_failed_refresh(
    sim: RunningSimulator,
    sqlite_url: str,
    tmp_path: Path,
    fernet_key: str,
    tokens: Any,
    clock: ManualClock,
) -> None:
    """``seed=`` makes the jitter reproducible: the waits between the token requests of a
    refresh and the hold after it failed (the drill's token-revocation gave 5 or 6 failures
    at one moment, from run to run, while they came from the unseeded ``random`` module)."""
    sim.control.set_fault(P, "error", endpoint="token", status=503)

    def waits(seed: int, name: str) -> tuple[float, float]:
        url = f"sqlite:///{tmp_path / name}"
        shutil.copyfile(sqlite_url.removeprefix("sqlite:///"), tmp_path / name)
        manager = tokens(make_settings(sim, url, fernet_key), seed=seed)
        start = clock.now()
        with pytest.raises(AuthError):
            manager.get_token(P)
        hold = _row(url)["next_attempt_at"].replace(tzinfo=UTC)
        return (clock.now() - start).total_seconds(), (hold - start).total_seconds()

    first, again, other = waits(11, "a.sqlite3"), waits(11, "b.sqlite3"), waits(12, "c.sqlite3")

    assert first == again
    assert first != other
    assert 0 < first[0] < first[1]  # the requests' waits, then the hold (5 s at most after 1)
