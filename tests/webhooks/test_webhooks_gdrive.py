"""Google Drive push notifications through the library's receiver, both faces, both databases.

A Drive notification carries no data: the receiver verifies its channel token, answers
the ``sync`` handshake with 200 and nothing applied, and turns a ``change`` into a
changes fetch from the stored page token (the poller's path, as the webhook channel),
against the simulator's Drive dialect on loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from tests.sync.conftest import HostTable

from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.providers import async_client_for, client_for
from idis.integrations.resilience import Gateway
from idis.integrations.resilience._gateway import AsyncGateway
from idis.integrations.testing import (
    RunningSimulator,
    run_simulator,
    serve_asgi,
    simulator_settings,
)
from idis.integrations.webhooks._receiver import AsyncWebhookReceiver, WebhookReceiver

P = "docs_provider"
TOKEN = "drive-channel-token-0123456789"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator() as running:
        yield running


def _settings(sim: RunningSimulator, db_url: str) -> Settings:
    base = simulator_settings(sim.url, providers=(P,), database_url=db_url, api="gdrive")
    return replace(base, providers={P: replace(base.provider(P), webhook_secrets=(Secret(TOKEN),))})


class Served:
    """A receiver of one face with a Drive feed, its resources closed on the server's loop."""

    def __init__(self, kind: str, settings: Settings, db_url: str, host: HostTable) -> None:
        self.async_engine: Any = None
        self.gateway: Any = None
        if kind == "sync":
            self.gateway = Gateway(settings)
            self.receiver: Any = WebhookReceiver(
                settings,
                host.engine,
                registry=host.registry(),
                feeds={P: client_for(self.gateway, P)},
            )
        else:
            self.gateway = AsyncGateway(settings)
            self.async_engine = create_async_db_engine(db_url)
            self.receiver = AsyncWebhookReceiver(
                settings,
                self.async_engine,
                registry=host.registry(),
                feeds={P: async_client_for(self.gateway, P)},
            )

    def app(self) -> Any:
        inner = self.receiver.asgi_app()
        served = self

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "lifespan":
                await inner(scope, receive, send)
                return
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if served.async_engine is not None:
                        await served.gateway.aclose()
                        await served.async_engine.dispose()
                    else:
                        served.gateway.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

        return app


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _push(sim: RunningSimulator, address: str) -> list[httpx.Response]:
    """Deliver what Drive would have pushed since the last call, to the channel's address."""
    pending = httpx.get(f"{sim.url}/p/{P}/drive/_notifications", trust_env=False)
    return [
        httpx.post(address, content=b"", headers=headers, trust_env=False)
        for headers in pending.json()["notifications"]
    ]


def _sim_push(sim: RunningSimulator) -> list[tuple[str, int]]:
    """The simulator itself POSTs its pending notifications to the channel address."""
    answer = httpx.post(f"{sim.url}/p/{P}/drive/_push", trust_env=False, timeout=60)
    return [(p["state"], p["status"]) for p in answer.json()["pushed"]]


def _inbox(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT DISTINCT source FROM sync_inbox"))}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_change_notification_fetches_the_changes_a_sync_one_applies_nothing(
    sim: RunningSimulator, db_url: str, kind: str
) -> None:
    engine = create_engine(db_url)
    host = HostTable(engine)
    settings = _settings(sim, db_url)
    served = Served(kind, settings, db_url, host)
    watcher = Gateway(settings)
    port = _free_port()
    address = f"http://127.0.0.1:{port}/{P}"
    try:
        with serve_asgi(served.app(), port=port):
            client = client_for(watcher, P)
            client.watch(address, TOKEN)
            handshake = _push(sim, address)
            applied_after_handshake = len(host.rows())
            sim.control.emit(P, 3, record_ids=["doc_1", "doc_2", "doc_3"], webhook=False)
            first = _push(sim, address)
            sim.control.emit(P, 2, record_ids=["doc_4", "doc_1"], webhook=False)
            second = _push(sim, address)
            again = httpx.post(address, headers=first[0].request.headers, trust_env=False)
            forged = httpx.post(
                address,
                headers={**dict(first[0].request.headers), "x-goog-channel-token": "guess"},
                trust_env=False,
            )
            bare = httpx.post(address, headers={"X-Goog-Resource-State": "change"})
            sim.control.emit(P, 1, record_ids=["doc_5"], webhook=False)
            pushed = _sim_push(sim)
    finally:
        watcher.close()

    assert [(200, "ignored")] == [(r.status_code, r.json()["status"]) for r in handshake]
    assert 0 == applied_after_handshake
    assert [(200, "fetched", {"accepted": 3})] == [
        (r.status_code, r.json()["status"], r.json()["events"]) for r in first
    ]
    assert [(200, {"accepted": 2})] == [(r.status_code, r.json()["events"]) for r in second]
    # A repeated notification fetches again and finds nothing new.
    assert (200, "fetched", {}) == (
        again.status_code,
        again.json()["status"],
        again.json()["events"],
    )
    assert (401, "bad_signature") == (forged.status_code, forged.json()["status"])
    assert (400, "missing_headers") == (bare.status_code, bare.json()["status"])
    assert [("change", 200)] == pushed
    assert ["doc_1", "doc_1", "doc_2", "doc_3", "doc_4", "doc_5"] == sorted(
        r[1] for r in host.rows()
    )
    assert {"webhook"} == _inbox(engine)
    engine.dispose()
