"""OAuth through each pack's dialect: a session the provider ended is refreshed once, reactively."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from idis.integrations.auth._crypto import generate_key
from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import ProviderRejected
from idis.integrations.providers import client_for
from idis.integrations.providers._pack import pack_auth
from idis.integrations.resilience import Gateway
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator(seed=13) as running:
        yield running


def _settings(sim: RunningSimulator, url: str, api: str) -> Settings:
    base = simulator_settings(
        sim.url, providers=(P,), database_url=url, encryption_keys=(Secret(generate_key()),)
    )
    provider = base.provider(P)
    return base.with_providers(
        replace(provider, api=api, auth=replace(provider.auth, grant="client_credentials"))
    )


@pytest.mark.parametrize("api", ["hubspot", "salesforce"])
def test_an_ended_session_is_refreshed_once_and_the_call_succeeds(
    sim: RunningSimulator, sqlite_url: str, api: str
) -> None:
    """The provider ends the session (Salesforce: 401 INVALID_SESSION_ID): refresh once, retry."""
    sim.control.emit(P, 2, record_ids=["deal_a", "deal_b"], webhook=False)
    sim.control.require_auth(P)
    settings = _settings(sim, sqlite_url, api)
    engine = create_db_engine(sqlite_url)
    manager = TokenManager(settings, engine=engine)
    gateway = Gateway(settings, auth=pack_auth(oauth_auth_factory(settings, manager=manager)))
    try:
        client = client_for(gateway, P)
        first = client.get_record("deal_a")
        sim.control.expire_tokens(P)
        second = client.get_record("deal_b")
    finally:
        gateway.close()
        manager.close()
        engine.dispose()

    stats = sim.control.stats(P)
    assert first is not None
    assert second is not None
    assert 2 == stats["oauth"]["client_credentials_grants"]
    assert 1 == stats["auth_failures"]


def test_without_a_token_the_dialect_says_why(sim: RunningSimulator, sqlite_url: str) -> None:
    """Salesforce's 401 is a JSON array naming INVALID_SESSION_ID; the error keeps the code."""
    sim.control.require_auth(P)
    settings = _settings(sim, sqlite_url, "salesforce")
    gateway = Gateway(settings)
    try:
        with pytest.raises(ProviderRejected) as caught:
            client_for(gateway, P).get_record("deal_a")
    finally:
        gateway.close()

    assert 401 == caught.value.status_code
    assert "INVALID_SESSION_ID" == (caught.value.details or {}).get("errorCode")


@pytest.mark.parametrize("face", ["sync", "async"])
def test_salesforce_calls_go_to_the_instance_url_of_the_token(
    sim: RunningSimulator, sqlite_url: str, face: str
) -> None:
    """BASE_URL is the login host (it serves only the token endpoint); the token answer's
    instance_url is the org's API base, stored with the token, and every call goes there."""
    import asyncio

    from sqlalchemy import text

    from idis.integrations.auth._tokens import AsyncTokenManager
    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.providers import async_client_for
    from idis.integrations.resilience._gateway import AsyncGateway

    sim.control.emit(P, 2, record_ids=["opp_a", "opp_b"], webhook=False)
    sim.control.require_auth(P)
    base = _settings(sim, sqlite_url, "salesforce")
    provider = base.provider(P)
    settings = base.with_providers(
        replace(
            provider,
            base_url=f"{sim.url}/p/{P}/login",
            auth=replace(provider.auth, token_url="/services/oauth2/token"),
        )
    )
    engine = create_db_engine(sqlite_url)
    if face == "sync":
        manager = TokenManager(settings, engine=engine)
        gateway = Gateway(settings, auth=pack_auth(oauth_auth_factory(settings, manager=manager)))
        try:
            found = client_for(gateway, P).get_record("opp_a")
            sim.control.expire_tokens(P)
            again = client_for(gateway, P).get_record("opp_b")
        finally:
            gateway.close()
            manager.close()
    else:

        async def run() -> tuple[object, object]:
            async_engine = create_async_db_engine(sqlite_url)
            manager = AsyncTokenManager(settings, engine=async_engine)
            factory = oauth_auth_factory(settings, async_manager=manager)
            gateway = AsyncGateway(settings, auth=pack_auth(factory))
            try:
                client = async_client_for(gateway, P)
                first = await client.get_record("opp_a")
                sim.control.expire_tokens(P)
                second = await client.get_record("opp_b")
            finally:
                await gateway.aclose()
                await manager.aclose()
                await async_engine.dispose()
            return first, second

        found, again = asyncio.run(run())
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT instance_url FROM oauth_tokens WHERE provider = :p"), {"p": P}
        ).scalar_one()
    engine.dispose()

    stats = sim.control.stats(P)
    assert found is not None
    assert again is not None
    assert f"{sim.url}/p/{P}" == stored
    # Both tokens (the first, and the one after the session ended) came from the login host.
    assert 2 == stats["oauth"]["client_credentials_grants"]
