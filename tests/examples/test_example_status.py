"""``/status`` and ``/healthz`` of the example service."""

from __future__ import annotations

import sqlite3

import pytest
from examples.integrations_service import app as service_app
from tests.examples.conftest import CRM, ENRICH, RunningService, wait_for

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


def test_status_answers_504_in_bounded_time_while_a_probe_hangs(
    service: RunningService, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider whose health endpoint hangs makes /status answer 504 instead of hanging.

    (A database locked for readers did this before issue 16; reads no longer wait for writers.)
    """
    monkeypatch.setattr(service_app, "STATUS_TIMEOUT", 0.5)
    sim.control.set_fault(CRM, "latency", endpoint="health", seconds=5)
    try:
        hung = service.get("/status", params={"probe": "true"})
    finally:
        sim.control.clear_faults(CRM)
    recorded = service.get("/status", params={"probe": "false"})

    assert 504 == hung.status_code
    assert "status took longer than 0.5s" in hung.json()["error"]
    assert 200 == recorded.status_code
