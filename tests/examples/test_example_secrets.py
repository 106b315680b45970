"""No secret leaves the example service: not in logs, responses, /status or /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.examples.conftest import CLIENT_SECRET, CRM, ENRICH, service_env, wait_for

from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.testing import RunningSimulator


def test_tokens_and_secrets_never_reach_logs_responses_status_or_metrics(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """A debug-logged run with OAuth, webhooks, pushes, enrichment and errors shows no secret."""
    for provider in (CRM, ENRICH):
        sim.control.declare_provider(provider, require_auth=True)
    env = service_env(sim, sqlite_url, IDIS_LOG_LEVEL="debug")
    texts: list[str] = []
    with start_service(env) as svc:
        sim.control.set_webhook_target(CRM, f"{svc.url}/webhooks/{CRM}", [DEFAULT_WEBHOOK_SECRET])
        sim.control.emit(CRM, 2)
        texts.append(svc.post("/deals", {"id": "s1", "tenant_id": "t1", "name": "S"}).text)
        wait_for(lambda: svc.deal_status("s1") == "SYNCED", "s1 SYNCED")
        texts.append(svc.post("/claims", {"id": "c1", "tenant_id": "t1", "text": "x"}).text)
        texts.append(svc.post("/claims/c1/enrich").text)
        sim.control.outage(ENRICH)
        texts.append(svc.post("/claims", {"id": "c2", "tenant_id": "t1", "text": "y"}).text)
        texts.append(svc.post("/claims/c2/enrich").text)
        texts.append(svc.post("/webhooks/crm_provider", {"forged": True}).text)
        texts.append(svc.get("/status").text)
        texts.append(svc.get("/metrics").text)
        texts.append(svc.get("/deals").text)
        logs = svc.logs.getvalue()

    tokens = [
        token
        for provider in (CRM, ENRICH)
        for token in sim.state.provider(provider).oauth.access_tokens
    ]
    secrets = [CLIENT_SECRET, DEFAULT_WEBHOOK_SECRET, DEFAULT_WEBHOOK_SECRET[6:], *tokens]
    everything = "\n".join([logs, *texts])
    assert len(tokens) >= 2  # both providers issued tokens the service used
    assert "idis.webhooks.rejected" in logs  # the run did log its failures
    assert [] == [s for s in secrets if s in everything]
