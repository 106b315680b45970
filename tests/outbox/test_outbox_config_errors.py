"""Configuration errors are ours: they never burn a message's attempts, never dead-letter.

A webhook to a provider with no webhook secret (our configuration) used to be
dead-lettered at once; a service started without its Vault variables
dead-lettered a pending CRM push. Now the message waits, its attempts intact,
and the worker reports the configuration error (``config_errors``) until a
delivery to that provider succeeds.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import Engine

from idis.integrations._clock import ManualClock
from idis.integrations.exceptions import ConfigError
from idis.integrations.outbox._delivery import AsyncGatewayDelivery

from .conftest import Loop, Recorder, outbox_settings, put_messages, statuses, table
from .test_outbox_delivery import _webhooks

CRM = "crm_provider"
VAULT = "IDIS_VAULT_ADDR is not set: credentials are read from Vault (CREDENTIALS_FROM_VAULT)"


def test_a_webhook_with_no_secret_waits_and_the_worker_says_why(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """No outbound secret: pending, attempts 0, config_errors names the variable; never dead."""
    settings = outbox_settings(max_retries=2)
    settings = settings.with_providers(
        replace(settings.provider(CRM), outbound_webhook_secret=None)
    )
    _webhooks(engine, clock, "deal.won", 2)
    gateway = loop.gateway(settings, clock=clock, sleep=clock.asleep)
    worker = loop.worker(
        engine,
        settings,
        deliver=AsyncGatewayDelivery(gateway, settings, clock=clock),
        providers=[CRM],
        clock=clock,
    )
    for _ in range(10):  # far more than 1 + max_retries
        worker.run_once()
        clock.advance(3600)

    rows = table(engine)
    assert {"pending": 2} == statuses(engine)
    assert [0, 0] == [r.attempts for r in rows]
    assert "OUTBOUND_WEBHOOK_SECRET" in worker.config_errors[CRM]
    assert all("ConfigError" in (r.last_error or "") for r in rows)


def test_missing_vault_variables_never_dead_letter_a_push(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    """A ConfigError from delivery: attempts intact, reported; once fixed, delivered and healthy."""
    put_messages(engine, 3, keys=1, clock=clock, max_retries=1)
    settings = outbox_settings()
    fixed = [False]
    recorder = Recorder(fail=lambda _m: None if fixed[0] else ConfigError(VAULT))
    worker = loop.worker(engine, settings, deliver=recorder, providers=[CRM], clock=clock)

    for _ in range(6):
        worker.run_once()
        clock.advance(3600)
    during = (statuses(engine), [r.attempts for r in table(engine)], worker.config_errors)
    fixed[0] = True
    for _ in range(5):
        worker.run_once()
        clock.advance(60)

    assert {"pending": 3} == during[0]
    assert [0, 0, 0] == during[1]
    assert {CRM: f"ConfigError: {VAULT}"} == during[2]
    assert {"delivered": 3} == statuses(engine)
    assert {} == worker.config_errors
