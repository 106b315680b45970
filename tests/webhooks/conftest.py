"""Helpers for the receiver's tests: signed deliveries, and both faces behind one interface.

Every receiver test runs through the sync face (``WebhookReceiver.handle``) and the
async face (``AsyncWebhookReceiver.handle`` on its own event loop), as the request-path
rule of issue 12 asks: one flow, two drivers, both tested.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine
from tests.sync.conftest import HostTable

from idis.integrations._clock import ManualClock
from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.webhooks._receiver import (
    AsyncWebhookReceiver,
    WebhookReceiver,
    WebhookResult,
)
from idis.integrations.webhooks._signing import sign_headers

P = "crm_provider"
SECRET = "whsec_dGVzdHMtd2ViaG9va3Mtc2lnbmluZy1rZXktMDEyMzQ1"
NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def event_body(number: int, **changes: Any) -> bytes:
    """A simulator-shaped delivery (envelope around the event)."""
    event = {
        "id": f"evt_{number}",
        "seq": number,
        "type": "record.updated",
        "record_id": f"rec_{number}",
        "tenant_id": "tenant_1",
        "version": 1,
        "occurred_at": "2026-01-19T09:59:00+00:00",
        "data": {"name": "Deal"},
    }
    event.update(changes)
    return json.dumps({"type": event["type"], "timestamp": "x", "data": event}).encode()


def signed(
    body: bytes, *, secret: str = SECRET, at: datetime | int = NOW, msg: str = "msg_1"
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``."""
    headers = sign_headers(secret, body, msg_id=msg, timestamp=at)
    headers["content-type"] = "application/json"
    return headers


def settings_for(url: str, *, secret: str = SECRET, **env: str) -> Settings:
    """The embedded defaults on ``url``, with ``crm_provider`` alone on a test secret."""
    base = Settings.from_env({"IDIS_DATABASE_URL": url, **env})
    crm = replace(base.provider(P), webhook_secrets=(Secret(secret),))
    return replace(base, providers={P: crm})


class Face:
    """One receiver face (sync or async) with a blocking ``send``."""

    def __init__(self, kind: str, engine: Engine, url: str) -> None:
        self.kind = kind
        self.engine = engine
        self.url = url
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_engine: Any = None

    def build(
        self,
        settings: Settings,
        registry: HandlerRegistry | None = None,
        *,
        clock: ManualClock | None = None,
        **kwargs: Any,
    ) -> Any:
        """A receiver of this face over the test database."""
        clock = clock if clock is not None else ManualClock(NOW)
        if self.kind == "sync":
            return WebhookReceiver(settings, self.engine, registry=registry, clock=clock, **kwargs)
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._async_engine = create_async_db_engine(self.url)
        return AsyncWebhookReceiver(
            settings, self._async_engine, registry=registry, clock=clock, **kwargs
        )

    def send(self, receiver: Any, headers: Any, body: bytes, provider: str = P) -> WebhookResult:
        """One delivery through ``receiver``."""
        if self.kind == "sync":
            result: WebhookResult = receiver.handle(provider, headers, body)
            return result
        assert self._loop is not None
        return self._loop.run_until_complete(receiver.handle(provider, headers, body))

    def send_concurrently(
        self, receiver: Any, deliveries: Sequence[tuple[dict[str, str], bytes]]
    ) -> list[WebhookResult]:
        """All ``deliveries`` at once (threads for the sync face, tasks for the async one)."""
        if self.kind == "sync":
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=8) as pool:
                futures = [pool.submit(receiver.handle, P, h, b) for h, b in deliveries]
                return [f.result(timeout=60) for f in futures]
        assert self._loop is not None

        async def all_at_once() -> list[WebhookResult]:
            return list(await asyncio.gather(*(receiver.handle(P, h, b) for h, b in deliveries)))

        return self._loop.run_until_complete(all_at_once())

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._async_engine.dispose())
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest, sqlite_engine: Engine, sqlite_url: str) -> Iterator[Face]:
    """The receiver's sync and async faces, over one SQLite test database."""
    built = Face(str(request.param), sqlite_engine, sqlite_url)
    yield built
    built.close()


@pytest.fixture
def host(sqlite_engine: Engine) -> HostTable:
    """The host table handlers write to."""
    return HostTable(sqlite_engine)


def failing_for(event_ids: set[str], host: HostTable) -> Callable[..., None]:
    """A handler that raises for ``event_ids`` and applies the others to ``host``."""

    def handler(session: Any, event: Any) -> None:
        if event.id in event_ids:
            raise RuntimeError("this handler fails on purpose")
        host.handler(session, event)

    return handler
