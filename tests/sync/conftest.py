"""Shared helpers for sync tests: events, a host table written by handlers, engines."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from idis.integrations.providers import ProviderEvent
from idis.integrations.sync._inbox import HandlerRegistry

T0 = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def make_event(
    seq: int,
    *,
    record_id: str | None = None,
    version: int = 1,
    type_: str = "record.updated",
    at: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> ProviderEvent:
    """An event shaped like the simulator's."""
    return ProviderEvent(
        id=f"evt_{seq}",
        seq=seq,
        type=type_,
        record_id=record_id or f"rec_{seq}",
        tenant_id="tenant_1",
        version=version,
        occurred_at=at or T0 + timedelta(seconds=seq),
        data=data if data is not None else {"n": seq},
    )


class HostTable:
    """A host-owned table the handlers write to, so tests see what was applied."""

    DDL = (
        "CREATE TABLE IF NOT EXISTS host_applied ("
        " id INTEGER PRIMARY KEY, event_id VARCHAR(64) NOT NULL, record_id VARCHAR(64),"
        " version INTEGER, source VARCHAR(16))"
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        with engine.begin() as conn:
            conn.execute(
                text(self.DDL.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"))
                if engine.dialect.name == "postgresql"
                else text(self.DDL)
            )

    def handler(self, session: Session, event: ProviderEvent) -> None:
        session.execute(
            text("INSERT INTO host_applied (event_id, record_id, version) VALUES (:e, :r, :v)"),
            {"e": event.id, "r": event.record_id, "v": event.version},
        )

    def rows(self) -> list[tuple[str, str, int]]:
        with self.engine.connect() as conn:
            return [
                (r[0], r[1], r[2])
                for r in conn.execute(
                    text("SELECT event_id, record_id, version FROM host_applied ORDER BY id")
                )
            ]

    def registry(self, *types: str) -> HandlerRegistry:
        registry = HandlerRegistry()
        for event_type in types or ("*",):
            registry.register(event_type, self.handler)
        return registry


@pytest.fixture
def host(engine: Engine) -> HostTable:
    """The host table on the test database."""
    return HostTable(engine)


@pytest.fixture
def sqlite_host(sqlite_engine: Engine) -> HostTable:
    """The host table on a SQLite test database (for tests the backend cannot change)."""
    return HostTable(sqlite_engine)


class OffsetClock:
    """Real time plus an offset that tests move forward (implements the library's Clock).

    Shared with the simulator (``run_simulator(clock=clock.now)``), so provider
    timestamps, webhook signatures and the library's thresholds agree while
    minutes of simulated time pass in milliseconds.
    """

    def __init__(self) -> None:
        import threading

        self._offset = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        import time as _time

        with self._lock:
            return _time.time() + self._offset

    def monotonic(self) -> float:
        import time as _time

        with self._lock:
            return _time.monotonic() + self._offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def sleep(self, seconds: float) -> None:
        """Advance instead of sleeping."""
        self.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        """Advance, then let other tasks run."""
        import asyncio

        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class Recorder:
    """A host handler that records every call (event id, record, version) thread-safely."""

    def __init__(self) -> None:
        import threading

        self.calls: list[tuple[str, str, int, str]] = []
        self._lock = threading.Lock()

    def __call__(self, session: Session, event: ProviderEvent) -> None:
        with self._lock:
            self.calls.append((event.id, event.record_id, event.version, event.type))

    def registry(self) -> HandlerRegistry:
        registry = HandlerRegistry()
        registry.register("*", self)
        return registry


class ServiceHarness:
    """The async sync service driven from a sync test, tick by tick, on one event loop.

    The service is a background worker and async only; a test drives it with
    ``tick()`` (``asyncio.Runner.run``). Webhooks go to a sync
    ``WebhookReceiver`` on the test's engine, served by its own thread
    (``serve()``), so a blocking ``flush_webhooks`` never waits on the loop.
    """

    def __init__(
        self,
        settings: Any,
        engine: Engine,
        *,
        registry: HandlerRegistry | None = None,
        clock: Any = None,
        **service: Any,
    ) -> None:
        import asyncio

        from idis.integrations.db._engine import create_async_db_engine
        from idis.integrations.sync._service import AsyncSyncService
        from idis.integrations.webhooks import WebhookReceiver

        self.runner = asyncio.Runner()
        self.async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))
        self.service = AsyncSyncService(
            settings,
            engine=self.async_engine,
            registry=registry,
            clock=clock,
            receiver=False,
            **service,
        )
        self.receiver = WebhookReceiver(
            settings,
            engine,
            registry=registry,
            providers=[p for p in self.service.providers if settings.provider(p).webhook_secrets],
            clock=clock,
        )

    def tick(self, provider: str) -> Any:
        """One service tick for ``provider``."""
        return self.runner.run(self.service.tick(provider))

    def serve(self) -> Any:
        """Serve the webhook receiver on 127.0.0.1 (context manager yielding its URL)."""
        from idis.integrations.testing import serve_asgi

        return serve_asgi(self.receiver.asgi_app())

    def close(self) -> None:
        """Stop the service, dispose of its engine, close the loop."""
        try:
            self.runner.run(self.service.aclose())
            self.runner.run(self.async_engine.dispose())
        finally:
            self.runner.close()

    def __enter__(self) -> ServiceHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def provider_log(sim_url: str, provider: str) -> list[ProviderEvent]:
    """Every event the simulator emitted, read from its change feed over HTTP."""
    from idis.integrations._http import httpx
    from idis.integrations.providers import parse_event

    events: list[ProviderEvent] = []
    after = 0
    while True:
        body = httpx.get(
            f"{sim_url}/p/{provider}/changes", params={"after": after, "limit": 500}
        ).json()
        events.extend(parse_event(raw, provider) for raw in body["events"])
        if not body.get("has_more") or not body["events"]:
            return events
        after = body["next_after"]


class FeedServer:
    """A provider whose change feed serves exactly the events a test puts in it (a real server).

    It misbehaves the way the simulator cannot: an event appended now may carry an
    ``occurred_at`` long past (a change the provider committed late). Serves the
    generic dialect's ``GET /p/<provider>/changes?after=N|since=T&limit=L`` in
    ``seq`` order, and ``GET /p/<provider>/records/<id>``.
    """

    def __init__(self) -> None:
        import threading

        self.events: list[dict[str, Any]] = []
        self.records: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, str]] = []
        #: Called (on a thread of its own) with each changes request's parameters
        #: before it is answered: what "meanwhile" does in a test.
        self.on_request: Any = None
        self._lock = threading.Lock()

    def append(self, event: dict[str, Any]) -> None:
        """Commit ``event`` to the feed now (its ``seq`` must be the next one)."""
        with self._lock:
            self.events.append(event)

    def app(self) -> Any:
        """The ASGI app."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def changes(request: Request) -> JSONResponse:
            import asyncio

            params = dict(request.query_params)
            self.requests.append(params)
            if self.on_request is not None:
                await asyncio.to_thread(self.on_request, params)
            limit = int(params.get("limit", 100))
            with self._lock:
                events = sorted(self.events, key=lambda e: e["seq"])
            if "after" in params:
                events = [e for e in events if e["seq"] > int(params["after"])]
            elif "since" in params:
                since = datetime.fromisoformat(params["since"])
                events = [e for e in events if datetime.fromisoformat(e["occurred_at"]) >= since]
            page = events[:limit]
            return JSONResponse(
                {
                    "events": page,
                    "next_after": page[-1]["seq"] if page else None,
                    "has_more": len(events) > limit,
                }
            )

        async def record(request: Request) -> JSONResponse:
            found = self.records.get(request.path_params["id"])
            if found is None:
                return JSONResponse({"error": "not_found"}, status_code=404)
            return JSONResponse(found)

        return Starlette(
            routes=[
                Route("/p/{provider}/changes", changes),
                Route("/p/{provider}/records/{id}", record),
            ]
        )


def feed_event(
    seq: int, record_id: str, at: datetime, version: int | None = None
) -> dict[str, Any]:
    """One generic-dialect event as a provider sends it (no version when ``version`` is None)."""
    event: dict[str, Any] = {
        "id": f"evt_{seq}",
        "seq": seq,
        "type": "record.updated",
        "record_id": record_id,
        "tenant_id": "tenant_1",
        "occurred_at": at.isoformat(),
        "data": {"n": seq},
    }
    if version is not None:
        event["version"] = version
    return event


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test once through the inbox's sync face and once through its async face."""
    return str(request.param)


class Faces:
    """The inbox's sync or async face, one transaction per call, from a sync test body.

    ``transaction(calls)`` runs several applies in one transaction of the
    face's own session (each may raise: its exception is returned in its
    place), then commits, or rolls back with ``commit=False``.
    """

    def __init__(self, mode: str, engine: Engine) -> None:
        import asyncio

        self.mode = mode
        self.engine = engine
        self.runner: Any = None
        if mode == "async":
            from idis.integrations.db._engine import create_async_db_engine

            self.runner = asyncio.Runner()
            self.async_engine = create_async_db_engine(
                engine.url.render_as_string(hide_password=False)
            )

    def transaction(
        self, calls: list[tuple[str, Any, str, dict[str, Any]]], *, commit: bool = True
    ) -> list[Any]:
        """Each call is ``(kind, event or events, source, options)``; kind ``one`` or ``many``."""
        from sqlalchemy.orm import sessionmaker

        from idis.integrations.sync import _inbox as inbox

        if self.runner is None:
            results: list[Any] = []
            with sessionmaker(self.engine)() as session, session.begin():
                for kind, what, source, options in calls:
                    try:
                        if kind == "one":
                            results.append(
                                inbox.apply_event_outcome(session, P, what, source, **options)
                            )
                        else:
                            results.append(inbox.apply_events(session, P, what, source, **options))
                    except Exception as exc:  # returned to the test
                        results.append(exc)
                if not commit:
                    session.rollback()
            return results

        async def go() -> list[Any]:
            from idis.integrations.db._engine import async_session_factory

            results: list[Any] = []
            factory = async_session_factory(self.async_engine)
            async with factory() as session, session.begin():
                for kind, what, source, options in calls:
                    try:
                        if kind == "one":
                            results.append(
                                await inbox.apply_event_outcome_async(
                                    session, P, what, source, **options
                                )
                            )
                        else:
                            results.append(
                                await inbox.apply_events_async(session, P, what, source, **options)
                            )
                    except Exception as exc:  # returned to the test
                        results.append(exc)
                if not commit:
                    await session.rollback()
            return results

        return list(self.runner.run(go()))

    def apply(self, event: Any, source: str, registry: HandlerRegistry, **options: Any) -> Any:
        """One event in its own transaction; raises what the apply raised."""
        (result,) = self.transaction([("one", event, source, {"registry": registry, **options})])
        if isinstance(result, Exception):
            raise result
        return result

    def apply_events(
        self, events: list[Any], source: str, registry: HandlerRegistry, **options: Any
    ) -> Any:
        """A batch in its own transaction; raises what the apply raised."""
        (result,) = self.transaction([("many", events, source, {"registry": registry, **options})])
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        if self.runner is not None:
            try:
                self.runner.run(self.async_engine.dispose())
            finally:
                self.runner.close()


P = "crm_provider"


@pytest.fixture
def faces(mode: str, engine: Engine) -> Iterator[Faces]:
    """The inbox through the face ``mode`` says, on the test database."""
    made = Faces(mode, engine)
    yield made
    made.close()


@pytest.fixture
def sqlite_faces(mode: str, sqlite_engine: Engine) -> Iterator[Faces]:
    """The inbox through the face ``mode`` says, on SQLite."""
    made = Faces(mode, sqlite_engine)
    yield made
    made.close()
