"""verify_sync and resync against the simulator over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from structlog.testing import capture_logs

from idis.integrations._timeparse import utcnow
from idis.integrations.exceptions import ConfigError
from idis.integrations.reconciliation import (
    LocalRecord,
    reconcile,
    resync,
    verify_sync,
)
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.testing import RunningSimulator

from .conftest import PROVIDER, Host, audit_rows, settings_for


def _synced(sim: RunningSimulator, db_url: str, host: Host, count: int) -> Any:
    """Settings, after ``count`` records were created at the provider and applied locally."""
    settings = settings_for(sim, db_url)
    since = utcnow() - timedelta(seconds=1)
    sim.control.emit(PROVIDER, count, webhook=False)
    assert reconcile(PROVIDER, since, settings=settings, handlers=host.registry).ok
    return settings


def test_a_record_changed_only_at_the_provider_is_found_and_repaired(
    sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """verify-sync --sample-size 20 flags the silently edited record; --repair re-syncs it."""
    settings = _synced(sim, db_url, host, 20)
    sim.control.mutate(PROVIDER, "rec_7", {"name": "edited at the provider"})

    found = verify_sync(PROVIDER, 20, seed=3, settings=settings, handlers=host.registry)
    repaired = verify_sync(
        PROVIDER, 20, seed=3, repair=True, settings=settings, handlers=host.registry
    )
    clean = verify_sync(PROVIDER, 20, seed=3, settings=settings, handlers=host.registry)

    audited = audit_rows(engine, "verify_sync.record_repaired")
    assert (20, ["rec_7"], False) == (
        len(found.comparisons),
        [c.record_id for c in found.mismatches],
        found.ok,
    )
    assert ("version", 1, 2) == (
        found.mismatches[0].diffs[0].field,
        found.mismatches[0].local_version,
        found.mismatches[0].remote_version,
    )
    assert (["rec_7"], True) == (repaired.repaired, repaired.ok)
    assert ([], True) == (clean.mismatches, clean.ok)
    assert [("rec_7", "repair", "ok")] == [
        (row.subject_id, row.source, row.outcome) for row in audited
    ]
    assert ("resync:rec_7:v2", "record.updated") == host.applied()[-1]
    assert 3 == len(audit_rows(engine, "verify_sync.completed"))


def test_the_same_seed_samples_the_same_records(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """A seed picks a reproducible sample; the report carries the seed it used."""
    settings = _synced(sim, db_url, host, 40)

    one = verify_sync(PROVIDER, 5, seed=11, settings=settings)
    two = verify_sync(PROVIDER, 5, seed=11, settings=settings)
    other = verify_sync(PROVIDER, 5, seed=12, settings=settings)
    unseeded = verify_sync(PROVIDER, 5, settings=settings)

    ids = [c.record_id for c in one.comparisons]
    assert ids == [c.record_id for c in two.comparisons]
    assert ids != [c.record_id for c in other.comparisons]
    # Five from the host's side, five from the provider's; one drawn twice is compared once.
    assert (5, 5) == (one.host_sampled, one.provider_sampled)
    assert 5 == len(set(ids[:5]))
    assert len(ids) == len(set(ids))
    assert isinstance(unseeded.seed, int)


def test_a_record_deleted_only_at_the_provider_is_repaired_as_a_deletion(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """The provider no longer has a record we hold: missing_remote, repaired by a delete event."""
    settings = _synced(sim, db_url, host, 3)
    sim.control.mutate(PROVIDER, "rec_2", {}, delete=True)

    report = verify_sync(
        PROVIDER,
        3,
        seed=1,
        repair=True,
        settings=settings,
        handlers=host.registry,
        confirm_after=timedelta(0),
    )
    after = verify_sync(PROVIDER, 3, seed=1, settings=settings)

    assert ["missing_remote"] == [c.status for c in report.mismatches]
    assert ["rec_2"] == report.repaired
    assert ("resync:rec_2:deleted:v2", "record.deleted") == host.applied()[-1]
    assert after.ok


def test_records_deleted_on_both_sides_are_expected_404s_not_warnings(
    sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """A record deleted at the provider whose deletion the host applied answers 404: that is
    a match, logged at debug and counted (``gone``), never a warning per record. A 404 for a
    record the host still holds (deleted behind our back) stays a warning, naming it."""
    settings = _synced(sim, db_url, host, 6)
    since = utcnow() - timedelta(seconds=1)
    for record_id in ("rec_1", "rec_2", "rec_3"):
        sim.control.mutate(PROVIDER, record_id, {}, delete=True, event=True)
    assert reconcile(PROVIDER, since, settings=settings, handlers=host.registry).ok
    sim.control.mutate(PROVIDER, "rec_5", {}, delete=True)  # no event: the host still has it

    with capture_logs() as logs:
        report = verify_sync(PROVIDER, 6, seed=1, settings=settings)

    warnings = [line for line in logs if line["log_level"] in ("warning", "error")]
    debug = [line for line in logs if line["log_level"] == "debug"]
    assert ["rec_5"] == [c.record_id for c in report.mismatches]
    assert (3, 3) == (report.gone, report.counts()["gone"])
    assert [("idis.reconcile.verify_missing_remote", "rec_5")] == [
        (line["event"], line.get("record_id")) for line in warnings
    ]
    assert ["rec_1", "rec_2", "rec_3"] == sorted(
        line["record_id"] for line in debug if line["event"] == "idis.reconcile.verify_gone"
    )
    assert 4 == sum(1 for line in debug if line["event"] == "idis.gateway.call_failed")
    assert 3 == audit_rows(engine, "verify_sync.completed")[-1].details["gone"]


class HostRecords:
    """A host-side LocalRecordSource with data: what a real host would implement."""

    def __init__(self, records: Mapping[str, LocalRecord]) -> None:
        self.records = dict(records)

    def sample(self, n: int, seed: int | None) -> list[LocalRecord]:
        return sorted(self.records.values(), key=lambda r: r.record_id)[:n]

    def get(self, record_id: str) -> LocalRecord | None:
        return self.records.get(record_id)


def test_a_host_source_with_data_gets_field_level_diffs(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """Local data that drifted at the same version is reported per field and not 'repaired'."""
    settings = _synced(sim, db_url, host, 2)
    writes = sim.control.stats(PROVIDER)["writes"]
    remote = writes["rec_1"][-1]["data"]
    drifted = dict(remote, stage="drifted")
    source = HostRecords(
        {
            "rec_1": LocalRecord("rec_1", "tenant_1", 1, data=drifted),
            "rec_2": LocalRecord("rec_2", "tenant_1", 1, data=writes["rec_2"][-1]["data"]),
        }
    )

    report = verify_sync(
        PROVIDER,
        1,
        seed=0,
        repair=True,
        local_records=source,
        settings=settings,
        handlers=host.registry,
    )

    assert [("data.stage", "drifted", remote["stage"])] == [
        (d.field, d.local, d.remote) for d in report.mismatches[0].diffs
    ]
    assert ["not_repairable"] == [r.outcome for r in report.repairs]
    assert not report.ok


def test_verify_rejects_bad_input_and_repair_without_handlers(
    sim: RunningSimulator, db_url: str
) -> None:
    """A bad sample size or an unknown provider names the value; repair needs handlers."""
    settings = settings_for(sim, db_url)

    with pytest.raises(ConfigError, match="--sample-size=0"):
        verify_sync(PROVIDER, 0, settings=settings)
    with pytest.raises(ConfigError, match="'nope'"):
        verify_sync("nope", 5, settings=settings)
    with pytest.raises(ConfigError, match="IDIS_HANDLERS"):
        verify_sync(PROVIDER, 5, repair=True, settings=settings, handlers=HandlerRegistry())


def test_resync_applies_current_records_and_a_second_resync_nothing(
    sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """The fallback fetches records updated since, applies each once, audited as resync."""
    settings = settings_for(sim, db_url)
    since = utcnow() - timedelta(seconds=1)
    sim.control.emit(PROVIDER, 30, webhook=False)
    sim.control.emit(PROVIDER, 5, record_ids=["rec_1"], webhook=False)

    dry = resync(PROVIDER, since=since, settings=settings, handlers=host.registry, dry_run=True)
    first = resync(PROVIDER, since=since, settings=settings, handlers=host.registry)
    second = resync(PROVIDER, since=since, settings=settings, handlers=host.registry)

    assert (30, 30, 0) == (dry.fetched, dry.applied, len(host.applied()) - first.applied)
    assert (30, 30, 0) == (first.fetched, first.applied, first.failed)
    assert (30, 0, 30) == (second.fetched, second.applied, second.unchanged)
    assert ("resync:rec_1:v6", "record.created") in host.applied()
    assert 30 == len(audit_rows(engine, "reconcile.record_resynced"))
    assert {"resync"} == {r.source for r in audit_rows(engine, "reconcile.record_resynced")}


def test_resync_by_ids_applies_a_deletion_and_counts_the_missing(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """By id: a record gone at the provider is deleted locally; an unknown id is 'missing'."""
    settings = _synced(sim, db_url, host, 3)
    sim.control.mutate(PROVIDER, "rec_3", {}, delete=True)

    summary = resync(
        PROVIDER,
        record_ids=["rec_1", "rec_3", "rec_404"],
        settings=settings,
        handlers=host.registry,
        confirm_after=timedelta(0),
    )

    assert (3, 1, 1, 1) == (summary.fetched, summary.unchanged, summary.applied, summary.missing)
    assert ("resync:rec_3:deleted:v2", "record.deleted") == host.applied()[-1]
    with pytest.raises(ConfigError, match="exactly one of"):
        resync(PROVIDER, settings=settings, handlers=host.registry)


def test_a_transient_404_is_not_taken_for_a_deletion(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """Issue 11: resync tombstoned a record on one 404, which can be transient. A record is
    deleted only when a second read, after the rest of the batch, still finds nothing."""
    settings = _synced(sim, db_url, host, 3)
    sim.control.set_fault(PROVIDER, "error", status=404, endpoint="record", count=1)
    before = host.applied()

    summary = resync(
        PROVIDER,
        record_ids=["rec_2"],
        settings=settings,
        handlers=host.registry,
        confirm_after=timedelta(0),
    )

    assert (1, 1, 0, 1) == (
        summary.fetched,
        summary.unchanged,
        summary.applied,
        summary.unconfirmed,
    )
    assert before == host.applied()  # no record.deleted applied


def test_verify_repair_does_not_delete_on_a_transient_404(
    sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """verify-sync --repair reads a 404 again before deleting the host's copy."""
    settings = _synced(sim, db_url, host, 1)
    sim.control.set_fault(PROVIDER, "error", status=404, endpoint="record", count=1)
    before = host.applied()

    report = verify_sync(
        PROVIDER,
        1,
        seed=1,
        repair=True,
        settings=settings,
        handlers=host.registry,
        confirm_after=timedelta(0),
    )

    assert ["missing_remote"] == [c.status for c in report.mismatches]
    assert report.ok
    assert before == host.applied()
