"""Provider packs: one per API, chosen by IDIS_PROVIDER_<NAME>_API, generic by default."""

from __future__ import annotations

import httpx
import pytest

from idis.integrations.config import Settings
from idis.integrations.exceptions import ConfigError
from idis.integrations.providers import (
    BearerToken,
    ProviderClient,
    known_packs,
    pack_for,
    register_pack,
)
from idis.integrations.providers._generic import GenericPack
from idis.integrations.providers._pack import pack_auth
from idis.integrations.resilience import Gateway


def _env(**extra: str) -> dict[str, str]:
    return {
        "IDIS_PROVIDERS": "crm",
        "IDIS_PROVIDER_CRM_KIND": "crm",
        "IDIS_PROVIDER_CRM_BASE_URL": "http://127.0.0.1:9/p/crm",
        **{f"IDIS_PROVIDER_CRM_{k}": v for k, v in extra.items()},
    }


def test_generic_is_the_default_pack() -> None:
    """Without IDIS_PROVIDER_<N>_API, every provider (the embedded ones too) is generic."""
    embedded = Settings.from_env({})
    declared = Settings.from_env(_env())

    assert ["generic"] * 4 == [
        pack_for(embedded.provider("crm_provider")).name,
        pack_for(embedded.provider("docs_provider")).name,
        pack_for(embedded.provider("enrichment_provider")).name,
        pack_for(declared.provider("crm")).name,
    ]


def test_the_api_variable_selects_the_pack() -> None:
    settings = Settings.from_env(_env(API="HubSpot"))

    assert "hubspot" == pack_for(settings.provider("crm")).name


def test_an_unknown_pack_names_the_variable_and_the_known_packs() -> None:
    settings = Settings.from_env(_env(API="pipedrive"))

    with pytest.raises(ConfigError) as caught:
        pack_for(settings.provider("crm"))

    assert "IDIS_PROVIDER_CRM_API='pipedrive'" in str(caught.value)
    assert "gdrive, generic, hubspot, pdl, salesforce" in str(caught.value)


def test_a_malformed_pack_name_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"IDIS_PROVIDER_CRM_API='hub spot'"):
        Settings.from_env(_env(API="hub spot"))


def test_known_packs_lists_the_library_packs_with_their_capabilities() -> None:
    packs = {pack.name: pack for pack in known_packs()}

    assert {"generic", "hubspot", "salesforce"} <= set(packs)
    assert packs["hubspot"].capabilities.replay is not None
    assert packs["salesforce"].capabilities.webhooks is None


def test_register_pack_refuses_a_second_pack_of_a_name() -> None:
    class Other(GenericPack):
        pass

    with pytest.raises(ConfigError, match="registered already"):
        register_pack(Other())


def test_a_static_api_token_is_sent_as_bearer_and_never_shown() -> None:
    """A private-app token authenticates every call; repr and the settings hide it."""
    token = "pat-na1-0123456789abcdef"  # test value
    settings = Settings.from_env(_env(API_TOKEN=token))
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    gateway = Gateway(settings, auth=pack_auth(None), transport=httpx.MockTransport(handler))
    try:
        client = pack_for(settings.provider("crm")).client(gateway, "crm")
        assert isinstance(client, ProviderClient)
        client.list_records()
    finally:
        gateway.close()

    auth = pack_auth(None)(settings.provider("crm"))
    assert isinstance(auth, BearerToken)
    assert [f"Bearer {token}"] == seen
    assert token not in repr(auth)
    assert token not in repr(settings.provider("crm"))


def test_each_client_knows_its_own_cursors() -> None:
    """The poller asks; a cursor another API left is polled from the watermark instead."""
    from idis.integrations.providers._hubspot import HubSpotClient
    from idis.integrations.providers._salesforce import SalesforceClient

    cursors = ("42", "hs1:1764000000000:0:", "sf1:2026-12-01T08:30:00.000Z:opp_1")

    assert [
        [ProviderClient.accepts_cursor(c) for c in cursors],
        [HubSpotClient.accepts_cursor(c) for c in cursors],
        [SalesforceClient.accepts_cursor(c) for c in cursors],
    ] == [[True, False, False], [False, True, False], [False, False, True]]


def test_a_packs_own_endpoints_apply_unless_endpoints_declares_the_name() -> None:
    """PDL's enrich path comes from its pack; ENDPOINTS wins; generic keeps names as paths."""
    by_pack = Settings.from_env(_env(API="pdl")).provider("crm")
    declared = Settings.from_env(
        _env(API="pdl", ENDPOINTS="enrich=/v5/person/enrich?email={id}")
    ).provider("crm")
    generic = Settings.from_env(_env()).provider("crm")

    assert "/v5/person/enrich?pdl_id={id}" == by_pack.endpoint_path("enrich")
    assert "/v5/person/enrich?email={id}" == declared.endpoint_path("enrich")
    assert "/enrich" == generic.endpoint_path("enrich")
    assert "/health" == by_pack.endpoint_path("health")


@pytest.mark.parametrize("order_by", ["version", "modified"])
def test_every_packs_clients_order_as_the_pack_says(order_by: str) -> None:
    """A client's ``ordering`` (what resync and verify-sync key records by) is the rule its
    pack declares, for both faces: the packs' by modification time, generic's ORDER_BY."""
    import asyncio

    from idis.integrations.providers import BY_MODIFIED, async_client_for, client_for, ordering_for
    from idis.integrations.resilience import AsyncGateway

    async def async_ordering(settings: Settings) -> object:
        async with AsyncGateway(settings) as gateway:
            return async_client_for(gateway, "crm").ordering

    seen = {}
    for pack in known_packs():
        settings = Settings.from_env(_env(API=pack.name, ORDER_BY=order_by, API_TOKEN="t" * 20))
        with Gateway(settings) as gateway:
            sync_ordering = client_for(gateway, "crm").ordering
        declared = pack.ordering(settings.provider("crm"))
        seen[pack.name] = (sync_ordering, asyncio.run(async_ordering(settings)), declared)

    assert {"generic", "hubspot", "salesforce", "gdrive", "pdl"} <= set(seen)
    assert all(s is a is declared for s, a, declared in seen.values()), seen
    assert ordering_for(order_by) is seen["generic"][0]
    assert {BY_MODIFIED} == {seen[name][0] for name in ("hubspot", "salesforce", "gdrive", "pdl")}
