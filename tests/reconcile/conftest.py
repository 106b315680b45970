"""Fixtures for reconciliation tests: a simulator over HTTP, settings, a host table, events."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from idis.integrations._audit import AuditEvent
from idis.integrations.config import Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.providers import ProviderEvent
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._models import SyncInbox
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    # The host stand-in must be importable by name, here and in CLI subprocesses.
    sys.path.insert(0, str(HERE))

import reconcile_host  # noqa: E402  # needs the path above

PROVIDER = "crm_provider"
T0 = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)


def make_event(seq: int, *, record_id: str | None = None, version: int = 1, **kw: Any) -> Any:
    """A ProviderEvent shaped like the simulator's."""
    return ProviderEvent(
        id=f"evt_{seq}",
        seq=seq,
        type=kw.get("type", "record.updated"),
        record_id=record_id or f"rec_{seq}",
        tenant_id="tenant_1",
        version=version,
        occurred_at=kw.get("at", T0 + timedelta(seconds=seq)),
        data=kw.get("data", {"n": seq}),
    )


class Host:
    """The host's side: a table its handler writes, and a registry with that handler."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        reconcile_host.create_table(engine)
        self.registry = HandlerRegistry()
        self.registry.register("*", reconcile_host.apply)

    def applied(self) -> list[tuple[str, str]]:
        """``(event_id, event_type)`` per application, in order."""
        return reconcile_host.applied(self.engine)

    def applied_ids(self) -> list[str]:
        """Event ids per application, in order."""
        return [event_id for event_id, _type in self.applied()]


def count_inbox(engine: Engine, **where: Any) -> int:
    """Inbox rows matching ``where`` (column=value)."""
    query = select(func.count()).select_from(SyncInbox)
    for column, value in where.items():
        query = query.where(getattr(SyncInbox, column) == value)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def audit_rows(engine: Engine, action: str) -> list[AuditEvent]:
    """Audit rows of one action, oldest first (detached copies)."""
    from sqlalchemy.orm import Session

    with Session(engine, expire_on_commit=False) as session:
        rows = list(
            session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
            )
        )
        session.expunge_all()
    return rows


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """A simulator served over HTTP on 127.0.0.1."""
    with run_simulator(seed=7) as running:
        yield running


@pytest.fixture
def host(engine: Engine) -> Host:
    """The host table and handler on the test database."""
    return Host(engine)


def settings_for(sim: RunningSimulator, url: str, **overrides: Any) -> Settings:
    """Settings for the simulator's providers on database ``url``, without OAuth."""
    from idis.integrations.config import AuthSettings

    return simulator_settings(sim.url, database_url=url, auth=AuthSettings(), **overrides)


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Run the test once through ``reconcile`` and once through ``reconcile_async``."""
    return str(request.param)


def run_face(mode: str, function: Any, async_function: Any) -> Callable[..., Any]:
    """``function(...)``, or ``asyncio.run(async_function(...))`` with an async engine.

    The async face gets an ``AsyncEngine`` on the same database as the test's
    ``engine=``, so one test body checks both faces; without ``engine=`` each face
    opens (and disposes) its own on the settings' URL, as without the fixture.
    """
    if mode == "sync":
        return function  # type: ignore[no-any-return]

    def call(*args: Any, engine: Engine | None = None, **kwargs: Any) -> Any:
        async def go() -> Any:
            if engine is None:
                return await async_function(*args, **kwargs)
            async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))
            try:
                return await async_function(*args, engine=async_engine, **kwargs)
            finally:
                await async_engine.dispose()

        return asyncio.run(go())

    return call


@pytest.fixture
def reconcile_any(mode: str) -> Callable[..., Any]:
    """``reconcile`` with the signature of the sync face, run through the face ``mode`` says."""
    from idis.integrations.reconciliation import reconcile, reconcile_async

    return run_face(mode, reconcile, reconcile_async)
