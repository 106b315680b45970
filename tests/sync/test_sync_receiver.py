"""The webhook receiver: status codes that make providers behave, nothing applied twice or
wrongly, nothing secret in the logs; framework-free handle() and the ASGI app over real HTTP."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from idis.integrations._clock import ManualClock
from idis.integrations._http import httpx
from idis.integrations.config import Secret, Settings, WebhookSettings
from idis.integrations.db._engine import create_async_db_engine, create_db_engine
from idis.integrations.observability._logs import configure_logging
from idis.integrations.observability._metrics import Metrics
from idis.integrations.providers import ProviderEvent
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._models import SyncInbox, SyncProviderState
from idis.integrations.testing import serve_asgi
from idis.integrations.webhooks._receiver import AsyncWebhookReceiver, WebhookReceiver
from idis.integrations.webhooks._signing import sign_headers

from ..conftest import free_port, sample
from .conftest import HostTable

P = "crm_provider"
SECRET = "whsec_c3VwZXItc2VjcmV0LXNpZ25pbmcta2V5LTAxMjM0NQ=="
OLD_SECRET = "whsec_b2xkLXNlY3JldC1zaWduaW5nLWtleS0wMTIzNDU2Nzg="
NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def _settings(url: str, **webhooks: Any) -> Settings:
    base = Settings.from_env({"IDIS_DATABASE_URL": url})
    provider = base.provider(P)
    from dataclasses import replace

    return replace(
        base.with_providers(
            replace(provider, webhook_secrets=(Secret(SECRET), Secret(OLD_SECRET)))
        ),
        webhooks=WebhookSettings(**webhooks),
    )


def _event_body(number: int, **changes: Any) -> bytes:
    event = {
        "id": f"evt_{number}",
        "seq": number,
        "type": "record.updated",
        "record_id": f"rec_{number}",
        "tenant_id": "tenant_1",
        "version": 1,
        "occurred_at": "2026-01-19T09:59:00+00:00",
        "data": {"name": "Deal", "owner_email": "someone@example.com"},
    }
    event.update(changes)
    # The simulator's envelope: {"type", "timestamp", "data": event}
    return json.dumps(
        {"type": event["type"], "timestamp": event["occurred_at"], "data": event}
    ).encode()


def _signed(
    body: bytes, *, secret: str = SECRET, at: datetime = NOW, msg: str = "msg_1"
) -> dict[str, str]:
    headers = sign_headers(secret, body, msg_id=msg, timestamp=at)
    headers["content-type"] = "application/json"
    return headers


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock at NOW."""
    return ManualClock(NOW)


def _receiver(
    engine: Engine, host: HostTable, clock: ManualClock, **webhooks: Any
) -> WebhookReceiver:
    return WebhookReceiver(
        _settings(str(engine.url), **webhooks),
        engine,
        registry=host.registry("record.updated"),
        providers=[P],
        clock=clock,
    )


def _inbox_count(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(SyncInbox)) or 0)


def test_accepted_then_duplicate(
    engine: Engine, host: HostTable, clock: ManualClock, metrics: Metrics
) -> None:
    """A valid webhook is applied (200 accepted); the redelivery is acknowledged, not applied."""
    receiver = _receiver(engine, host, clock)
    body = _event_body(1)

    first = receiver.handle(P, _signed(body), body)
    again = receiver.handle(P, _signed(body, msg="msg_1"), body)

    assert (200, "accepted", "evt_1") == (first.status_code, first.outcome, first.event_id)
    assert (200, "duplicate") == (again.status_code, again.outcome)
    assert [("evt_1", "rec_1", 1)] == host.rows()
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="accepted"
    )
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="duplicate"
    )
    assert json.loads(first.body()) == {"status": "accepted", "event_id": "evt_1"}


def test_the_old_secret_still_verifies_during_rotation(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: ManualClock
) -> None:
    """Deliveries signed with either configured secret are accepted."""
    receiver = _receiver(sqlite_engine, sqlite_host, clock)
    body = _event_body(2)

    assert 200 == receiver.handle(P, _signed(body, secret=OLD_SECRET), body).status_code


def test_superseded_and_ignored_are_acknowledged(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: ManualClock
) -> None:
    """An older version and an unhandled type both answer 200 without applying."""
    receiver = _receiver(sqlite_engine, sqlite_host, clock)
    newer = _event_body(5, record_id="deal", version=5)
    older = _event_body(4, record_id="deal", version=4)
    other = _event_body(6, type="record.archived")

    results = [receiver.handle(P, _signed(b), b) for b in (newer, older, other)]

    assert [(200, "accepted"), (200, "superseded"), (200, "ignored")] == [
        (r.status_code, r.outcome) for r in results
    ]
    assert ["evt_5"] == [r[0] for r in sqlite_host.rows()]


def _cases() -> list[tuple[str, Any, int, str]]:
    good = _event_body(9)

    def headers_without(name: str) -> Any:
        def build() -> tuple[dict[str, str], bytes]:
            h = _signed(good)
            del h[name]
            return h, good

        return build

    def tampered() -> tuple[dict[str, str], bytes]:
        return _signed(good), _event_body(9, version=99)

    def wrong_secret() -> tuple[dict[str, str], bytes]:
        other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
        return _signed(good, secret=other), good

    def stale() -> tuple[dict[str, str], bytes]:
        return _signed(good, at=NOW - timedelta(minutes=6)), good

    def oversized() -> tuple[dict[str, str], bytes]:
        body = _event_body(9, data={"blob": "x" * 5000})
        return _signed(body), body

    def malformed() -> tuple[dict[str, str], bytes]:
        body = b'{"type": "record.updated", "data": {"id": "evt_9", "id": "evt_9"}}'
        return _signed(body), body

    def nan() -> tuple[dict[str, str], bytes]:
        body = b'{"data": {"id": "evt_9", "seq": NaN}}'
        return _signed(body), body

    def not_an_event() -> tuple[dict[str, str], bytes]:
        body = json.dumps({"type": "ping", "data": {"hello": "world"}}).encode()
        return _signed(body), body

    def huge_seq() -> tuple[dict[str, str], bytes]:
        body = _event_body(9, seq=2**70)
        return _signed(body), body

    return [
        ("missing webhook-id", headers_without("webhook-id"), 400, "missing_headers"),
        ("missing timestamp", headers_without("webhook-timestamp"), 400, "missing_headers"),
        ("missing signature", headers_without("webhook-signature"), 400, "missing_headers"),
        ("tampered body", tampered, 401, "bad_signature"),
        ("wrong secret", wrong_secret, 401, "bad_signature"),
        ("stale timestamp", stale, 401, "stale_timestamp"),
        ("oversized body", oversized, 413, "too_large"),
        ("duplicate keys", malformed, 400, "malformed_json"),
        ("NaN", nan, 400, "malformed_json"),
        ("not an event", not_an_event, 400, "invalid_event"),
        ("seq out of range", huge_seq, 400, "invalid_event"),
    ]


@pytest.mark.parametrize(
    ("name", "build", "status", "outcome"), _cases(), ids=[c[0] for c in _cases()]
)
def test_rejections_apply_nothing_and_log_no_secret(
    sqlite_engine: Engine,
    sqlite_host: HostTable,
    clock: ManualClock,
    metrics: Metrics,
    name: str,
    build: Any,
    status: int,
    outcome: str,
) -> None:
    """Each bad delivery gets its status, applies nothing, is counted, and logs no secret."""
    receiver = _receiver(sqlite_engine, sqlite_host, clock, max_body_bytes=4096)
    headers, body = build()
    stream = io.StringIO()

    with capture_logs() as raw:
        result = receiver.handle(P, headers, body)
    configure_logging("json", "DEBUG", stream=stream)
    receiver.handle(P, headers, body)

    assert (status, outcome) == (result.status_code, result.outcome)
    assert 0 == _inbox_count(sqlite_engine)
    assert [] == sqlite_host.rows()
    assert 2.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome=outcome
    )
    rendered = stream.getvalue() + repr(raw) + result.body().decode()
    for secret in (
        SECRET,
        OLD_SECRET,
        SECRET.removeprefix("whsec_"),
        OLD_SECRET.removeprefix("whsec_"),
    ):
        assert secret not in rendered
    if "webhook-signature" in headers:
        assert headers["webhook-signature"].split(",", 1)[1] not in rendered
    assert "someone@example.com" not in rendered
    assert "idis.webhooks.rejected" in stream.getvalue()


def test_unknown_provider_is_404(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: ManualClock
) -> None:
    """A provider the receiver does not serve answers 404 and applies nothing."""
    receiver = _receiver(sqlite_engine, sqlite_host, clock)
    body = _event_body(1)

    result = receiver.handle("nobody", _signed(body), body)

    assert (404, "unknown_provider") == (result.status_code, result.outcome)
    assert 0 == _inbox_count(sqlite_engine)


def test_a_failing_handler_is_500_and_the_retry_applies(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: ManualClock
) -> None:
    """A host handler that raises answers 500 (provider retries); the retry is applied once."""
    calls: list[str] = []

    def flaky(session: Session, event: ProviderEvent) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise RuntimeError("secret-looking sqlite_host detail")
        sqlite_host.handler(session, event)

    registry = HandlerRegistry()
    registry.register("record.updated", flaky)
    receiver = WebhookReceiver(
        _settings(str(sqlite_engine.url)),
        sqlite_engine,
        registry=registry,
        providers=[P],
        clock=clock,
    )
    body = _event_body(3)
    with capture_logs() as logs:
        first = receiver.handle(P, _signed(body), body)
    second = receiver.handle(P, _signed(body), body)

    assert (500, "handler_error") == (first.status_code, first.outcome)
    assert "secret-looking" not in repr(logs)
    assert (200, "accepted") == (second.status_code, second.outcome)
    assert ["evt_3"] == [r[0] for r in sqlite_host.rows()]


def test_database_down_is_503_so_the_provider_retries(clock: ManualClock, sqlite_url: str) -> None:
    """When the database cannot be reached the receiver answers 503 (our transient fault)."""
    down = create_db_engine(
        f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", pool_pre_ping=False
    )
    receiver = WebhookReceiver(
        _settings(sqlite_url), down, registry=HandlerRegistry(), providers=[P], clock=clock
    )
    body = _event_body(1)

    result = receiver.handle(P, _signed(body), body)
    down.dispose()

    assert (503, "unavailable") == (result.status_code, result.outcome)


def test_signature_failures_are_counted_and_a_spike_is_persisted(
    sqlite_engine: Engine, sqlite_host: HostTable, clock: ManualClock
) -> None:
    """Bad signatures are counted per minute; crossing the threshold is persisted."""
    receiver = _receiver(sqlite_engine, sqlite_host, clock)
    body = _event_body(1)
    forged = _signed(body, secret="whsec_" + "Zm9yZ2VkLWtleS1mb3JnZWQta2V5LTEyMzQ=")
    for _ in range(10):
        receiver.handle(P, forged, body)

    assert 10 == receiver.signature_failures(P)
    with Session(sqlite_engine) as session:
        spike = session.scalar(select(SyncProviderState.signature_spike_at))
    assert NOW == spike
    clock.advance(61)
    assert 0 == receiver.signature_failures(P)


def test_a_provider_without_secret_refuses_to_start(sqlite_url: str) -> None:
    """Serving a provider without a webhook secret fails at construction, naming the variable."""
    from idis.integrations.exceptions import ConfigError

    settings = Settings.from_env(
        {
            "IDIS_PROVIDERS": "crm",
            "IDIS_PROVIDER_CRM_KIND": "crm",
            "IDIS_PROVIDER_CRM_BASE_URL": "https://crm.example.com",
        }
    )
    engine = create_db_engine(sqlite_url)
    with pytest.raises(ConfigError, match="IDIS_PROVIDER_CRM_WEBHOOK_SECRETS"):
        WebhookReceiver(settings, engine, providers=["crm"])
    engine.dispose()


def test_asgi_app_over_real_http(sqlite_engine: Engine, sqlite_host: HostTable) -> None:
    """Mounted in Starlette and served by uvicorn: accepted, 413 while streaming, 405, 404."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    receiver = WebhookReceiver(
        _settings(str(sqlite_engine.url), max_body_bytes=2048),
        sqlite_engine,
        registry=sqlite_host.registry(),
        providers=[P],
    )
    app = Starlette(routes=[Mount("/webhooks", app=receiver.asgi_app())])
    body = _event_body(7)
    now = datetime.now(UTC)

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1024

    with serve_asgi(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ok = client.post(f"/webhooks/{P}", content=body, headers=_signed(body, at=now))
        dup = client.post(f"/webhooks/{P}", content=body, headers=_signed(body, at=now))
        big = client.post(f"/webhooks/{P}", content=chunks(), headers=_signed(b"", at=now))
        declared = client.post(f"/webhooks/{P}", content=b"y" * 4096, headers=_signed(b"", at=now))
        get = client.get(f"/webhooks/{P}")
        unknown = client.post("/webhooks/nobody", content=body, headers=_signed(body, at=now))

    assert (200, "accepted") == (ok.status_code, ok.json()["status"])
    assert (200, "duplicate") == (dup.status_code, dup.json()["status"])
    assert 413 == big.status_code
    assert 413 == declared.status_code
    assert 405 == get.status_code
    assert 404 == unknown.status_code
    assert [("evt_7", "rec_7", 1)] == sqlite_host.rows()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_receiver(db_url: str, anyio_backend: str, clock: ManualClock) -> None:
    """AsyncWebhookReceiver verifies, applies through async handlers, dedupes and rejects alike."""
    engine = create_async_db_engine(db_url)
    seen: list[str] = []

    async def on_update(session: Any, event: ProviderEvent) -> None:
        seen.append(event.id)

    registry = HandlerRegistry()
    registry.register_async("record.updated", on_update)
    receiver = AsyncWebhookReceiver(
        _settings(db_url), engine, registry=registry, providers=[P], clock=clock
    )
    body = _event_body(8)
    try:
        first = await receiver.handle(P, _signed(body), body)
        again = await receiver.handle(P, _signed(body), body)
        forged = await receiver.handle(P, _signed(body, secret=SECRET.replace("c3", "d3")), body)
    finally:
        await engine.dispose()

    assert ["accepted", "duplicate", "bad_signature"] == [r.outcome for r in (first, again, forged)]
    assert ["evt_8"] == seen
