"""Reads never queue behind a writer on SQLite (issue 16).

Every transaction used to start with ``BEGIN IMMEDIATE``, reads included, so
``status`` (and the example service's ``/status``) waited behind the outbox
worker's writes for up to the 30 s busy timeout. Each read path below runs
while a second connection holds the database's write lock: on the old code it
waits out the busy timeout and fails with "database is locked".
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from idis.integrations._timeparse import utcnow
from idis.integrations.cli import main
from idis.integrations.config import Settings
from idis.integrations.ops._postmortem import build_postmortem
from idis.integrations.ops._status import collect_status
from idis.integrations.reconciliation._ledger import AppliedRecordSource

PROVIDER = "crm_provider"
WINDOW = ["--provider", PROVIDER, "--since", "1 hour ago"]


@pytest.fixture
def write_locked(sqlite_url: str) -> Iterator[sqlite3.Connection]:
    """A second connection holding the database's write lock (``BEGIN IMMEDIATE``)."""
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    yield holder
    holder.execute("ROLLBACK")
    holder.close()


def _still_locked(holder: sqlite3.Connection) -> bool:
    return holder.in_transaction


# Each command and the exit codes that mean "it read the database" (timeline exits 1 on gaps).
READ_COMMANDS = {
    "status": (["status", "--no-probe", "--json"], {0}),
    "audit": (["audit", *WINDOW, "--json"], {0}),
    "timeline": (["timeline", *WINDOW, "--json"], {0, 1}),
    "impact": (["impact", *WINDOW, "--json"], {0}),
    "enrichment defects": (["enrichment", "defects", "--json"], {0}),
    "postmortem": (["postmortem", *WINDOW], {0}),
    "sync status": (["sync", "status", "--json"], {0}),
    "sync mode (show)": (["sync", "mode", "--provider", PROVIDER, "--json"], {0}),
    "outbox status": (["outbox", "status", "--json"], {0}),
    "outbox list": (["outbox", "list", "--json"], {0}),
    "check-token": (["check-token", "--provider", PROVIDER, "--json"], {0, 1}),
}


@pytest.mark.parametrize("command", sorted(READ_COMMANDS), ids=str)
def test_a_read_command_answers_while_a_writer_holds_the_lock(
    command: str, sqlite_url: str, write_locked: sqlite3.Connection
) -> None:
    """The command reads and exits as usual; the writer keeps its lock throughout."""
    args, codes = READ_COMMANDS[command]

    result = CliRunner().invoke(main, args, env={"IDIS_DATABASE_URL": sqlite_url})

    assert result.exit_code in codes, result.output
    # status folds a database failure into a note ("database unreachable: ...") and exits 0.
    assert [] == [word for word in ("locked", "unreachable") if word in result.output]
    assert _still_locked(write_locked)


def test_collect_status_reports_no_database_trouble_while_a_writer_holds_the_lock(
    sqlite_url: str, write_locked: sqlite3.Connection
) -> None:
    """What /status of a service calls: every provider, and no note about the database."""
    settings = Settings.from_env({"IDIS_DATABASE_URL": sqlite_url})

    statuses, notes = collect_status(settings, probe=False)

    assert {PROVIDER} <= {s.provider for s in statuses}
    assert [] == [n for n in notes if "locked" in n or "unreachable" in n]
    assert all("outbox_pending" in s.facts for s in statuses)
    assert _still_locked(write_locked)


def test_verify_and_postmortem_reads_proceed_while_a_writer_holds_the_lock(
    sqlite_engine: Engine, write_locked: sqlite3.Connection
) -> None:
    """verify-sync's sample and ledger reads, and the postmortem's rebuild, take no write lock."""
    source = AppliedRecordSource(sqlite_engine, PROVIDER)

    sample = source.sample(5, seed=1)
    missing = source.get("nope")
    report, _facts = build_postmortem(sqlite_engine, PROVIDER, utcnow() - timedelta(hours=1))

    assert ([], None) == (sample, missing)
    assert report.title
    assert _still_locked(write_locked)


def test_the_status_json_is_the_same_with_and_without_a_writer(sqlite_url: str) -> None:
    """The read-only transaction reads the same facts as before (no writer: the baseline)."""
    env = {"IDIS_DATABASE_URL": sqlite_url}
    args = ["outbox", "status", "--json"]

    before = json.loads(CliRunner().invoke(main, args, env=env).stdout)
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        during = json.loads(CliRunner().invoke(main, args, env=env).stdout)
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert before == during


def test_status_keeps_its_engine_between_calls(sqlite_url: str) -> None:
    """A second status call opens no connection: /status paid a new engine per request.

    A fresh engine per call also compiled every statement again, most of the call's time.
    """
    from sqlalchemy import event as sa_event
    from sqlalchemy.pool import Pool

    settings = Settings.from_env({"IDIS_DATABASE_URL": sqlite_url})
    connections: list[object] = []

    def connected(dbapi_connection: object, _record: object) -> None:
        connections.append(dbapi_connection)

    collect_status(settings, probe=False)
    sa_event.listen(Pool, "connect", connected)
    try:
        _statuses, notes = collect_status(settings, probe=False)
    finally:
        sa_event.remove(Pool, "connect", connected)

    assert [] == connections
    assert [] == [n for n in notes if "embedded default providers" not in n]


def test_status_reads_on_one_connection_without_the_catalog(db_url: str) -> None:
    """A status call on a migrated database: one pool checkout, no catalog query (issue 16).

    The table check used to read the catalog on a second connection at every call, a fifth
    of the call's CPU on PostgreSQL; it now runs only when a read failed.
    """
    from sqlalchemy import event as sa_event

    from idis.integrations.config import ProviderSettings
    from idis.integrations.ops._status import _engine_for

    # One provider without OAuth: the token state reads on a connection of its own.
    provider = ProviderSettings(name=PROVIDER, kind="crm", base_url="http://127.0.0.1:9")
    settings = Settings(providers={PROVIDER: provider}, database_url=db_url)
    collect_status(settings, probe=False)  # creates the engine, first connection
    engine = _engine_for(db_url)
    checkouts: list[object] = []
    statements: list[str] = []

    def checked_out(*_args: object) -> None:
        checkouts.append(_args[0])

    def executed(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    sa_event.listen(engine.pool, "checkout", checked_out)
    sa_event.listen(engine, "before_cursor_execute", executed)
    try:
        statuses, notes = collect_status(settings, probe=False)
    finally:
        sa_event.remove(engine.pool, "checkout", checked_out)
        sa_event.remove(engine, "before_cursor_execute", executed)

    assert [] == notes
    assert "outbox_pending" in statuses[0].facts
    assert 1 == len(checkouts)
    catalog = [s for s in statements if "pg_catalog" in s or "sqlite_master" in s]
    assert [] == catalog


def test_status_without_tables_still_says_to_run_db_upgrade(tmp_path: object) -> None:
    """No library tables: the failed read leads to the catalog check and the db upgrade note."""
    from pathlib import Path

    url = f"sqlite:///{Path(str(tmp_path)) / 'empty.sqlite3'}"
    settings = Settings.from_env({"IDIS_DATABASE_URL": url})

    statuses, notes = collect_status(settings, probe=False)

    assert any("idis-integrations db upgrade" in n for n in notes), notes
    assert all(s.facts == {} and s.breaker_state == "unknown" for s in statuses)


def test_status_reads_the_outbox_once_for_every_provider(db_url: str) -> None:
    """The outbox aggregate walks every unsettled message: one read per status call.

    It ran once per provider (three times for the example service), most of a
    status call's time on a large backlog (issue 16's /status p99).
    """
    from sqlalchemy import event as sa_event
    from sqlalchemy.orm import Session

    from idis.integrations.config import ProviderSettings
    from idis.integrations.db._engine import create_db_engine
    from idis.integrations.ops._status import _engine_for
    from idis.integrations.outbox import NewMessage, enqueue

    names = ("crm_a", "crm_b", "docs_c")
    providers = {
        n: ProviderSettings(name=n, kind="crm", base_url="http://127.0.0.1:9") for n in names
    }
    settings = Settings(providers=providers, database_url=db_url)
    writer = create_db_engine(db_url)
    try:
        with Session(writer) as session, session.begin():
            for i in range(3):
                enqueue(session, NewMessage(provider="crm_a", idempotency_key=f"a{i}", payload={}))
            enqueue(session, NewMessage(provider="docs_c", idempotency_key="c0", payload={}))
    finally:
        writer.dispose()
    collect_status(settings, probe=False)  # creates the engine
    statements: list[str] = []

    def executed(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    engine = _engine_for(db_url)
    sa_event.listen(engine, "before_cursor_execute", executed)
    try:
        statuses, notes = collect_status(settings, probe=False)
    finally:
        sa_event.remove(engine, "before_cursor_execute", executed)

    assert [] == notes
    assert {"crm_a": 3, "crm_b": 0, "docs_c": 1} == {
        s.provider: s.facts["outbox_pending"] for s in statuses
    }
    reads = [s for s in statements if "FROM outbox_messages" in s]
    assert 1 == sum("count(" in s for s in reads), reads  # one aggregate for all three
    assert 2 == sum("LIMIT" in s for s in reads), reads  # the first pending of crm_a, docs_c
    assert all("lease_expires_at" not in s for s in reads), reads  # the index alone
    with Session(_engine_for(db_url)) as session:
        from idis.integrations.outbox import outbox_summary

        full = {r.provider: r for r in outbox_summary(session, providers=names)}
    for status in statuses:  # the same facts the detailed summary gives
        row = full[status.provider]
        assert row.undelivered == status.facts["outbox_pending"]
        assert row.dead == status.facts["outbox_dead"]
        age = status.facts["outbox_oldest_pending_age_seconds"]
        assert (row.oldest_pending_age is None) == (age is None)
    # A new transaction reads again (the facts are never older than the call).
    with Session(_engine_for(db_url)) as session:
        from idis.integrations.outbox._admin import status_facts

        with session.begin():
            first = status_facts(session, settings, "crm_a")
        with session.begin():
            enqueue(session, NewMessage(provider="crm_a", idempotency_key="a9", payload={}))
        with session.begin():
            again = status_facts(session, settings, "crm_a")
    assert (3, 4) == (first["outbox_pending"], again["outbox_pending"])
