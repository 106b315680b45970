"""HubSpot's CRM search is a read sent as a POST: the gateway retries it; writes it does not.

Against the simulator's HubSpot dialect (a real HTTP server), through both faces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from idis.integrations.exceptions import ProviderError
from idis.integrations.providers import async_client_for, client_for
from idis.integrations.resilience import Gateway
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"
SINCE = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator() as running:
        running.control.emit(P, 2, record_ids=["deal_1", "deal_2"], webhook=False)
        yield running


def _requests(sim: RunningSimulator, endpoint: str) -> int:
    return int(sim.control.stats(P)["requests"].get(endpoint, 0))


def _changes(sim: RunningSimulator, face: str) -> Any:
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")
    if face == "sync":
        with Gateway(settings) as gateway:
            return client_for(gateway, P).changes(since=SINCE)

    async def run() -> Any:
        agw = AsyncGateway(settings)
        try:
            return await async_client_for(agw, P).changes(since=SINCE)
        finally:
            await agw.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_search_that_meets_a_503_is_retried(sim: RunningSimulator, face: str) -> None:
    sim.control.set_fault(P, "error", endpoint="changes", status=503, count=1)

    page = _changes(sim, face)

    assert {"deal_1", "deal_2"} == {event.record_id for event in page.events}
    assert 2 == _requests(sim, "changes")  # the 503, then the retry that succeeded


def test_a_create_that_meets_a_503_is_not_retried(sim: RunningSimulator) -> None:
    sim.control.set_fault(P, "error", endpoint="records", status=503, count=1)
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")

    with Gateway(settings) as gateway, pytest.raises(ProviderError) as caught:
        gateway.request(
            P, "/crm/v3/objects/deals", method="POST", json={"properties": {"dealname": "x"}}
        )

    assert (503, 1) == (caught.value.status_code, caught.value.sent)
    assert 1 == _requests(sim, "records")  # a write is sent once


def test_a_create_with_an_idempotency_key_is_retried(sim: RunningSimulator) -> None:
    sim.control.set_fault(P, "error", endpoint="records", status=503, count=3)
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")

    with Gateway(settings) as gateway, pytest.raises(ProviderError) as caught:
        gateway.request(
            P,
            "/crm/v3/objects/deals",
            method="POST",
            json={"properties": {"dealname": "x"}},
            idempotency_key="deal-x-1",
        )

    assert (503, 3) == (caught.value.status_code, caught.value.sent)


def test_idempotent_false_keeps_even_a_get_from_being_repeated(sim: RunningSimulator) -> None:
    sim.control.set_fault(P, "error", endpoint="records", status=503, count=1)
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")

    with Gateway(settings) as gateway, pytest.raises(ProviderError) as caught:
        gateway.request(P, "/crm/v3/objects/deals", idempotent=False)

    assert (503, 1) == (caught.value.status_code, caught.value.sent)
