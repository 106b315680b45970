"""What one status call costs the database: connections, statements, round trips (issue 16).

``/status`` p99 while the outbox drains on PostgreSQL is mostly waiting: for the
server, and for a CPU after each answer. Every round trip is one such wait, so
the counts are pinned here (never the time): one pool checkout, no pre-ping,
no BEGIN/ROLLBACK on PostgreSQL, one statement for every provider's token, and
a connection the server dropped (restart) costs one read more, not a failed call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy import event as sa_event
from tests.outbox.test_outbox_processes import PrivateCluster, private_pg

from idis.integrations.config import AuthSettings, ProviderSettings, Settings
from idis.integrations.ops._status import _engine_for, collect_status

__all__ = ["private_pg"]  # the fixture, imported for the restart test

#: Statements each provider's facts take: health samples, last breaker transition,
#: sync state with the last webhook (two statements before), open defects.
PER_PROVIDER = 4


def _settings(url: str, *, oauth: int, plain: int) -> Settings:
    providers = {
        f"oauth_{i}": ProviderSettings(
            name=f"oauth_{i}",
            kind="crm",
            base_url="http://127.0.0.1:9",
            auth=AuthSettings(grant="client_credentials", client_id="x"),
        )
        for i in range(oauth)
    }
    providers.update(
        {
            f"plain_{i}": ProviderSettings(
                name=f"plain_{i}", kind="crm", base_url="http://127.0.0.1:9"
            )
            for i in range(plain)
        }
    )
    return Settings(providers=providers, database_url=url)


class Counts:
    """Checkouts, pings, statements and transactions of ``engine`` while counting."""

    def __init__(self) -> None:
        self.checkouts = 0
        self.pings = 0
        self.statements: list[str] = []
        self.in_transaction: list[bool] = []


@contextmanager
def counting(engine: Engine) -> Iterator[Counts]:
    counts = Counts()
    dialect: Any = engine.dialect
    ping = dialect.do_ping

    def checked_out(*_args: object) -> None:
        counts.checkouts += 1

    def counted_ping(dbapi_connection: Any) -> Any:
        counts.pings += 1
        return ping(dbapi_connection)

    def executed(conn: Any, _cursor: object, statement: str, *_rest: object) -> None:
        if statement == "BEGIN":  # SQLite's deferred BEGIN: no lock, no round trip
            assert engine.dialect.name == "sqlite"
            return
        counts.statements.append(statement)
        if engine.dialect.name == "postgresql":
            # psycopg sends BEGIN before a statement unless in autocommit
            counts.in_transaction.append(not conn.connection.dbapi_connection.autocommit)

    sa_event.listen(engine.pool, "checkout", checked_out)
    sa_event.listen(engine, "before_cursor_execute", executed)
    dialect.do_ping = counted_ping
    try:
        yield counts
    finally:
        del dialect.do_ping
        sa_event.remove(engine.pool, "checkout", checked_out)
        sa_event.remove(engine, "before_cursor_execute", executed)


def test_a_status_call_is_one_checkout_no_ping_and_one_token_read(db_url: str) -> None:
    """Three OAuth providers and one without: 1 checkout, no ping, no transaction on PG.

    Before: a pre-ping and BEGIN/ROLLBACK on the status connection, then for each
    OAuth provider a connection of its own (checkout, ping, BEGIN, SELECT, ROLLBACK):
    31 round trips for three providers and one without OAuth on PostgreSQL; now 18.
    """
    settings = _settings(db_url, oauth=3, plain=1)
    collect_status(settings, probe=False)  # the engine, its first connection
    engine = _engine_for(db_url)

    with counting(engine) as counts:
        statuses, notes = collect_status(settings, probe=False)

    assert [] == notes
    assert {"missing"} == {s.facts["token"] for s in statuses if s.provider.startswith("oauth")}
    assert all("token" not in s.facts for s in statuses if s.provider.startswith("plain"))
    assert 1 == counts.checkouts
    assert 0 == counts.pings
    tokens = [s for s in counts.statements if "FROM oauth_tokens" in s]
    assert 1 == len(tokens), tokens
    # Per provider, the outbox count once for all (nothing queued: no first pending), tokens.
    assert 4 * PER_PROVIDER + 1 + 1 == len(counts.statements), counts.statements
    assert not any(counts.in_transaction)


def test_a_status_call_without_oauth_reads_no_token_table(db_url: str) -> None:
    settings = _settings(db_url, oauth=0, plain=2)
    collect_status(settings, probe=False)

    with counting(_engine_for(db_url)) as counts:
        _statuses, notes = collect_status(settings, probe=False)

    assert [] == notes
    assert 1 == counts.checkouts
    assert 2 * PER_PROVIDER + 1 == len(counts.statements), counts.statements


def test_a_missing_token_table_is_reported_per_provider_and_the_rest_kept(
    sqlite_url: str,
) -> None:
    """The one token read fails: each provider's token is read alone, which says why."""
    settings = _settings(sqlite_url, oauth=2, plain=0)
    engine = _engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE oauth_tokens"))

    statuses, notes = collect_status(settings, probe=False)

    assert [] == notes
    assert {"unknown"} == {s.facts["token"] for s in statuses}
    assert all("outbox_pending" in s.facts for s in statuses)


def _terminate_backends(admin: Engine, database: str) -> int:
    with admin.connect() as conn:
        return len(
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).all()
        )


@pytest.mark.postgres
def test_status_answers_after_the_server_dropped_its_connection(pg_url: str) -> None:
    """No pre-ping: the dropped connection fails the read, which runs again on a fresh one."""
    from idis.integrations.db._engine import create_db_engine

    settings = _settings(pg_url, oauth=1, plain=1)
    before, _ = collect_status(settings, probe=False)
    engine = _engine_for(pg_url)
    admin = create_db_engine(pg_url)
    try:
        assert _terminate_backends(admin, engine.url.database or "") >= 1
    finally:
        admin.dispose()

    with counting(engine) as counts:
        after, notes = collect_status(settings, probe=False)

    assert [] == notes
    assert [s.as_dict() | {"last_webhook_age_seconds": None} for s in before] == [
        s.as_dict() | {"last_webhook_age_seconds": None} for s in after
    ]
    assert 2 == counts.checkouts  # the dropped connection, then a fresh one (no catalog read)


@pytest.mark.slow
@pytest.mark.postgres
def test_status_answers_right_after_a_postgres_restart(private_pg: PrivateCluster) -> None:
    """The crash drill's case: the server restarted between two status calls."""
    settings = _settings(private_pg.url, oauth=1, plain=1)
    _statuses, notes = collect_status(settings, probe=False)
    assert [] == notes

    private_pg.pg_ctl("restart", "-m", "fast")
    statuses, notes = collect_status(settings, probe=False)

    assert [] == notes
    assert all("outbox_pending" in s.facts for s in statuses)
    assert "missing" == statuses[0].facts["token"]


def test_the_sync_facts_are_one_statement_with_the_last_webhook(db_url: str) -> None:
    """The sync state row and the last webhook time come from one statement, as before."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from idis.integrations._timeparse import utcnow
    from idis.integrations.sync._models import SyncInbox, SyncProviderState

    settings = _settings(db_url, oauth=0, plain=2)
    now = utcnow()
    with Session(_engine_for(db_url)) as session, session.begin():
        session.add(
            SyncProviderState(
                provider="plain_0",
                mode="webhook",
                reason="default",
                changed_at=now,
                updated_at=now,
            )
        )
        for seconds, event in ((90, "e1"), (30, "e2")):
            session.add(
                SyncInbox(
                    provider="plain_0",
                    event_id=event,
                    event_type="contact.updated",
                    source="webhook",
                    status="applied",
                    received_at=now - timedelta(seconds=seconds),
                    webhook_at=now - timedelta(seconds=seconds),
                )
            )
    collect_status(settings, probe=False)

    with counting(_engine_for(db_url)) as counts:
        statuses, notes = collect_status(settings, probe=False)

    assert [] == notes
    started, fresh = statuses
    assert "webhook (default)" == started.facts["sync_mode"]
    assert 30 <= started.facts["last_webhook_age_seconds"] < 90
    assert "webhook (not started)" == fresh.facts["sync_mode"]
    assert fresh.facts["last_webhook_age_seconds"] is None
    sync_reads = [s for s in counts.statements if "sync_" in s]
    assert 2 == len(sync_reads), sync_reads  # one per provider
