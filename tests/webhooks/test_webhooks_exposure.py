"""No door left open (issue 17): published secrets, routes, slow bodies.

* The embedded simulator providers' webhook secret is printed in the README: a
  receiver and an outbound webhook refuse it without ``IDIS_ALLOW_EMBEDDED_DEFAULTS``.
* The provider comes from the whole route, never from its last segment.
* A client trickling its body gets 408 within ``IDIS_WEBHOOK_BODY_TIMEOUT`` instead of
  holding a connection forever (a real slow client on a real socket, against uvicorn).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.routing import Mount
from tests.sync.conftest import HostTable

from idis.integrations._http import httpx
from idis.integrations.config import EMBEDDED_WEBHOOK_SECRET, Settings
from idis.integrations.exceptions import ConfigError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox._delivery import build_call
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.sync._models import SyncInbox
from idis.integrations.testing import serve_asgi
from idis.integrations.webhooks._receiver import WebhookReceiver

from ..conftest import sample
from .conftest import NOW, Face, P, event_body, settings_for, signed


def _inbox_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(SyncInbox)) or 0)


# --------------------------------------------------------------------------- published secret


@pytest.mark.parametrize("served", [None, [P]], ids=["every-provider", "named"])
def test_the_published_simulator_secret_refuses_to_start(
    face: Face, sqlite_url: str, served: list[str] | None
) -> None:
    """With only IDIS_DATABASE_URL set, a receiver refuses to start, naming what to set."""
    settings = Settings.from_env({"IDIS_DATABASE_URL": sqlite_url})

    with pytest.raises(ConfigError) as info:
        face.build(settings, providers=served)

    message = str(info.value)
    assert "IDIS_PROVIDERS" in message
    assert "IDIS_PROVIDER_CRM_PROVIDER_WEBHOOK_SECRETS" in message
    assert "IDIS_ALLOW_EMBEDDED_DEFAULTS=true" in message
    assert EMBEDDED_WEBHOOK_SECRET not in message


def test_with_the_opt_in_the_simulator_secret_verifies(
    face: Face, sqlite_url: str, host: HostTable
) -> None:
    """IDIS_ALLOW_EMBEDDED_DEFAULTS=true lets the drill, the tour and tests use the simulator."""
    settings = Settings.from_env(
        {"IDIS_DATABASE_URL": sqlite_url, "IDIS_ALLOW_EMBEDDED_DEFAULTS": "true"}
    )
    receiver = face.build(settings, host.registry())
    body = event_body(1)

    result = face.send(receiver, signed(body, secret=EMBEDDED_WEBHOOK_SECRET), body)

    assert (200, "accepted") == (result.status_code, result.outcome)


def _webhook_message() -> OutboxMessage:
    return OutboxMessage(
        id=1,
        provider=P,
        kind="webhook",
        idempotency_key="evt_out",
        payload={"body": '{"id": "evt_out"}', "webhook_id": "evt_out"},
        ordering_key=None,
        tenant_id=None,
        attempts=1,
        max_retries=3,
        created_at=NOW,
        lease_expires_at=NOW,
    )


def test_an_outbound_webhook_is_never_signed_with_the_published_secret() -> None:
    """Signing an outbound webhook with the simulator's secret needs the opt-in too."""
    settings = Settings.from_env({})
    allowed = Settings.from_env({"IDIS_ALLOW_EMBEDDED_DEFAULTS": "true"})

    with pytest.raises(ConfigError, match="IDIS_ALLOW_EMBEDDED_DEFAULTS"):
        build_call(_webhook_message(), settings, now=NOW.timestamp())
    call = build_call(_webhook_message(), allowed, now=NOW.timestamp())

    assert call.kwargs["headers"]["webhook-signature"].startswith("v1,")


# --------------------------------------------------------------------------- routes and slow bodies


def _serve(engine: Engine, host: HostTable, **webhooks: str) -> Any:
    env = {f"IDIS_WEBHOOK_{key.upper()}": value for key, value in webhooks.items()}
    receiver = WebhookReceiver(
        settings_for(str(engine.url), **env), engine, registry=host.registry(), providers=[P]
    )
    return Starlette(routes=[Mount("/webhooks", app=receiver.asgi_app())])


@pytest.mark.parametrize(
    "path",
    [
        f"/webhooks/x/{P}",
        f"/webhooks/..%2f..%2f{P}",
        f"/webhooks/{P}/extra",
        "/webhooks/",
        f"/webhooks/{P.upper()}",
    ],
)
def test_the_whole_route_names_the_provider(
    sqlite_engine: Engine, host: HostTable, metrics: Metrics, path: str
) -> None:
    """A path whose last segment is a provider, but whose route is not /{provider}, is a 404."""
    app = _serve(sqlite_engine, host)
    now = datetime.now(UTC)
    body = event_body(1)

    with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        stray = client.post(path, content=body, headers=signed(body, at=now))
        good = client.post(f"/webhooks/{P}/", content=body, headers=signed(body, at=now))

    assert (404, "unknown_provider") == (stray.status_code, stray.json()["status"])
    assert 200 == good.status_code
    assert [("evt_1", "rec_1", 1)] == host.rows()
    assert 1.0 == sample(
        metrics,
        "integration_webhooks_received_total",
        provider="unknown",
        outcome="unknown_provider",
    )


def _slow_request(url: str, path: str, declared: int) -> bytes:
    """Send headers and one body byte, then nothing; return what the server answers."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n{{"
        )
        sock.sendall(head.encode())
        # The client stops sending here. A receiver without a deadline never answers,
        # and this read times out (30 s) instead of returning the 408.
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_slow_body_gets_408_and_its_connection_back(
    sqlite_engine: Engine, host: HostTable, metrics: Metrics
) -> None:
    """A client trickling its body is answered 408 at the deadline, and counted."""
    app = _serve(sqlite_engine, host, body_timeout="300ms")

    with serve_asgi(app) as url:
        answer = _slow_request(url, f"/webhooks/{P}", declared=500)

    status_line, _, headers = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in headers.lower()
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="body_timeout"
    )
    assert 0 == _inbox_count(sqlite_engine)


def test_the_body_deadline_setting_is_validated() -> None:
    """IDIS_WEBHOOK_BODY_TIMEOUT must be a positive duration."""
    with pytest.raises(ConfigError, match="IDIS_WEBHOOK_BODY_TIMEOUT='0s' must be positive"):
        Settings.from_env({"IDIS_WEBHOOK_BODY_TIMEOUT": "0s"})


def test_the_async_receiver_over_real_http(sqlite_url: str, host: HostTable) -> None:
    """AsyncWebhookReceiver's app, served by uvicorn: accepted, duplicate, 404 route, 408."""
    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.webhooks._receiver import AsyncWebhookReceiver

    engine = create_async_db_engine(sqlite_url)
    receiver = AsyncWebhookReceiver(
        settings_for(sqlite_url, IDIS_WEBHOOK_BODY_TIMEOUT="300ms"),
        engine,
        registry=host.registry(),
        providers=[P],
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        yield
        await engine.dispose()  # on the server's loop, where the connections live

    app = Starlette(routes=[Mount("/webhooks", app=receiver.asgi_app())], lifespan=lifespan)
    body = event_body(4)
    now = datetime.now(UTC)

    with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ok = client.post(f"/webhooks/{P}", content=body, headers=signed(body, at=now))
        dup = client.post(f"/webhooks/{P}", content=body, headers=signed(body, at=now))
        stray = client.post(f"/webhooks/x/{P}", content=body, headers=signed(body, at=now))
        slow = _slow_request(url, f"/webhooks/{P}", declared=100)

    assert [(200, "accepted"), (200, "duplicate")] == [
        (r.status_code, r.json()["status"]) for r in (ok, dup)
    ]
    assert 404 == stray.status_code
    assert slow.startswith(b"HTTP/1.1 408")
    assert [("evt_4", "rec_4", 1)] == host.rows()


def test_a_fixed_provider_app_answers_its_root_only(sqlite_engine: Engine, host: HostTable) -> None:
    """asgi_app(provider=...) serves POST / (or the mount point) and nothing below it."""
    receiver = WebhookReceiver(
        settings_for(str(sqlite_engine.url)), sqlite_engine, registry=host.registry()
    )
    app = Starlette(routes=[Mount("/hooks/crm", app=receiver.asgi_app(provider=P))])
    body = event_body(5)
    now = datetime.now(UTC)

    with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ok = client.post("/hooks/crm/", content=body, headers=signed(body, at=now))
        below = client.post(f"/hooks/crm/{P}", content=body, headers=signed(body, at=now))

    assert (200, 404) == (ok.status_code, below.status_code)
