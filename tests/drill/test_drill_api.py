"""``drill --api``: the RB-09 drill against each provider dialect of the simulator (issues 13, 14).

Each drill runs in-process at the default speed (about 6 s on this machine);
each test asserts that the drill went through that API (the applied event ids
are the pack's), that every applicable check passed, and that what cannot
apply says so instead of passing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from idis.integrations.exceptions import ConfigError
from idis.integrations.ops._drill import (
    OUTAGE_DELETIONS,
    DrillOptions,
    DrillResult,
    applied_table,
    run_drill,
)


def _quiet(_line: str) -> None:
    return None


def _drill(tmp_path: Path, api: str, **options: object) -> tuple[DrillResult, list[str]]:
    """Run the drill on a kept SQLite file; return its result and the applied event ids."""
    url = f"sqlite:///{tmp_path / 'drill.sqlite3'}"
    result = run_drill(
        DrillOptions(api=api, database_url=url, report_path=tmp_path / "r.html", **options),  # type: ignore[arg-type]  # test-chosen options
        echo=_quiet,
    )
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ids = [str(i) for i in conn.execute(select(applied_table.c.event_id)).scalars()]
    finally:
        engine.dispose()
    return result, ids


def _failed(result: DrillResult) -> list[str]:
    return [f"{c.name}: {c.actual}" for c in result.report.checks if not c.ok]


def _not_applicable(result: DrillResult) -> dict[str, str]:
    return {c.name: c.actual for c in result.report.checks if not c.applicable}


def _check(result: DrillResult, name: str) -> str:
    [actual] = [c.actual for c in result.report.checks if c.name == name and c.applicable]
    return actual


#: The rows an API without webhooks in the drill shows as not applicable.
_NO_WEBHOOK_ROWS = {
    "Containment 1: automatic polling failover",
    "Recovery 5: back to webhooks",
    "Verification 4: webhooks delivered",
}


def test_api_generic_is_the_default_drill(tmp_path: Path) -> None:
    """--api generic keeps the embedded defaults: the same 17 checks, all passing, none n/a."""
    result, ids = _drill(tmp_path, "generic")

    assert [] == _failed(result)
    assert {} == _not_applicable(result)
    assert 17 == len(result.report.checks)
    assert result.summary.lines()[0] == "checks: 17 passed, 0 failed"
    assert ids
    assert all(i.startswith("evt_") for i in ids)
    assert (result.summary.reconcile_applied or 0) > 0
    assert result.report.title == "RB-09 drill: full-outage of crm_provider"


def test_api_salesforce_polls_soql_and_replays_the_deletions(tmp_path: Path) -> None:
    """Salesforce: SOQL polling throughout, deletions brought back by the deleted/ replay."""
    result, ids = _drill(tmp_path, "salesforce")

    assert [] == _failed(result)
    assert _NO_WEBHOOK_ROWS == set(_not_applicable(result))
    assert all("sends no plain webhooks" in why for why in _not_applicable(result).values())
    assert ids
    assert all(i.startswith("sf:Opportunity:") for i in ids)
    assert sum(":deleted:" in i for i in ids) == OUTAGE_DELETIONS
    assert (result.summary.reconcile_applied or 0) >= OUTAGE_DELETIONS
    assert () == result.summary.lost
    assert () == result.summary.doubled
    assert "3 not applicable" in result.summary.lines()[0]
    engine = create_engine(result.database_url)
    try:
        with engine.connect() as conn:
            instance = conn.execute(
                text("SELECT instance_url FROM oauth_tokens WHERE provider = 'crm_provider'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert str(instance).endswith("/p/crm_provider")  # the token answer's instance_url
    assert result.summary.lines()[1].startswith(f"records: {result.summary.records} at the")


def test_api_salesforce_without_reconcile_loses_the_deletions(tmp_path: Path) -> None:
    """--break reconcile: no poll reads a deletion, so the deleted records are named lost."""
    result, _ = _drill(tmp_path, "salesforce", broken=frozenset({"reconcile"}))

    failed = {c.name for c in result.report.checks if not c.ok}
    assert "Verification 2: zero records lost (latest state of each applied)" in failed
    assert OUTAGE_DELETIONS == len(result.summary.lost)
    assert all(lost.endswith("@deleted") for lost in result.summary.lost)


def test_api_hubspot_takes_batched_webhooks_polls_search_and_resyncs_deletions(
    tmp_path: Path,
) -> None:
    """HubSpot: batched v3-signed webhooks, failover to CRM search polling and back (the
    sentinel matches webhook deltas to search snapshots by record); search replay sees no
    deletions, the resync by id does."""
    result, ids = _drill(tmp_path, "hubspot")

    assert [] == _failed(result)
    assert {} == _not_applicable(result)
    assert "polling" == _check(result, "Containment 1: automatic polling failover")
    assert "webhook" == _check(result, "Recovery 5: back to webhooks")
    assert ids
    assert all(i.startswith(("hs:deals.poll:", "hs:deal.", "resync:")) for i in ids)
    assert any(i.startswith("hs:deal.propertyChange:") for i in ids)  # by webhook
    assert (
        _check(result, "Verification 4: webhooks delivered, retry queue drained").split()[0] != "0"
    )
    deletions = [i for i in ids if i.startswith("resync:") and ":deleted:" in i]
    assert OUTAGE_DELETIONS == len(deletions)
    assert result.summary.resync_applied is not None
    assert result.summary.resync_applied >= OUTAGE_DELETIONS
    assert _check(result, "Recovery 3: resync by id (no replay of deletions)").startswith(
        f"applied {result.summary.resync_applied}"
    )
    assert () == result.summary.lost
    assert () == result.summary.doubled


def test_api_gdrive_rehearses_the_documents_provider_on_a_durable_feed(tmp_path: Path) -> None:
    """Drive: the documents provider; notifications through a renewed watch channel that lapses
    in the outage (failover) and is opened again (return); the changes feed is durable, so
    replay finds nothing left, and the drill says replay was not needed instead of passing it."""
    result, ids = _drill(tmp_path, "gdrive")

    assert [] == _failed(result)
    assert result.report.title == "RB-09 drill: full-outage of docs_provider (gdrive API)"
    assert {"Recovery 3: replay needed"} == set(_not_applicable(result))
    assert "polling" == _check(result, "Containment 1: automatic polling failover")
    assert "webhook" == _check(result, "Recovery 5: back to webhooks")
    notes = [text for _, text in result.report.events]
    assert "Drive watch channel renewed before expiry" in notes
    assert "Drive watch channel opened again (the last one lapsed in the outage)" in notes
    assert ids
    assert all(i.startswith("gd:") for i in ids)
    assert 0 == result.summary.reconcile_applied
    assert () == result.summary.lost
    assert () == result.summary.doubled


def test_api_pdl_defers_on_spent_credits_and_answers_no_match(tmp_path: Path) -> None:
    """PDL: credits spent (402) defer with defects; a 404 no-match is an answer, not a defect;
    the CRM stays generic, with webhooks and failover."""
    result, ids = _drill(tmp_path, "pdl")

    assert [] == _failed(result)
    assert {} == _not_applicable(result)
    assert all(i.startswith("evt_") for i in ids)
    no_match = _check(result, "Verification 2: PDL no-match is an answer, not a defect")
    assert no_match.endswith(", 0 defects")
    assert not no_match.startswith("0 ")
    assert any("credits spent" in text for _, text in result.report.events)
    assert "deferred" in _check(result, "Containment 2: enrichment deferred, no exception")


def test_api_pdl_rate_limit_storm_settles_subjects_pdl_does_not_know(tmp_path: Path) -> None:
    """Subjects deferred in the storm that PDL then answers "no match" leave no defect open
    (they have no data to be stale): Recovery 4 passes. It failed naming claim-10, claim-20."""
    result, _ = _drill(tmp_path, "pdl", scenario="rate-limit-storm")

    assert [] == _failed(result)
    assert set(_not_applicable(result)) <= {
        "Verification 2: PDL no-match is an answer, not a defect"
    }


def test_api_salesforce_rate_limit_storm_is_detected_by_the_rate_limit_alert(
    tmp_path: Path,
) -> None:
    """Polled alone, with every call paused on Retry-After, Salesforce's errors sit at the
    errors alert's 0.050/s and never exceed it: Detection failed. The rate-limit alert
    (the share of attempts answered 429) detects the storm."""
    result, _ = _drill(tmp_path, "salesforce", scenario="rate-limit-storm")

    assert [] == _failed(result)
    detection = _check(
        result,
        "Detection: alert IDISIntegrationProviderErrors or IDISIntegrationProviderRateLimited "
        "fired",
    )
    assert detection.startswith("IDISIntegrationProviderRateLimited fired at T+")
    assert "IDISIntegrationProviderErrors" not in detection
    assert "alert IDISIntegrationProviderRateLimited FIRING" in [t for _, t in result.report.events]


def test_a_bad_api_is_a_config_error_naming_the_value_and_the_choices() -> None:
    with pytest.raises(ConfigError, match="--api") as caught:
        DrillOptions(api="zoho")

    assert "'zoho'" in str(caught.value)
    assert "generic, hubspot, salesforce, gdrive, pdl" in str(caught.value)


def test_webhook_only_needs_an_api_with_webhooks() -> None:
    with pytest.raises(ConfigError, match="--scenario"):
        DrillOptions(api="salesforce", scenario="webhook-only")


@pytest.mark.parametrize("api", ["hubspot", "gdrive"])
def test_silent_webhooks_of_a_healthy_api_fail_over_and_return(tmp_path: Path, api: str) -> None:
    """webhook-only: the API stays up, its webhooks go silent. The sentinel must notice by
    itself (no breaker opens): HubSpot's deltas are matched to search results by record, Drive's
    feed is read with its page tokens. Before, HubSpot's ids never matched (false failover in
    healthy traffic) and Drive's feed was re-read from its first page (no failover, no return)."""
    result, _ = _drill(tmp_path, api, scenario="webhook-only")

    assert [] == _failed(result)
    assert "polling" == _check(result, "Containment 1: automatic polling failover")
    assert "webhook" == _check(result, "Recovery 5: back to webhooks")


def test_the_cli_refuses_a_bad_api_with_exit_2_and_changes_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    database = tmp_path / "kept.sqlite3"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "idis.integrations",
            "drill",
            "--api",
            "zoho",
            "--database-url",
            f"sqlite:///{database}",
            "--report",
            "r.html",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )

    assert 2 == result.returncode, result.stdout + result.stderr
    assert "--api='zoho' is not valid" in result.stderr
    assert "generic, hubspot, salesforce, gdrive, pdl" in result.stderr
    assert "" == result.stdout
    assert not (tmp_path / "r.html").exists()
    assert not database.exists()
    assert [] == [p.name for p in tmp_path.iterdir()]


def test_the_drill_table_is_kept_on_a_database_the_operator_names(tmp_path: Path) -> None:
    """The drill's applied-events table gained two columns; an old one is replaced, not kept."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE drill_applied_events (id INTEGER PRIMARY KEY, "
                    "event_id VARCHAR(64), record_id VARCHAR(255), version INTEGER, "
                    "applied_at DATETIME)"
                )
            )
    finally:
        engine.dispose()

    result = run_drill(DrillOptions(api="pdl", database_url=url, report_path=None), echo=_quiet)

    assert [] == _failed(result)
