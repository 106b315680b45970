"""verify_sync against the example service's deals table (its host record source), over HTTP.

Issue 15: verify-sync compared the inbox's ledger with itself, so a deal changed
by hand in ``deals`` still "matched" and a deal never pushed was never sampled.
Here the deals come from the CRM through the example's own handlers, then one
is tampered with in the table, one is inserted without a push, and one exists
only at the CRM; each is found, and repaired on the side asked for. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from examples.integrations_service.handlers import register as register_deal_handlers
from examples.integrations_service.host_records import DealRecords
from examples.integrations_service.models import Deal, host_metadata
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from idis.integrations._timeparse import utcnow
from idis.integrations.cli import main
from idis.integrations.config import Settings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.exceptions import ConfigError
from idis.integrations.outbox import AsyncOutboxWorker, BatchResult, OutboxMessageRow
from idis.integrations.reconciliation import reconcile, verify_sync
from idis.integrations.resilience import AsyncGateway
from idis.integrations.sync._inbox import HandlerRegistry, set_registry
from idis.integrations.testing import RunningSimulator

from .conftest import PROVIDER, audit_rows, settings_for

HOST_RECORDS = "examples.integrations_service.host_records:deal_records"


@pytest.fixture
def deals(engine: Engine) -> DealRecords:
    """The example service's deals table on the test database, read by its host record source."""
    host_metadata.create_all(engine)
    return DealRecords(engine)


@pytest.fixture
def handlers() -> HandlerRegistry:
    """The example service's event handlers."""
    return register_deal_handlers(HandlerRegistry())


def _crm_deals(
    sim: RunningSimulator, db_url: str, handlers: HandlerRegistry, count: int
) -> Settings:
    """``count`` deals created at the CRM and brought into ``deals`` by the example's handlers."""
    settings = settings_for(sim, db_url)
    since = utcnow() - timedelta(seconds=1)
    sim.control.emit(PROVIDER, count, webhook=False)
    assert reconcile(PROVIDER, since, settings=settings, handlers=handlers).ok
    return settings


def _tamper(engine: Engine, deal_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Deal).where(Deal.id == deal_id).values(amount=1, stage="TAMPERED"))


def _never_pushed(engine: Engine, deal_id: str) -> None:
    """A deal the service wrote whose push never reached the outbox (lost, or inserted by hand)."""
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            insert(Deal).values(
                id=deal_id,
                tenant_id="tenant_1",
                name="Never pushed",
                stage="lead",
                amount=500,
                revision=1,
                crm_version=None,
                crm_sync_status="PENDING",
                updated_at=now,
            )
        )


def _deal(engine: Engine, deal_id: str) -> dict[str, Any] | None:
    with Session(engine) as session:
        deal = session.get(Deal, deal_id)
        return None if deal is None else deal.as_dict()


def _by_id(report: Any) -> dict[str, Any]:
    return {c.record_id: c for c in report.mismatches}


def test_a_tampered_deal_a_never_pushed_deal_and_a_crm_only_deal_are_found(
    sim: RunningSimulator, engine: Engine, db_url: str, deals: DealRecords, handlers: Any
) -> None:
    """Both directions are sampled; each drift is reported with the fields that differ."""
    settings = _crm_deals(sim, db_url, handlers, 6)
    _tamper(engine, "rec_3")
    _never_pushed(engine, "deal_local")
    sim.control.emit(PROVIDER, 1, record_ids=["rec_crm_only"], webhook=False)
    crm = sim.control.stats(PROVIDER)["writes"]["rec_3"][-1]["data"]

    report = verify_sync(PROVIDER, 20, seed=1, host_records=deals, settings=settings)

    found = _by_id(report)
    assert {"rec_3", "deal_local", "rec_crm_only"} == set(found)
    assert [("data.stage", "TAMPERED", crm["stage"]), ("data.amount", 1, crm["amount"])] == [
        (d.field, d.local, d.remote) for d in found["rec_3"].diffs
    ]
    assert ("missing_remote", "missing_local") == (
        found["deal_local"].status,
        found["rec_crm_only"].status,
    )
    assert (7, 7, 8, "host_records") == (
        report.host_sampled,
        report.provider_sampled,
        len(report.comparisons),
        report.local_source,
    )
    assert not report.ok


def test_the_ledger_alone_misses_what_the_host_source_finds(
    sim: RunningSimulator, engine: Engine, db_url: str, deals: DealRecords, handlers: Any
) -> None:
    """The old comparison (inbox ledger vs provider) calls the tampered deal a match."""
    settings = _crm_deals(sim, db_url, handlers, 3)
    _tamper(engine, "rec_2")

    ledger = verify_sync(PROVIDER, 20, seed=1, settings=settings)
    host = verify_sync(PROVIDER, 20, seed=1, host_records=deals, settings=settings)

    assert ([], "ledger") == ([c.record_id for c in ledger.mismatches], ledger.local_source)
    assert ["rec_2"] == [c.record_id for c in host.mismatches]


def test_repair_host_writes_the_crm_version_into_the_deals_and_audits_each(
    sim: RunningSimulator, engine: Engine, db_url: str, deals: DealRecords, handlers: Any
) -> None:
    """--repair=host: the tampered deal gets the CRM's fields back, the CRM-only deal is
    created through the handlers; the never-pushed deal is not deleted (nothing says the
    CRM ever had it); a second run finds only that one."""
    settings = _crm_deals(sim, db_url, handlers, 4)
    _tamper(engine, "rec_1")
    _never_pushed(engine, "deal_local")
    sim.control.emit(PROVIDER, 1, record_ids=["rec_crm_only"], webhook=False)
    crm = sim.control.stats(PROVIDER)["writes"]

    report = verify_sync(
        PROVIDER,
        20,
        seed=2,
        repair="host",
        host_records=deals,
        settings=settings,
        handlers=handlers,
        confirm_after=timedelta(0),
    )
    again = verify_sync(PROVIDER, 20, seed=2, host_records=deals, settings=settings)

    outcomes = {r.record_id: (r.side, r.outcome) for r in report.repairs}
    assert {
        "rec_1": ("host", "repaired"),
        "rec_crm_only": ("host", "repaired"),
        "deal_local": ("host", "not_repairable"),
    } == outcomes
    tampered = _deal(engine, "rec_1")
    assert tampered is not None
    assert (crm["rec_1"][-1]["data"]["amount"], crm["rec_1"][-1]["data"]["stage"]) == (
        tampered["amount"],
        tampered["stage"],
    )
    created = _deal(engine, "rec_crm_only")
    assert created is not None
    assert crm["rec_crm_only"][-1]["data"]["name"] == created["name"]
    assert _deal(engine, "deal_local") is not None
    assert ["deal_local"] == [c.record_id for c in again.mismatches]
    audited = {
        (row.subject_id, row.details["side"], row.details["via"], row.outcome)
        for row in audit_rows(engine, "verify_sync.record_repaired")
    }
    assert {
        ("rec_1", "host", "host_records", "ok"),
        ("rec_crm_only", "host", "handlers", "ok"),
    } == audited


def test_repair_provider_pushes_the_deals_through_the_outbox(
    sim: RunningSimulator, engine: Engine, db_url: str, deals: DealRecords, handlers: Any
) -> None:
    """--repair=provider: the tampered and the never-pushed deals are queued as PUTs; once the
    outbox delivers them the CRM holds the host's values; the CRM-only deal is left alone."""
    settings = _crm_deals(sim, db_url, handlers, 4)
    _tamper(engine, "rec_2")
    _never_pushed(engine, "deal_local")
    sim.control.emit(PROVIDER, 1, record_ids=["rec_crm_only"], webhook=False)

    report = verify_sync(
        PROVIDER, 20, seed=3, repair="provider", host_records=deals, settings=settings
    )
    with Session(engine) as session:
        queued = sorted(
            row.idempotency_key.rsplit("-", 1)[-1]
            for row in session.scalars(select(OutboxMessageRow))
        )
    delivered = asyncio.run(_deliver_once(engine, settings))
    crm = sim.control.stats(PROVIDER)["writes"]

    outcomes = {r.record_id: (r.side, r.outcome) for r in report.repairs}
    assert {
        "rec_2": ("provider", "queued"),
        "deal_local": ("provider", "queued"),
        "rec_crm_only": ("provider", "not_repairable"),
    } == outcomes
    assert ["deal_local", "rec_2"] == queued
    assert 2 == delivered.delivered
    assert ({"amount": 1, "stage": "TAMPERED"}, "Never pushed") == (
        {k: crm["rec_2"][-1]["data"][k] for k in ("amount", "stage")},
        crm["deal_local"][-1]["data"]["name"],
    )
    assert ("provider", "outbox") == tuple(
        next(
            (r.details["side"], r.details["via"])
            for r in audit_rows(engine, "verify_sync.record_repaired")
            if r.subject_id == "deal_local"
        )
    )


def test_verify_rejects_a_bad_repair_side_and_a_bad_host_records_entry(
    sim: RunningSimulator, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input names the value and what was expected; nothing is written."""
    settings = settings_for(sim, db_url)
    monkeypatch.setenv("IDIS_HOST_RECORDS", "not a module")

    with pytest.raises(ConfigError, match=r"--repair=.both.*expected host"):
        verify_sync(PROVIDER, 5, repair="both", settings=settings)
    with pytest.raises(ConfigError, match=r"IDIS_HOST_RECORDS=.not a module.*package\.module"):
        Settings.from_env()
    missing = replace(settings, host_records="examples.integrations_service.models:nothing_here")
    with pytest.raises(ConfigError, match="no callable 'nothing_here'"):
        verify_sync(PROVIDER, 5, settings=missing)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_env(sim: RunningSimulator, db_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An operator's shell for the example service: its handlers and its host record source."""
    values = {
        "IDIS_DATABASE_URL": db_url,
        "IDIS_PROVIDERS": PROVIDER,
        "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
        "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": sim.provider_url(PROVIDER),
        "IDIS_PROVIDER_CRM_PROVIDER_ENDPOINTS": (
            "records=/records,record=/records/{id},replay=/replay,changes=/changes"
        ),
        "IDIS_HANDLERS": "examples.integrations_service.handlers:register",
        "IDIS_HOST_RECORDS": HOST_RECORDS,
        "IDIS_LOG_LEVEL": "warning",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _run(*args: str) -> Result:
    # Each command is a process of its own in production: IDIS_HANDLERS fills a fresh registry.
    previous = set_registry(HandlerRegistry())
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        set_registry(previous)


def test_cli_prints_the_mismatches_and_a_summary_not_every_match(
    sim: RunningSimulator,
    engine: Engine,
    db_url: str,
    deals: DealRecords,
    handlers: Any,
    cli_env: dict[str, str],
) -> None:
    """RB-09's command with IDIS_HOST_RECORDS set: exit 1, one table of the tampered deal's
    fields, a summary; bare --repair (RB-09's meaning) repairs the host; then exit 0."""
    _crm_deals(sim, db_url, handlers, 40)
    _tamper(engine, "rec_7")

    found = _run("verify-sync", "--provider", PROVIDER, "--sample-size", "40", "--seed", "4")
    repaired = _run(
        "verify-sync", "--provider", PROVIDER, "--sample-size", "40", "--seed", "4", "--repair"
    )
    clean = _run("verify-sync", "--provider", PROVIDER, "--sample-size", "40", "--json")

    assert 1 == found.exit_code, found.output
    assert "TAMPERED" in found.stdout
    assert "40 checked, 39 match, 1 mismatch (40 sampled from the host's table, 40 from" in (
        found.stdout
    )
    assert 1 == found.stdout.count("rec_")  # the mismatch only, not 40 "match" rows
    assert 0 == repaired.exit_code, repaired.output
    assert "1 repaired" in repaired.stdout
    body = json.loads(clean.stdout)
    assert (0, "host_records", 40) == (body["mismatched"], body["local_source"], body["checked"])


def test_a_missing_deals_table_is_named_not_an_sql_traceback(
    sim: RunningSimulator, db_url: str, engine: Engine, cli_env: dict[str, str]
) -> None:
    """verify-sync before the service ever created its tables: exit 2, what and where."""
    result = _run("verify-sync", "--provider", PROVIDER, "--sample-size", "5")

    assert 2 == result.exit_code, result.output
    assert "no 'deals' table" in result.output
    assert "prepare_database" in result.output
    assert "Traceback" not in result.output


def test_the_example_handlers_apply_an_update_to_an_existing_deal(
    sim: RunningSimulator, engine: Engine, db_url: str, deals: DealRecords, handlers: Any
) -> None:
    """Found by verify-sync on PostgreSQL: the handlers' conflict-free insert took psycopg's
    rowcount of -1 for "created", so an existing deal never took the CRM's update there."""
    settings = _crm_deals(sim, db_url, handlers, 2)
    since = utcnow() - timedelta(seconds=1)
    current = sim.control.stats(PROVIDER)["writes"]["rec_1"][-1]["data"]
    sim.control.mutate(PROVIDER, "rec_1", dict(current, name="renamed at the CRM"), event=True)

    assert reconcile(PROVIDER, since, settings=settings, handlers=handlers).ok

    assert ("renamed at the CRM", 2) == tuple(
        (_deal(engine, "rec_1") or {}).get(k) for k in ("name", "crm_version")
    )
    assert [] == verify_sync(PROVIDER, 5, seed=0, host_records=deals, settings=settings).mismatches


async def _deliver_once(engine: Engine, settings: Any) -> BatchResult:
    """One cycle of the (async) outbox worker on ``engine``'s database."""
    async_engine = create_async_db_engine(engine.url.render_as_string(hide_password=False))
    try:
        async with AsyncGateway(settings) as gateway:
            return await AsyncOutboxWorker(async_engine, settings, gateway=gateway).run_once()
    finally:
        await async_engine.dispose()
