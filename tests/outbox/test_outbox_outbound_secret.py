"""Outbound webhooks are signed with their own secret, never an inbound one (issue 17 item 9).

A delivery the worker really sends is accepted by the provider's receiver (the
simulator, verifying the outbound secret); the same request, captured and
replayed to our own receiver (the library's ``WebhookReceiver``, verifying the
provider's inbound secrets), is refused.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy import Engine

from idis.integrations._clock import ManualClock
from idis.integrations.config import Secret, Settings
from idis.integrations.exceptions import ConfigError
from idis.integrations.outbox._delivery import AsyncGatewayDelivery, build_call
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.testing import run_simulator
from idis.integrations.webhooks import WebhookReceiver

from .conftest import Loop, outbox_settings, table
from .test_outbox_delivery import _webhooks

CRM = "crm_provider"
INBOUND = "whsec_" + "aW5ib3VuZC1zZWNyZXQtZm9yLXRlc3RzLTEyMzQ1Ng=="
OUTBOUND = "whsec_" + "b3V0Ym91bmQtc2VjcmV0LWZvci10ZXN0cy02NTQzMjE="


def _settings(url: str, outbound: str | None = OUTBOUND) -> Settings:
    settings = outbox_settings(url)
    provider = replace(
        settings.provider(CRM),
        webhook_secrets=(Secret(INBOUND),),
        outbound_webhook_secret=Secret(outbound) if outbound else None,
    )
    return settings.with_providers(provider)


def test_a_captured_outbound_delivery_does_not_verify_at_our_receiver(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """Delivered to the provider with the outbound secret; replayed to us: refused."""
    with run_simulator(clock=clock.now, seed=5) as sim:
        settings = _settings(sim.url)
        sim.control.configure_receiver(CRM, secrets=[OUTBOUND])
        _webhooks(engine, clock, "deal.won", 1)
        gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep)
        delivery = AsyncGatewayDelivery(gateway, settings, clock=clock)
        result = loop.worker(
            engine, settings, deliver=delivery, providers=[CRM], clock=clock
        ).run_once()
        inbound = sim.control.stats(CRM)["inbound"]

    (row,) = table(engine)
    # What went over the wire, byte for byte (the worker's own call builder).
    message = OutboxMessage(
        id=row.id,
        provider=row.provider,
        kind=row.kind,
        idempotency_key=row.idempotency_key,
        payload=row.payload,
        ordering_key=row.ordering_key,
        tenant_id=row.tenant_id,
        attempts=row.attempts,
        max_retries=5,
        created_at=row.created_at,
        lease_expires_at=None,
    )
    captured = build_call(message, settings, now=clock.time())
    receiver = WebhookReceiver(settings, engine, providers=[CRM], clock=clock)
    replayed = receiver.handle(CRM, dict(captured.kwargs["headers"]), captured.kwargs["content"])

    assert (1, 1) == (result.delivered, inbound["accepted"])
    assert replayed.status_code == 401, replayed
    assert "signature" in replayed.outcome


@pytest.mark.parametrize(
    ("outbound", "named"),
    [(None, "no secret to sign outbound"), (INBOUND, "one of its inbound secrets")],
)
def test_an_outbound_secret_that_is_missing_or_an_inbound_one_is_refused(
    outbound: str | None, named: str
) -> None:
    """Unset, or equal to an inbound secret: a ConfigError naming the variable."""
    settings = _settings("http://127.0.0.1:9", outbound)
    with pytest.raises(ConfigError, match=named) as caught:
        settings.checked_outbound_webhook_secret(CRM)
    assert "IDIS_PROVIDER_CRM_PROVIDER_OUTBOUND_WEBHOOK_SECRET" in str(caught.value)
