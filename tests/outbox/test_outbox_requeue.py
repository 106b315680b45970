"""queue_webhook_retries and the outbox CLI: fresh budgets, idempotence, audit, bad input."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from idis.integrations._audit import AuditEvent
from idis.integrations._clock import ManualClock
from idis.integrations.cli import main
from idis.integrations.config import Secret
from idis.integrations.exceptions import ConfigError, ProviderUnavailable, UnknownProviderError
from idis.integrations.outbox._admin import outbox_summary, queue_webhook_retries
from idis.integrations.outbox._enqueue import enqueue
from idis.integrations.outbox._messages import NewMessage, OutboxMessage

from .conftest import outbox_settings, put_messages, statuses, table, work_once

CRM = "crm_provider"
SECRET = Secret("sk_outbox_test_" + "q" * 20)


def _shape(engine: Engine, clock: ManualClock) -> None:
    """Leave 2 dead, 2 failed-and-waiting, 2 delivered and 1 webhook dead."""
    put_messages(engine, 6, clock=clock, max_retries=0)
    with Session(engine) as session, session.begin():
        enqueue(
            session,
            NewMessage.webhook(CRM, "deal.won", {"id": 1}, webhook_id="evt_1", max_retries=0),
            now=clock.now(),
        )
    rows = table(engine)
    dead = {rows[0].id, rows[1].id, rows[6].id}
    waiting = {rows[2].id, rows[3].id}

    def deliver(message: OutboxMessage) -> None:
        if message.id in dead:
            raise ProviderUnavailable(f"token {SECRET.get_secret_value()} refused", status_code=503)
        if message.id in waiting:
            raise ProviderUnavailable("busy", status_code=503)

    with Session(engine) as session, session.begin():
        for row in session.scalars(select(type(rows[0])).where(type(rows[0]).id.in_(waiting))):
            row.max_retries = 5
    work_once(
        engine,
        outbox_settings(),
        deliver=deliver,
        providers=[CRM],
        clock=clock,
        rng=random.Random(1),
    )


def _snapshot(engine: Engine) -> list[tuple[Any, ...]]:
    return [
        (r.id, r.status, r.attempts, r.max_retries, r.next_attempt_at, r.last_error)
        for r in table(engine)
    ]


def _audits(engine: Engine) -> list[AuditEvent]:
    with Session(engine, expire_on_commit=False) as session:
        return list(
            session.scalars(select(AuditEvent).where(AuditEvent.action == "outbox.requeued"))
        )


def test_requeue_gives_failed_and_dead_a_fresh_budget(engine: Engine, clock: ManualClock) -> None:
    """Dead and failed deliveries go back to pending, due now, attempts 0, the new budget."""
    _shape(engine, clock)
    clock.advance(10)

    result = queue_webhook_retries(
        CRM, 7, settings=outbox_settings(), engine=engine, actor="cli:oncall", now=clock.now()
    )
    rows = table(engine)
    again = queue_webhook_retries(
        CRM, 7, settings=outbox_settings(), engine=engine, now=clock.now()
    )

    assert (3, 2, 5) == (result.dead, result.failed, result.total)
    requeued = [r for r in rows if r.status == "pending"]
    assert 5 == len(requeued)
    assert all(
        (r.attempts, r.max_retries, r.next_attempt_at) == (0, 7, clock.now()) for r in requeued
    )
    assert 2 == sum(r.status == "delivered" for r in rows)
    assert (0, 0) == (again.dead, again.failed)  # idempotent: nothing new to re-queue
    first, second = _audits(engine)  # every real run is on the trail, even a no-op
    assert ("cli:oncall", CRM, 3, 2, 7) == (
        first.actor,
        first.provider,
        first.details["dead"],
        first.details["failed"],
        first.details["max_retries"],
    )
    assert (0, 0) == (second.details["dead"], second.details["failed"])


def test_dry_run_counts_and_changes_nothing(engine: Engine, clock: ManualClock) -> None:
    """--dry-run reports what would be re-queued and leaves every row and the audit trail alone."""
    _shape(engine, clock)
    before = _snapshot(engine)

    result = queue_webhook_retries(
        CRM, 3, dry_run=True, settings=outbox_settings(), engine=engine, now=clock.now()
    )

    assert (3, 2, True) == (result.dead, result.failed, result.dry_run)
    assert before == _snapshot(engine)
    assert [] == _audits(engine)


def test_since_and_kind_narrow_what_is_requeued(sqlite_engine: Engine, clock: ManualClock) -> None:
    """Only deliveries last attempted since --since, and only the kinds asked for, are re-queued."""
    _shape(sqlite_engine, clock)
    clock.advance(3600)

    none_recent = queue_webhook_retries(
        CRM,
        3,
        "30 minutes ago",
        settings=outbox_settings(),
        engine=sqlite_engine,
        now=clock.now(),
    )
    webhooks = queue_webhook_retries(
        CRM,
        3,
        "2 hours ago",
        kinds=["webhook"],
        settings=outbox_settings(),
        engine=sqlite_engine,
        now=clock.now(),
    )

    assert 0 == none_recent.total
    assert (1, 0) == (webhooks.dead, webhooks.failed)
    assert ["webhook"] == [
        r.kind for r in table(sqlite_engine) if r.attempts == 0 and r.max_retries == 3
    ]


@pytest.mark.parametrize(
    ("provider", "max_retries", "since", "error", "named"),
    [
        ("nope_provider", 10, None, UnknownProviderError, "'nope_provider'"),
        (CRM, -1, None, ConfigError, "--max-retries=-1"),
        (CRM, 10, "last tuesday-ish", ConfigError, "'last tuesday-ish'"),
        (CRM, 10, "2999-01-01T00:00:00Z", ConfigError, "future"),
    ],
)
def test_bad_input_fails_naming_the_value_and_changes_nothing(
    sqlite_engine: Engine,
    clock: ManualClock,
    provider: str,
    max_retries: int,
    since: str | None,
    error: type[Exception],
    named: str,
) -> None:
    """Unknown provider, negative budget or bad --since: an error naming it, nothing touched."""
    _shape(sqlite_engine, clock)
    before = _snapshot(sqlite_engine)

    with pytest.raises(error) as caught:
        queue_webhook_retries(
            provider,
            max_retries,
            since,
            settings=outbox_settings(),
            engine=sqlite_engine,
        )

    assert named in str(caught.value)
    assert before == _snapshot(sqlite_engine)
    assert [] == _audits(sqlite_engine)


def _cli(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env={"IDIS_DATABASE_URL": url})


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--provider", "nope_provider", "--max-retries", "10"], "nope_provider"),
        (["--provider", CRM, "--max-retries", "-1"], "-1"),
        (["--provider", CRM, "--max-retries", "ten"], "ten"),
        (["--provider", CRM, "--max-retries", "10", "--since", "banana"], "banana"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_value(
    sqlite_url: str, sqlite_engine: Engine, clock: ManualClock, args: list[str], named: str
) -> None:
    """queue-webhook-retries with a bad flag exits 2, names the value, and changes nothing."""
    _shape(sqlite_engine, clock)
    before = _snapshot(sqlite_engine)

    result = _cli(sqlite_url, "queue-webhook-retries", *args)

    assert 2 == result.exit_code
    assert named in result.output
    assert before == _snapshot(sqlite_engine)


@pytest.mark.parametrize("budget", ["2147483648", "99999999999999999999"])
def test_cli_budget_beyond_the_column_exits_2_naming_it(
    db_url: str, engine: Engine, clock: ManualClock, budget: str
) -> None:
    """A --max-retries the max_retries column cannot hold is bad input, not a driver traceback.

    PostgreSQL's INTEGER stops at 2**31 - 1 and SQLite's at 2**63 - 1; before the check both
    ended in a DataError/OverflowError traceback with exit 1, after the UPDATE had been tried.
    """
    _shape(engine, clock)
    before = _snapshot(engine)

    result = _cli(db_url, "queue-webhook-retries", "--provider", CRM, "--max-retries", budget)

    assert 2 == result.exit_code, result.output
    assert f"--max-retries={budget}" in result.output
    assert "2147483647" in result.output
    assert "Traceback" not in result.output
    assert before == _snapshot(engine)
    assert [] == _audits(engine)


@pytest.mark.timeout(30)  # before the check, the worker started and ran until killed
@pytest.mark.parametrize("flag", ["--batch-size", "--concurrency"])
def test_outbox_work_refuses_a_size_beyond_any_use(sqlite_url: str, flag: str) -> None:
    """--batch-size 99999999999999999999 made every lease a DataError on PostgreSQL, logged as
    "outbox database unreachable; will retry" for ever; it is bad input, exit 2."""
    result = _cli(sqlite_url, "outbox", "work", flag, "99999999999999999999")

    assert 2 == result.exit_code, result.output
    assert flag in result.output
    assert "99999999999999999999" in result.output


def test_message_budget_beyond_the_column_is_refused() -> None:
    """NewMessage refuses a max_retries the column cannot store, naming it, before any write."""
    with pytest.raises(ConfigError, match="max_retries=2147483648"):
        NewMessage.webhook(CRM, "deal.won", {"id": 1}, webhook_id="evt_big", max_retries=2**31)


def test_cli_requeues_and_reports_without_secrets(
    sqlite_url: str, sqlite_engine: Engine, clock: ManualClock
) -> None:
    """The CLI dry run and real run report counts as text and JSON; no secret in any output."""
    _shape(sqlite_engine, clock)

    dry = _cli(
        sqlite_url,
        "queue-webhook-retries",
        "--provider",
        CRM,
        "--max-retries",
        "10",
        "--dry-run",
        "--json",
    )
    listed = _cli(sqlite_url, "outbox", "list", "--provider", CRM, "--json")
    real = _cli(sqlite_url, "queue-webhook-retries", "--provider", CRM, "--max-retries", "10")
    status = _cli(sqlite_url, "outbox", "status", "--json")

    assert (0, 0, 0, 0) == (dry.exit_code, listed.exit_code, real.exit_code, status.exit_code)
    assert {"requeued": 5, "dead": 3, "failed": 2, "dry_run": True} == {
        k: v
        for k, v in json.loads(dry.stdout).items()
        if k in ("requeued", "dead", "failed", "dry_run")
    }
    assert 3 == len(json.loads(listed.stdout))
    assert "re-queued 5 deliveries" in real.output
    crm = next(row for row in json.loads(status.stdout) if row["provider"] == CRM)
    assert (5, 2) == (crm["pending"], crm["delivered"])
    for output in (dry.output, listed.output, real.output, status.output):
        assert SECRET.get_secret_value() not in output


def test_summary_counts_statuses_and_oldest_pending_age(engine: Engine, clock: ManualClock) -> None:
    """outbox_summary gives per-provider counts and the age of the oldest undelivered message."""
    _shape(engine, clock)
    put_messages(engine, 2, provider="docs_provider", prefix="d", clock=clock)
    clock.advance(90)

    with Session(engine) as session:
        rows = {r.provider: r for r in outbox_summary(session, now=clock.now())}
        only_docs = outbox_summary(session, providers=["docs_provider", "enrichment_provider"])

    crm = rows[CRM]
    assert (2, 2, 0, 2, 3) == (crm.pending, crm.retrying, crm.in_flight, crm.delivered, crm.dead)
    assert 90.0 == crm.oldest_pending_age
    assert (2, 0) == (rows["docs_provider"].pending, rows["docs_provider"].retrying)
    assert ["docs_provider", "enrichment_provider"] == [r.provider for r in only_docs]
    assert 0 == only_docs[1].undelivered


def test_purge_removes_only_old_delivered_messages(sqlite_url: str, sqlite_engine: Engine) -> None:
    """outbox purge deletes delivered rows older than --older-than and nothing else."""
    put_messages(sqlite_engine, 4)
    work_once(
        sqlite_engine, outbox_settings(), deliver=lambda m: None, providers=[CRM], until_idle=True
    )
    put_messages(sqlite_engine, 2, prefix="later")

    kept = _cli(sqlite_url, "outbox", "purge", "--older-than", "1h")
    removed = _cli(sqlite_url, "outbox", "purge", "--older-than", "0s")
    bad = _cli(sqlite_url, "outbox", "purge", "--older-than", "soon")

    assert "purged 0" in kept.output
    assert "purged 4" in removed.output
    assert 2 == bad.exit_code
    assert "'soon'" in bad.output
    assert {"pending": 2} == statuses(sqlite_engine)


@pytest.mark.parametrize("flag", ["--lease", "--poll-interval"])
@pytest.mark.parametrize("value", ["0s", "-5s", "soon"])
def test_outbox_work_refuses_a_duration_that_is_not_positive(
    sqlite_url: str, sqlite_engine: Engine, flag: str, value: str
) -> None:
    """A zero lease would lapse at once (and used to fall back to the default silently); a
    zero poll interval would spin an idle worker against the database."""
    put_messages(sqlite_engine, 1)

    bad = _cli(sqlite_url, "outbox", "work", "--provider", CRM, flag, value, "--until-idle")

    assert 2 == bad.exit_code
    assert f"{flag}='{value}'" in bad.output
    assert {"pending": 1} == statuses(sqlite_engine)
