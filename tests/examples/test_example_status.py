"""``/status`` and ``/healthz`` of the example service."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest
from examples.integrations_service import app as service_app
from sqlalchemy import create_engine, text
from tests.examples.conftest import CRM, ENRICH, RunningService, service_env, wait_for

from idis.integrations.testing import RunningSimulator


def test_status_reports_each_provider_with_its_sync_and_outbox_facts(
    service: RunningService,
) -> None:
    """/status lists the configured providers, probes them, and adds sync and outbox facts."""
    # The sync service's first tick writes the mode row; until then status says "not started".
    answer = wait_for(
        lambda: (
            (got := service.get("/status")).status_code == 200
            and "not started" not in str(got.json())
            and got
        ),
        "the sync service's first tick",
    )

    assert 200 == answer.status_code
    providers = {p["provider"]: p for p in answer.json()["providers"]}
    assert {CRM, ENRICH} == set(providers)
    assert (True, "webhook (default)", 0) == (
        providers[CRM]["probe_ok"],
        providers[CRM]["sync_mode"],
        providers[CRM]["outbox_pending"],
    )


def test_status_and_healthz_answer_while_a_writer_holds_the_write_lock(
    service: RunningService,
) -> None:
    """Reads take no write lock: a writer mid-transaction (the outbox draining) delays nothing.

    Before issue 16 every transaction began with BEGIN IMMEDIATE, so /status queued
    behind the writer for the whole busy timeout and answered 504.
    """
    path = service.database_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        status = service.get("/status", params={"probe": "false"})
        health = service.get("/healthz")
        held = writer.in_transaction
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    assert (200, 200, True) == (status.status_code, health.status_code, held)
    assert "database" not in " ".join(status.json()["notes"])
    assert "ok" == health.json()["database"]


def test_reading_deals_and_claims_waits_for_no_writer(service: RunningService) -> None:
    """GET /deals, /deals/{id} and /claims/{id} read without a write lock.

    They used write transactions (BEGIN IMMEDIATE on SQLite), so a page view queued
    behind the outbox for the whole busy timeout.
    """
    assert (
        201 == service.post("/deals", {"id": "deal-ro", "tenant_id": "t1", "name": "R"}).status_code
    )
    claim = {"id": "claim-ro", "tenant_id": "t1", "text": "revenue grew"}
    assert 201 == service.post("/claims", claim).status_code
    path = service.database_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        answers = [
            service.get(p, timeout=3).status_code
            for p in ("/deals", "/deals/deal-ro", "/claims/claim-ro")
        ]
        held = writer.in_transaction
    finally:
        writer.execute("ROLLBACK")
        writer.close()

    assert ([200, 200, 200], True) == (answers, held)


def test_status_answers_504_in_bounded_time_while_a_probe_hangs(
    service: RunningService, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider whose health endpoint hangs makes /status answer 504 instead of hanging.

    (A database locked for readers did this before issue 16; reads no longer wait for writers.)
    """
    default = service_app.STATUS_TIMEOUT
    monkeypatch.setattr(service_app, "STATUS_TIMEOUT", 0.5)
    sim.control.set_fault(CRM, "latency", endpoint="health", seconds=5)
    try:
        hung = service.get("/status", params={"probe": "true"})
    finally:
        sim.control.clear_faults(CRM)
    # The recorded answer gets the default bound back: 0.5 s is a race on a busy machine.
    monkeypatch.setattr(service_app, "STATUS_TIMEOUT", default)
    recorded = service.get("/status", params={"probe": "false"})

    assert 504 == hung.status_code
    assert "status took longer than 0.5s" in hung.json()["error"]
    assert 200 == recorded.status_code


def test_a_configuration_error_makes_healthz_unhealthy_and_dead_letters_nothing(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """Vault credentials asked for, no Vault variables: the push waits, /healthz says why."""
    env = service_env(sim, sqlite_url, IDIS_PROVIDER_CRM_PROVIDER_CREDENTIALS_FROM_VAULT="true")
    env.pop("VAULT_ADDR", None)
    with start_service(env) as svc:
        svc.post("/deals", {"id": "c1", "tenant_id": "t1", "name": "Acme"})
        health = wait_for(
            lambda: (got := svc.client.get("/healthz")).status_code == 503 and got,
            "/healthz unhealthy",
        )
        status = svc.get("/status", params={"probe": "false"})
        deal = svc.deal("c1")
    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, attempts FROM outbox_messages")).all()
    finally:
        engine.dispose()

    outbox = health.json()["loops"]["outbox"]
    assert outbox.startswith(f"configuration error ({CRM}): ConfigError:"), outbox
    assert "VAULT" in outbox
    assert any("stopped by our configuration" in n for n in status.json()["notes"])
    assert [("pending", 0)] == [tuple(r) for r in rows]
    assert "SYNCED" != deal["crm_sync_status"]
