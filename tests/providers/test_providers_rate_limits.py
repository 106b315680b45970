"""The gateway's response hook: each pack classifies a refusal before the retry decision.

Against the simulator's dialects, through both gateway faces: Salesforce's 403
``REQUEST_LIMIT_EXCEEDED`` and HubSpot's ``DAILY`` 429 pause the provider and are not
retried (nor counted by the breaker); HubSpot's ten-secondly 429 backs off and is retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from idis.integrations._clock import ManualClock
from idis.integrations.exceptions import QuotaExhausted, RateLimited
from idis.integrations.providers import async_client_for, client_for
from idis.integrations.resilience import Gateway
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator() as running:
        running.control.emit(P, 1, record_ids=["deal_1"], webhook=False)
        yield running


def _get(sim: RunningSimulator, api: str, face: str) -> tuple[Any, Any, bool, str]:
    """Fetch ``deal_1`` once; the outcome (record or error), then the gateway's view.

    The gateway's clock stands at noon UTC: a quota pause that lasts until a
    midnight is then hours long whenever the test runs.
    """
    settings = simulator_settings(sim.url, providers=(P,), api=api)
    clock = ManualClock(datetime(2026, 12, 7, 12, 0, tzinfo=UTC))
    if face == "sync":
        gateway = Gateway(settings, clock=clock)
        try:
            try:
                outcome: Any = client_for(gateway, P).get_record("deal_1")
            except RateLimited as exc:
                outcome = exc
            return outcome, gateway.snapshot(P), gateway.available(P), gateway.breaker_state(P)
        finally:
            gateway.close()

    async def run() -> tuple[Any, Any, bool, str]:
        agw = AsyncGateway(settings, clock=clock)
        try:
            try:
                outcome: Any = await async_client_for(agw, P).get_record("deal_1")
            except RateLimited as exc:
                outcome = exc
            return outcome, agw.snapshot(P), agw.available(P), agw.breaker_state(P)
        finally:
            await agw.aclose()

    return asyncio.run(run())


def _record_requests(sim: RunningSimulator) -> int:
    requests = sim.control.stats(P)["requests"]
    return int(requests.get("record", 0))


@pytest.mark.parametrize("face", ["sync", "async"])
@pytest.mark.parametrize(
    ("api", "policy", "status"),
    [("salesforce", "REQUEST_LIMIT_EXCEEDED", 403), ("hubspot", "DAILY", 429)],
)
def test_a_spent_quota_pauses_the_provider_and_is_not_retried(
    sim: RunningSimulator, face: str, api: str, policy: str, status: int
) -> None:
    sim.control.set_fault(P, "rate_limit", endpoint="record", count=1, policy=policy)

    outcome, snapshot, available, breaker = _get(sim, api, face)

    assert isinstance(outcome, QuotaExhausted)
    assert (status, 1) == (outcome.status_code, outcome.sent)
    assert 1 == _record_requests(sim)  # one attempt: never retried blindly
    assert outcome.retry_after is not None
    assert outcome.retry_after > 60
    assert not available  # paused until it clears
    assert snapshot["paused_for"] > 60
    assert "closed" == breaker  # a quota is not an outage


@pytest.mark.parametrize("face", ["sync", "async"])
def test_a_ten_secondly_429_backs_off_and_is_retried(sim: RunningSimulator, face: str) -> None:
    sim.control.set_fault(
        P, "rate_limit", endpoint="record", count=1, policy="TEN_SECONDLY_ROLLING", retry_after=0
    )

    outcome, _, available, _ = _get(sim, "hubspot", face)

    assert outcome is not None
    assert not isinstance(outcome, Exception)
    assert "deal_1" == outcome.id
    assert 2 == _record_requests(sim)
    assert available
