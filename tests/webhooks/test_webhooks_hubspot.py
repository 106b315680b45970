"""HubSpot's batched, v3-signed webhooks through the library's receiver, both faces, both databases.

The simulator's HubSpot dialect POSTs its changes as HubSpot does (one JSON array of
events per request, ``X-HubSpot-Signature-v3``) to a receiver served on loopback; the
receiver verifies with the pack's scheme and applies the whole batch in one inbox apply.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from tests.sync.conftest import HostTable

from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.simulator._webhooks import sign_hubspot_v3
from idis.integrations.testing import (
    RunningSimulator,
    run_simulator,
    serve_asgi,
    simulator_settings,
)
from idis.integrations.webhooks._receiver import AsyncWebhookReceiver, WebhookReceiver

P = "crm_provider"
# HubSpot's client secret: any text (the simulator keeps whsec_-shaped ones).
SECRET = "whsec_aHVic3BvdC10ZXN0LWNsaWVudC1zZWNyZXQtMDAx"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator() as running:
        yield running


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(sim: RunningSimulator, db_url: str, port: int) -> Settings:
    base = simulator_settings(sim.url, providers=(P,), database_url=db_url, api="hubspot")
    crm = replace(
        base.provider(P),
        webhook_secrets=(Secret(SECRET),),
        webhook_public_url=f"http://127.0.0.1:{port}",
    )
    return replace(base, providers={P: crm})


class Served:
    """A receiver of one face served on loopback, over the test database."""

    def __init__(self, kind: str, settings: Settings, db_url: str, host: HostTable) -> None:
        self.kind = kind
        self.async_engine: Any = None
        if kind == "sync":
            self.receiver: Any = WebhookReceiver(settings, host.engine, registry=host.registry())
        else:
            self.async_engine = create_async_db_engine(db_url)
            self.receiver = AsyncWebhookReceiver(
                settings, self.async_engine, registry=host.registry()
            )

    def app(self) -> Any:
        """The receiver's ASGI app; the async engine is disposed on the server's own loop."""
        inner = self.receiver.asgi_app()
        engine = self.async_engine

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan" or engine is None:
                await inner(scope, receive, send)
                return
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await engine.dispose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

        return app


def _inbox(engine: Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id, source FROM sync_inbox ORDER BY event_id"))
        return [(r[0], r[1]) for r in rows]


def _signed(url: str, body: bytes, *, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time() * 1000))
    return {
        "content-type": "application/json",
        "x-hubspot-signature-v3": sign_hubspot_v3(secret, "POST", url, body, stamp),
        "x-hubspot-request-timestamp": stamp,
    }


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_simulator_s_hubspot_batches_are_applied_once_each(
    sim: RunningSimulator, db_url: str, kind: str
) -> None:
    """Three deals created, then updated: one request per emit, every event applied once."""
    engine = create_engine(db_url)
    host = HostTable(engine)
    port = _free_port()
    served = Served(kind, _settings(sim, db_url, port), db_url, host)
    with serve_asgi(served.app(), port=port) as url:
        sim.control.set_webhook_target(P, f"{url}/{P}", secrets=[SECRET], format="hubspot")
        sim.control.emit(P, 3, record_ids=["101", "102", "103"])
        assert sim.control.flush_webhooks(P)
        sim.control.emit(P, 3, record_ids=["101", "102", "103"], data={"stage": "won"})
        assert sim.control.flush_webhooks(P)
        stats = sim.control.stats(P)["webhooks"]
        redelivered = sim.control.set_webhook_mode(P, "duplicate")
        sim.control.emit(P, 1, record_ids=["101"], data={"stage": "lost"})
        assert sim.control.flush_webhooks(P)

    rows = host.rows()
    ids = [row[0] for row in rows]
    assert "hubspot" == stats["format"]
    # One request per emit: three creations in one, three property changes in another.
    assert (2, 6, 0) == (stats["delivered"], stats["delivered_events"], stats["failed"])
    assert "duplicate" == redelivered["mode"]
    assert 7 == len(rows) == len(set(ids))
    assert {f"hs:deal.creation:{n}" for n in ("101", "102", "103")} == {
        i.rsplit(":", 1)[0] for i in ids[:3]
    }
    assert all(i.startswith("hs:deal.propertyChange:") and i.endswith(":stage") for i in ids[3:])
    assert {"webhook"} == {source for _, source in _inbox(engine)}
    engine.dispose()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_malformed_batch_is_a_400_naming_the_element_and_applies_nothing(
    sim: RunningSimulator, db_url: str, kind: str
) -> None:
    engine = create_engine(db_url)
    host = HostTable(engine)
    port = _free_port()
    served = Served(kind, _settings(sim, db_url, port), db_url, host)
    good = {
        "eventId": 1,
        "subscriptionId": 1,
        "portalId": 62515,
        "occurredAt": 1_768_816_740_000,
        "subscriptionType": "deal.propertyChange",
        "attemptNumber": 0,
        "objectId": 123,
        "propertyName": "dealstage",
        "propertyValue": "won",
    }
    missing = {k: v for k, v in good.items() if k != "objectId"}
    bodies = {
        "element": json.dumps([good, missing]).encode(),
        "object": json.dumps(good).encode(),
        "empty": b"[]",
        "stamp": json.dumps([{**good, "occurredAt": "yesterday"}]).encode(),
        "json": b"[{]",
    }
    with serve_asgi(served.app(), port=port) as url:
        target = f"{url}/{P}"
        answers = {
            name: httpx.post(target, content=body, headers=_signed(target, body))
            for name, body in bodies.items()
        }
        good_body = json.dumps([good]).encode()
        forged = httpx.post(
            target,
            content=good_body,
            headers=_signed(target, good_body, secret="not-our-secret"),
        )
        accepted = httpx.post(target, content=good_body, headers=_signed(target, good_body))
        again = httpx.post(target, content=good_body, headers=_signed(target, good_body))

    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(bodies, 400)
    assert "event 1: objectId is missing" in answers["element"].json()["error"]
    assert "expected an array of events" in answers["object"].json()["error"]
    assert "empty array" in answers["empty"].json()["error"]
    assert (
        "event 0: occurredAt must be integer epoch milliseconds"
        in (answers["stamp"].json()["error"])
    )
    assert "malformed_json" == answers["json"].json()["status"]
    assert (401, "bad_signature") == (forged.status_code, forged.json()["status"])
    assert (200, {"accepted": 1}) == (accepted.status_code, accepted.json()["events"])
    assert (200, "duplicate") == (again.status_code, again.json()["status"])
    # Only the one good delivery was applied; the malformed batch's good element was not.
    assert [("hs:deal.propertyChange:123:1768816740000:dealstage", "123", 0)] == host.rows()
    engine.dispose()


def test_a_provider_whose_api_sends_no_webhooks_is_refused_by_name(
    sim: RunningSimulator, sqlite_engine: Engine
) -> None:
    from idis.integrations.exceptions import ConfigError

    settings = simulator_settings(sim.url, providers=(P,), api="salesforce")

    with pytest.raises(ConfigError) as caught:
        WebhookReceiver(settings, sqlite_engine, providers=[P])

    assert "sends no webhooks" in str(caught.value)
    assert f"IDIS_PROVIDER_{P.upper()}_API" == caught.value.variable
