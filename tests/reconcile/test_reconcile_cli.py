"""The reconcile, timeline, verify-sync and audit commands, configured from the environment."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from idis.integrations._timeparse import utcnow
from idis.integrations.cli import main
from idis.integrations.reconciliation._models import ReconcileCheckpoint
from idis.integrations.sync._inbox import HandlerRegistry, set_registry
from idis.integrations.sync._models import SyncInbox
from idis.integrations.testing import RunningSimulator

from .conftest import PROVIDER, Host, audit_rows, reconcile_host


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the commands are thin over the API, whose tests run on both databases
    (and the SIGKILL test drives this CLI on PostgreSQL too)."""
    return sqlite_url


@pytest.fixture(autouse=True)
def _own_registry() -> Iterator[None]:
    """IDIS_HANDLERS fills the process-wide registry: give each test a fresh one."""
    previous = set_registry(HandlerRegistry())
    yield
    set_registry(previous)


@pytest.fixture
def env(sim: RunningSimulator, db_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment an operator's shell would have: one provider, the host's handlers."""
    values = {
        "IDIS_DATABASE_URL": db_url,
        "IDIS_PROVIDERS": PROVIDER,
        "IDIS_PROVIDER_CRM_PROVIDER_KIND": "crm",
        "IDIS_PROVIDER_CRM_PROVIDER_BASE_URL": sim.provider_url(PROVIDER),
        "IDIS_PROVIDER_CRM_PROVIDER_ENDPOINTS": (
            "records=/records,record=/records/{id},replay=/replay,changes=/changes"
        ),
        "IDIS_HANDLERS": "reconcile_host:register",
        "IDIS_LOG_LEVEL": "warning",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def run(*args: str) -> Result:
    """Invoke the CLI in-process."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _since() -> str:
    return (utcnow() - timedelta(seconds=1)).isoformat()


def _count(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_reconcile_prints_a_summary_and_a_second_run_applies_nothing(
    sim: RunningSimulator, env: dict[str, str], engine: Engine, host: Host
) -> None:
    """Exit 0, a summary table, then JSON from a second run showing nothing applied."""
    since = _since()
    sim.control.emit(PROVIDER, 30, webhook=False)

    first = run("reconcile", "--provider", PROVIDER, "--since", since)
    second = run("reconcile", "--provider", PROVIDER, "--since", since, "--json")

    data = json.loads(second.stdout)
    assert 0 == first.exit_code, first.output
    assert "applied" in first.stdout
    assert "30" in first.stdout
    assert 0 == second.exit_code
    assert (30, 0, 30, True) == (
        data["fetched"],
        data["applied"],
        data["already_applied"],
        data["ok"],
    )
    assert 30 == len(host.applied())
    assert {"cli"} == {row.actor.split(":")[0] for row in audit_rows(engine, "reconcile.completed")}


def test_a_failed_event_exits_1_and_lists_it(
    sim: RunningSimulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, host: Host
) -> None:
    """A handler failure makes the command exit 1 and names the failed event."""
    monkeypatch.setenv("IDIS_HANDLERS", "reconcile_host:register_flaky")
    since = _since()
    events = sim.control.emit(PROVIDER, 5, webhook=False)

    result = run("reconcile", "--provider", PROVIDER, "--since", since)

    assert 1 == result.exit_code
    assert events[1]["id"] in result.stdout
    assert "stage 'zz' unknown" in result.stdout
    assert 4 == len(host.applied())


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--provider", "nope", "--since", "1 hour ago"], "nope"),
        (["--provider", PROVIDER, "--since", "yesterday-ish"], "yesterday-ish"),
        (["--provider", PROVIDER, "--since", "2999-01-01T00:00:00Z"], "in the future"),
        (["--provider", PROVIDER, "--since", "1 hour ago", "--page-size", "0"], "0"),
    ],
)
def test_bad_input_fails_naming_the_value_and_changes_nothing(
    sim: RunningSimulator, env: dict[str, str], engine: Engine, args: list[str], named: str
) -> None:
    """Unknown provider, bad --since or --page-size: exit 2, the value named, nothing touched."""
    sim.control.emit(PROVIDER, 3, webhook=False)

    result = run("reconcile", *args)

    assert 2 == result.exit_code
    assert named in result.output
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)
    assert (0, 0) == (_count(engine, SyncInbox), _count(engine, ReconcileCheckpoint))


def test_a_bad_since_lists_the_bare_duration_form_and_help_does_too(
    sim: RunningSimulator, env: dict[str, str], engine: Engine
) -> None:
    """`--since "5 minutes"` is accepted, so a bad --since lists that form (exit 2, nothing
    replayed), and --help names it too."""
    bad = run("reconcile", "--provider", PROVIDER, "--since", "5 minutez")
    usage = run("reconcile", "--help")

    assert 2 == bad.exit_code
    assert "'5 minutez'" in bad.output
    assert 'without "ago" ("5 minutes", "2h")' in bad.output
    assert '"now"' in bad.output
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)
    assert (0, 0) == (_count(engine, SyncInbox), _count(engine, ReconcileCheckpoint))
    assert '"5 minutes"' in " ".join(usage.output.split())


def test_since_beyond_the_retention_names_the_window_and_applies_nothing(
    sim: RunningSimulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, engine: Engine
) -> None:
    """--since older than IDIS_PROVIDER_*_REPLAY_RETENTION: exit 2, window and resync named."""
    monkeypatch.setenv("IDIS_PROVIDER_CRM_PROVIDER_REPLAY_RETENTION", "1h")
    sim.control.emit(PROVIDER, 3, webhook=False)

    result = run("reconcile", "--provider", PROVIDER, "--since", "2 hours ago")

    assert 2 == result.exit_code
    assert "replay retention of 1h" in result.stderr
    assert "--resync" in result.stderr
    assert (0, 0) == (_count(engine, SyncInbox), _count(engine, ReconcileCheckpoint))


def test_unloadable_or_missing_handlers_fail_before_anything_is_fetched(
    sim: RunningSimulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad IDIS_HANDLERS entry, or none at all, exits 2 naming it; no replay call is made."""
    monkeypatch.setenv("IDIS_HANDLERS", "no_such_host_module:register")
    missing = run("reconcile", "--provider", PROVIDER, "--since", "1 hour ago")
    monkeypatch.delenv("IDIS_HANDLERS")
    empty = run("reconcile", "--provider", PROVIDER, "--since", "1 hour ago")

    assert 2 == missing.exit_code
    assert "no_such_host_module" in missing.stderr
    assert 2 == empty.exit_code
    assert "IDIS_HANDLERS" in empty.stderr
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)


def test_a_module_that_registers_nothing_is_named_with_the_entry_to_write(
    sim: RunningSimulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """IDIS_HANDLERS=package.module whose handlers register through a function, not on import.

    The module imported fine and registered nothing; the command then said only that no
    handler was registered, with IDIS_HANDLERS apparently set right. Exit 2 naming the entry
    and the one to write instead; no replay call.
    """
    monkeypatch.setenv("IDIS_HANDLERS", "reconcile_host")

    result = run("reconcile", "--provider", PROVIDER, "--since", "1 hour ago")

    assert 2 == result.exit_code
    assert "IDIS_HANDLERS entry 'reconcile_host' registered no handler" in result.stderr
    assert "reconcile_host:register" in result.stderr
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)


def test_dry_run_and_resync_from_the_command_line(
    sim: RunningSimulator, env: dict[str, str], host: Host
) -> None:
    """--dry-run says so and applies nothing; --resync applies the current records."""
    since = _since()
    sim.control.emit(PROVIDER, 12, webhook=False)

    dry = run("reconcile", "--provider", PROVIDER, "--since", since, "--dry-run")
    resynced = run("reconcile", "--provider", PROVIDER, "--since", since, "--resync", "--json")

    assert 0 == dry.exit_code
    assert "dry run: nothing changed" in dry.stdout
    assert 0 == resynced.exit_code
    assert 12 == json.loads(resynced.stdout)["applied"]
    assert 12 == len(host.applied())


def test_timeline_shows_the_gap_then_none_after_reconcile(
    sim: RunningSimulator, env: dict[str, str]
) -> None:
    """timeline exits 1 on the gap (strict), calls it 'not confirmed yet' by default, 0 after."""
    since = _since()
    sim.control.emit(PROVIDER, 5, webhook=False)
    until = utcnow().isoformat()

    window = ["--provider", PROVIDER, "--since", since, "--until", until, "--settle", "0s"]
    before = run("timeline", *window)
    pending = run("timeline", "--provider", PROVIDER, "--since", since, "--until", until)
    run("reconcile", "--provider", PROVIDER, "--since", since)
    after = run("timeline", *window)
    data = json.loads(
        run("timeline", "--provider", PROVIDER, "--since", since, "--until", until, "--json").stdout
    )

    assert 1 == before.exit_code
    assert "1 gap(s) in sync timeline" in before.stdout
    assert 0 == pending.exit_code
    assert "not confirmed yet" in pending.stdout
    assert 0 == after.exit_code
    assert "no gaps in sync timeline" in after.stdout
    assert (True, ["replay"]) == (data["no_gaps"], [i["source"] for i in data["intervals"]])


def test_timeline_rejects_an_inverted_window(env: dict[str, str]) -> None:
    """--until before --since is bad input naming both."""
    result = run(
        "timeline", "--provider", PROVIDER, "--since", "1 hour ago", "--until", "2 hours ago"
    )

    assert 2 == result.exit_code
    assert "is before since" in result.stderr


def test_verify_sync_exits_1_on_a_mismatch_and_0_after_repair(
    sim: RunningSimulator, env: dict[str, str], engine: Engine
) -> None:
    """A record changed behind our back shows in the diff table; --repair fixes it."""
    since = _since()
    sim.control.emit(PROVIDER, 20, webhook=False)
    run("reconcile", "--provider", PROVIDER, "--since", since)
    sim.control.mutate(PROVIDER, "rec_4", {"stage": "lost"})

    found = run("verify-sync", "--provider", PROVIDER, "--sample-size", "20", "--seed", "5")
    fixed = run(
        "verify-sync", "--provider", PROVIDER, "--sample-size", "20", "--seed", "5", "--repair"
    )
    clean = json.loads(
        run("verify-sync", "--provider", PROVIDER, "--sample-size", "20", "--json").stdout
    )

    assert 1 == found.exit_code
    assert "rec_4" in found.stdout
    assert "version" in found.stdout
    assert "1 mismatch" in found.stdout
    assert 0 == fixed.exit_code, fixed.output
    assert "1 repaired" in fixed.stdout
    assert (20, 0, True) == (clean["checked"], clean["mismatched"], clean["ok"])
    assert ["rec_4"] == [r.subject_id for r in audit_rows(engine, "verify_sync.record_repaired")]


def test_verify_sync_counts_records_gone_on_both_sides_without_a_warning_each(
    sim: RunningSimulator, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records deleted at the provider, deletions applied: their 404s are expected. No
    warning line per record on stderr, one count in the summary and the JSON, exit 0."""
    monkeypatch.setenv("IDIS_LOG_FORMAT", "json")
    since = _since()
    sim.control.emit(PROVIDER, 8, webhook=False)
    for record_id in ("rec_2", "rec_4", "rec_6"):
        sim.control.mutate(PROVIDER, record_id, {}, delete=True, event=True)
    run("reconcile", "--provider", PROVIDER, "--since", since)

    result = run("verify-sync", "--provider", PROVIDER, "--sample-size", "20", "--seed", "5")
    as_json = json.loads(
        run("verify-sync", "--provider", PROVIDER, "--sample-size", "20", "--json").stdout
    )

    assert 0 == result.exit_code, result.output
    assert "3 deleted on both sides: crm_provider answered 404, as expected" in result.stdout
    assert '"level": "warning"' not in result.stderr
    assert "404" not in result.stderr
    assert (3, 0, True) == (as_json["gone"], as_json["mismatched"], as_json["ok"])


def test_audit_lists_events_by_provider_time_and_action(
    sim: RunningSimulator, env: dict[str, str]
) -> None:
    """audit filters by exact action or prefix; --json returns the rows."""
    since = _since()
    sim.control.emit(PROVIDER, 4, webhook=False)
    run("reconcile", "--provider", PROVIDER, "--since", since)

    applied = json.loads(
        run(
            "audit",
            "--provider",
            PROVIDER,
            "--since",
            since,
            "--action",
            "reconcile.event_applied",
            "--json",
        ).stdout
    )
    everything = run("audit", "--provider", PROVIDER, "--since", since, "--action", "reconcile.*")
    other = run("audit", "--provider", "crm_provider", "--since", "1 minute ago", "--action", "x")

    assert 4 == len(applied)
    assert {("replay", "reconcile.event_applied")} == {(r["source"], r["action"]) for r in applied}
    assert "reconcile.completed" in everything.stdout
    assert "5 audit events" in everything.stdout
    assert "0 audit events" in other.stdout
    assert "actions recorded there: reconcile.completed" in other.stderr


def test_audit_names_the_recorded_actions_when_an_action_matches_nothing(
    sim: RunningSimulator, env: dict[str, str]
) -> None:
    """A mistyped --action ("0 audit events", exit 0) names what the window holds, on stderr;
    a filter that matches says nothing more."""
    since = _since()
    sim.control.emit(PROVIDER, 2, webhook=False)
    run("reconcile", "--provider", PROVIDER, "--since", since)

    typo = run("audit", "--provider", PROVIDER, "--since", since, "--action", "reconcile.aplied")
    as_json = run(
        "audit", "--provider", PROVIDER, "--since", since, "--action", "recon.*", "--json"
    )
    found = run("audit", "--provider", PROVIDER, "--since", since, "--action", "reconcile.*")
    empty = run(
        "audit", "--provider", PROVIDER, "--since", since, "--until", since, "--action", "x"
    )

    assert (0, 0) == (typo.exit_code, as_json.exit_code)
    assert "0 audit events" in typo.stdout
    assert (
        f"no audit event of {PROVIDER} in that window has action 'reconcile.aplied'; "
        "actions recorded there: reconcile.completed, reconcile.event_applied"
    ) in " ".join(typo.stderr.split())
    assert [] == json.loads(as_json.stdout), "the note goes to stderr, never into the JSON"
    assert "'recon.*'" in as_json.stderr
    assert "note:" not in found.stderr
    assert "actions recorded there: none (no audit event at all)" in " ".join(empty.stderr.split())


def test_no_secret_reaches_the_output_the_audit_trail_or_the_logs(
    sim: RunningSimulator,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    engine: Engine,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A handler error quoting a configured secret and a bearer token is redacted everywhere."""
    monkeypatch.setenv("IDIS_HANDLERS", "reconcile_host:register_leaky")
    monkeypatch.setenv("IDIS_PROVIDER_CRM_PROVIDER_CLIENT_SECRET", reconcile_host.LEAKED_SECRET)
    monkeypatch.setenv("IDIS_LOG_LEVEL", "debug")
    since = _since()
    sim.control.emit(PROVIDER, 3, webhook=False)

    result = run("reconcile", "--provider", PROVIDER, "--since", since)
    listed = run("audit", "--provider", PROVIDER, "--since", since, "--json")
    streams = capfd.readouterr()

    failed = audit_rows(engine, "reconcile.event_failed")
    stored = json.dumps([(r.message, r.details) for r in failed])
    everything = result.output + listed.output + streams.out + streams.err + stored
    assert 1 == result.exit_code
    assert 1 == len(failed)
    assert "[REDACTED]" in stored
    assert reconcile_host.LEAKED_SECRET not in everything
    assert reconcile_host.LEAKED_TOKEN not in everything
