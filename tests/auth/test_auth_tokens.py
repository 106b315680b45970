"""Token refresh against the simulator over real HTTP: single flight, rotation, failures.

Time is a ManualClock passed to the token manager, so "an hour later" costs nothing;
the simulator's own clock is real, and tokens it considers expired are made so
with its control API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select
from tests.auth.conftest import make_settings
from tests.conftest import sample

from idis.integrations._http import httpx
from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.auth._status import token_status
from idis.integrations.auth._store import TABLE
from idis.integrations.auth._tokens import (
    AsyncTokenManager,
    TokenManager,
    reencrypt_tokens,
    refresh_tokens,
)
from idis.integrations.config import Secret
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import AuthError, ConfigError, ReauthorizationRequired
from idis.integrations.observability._metrics import Metrics
from idis.integrations.resilience import AsyncGateway, Gateway, ManualClock
from idis.integrations.simulator import token_fingerprint
from idis.integrations.testing import RunningSimulator

P = "crm_provider"


def _oauth(sim: RunningSimulator) -> dict[str, Any]:
    return dict(sim.control.stats(P)["oauth"])


def _token_requests(sim: RunningSimulator) -> int:
    return int(sim.control.stats(P)["requests"].get("token", 0))


def _bootstrap_expired(sim: RunningSimulator, manager: TokenManager) -> str:
    """Import a token pair from the simulator that is expired on both sides; return its RT."""
    issued = sim.control.issue_tokens(P)
    sim.control.expire_tokens(P)
    manager.import_token(P, {**issued, "expires_in": -60})
    return str(issued["refresh_token"])


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock for the token manager."""
    return ManualClock()


@pytest.fixture
def manager_factory(clock: ManualClock, metrics: Metrics) -> Iterator[Any]:
    """Builds TokenManagers on the manual clock that are closed after the test."""
    made: list[TokenManager] = []

    def make(settings: Any, **kw: Any) -> TokenManager:
        kw.setdefault("clock", clock)
        kw.setdefault("metrics", metrics)
        kw.setdefault("sleep", lambda _s: None)
        manager = TokenManager(settings, **kw)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def test_client_credentials_token_is_obtained_once_and_stored_encrypted(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any, metrics: Metrics
) -> None:
    """The first call obtains a token, later calls reuse it, and the row holds only ciphertext."""
    manager = manager_factory(make_settings(sim, sqlite_url, fernet_key))

    first = manager.get_token(P)
    again = [manager.get_token(P) for _ in range(5)]

    engine = create_db_engine(sqlite_url)
    with engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.provider == P)).mappings().one()
    engine.dispose()
    assert 1 == _oauth(sim)["client_credentials_grants"]
    assert all(token is first for token in again)
    assert first.access_token not in str(dict(row))
    assert row["access_token_enc"]
    assert 1 == row["generation"]
    assert 1.0 == sample(metrics, "integration_token_refreshes_total", provider=P, outcome="ok")
    assert 3600.0 == sample(metrics, "integration_token_expiry_seconds", provider=P)


def test_refreshes_ahead_of_expiry_and_keeps_a_valid_token_when_the_endpoint_fails(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    manager_factory: Any,
    clock: ManualClock,
) -> None:
    """Inside the refresh margin a failing token endpoint fails no call: the old token stays."""
    manager = manager_factory(make_settings(sim, sqlite_url, fernet_key, refresh_margin=300.0))
    first = manager.get_token(P)

    clock.advance(3200)
    outside_margin = manager.get_token(P)
    clock.advance(101)  # 299 s left: inside the margin
    sim.control.set_fault(P, "error", endpoint="token", status=503)
    during_outage = manager.get_token(P)
    status = token_status(manager.settings, P, clock=clock.now)
    sim.control.clear_faults(P)
    clock.advance(10)  # past the first failure backoff (5 s)
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
    manager_factory: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """With no valid token and the token endpoint down, calls fail fast during the backoff."""
    manager = manager_factory(make_settings(sim, sqlite_url, fernet_key))
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


def test_hundred_threads_on_an_expired_token_make_one_refresh(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any, metrics: Metrics
) -> None:
    """100 threads calling through the Gateway on an expired token cause exactly one refresh."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    manager = manager_factory(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.require_auth(P)
    factory = oauth_auth_factory(settings, manager=manager)
    barrier = threading.Barrier(100)

    with Gateway(settings, auth=factory, metrics=metrics) as gateway:

        def call(_: int) -> int:
            barrier.wait()
            return len(gateway.get_json(P, "records")["items"])

        with ThreadPoolExecutor(max_workers=100) as pool:
            results = list(pool.map(call, range(100)))

    oauth = _oauth(sim)
    stats = sim.control.stats(P)
    assert 100 == len(results)
    assert 1 == oauth["refreshes"]
    assert {token_fingerprint(original): 1} == oauth["refresh_requests"]
    assert 100 == stats["responses"].get("records:200")
    assert 0 == stats["auth_failures"]


def test_hundred_coroutines_on_an_expired_token_make_one_refresh(
    sim: RunningSimulator, db_url: str, fernet_key: str, clock: ManualClock, metrics: Metrics
) -> None:
    """100 concurrent coroutines through the AsyncGateway cause exactly one refresh."""
    settings = make_settings(sim, db_url, fernet_key, grant="refresh_token")
    with TokenManager(settings, clock=clock, metrics=metrics) as bootstrap:
        original = _bootstrap_expired(sim, bootstrap)
    sim.control.require_auth(P)

    async def scenario() -> list[int]:
        async with AsyncTokenManager(settings, clock=clock, metrics=metrics) as manager:
            factory = oauth_auth_factory(settings, async_manager=manager)
            gateway = AsyncGateway(settings, auth=factory, metrics=metrics)
            try:
                pages = await asyncio.gather(*(gateway.get_json(P, "records") for _ in range(100)))
            finally:
                await gateway.aclose()
            return [len(page["items"]) for page in pages]

    results = asyncio.run(scenario())

    oauth = _oauth(sim)
    assert 100 == len(results)
    assert 1 == oauth["refreshes"]
    assert {token_fingerprint(original): 1} == oauth["refresh_requests"]
    assert 100 == sim.control.stats(P)["responses"].get("records:200")


def test_rotated_refresh_token_is_used_next_time_and_the_old_one_never_again(
    sim: RunningSimulator,
    db_url: str,
    fernet_key: str,
    manager_factory: Any,
    clock: ManualClock,
) -> None:
    """Each refresh uses the refresh token the previous one returned, also after a restart."""
    settings = make_settings(sim, db_url, fernet_key, grant="refresh_token")
    manager = manager_factory(settings)
    original = _bootstrap_expired(sim, manager)

    first = manager.get_token(P)
    clock.advance(3600)
    second = manager.get_token(P)
    manager.close()
    clock.advance(3600)
    restarted = manager_factory(settings)  # a new process: only the database remembers
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
    manager_factory: Any,
    clock: ManualClock,
    metrics: Metrics,
) -> None:
    """invalid_grant stops refreshing: later calls (and processes) fail fast until re-import."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    manager = manager_factory(settings)
    original = _bootstrap_expired(sim, manager)
    sim.control.revoke_token(P, original)

    failures = []
    for _ in range(5):
        with pytest.raises(ReauthorizationRequired) as caught:
            manager.get_token(P)
        failures.append(str(caught.value))
        clock.advance(600)
    with pytest.raises(ReauthorizationRequired):
        manager_factory(settings).get_token(P)  # another process
    status = token_status(settings, P, clock=clock.now)
    manager.import_token(P, sim.control.issue_tokens(P))
    healed = manager.get_token(P)
    after_import = token_status(settings, P, clock=clock.now)

    assert {token_fingerprint(original): 1} == _oauth(sim)["refresh_requests"]
    assert "reauthorization_required" == status.state
    assert "REAUTHORIZATION REQUIRED" in str(status)
    assert "import-token" in str(status)
    assert all("import-token --provider crm_provider" in text for text in failures)
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="invalid_grant"
    )
    assert "valid" == after_import.state
    assert 2 == healed.generation


def test_refresh_tokens_retries_a_reauthorization_state_on_demand(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    manager_factory: Any,
    clock: ManualClock,
) -> None:
    """refresh_tokens (RB-09 Recovery 1) tries once even in the stopped state, and reports it."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    manager = manager_factory(settings)
    sim.control.set_oauth_client(P, "idis-local", "another-secret-entirely")
    with pytest.raises(ReauthorizationRequired):
        manager.get_token(P)
    sim.control.set_oauth_client(P, "idis-local", "local-simulator-secret")

    results = refresh_tokens(P, settings=settings, manager=manager)

    assert ["refreshed"] == [r.outcome for r in results]
    assert str(results[0]).startswith("crm_provider: refreshed, expires in 3600s")
    assert "valid" == token_status(settings, P, clock=clock.now).state


def test_refresh_tokens_all_reports_each_provider(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any
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

    results = refresh_tokens(all=True, settings=settings, manager=manager_factory(settings))

    by_name = {r.provider: r for r in results}
    assert "refreshed" == by_name["crm_provider"].outcome
    assert "failed" == by_name["docs_provider"].outcome
    assert "CredentialsRejected" == by_name["docs_provider"].error_type
    assert "skipped" == by_name["enrichment_provider"].outcome
    with pytest.raises(ConfigError):
        refresh_tokens(settings=settings)


def test_a_401_refreshes_once_and_retries_once(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any, metrics: Metrics
) -> None:
    """A token the provider stopped accepting is replaced once and the request sent again."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    manager = manager_factory(settings)
    manager.get_token(P)
    sim.control.require_auth(P)
    sim.control.expire_tokens(P)  # valid in our view, rejected by the provider

    with Gateway(settings, auth=oauth_auth_factory(settings, manager=manager)) as gateway:
        page = gateway.get_json(P, "records")

    stats = sim.control.stats(P)
    assert "items" in page
    assert 1 == stats["responses"].get("records:401")
    assert 1 == stats["responses"].get("records:200")
    assert 2 == stats["oauth"]["client_credentials_grants"]


def test_a_second_401_is_returned_not_retried_again(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any
) -> None:
    """If the provider also refuses the new token, the 401 reaches the caller after one retry."""
    settings = make_settings(sim, sqlite_url, fernet_key)
    manager = manager_factory(settings)
    seen: list[str] = []

    def always_401(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(401, json={"error": "invalid_token"})

    auth = oauth_auth_factory(settings, manager=manager)(settings.provider(P))
    with httpx.Client(transport=httpx.MockTransport(always_401), auth=auth) as client:
        response = client.get("http://resource.test/records")

    assert 401 == response.status_code
    assert 2 == len(seen)
    assert seen[0] != seen[1]
    assert 2 == _oauth(sim)["client_credentials_grants"]


def test_without_a_key_tokens_stay_in_memory_and_metadata_is_stored(
    sim: RunningSimulator, sqlite_url: str, manager_factory: Any, clock: ManualClock
) -> None:
    """No IDIS_ENCRYPTION_KEYS: client_credentials works, nothing secret is written."""
    settings = make_settings(sim, sqlite_url, None)
    token = manager_factory(settings).get_token(P)

    engine = create_db_engine(sqlite_url)
    with engine.connect() as conn:
        row = conn.execute(select(TABLE).where(TABLE.c.provider == P)).mappings().one()
    engine.dispose()
    status = token_status(settings, P, clock=clock.now)

    assert None is row["access_token_enc"]
    assert None is row["refresh_token_enc"]
    assert token.access_token not in str(dict(row))
    assert "valid" == status.state
    assert "memory only: IDIS_ENCRYPTION_KEYS is unset" in str(status)
    with pytest.raises(ConfigError) as caught:
        manager_factory(make_settings(sim, sqlite_url, None, grant="refresh_token")).get_token(P)
    assert "IDIS_ENCRYPTION_KEYS" == caught.value.variable


def test_key_rotation_reencrypts_stored_tokens(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any
) -> None:
    """After reencrypt_tokens a manager holding only the new key reads the stored token."""
    from idis.integrations.auth._crypto import generate_key

    old_settings = make_settings(sim, sqlite_url, fernet_key)
    first = manager_factory(old_settings).get_token(P)
    new_key = generate_key()
    both = replace(old_settings, encryption_keys=(Secret(new_key), Secret(fernet_key)))

    count = reencrypt_tokens(settings=both)
    only_new = make_settings(sim, sqlite_url, new_key)
    reread = manager_factory(only_new).get_token(P)

    assert 1 == count
    assert first.access_token == reread.access_token
    assert 1 == _oauth(sim)["client_credentials_grants"]


def test_import_token_rejects_malformed_documents_naming_the_field(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, manager_factory: Any
) -> None:
    """A bad token document fails naming the field, and changes nothing."""
    manager = manager_factory(make_settings(sim, sqlite_url, fernet_key, grant="refresh_token"))

    with pytest.raises(ConfigError) as missing:
        manager.import_token(P, {"token_type": "Bearer"})
    with pytest.raises(ConfigError) as bad_expiry:
        manager.import_token(P, {"access_token": "at_x", "expires_in": "soon"})

    assert "access_token" == missing.value.variable
    assert "expires_in" == bad_expiry.value.variable
    assert "missing" == token_status(manager.settings, P).state


def test_async_manager_handles_401_failures_and_reauthorization(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, clock: ManualClock, metrics: Metrics
) -> None:
    """The asyncio driver: 401 retried once, outage backed off, invalid_grant stops refreshing."""
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    with TokenManager(settings, clock=clock, metrics=metrics) as bootstrap:
        bootstrap.import_token(P, sim.control.issue_tokens(P))
    sim.control.require_auth(P)

    async def no_sleep(_seconds: float) -> None:
        return None

    async def scenario() -> tuple[list[str], int, int]:
        errors: list[str] = []
        async with AsyncTokenManager(
            settings, clock=clock, metrics=metrics, sleep=no_sleep
        ) as manager:
            factory = oauth_auth_factory(settings, async_manager=manager)
            async with AsyncGateway(settings, auth=factory, metrics=metrics) as gateway:
                sim.control.expire_tokens(P)  # valid for us, refused by the provider
                await gateway.get_json(P, "records")
            after_401 = (await manager.get_token(P)).generation
            clock.advance(3600)
            sim.control.set_fault(P, "error", endpoint="token", status=503)
            for _ in range(2):
                with pytest.raises(AuthError) as failed:
                    await manager.get_token(P)
                errors.append(str(failed.value))
            sim.control.clear_faults(P)
            clock.advance(10)
            current = await manager.get_token(P)
            assert current.refresh_token is not None
            sim.control.revoke_token(P, current.refresh_token)
            clock.advance(3600)
            for _ in range(3):
                with pytest.raises(ReauthorizationRequired):
                    await manager.get_token(P)
            return errors, after_401, current.generation

    errors, after_401, recovered = asyncio.run(scenario())

    oauth = _oauth(sim)
    assert 2 == after_401
    assert 3 == recovered
    assert "HTTP 503" in errors[0]
    assert "next attempt in" in errors[1]
    assert 1 == sim.control.stats(P)["responses"].get("records:401")
    assert 2 == oauth["refreshes"]
    assert 3 == len(oauth["refresh_requests"])  # the revoked one was sent exactly once
    assert 1.0 == sample(
        metrics, "integration_token_refreshes_total", provider=P, outcome="invalid_grant"
    )
    assert "reauthorization_required" == token_status(settings, P, clock=clock.now).state
