"""Fixtures shared by every test: clean global state, real databases, real Redis.

PostgreSQL, Redis and OpenBao tests *skip* locally when the service is down,
but *fail* in CI (``CI=true``), where .ci/run has started every service: a
test CI can run must run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
import uuid
from collections.abc import Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from idis.integrations.db._engine import create_db_engine
from idis.integrations.observability._metrics import Metrics, set_default_metrics

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("IDIS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("IDIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: Variables the library reads; each test starts without them.
_LIBRARY_ENV_PREFIXES = ("IDIS_", "CRM_", "ENRICHMENT_", "VAULT_")


def unavailable(what: str) -> None:
    """Skip locally, fail in CI: CI starts every service the suite needs."""
    if IN_CI:
        pytest.fail(f"{what} is not available in CI; .ci/run must start it")
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Vault clients and stores a test opened; closed when it ends (see _close_opened).
_OPENED: list[Any] = []


def opened(resource: Any) -> Any:
    """Close ``resource`` (anything with ``close()``) when the current test ends.

    A requests session pools sockets; one the garbage collector finds open is
    reported as a ResourceWarning in whichever later test happens to be running.
    """
    _OPENED.append(resource)
    return resource


@pytest.fixture(autouse=True)
def _close_opened() -> Iterator[None]:
    yield
    while _OPENED:
        _OPENED.pop().close()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(_LIBRARY_ENV_PREFIXES) and not key.startswith("IDIS_TEST_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def metrics() -> Iterator[Metrics]:
    """A fresh metrics registry installed as the process default for this test."""
    fresh = Metrics(CollectorRegistry())
    previous = set_default_metrics(fresh)
    yield fresh
    set_default_metrics(previous)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


async def dies_whole(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await a worker's cycle; if it dies (a ``BaseException`` that is no ``Exception``, a
    test's stand-in for the process dying mid-batch), the rest of its batch dies with it: the
    loop's other tasks are cancelled, as they would be with the process."""
    try:
        return await coro
    except Exception:
        raise
    except BaseException:
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()
        raise


def sleep_past(leases: Iterable[datetime | None]) -> None:
    """Sleep until every lease in ``leases`` (expiry times, naive ones UTC) has lapsed.

    Crash tests start the next worker process once the dead one's leases lapsed,
    as a restarted worker whose back-off outlasts the lease would.
    """
    expiries = [t if t.tzinfo else t.replace(tzinfo=UTC) for t in leases if t is not None]
    if expiries:
        time.sleep(max(0.0, (max(expiries) - datetime.now(UTC)).total_seconds()) + 0.2)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of a metric sample (0.0 when absent)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- SQLite


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from idis.integrations.db._migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    """A migrated SQLite database file of this test's own."""
    target = tmp_path / "idis.sqlite3"
    shutil.copyfile(_sqlite_template, target)
    return f"sqlite:///{target}"


# --------------------------------------------------------------------------- PostgreSQL


def _pg_admin_connect() -> object:
    import psycopg

    return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str]:
    try:
        import psycopg

        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except Exception as exc:  # any failure means "not available" here
        unavailable(f"PostgreSQL at {POSTGRES_URL} ({type(exc).__name__})")
        raise  # unreachable: unavailable() skips or fails
    from idis.integrations.db._migrate import upgrade

    name = f"idis_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(_with_database(POSTGRES_URL, name))
        yield name
    finally:
        # A fresh connection: a test may restart the server mid-session
        # (tests/outbox), which kills any connection held since the start.
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(_pg_template: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own (cloned from a template)."""
    import psycopg

    name = f"idis_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_pg_template}"')
    try:
        yield _with_database(POSTGRES_URL, name)
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    """A sync engine on a migrated SQLite file."""
    eng = create_db_engine(sqlite_url)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """A sync engine on a migrated PostgreSQL database."""
    eng = create_db_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A sync engine on a migrated database; the test runs on SQLite and on PostgreSQL."""
    eng = create_db_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs twice: on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis URL; keys this test writes should use a unique prefix (see redis_prefix)."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.ping()
    except Exception as exc:  # any failure means "not available" here
        unavailable(f"Redis at {REDIS_URL} ({type(exc).__name__})")
        raise
    yield REDIS_URL
    client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test."""
    return f"idis-test:{uuid.uuid4().hex[:10]}:"
