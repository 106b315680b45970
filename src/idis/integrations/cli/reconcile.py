"""``reconcile``, ``timeline``, ``verify-sync`` and ``audit``: RB-09 Recovery 3 and Verification.

* ``idis-integrations reconcile --provider P --since "2 hours ago" [--dry-run] [--resync]``
* ``idis-integrations timeline --provider P --since ... [--until ...] [--json]``
* ``idis-integrations verify-sync --provider P --sample-size 20 [--seed N]
  [--repair[=host|provider]] [--host-records package.module:factory] [--json]``
* ``idis-integrations audit --provider P --since ... [--action X] [--json]``

Exit codes: 0 done; 1 done but a check failed (reconcile: an event failed;
timeline: gaps; verify-sync: mismatches left); 2 bad input, nothing changed;
3 a dependency (database, provider) is unreachable.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from datetime import datetime, timedelta
from typing import Any

import click

from .._audit import cli_actor
from .._timeparse import format_duration, parse_duration, utcnow
from . import main
from ._common import (
    EXIT_CHECK_FAILED,
    database_engine,
    get_settings,
    handle_errors,
    handler_registry,
    handlers_option,
    json_option,
    print_json,
    print_result,
    print_table,
    provider_option,
    since_option,
    stderr,
    stdout,
    until_option,
)
from ._progress import progress


def _time(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


# --------------------------------------------------------------------------- reconcile


def _counts(summary: Any, skipped: tuple[str, int], held: tuple[str, int]) -> list[Any]:
    """The rows a reconcile and a resync both print, with their own skipped and held rows."""
    dry = summary.dry_run
    rows: list[Any] = [("fetched", summary.fetched), skipped]
    rows += [("would apply" if dry else "applied", summary.applied), held]
    rows += [("ignored (no handler)", summary.ignored), ("failed", summary.failed)]
    if summary.run_id:
        rows.append(("run id", summary.run_id))
    return rows


def _dry(summary: Any) -> str:
    return " (dry run: nothing changed)" if summary.dry_run else ""


def _print_summary(summary: Any) -> None:
    resumed = " (resumed)" if summary.resumed else ""
    title = f"reconcile {summary.provider} since {_time(summary.since)}{_dry(summary)}{resumed}"
    rows = _counts(
        summary,
        ("already applied", summary.already_applied),
        ("superseded", summary.superseded),
    )
    if summary.covered_until is not None:
        rows.append(("covered until", _time(summary.covered_until)))
    print_table(title, ["", "events"], rows)
    if summary.failures:
        print_table(
            "failed events (retried by the next run)",
            ["event", "record", "error", "message"],
            [(f.event_id, f.record_id, f.error_type, f.message) for f in summary.failures[:20]],
        )


def _print_resync(summary: Any) -> None:
    rows = _counts(summary, ("unchanged", summary.unchanged), ("missing", summary.missing))
    print_table(f"resync {summary.provider}{_dry(summary)}", ["", "records"], rows)


@main.command("reconcile")
@provider_option()
@since_option()
@click.option("--dry-run", is_flag=True, help="Fetch and count only; change nothing.")
@click.option(
    "--resync",
    is_flag=True,
    help="Fetch the current records updated since --since instead of replaying events "
    "(the fallback beyond the provider's replay retention).",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 5000),
    default=1000,
    show_default=True,
    help="Events per replay page; one transaction per page.",
)
@click.option("--no-resume", is_flag=True, help="Start afresh instead of resuming a stopped run.")
@handlers_option
@json_option
@handle_errors
def reconcile_command(
    *,
    provider: str,
    since: datetime,
    dry_run: bool,
    resync: bool,
    page_size: int,
    no_resume: bool,
    handlers: str | None,
    as_json: bool,
) -> None:
    """Apply the events PROVIDER sent since --since that the host missed (RB-09 Recovery 3)."""
    from ..reconciliation._fallback import resync as run_resync
    from ..reconciliation._replay import ReconcileInterrupted, reconcile

    settings = get_settings()
    registry = handler_registry(handlers)
    with progress(
        f"{'resyncing' if resync else 'reconciling'} {provider}",
        unit="records" if resync else "events",
    ) as advance:
        if resync:
            result = run_resync(
                provider,
                since=since,
                settings=settings,
                handlers=registry,
                dry_run=dry_run,
                actor=cli_actor(),
                progress=advance,
            )
            print_result(result, as_json, _print_resync)
            if not result.ok:
                sys.exit(EXIT_CHECK_FAILED)
            return
        try:
            summary = reconcile(
                provider,
                since,
                settings=settings,
                dry_run=dry_run,
                handlers=registry,
                page_size=page_size,
                resume=not no_resume,
                actor=cli_actor(),
                progress=advance,
            )
        except ReconcileInterrupted as exc:
            print_result(exc.summary, as_json, _print_summary)
            raise
    print_result(summary, as_json, _print_summary)
    if not summary.ok:
        sys.exit(EXIT_CHECK_FAILED)


# --------------------------------------------------------------------------- timeline


def _settle_callback(
    _ctx: click.Context, _param: click.Parameter, value: str | None
) -> timedelta | None:
    if value is None:
        return None
    from ..exceptions import ConfigError

    try:
        return parse_duration(value, name="--settle")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("timeline")
@provider_option()
@since_option()
@until_option
@click.option(
    "--settle",
    default=None,
    callback=_settle_callback,
    help="A trailing uncovered stretch younger than this is 'not confirmed yet', not a gap "
    "(default: sentinel interval + lag threshold; 0 = strict).",
)
@json_option
@handle_errors
def timeline_command(
    *,
    provider: str,
    since: datetime,
    until: datetime | None,
    settle: timedelta | None,
    as_json: bool,
) -> None:
    """Show which channel covered PROVIDER's sync timeline, and the gaps (exit 1 on gaps)."""
    from ..reconciliation._sync_timeline import timeline

    report = timeline(provider, since, until, settings=get_settings(), settle=settle)
    if as_json:
        print_json(report.as_dict())
    else:
        print_table(
            f"sync timeline of {provider}",
            ["source", "start", "end", "covered"],
            [
                (i.source, _time(i.start), _time(i.end), format_duration(i.end - i.start))
                for i in report.intervals
            ],
        )
        if report.gaps:
            print_table(
                "gaps (no channel covered these)",
                ["start", "end", "length"],
                [(_time(g.start), _time(g.end), format_duration(g.seconds)) for g in report.gaps],
            )
        stdout.print(report.statement(), markup=False)
    if not report.no_gaps:
        sys.exit(EXIT_CHECK_FAILED)


# --------------------------------------------------------------------------- verify-sync


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


_HOST_RECORDS_HELP = (
    "The host's records to compare (package.module:factory returning a HostRecordSource); "
    "default $IDIS_HOST_RECORDS, else the inbox's version ledger."
)


@main.command("verify-sync")
@provider_option()
@click.option(
    "--sample-size",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="Records to sample on each side (host and provider).",
)
@click.option("--seed", type=int, default=None, help="Sampling seed (printed; reuse to repeat).")
@click.option(
    "--repair",
    type=click.Choice(["host", "provider"]),
    is_flag=False,
    flag_value="host",
    default=None,
    help="Fix the mismatches on one side: host (bare --repair; the provider's version through "
    "the handlers) or provider (the host's version pushed through the outbox).",
)
@click.option(
    "--fields", default=None, help="Data fields that matter, comma-separated (default: all)."
)
@handlers_option
@click.option("--host-records", default=None, help=_HOST_RECORDS_HELP)
@json_option
@handle_errors
def verify_sync_command(
    *,
    provider: str,
    sample_size: int,
    seed: int | None,
    repair: str | None,
    fields: str | None,
    handlers: str | None,
    host_records: str | None,
    as_json: bool,
) -> None:
    """Compare a random sample of the host's and PROVIDER's records (RB-09 Verification 3)."""
    from ..reconciliation._verify import verify_sync

    settings = get_settings()
    if host_records:  # loaded (and closed) by verify_sync, as IDIS_HOST_RECORDS would be
        settings = replace(settings, host_records=host_records)
    registry = handler_registry(handlers)
    wanted = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
    with progress(f"verifying {provider}", unit="records") as advance:
        report = verify_sync(
            provider,
            sample_size,
            seed=seed,
            repair=repair,
            fields=wanted,
            settings=settings,
            handlers=registry,
            actor=cli_actor(),
            on_checked=advance,
        )
    print_result(report, as_json, _print_verify)
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)


def _print_verify(report: Any) -> None:
    # Only what needs a look: 2,000 "match" rows would bury the one mismatch.
    provider = report.provider
    repairs = {r.record_id: r for r in report.repairs}
    rows = []
    for comparison in report.mismatches:
        fixed = repairs.get(comparison.record_id)
        for index, diff in enumerate(comparison.diffs or (None,)):
            first = index == 0
            rows.append(
                (
                    comparison.record_id if first else "",
                    comparison.status if first else "",
                    "" if diff is None else diff.field,
                    "" if diff is None else _cell(diff.local),
                    "" if diff is None else _cell(diff.remote),
                    (fixed.outcome if fixed else "") if first else "",
                )
            )
    if rows:
        print_table(
            f"verify-sync {provider}: {len(report.mismatches)} mismatched record(s)",
            ["record", "status", "field", "host", "provider", "repair"],
            rows,
        )
    for repair in report.repairs:
        if repair.outcome in ("failed", "not_repairable") and repair.reason:
            stdout.print(f"  {repair.record_id}: {repair.outcome}: {repair.reason}", markup=False)
    side = "the host's table" if report.local_source == "host_records" else "the inbox's ledger"
    summary = (
        f"verify-sync {provider} (seed {report.seed}): {len(report.comparisons)} checked, "
        f"{len(report.comparisons) - len(report.mismatches)} match"
        + (
            f" ({report.gone} deleted on both sides: {provider} answered 404, as expected)"
            if report.gone
            else ""
        )
        + f", {len(report.mismatches)} mismatch"
    )
    if report.repair_side is not None:
        summary += f", {len(report.repaired)} repaired"
        if report.queued:
            summary += f", {len(report.queued)} queued for {provider}"
    summary += (
        f" ({report.host_sampled} sampled from {side}, {report.provider_sampled} from {provider})"
    )
    if report.queued:
        summary += "; the outbox delivers the queued pushes: run verify-sync again after"
    if not report.ok:
        summary += (
            "; some mismatches remain"
            if report.repair_side is not None
            else "; re-run with --repair=host or --repair=provider to fix one side"
        )
    stdout.print(summary, markup=False)
    if report.local_source == "ledger":
        stderr.print(
            "note: compared with the inbox's ledger, which cannot see rows changed in the "
            "host's table; set IDIS_HOST_RECORDS (or --host-records) to read the host's records",
            markup=False,
        )


# --------------------------------------------------------------------------- audit


@main.command("audit")
@provider_option()
@since_option()
@until_option
@click.option(
    "--action",
    default=None,
    help="Only this action (reconcile.event_applied), or a prefix ending in * (reconcile.*).",
)
@click.option(
    "--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True, help="Most rows."
)
@json_option
@handle_errors
def audit_command(
    *,
    provider: str,
    since: datetime,
    until: datetime | None,
    action: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List PROVIDER's audit events since --since, oldest first (RB-09 Verification 2)."""
    from .._audit import list_audit_events, recorded_actions
    from ..db._engine import session_scope

    end = until or utcnow()
    actions = None
    prefix = None
    if action:
        if action.endswith("*"):
            prefix = action.rstrip("*")
        else:
            actions = [action]
    with database_engine() as engine, session_scope(engine, write=False) as session:
        records = list_audit_events(
            session,
            provider=provider,
            since=since,
            until=end,
            actions=actions,
            action_prefix=prefix,
            limit=limit,
        )
        # A filter that matched nothing may be a typo ("breaker.opne"): exit 0 and "0
        # audit events" alone would read as "it never happened". Name what is there.
        recorded = (
            recorded_actions(session, provider=provider, since=since, until=end)
            if action and not records
            else None
        )
    if recorded is not None:
        there = ", ".join(recorded) if recorded else "none (no audit event at all)"
        stderr.print(
            f"note: no audit event of {provider} in that window has action {action!r}; "
            f"actions recorded there: {there}",
            markup=False,
        )
    if as_json:
        # Every field but the provider (the command names it); times as ISO-8601.
        print_json([{k: v for k, v in asdict(r).items() if k != "provider"} for r in records])
        return
    print_table(
        f"audit events of {provider} since {_time(since)}",
        ["time", "action", "source", "subject", "tenant", "outcome", "actor", "run"],
        [
            (
                _time(r.occurred_at),
                r.action,
                r.source or "",
                f"{r.subject_type}:{r.subject_id}" if r.subject_id else "",
                r.tenant_id or "",
                r.outcome,
                r.actor,
                r.correlation_id or "",
            )
            for r in records
        ],
    )
    stdout.print(
        f"{len(records)} audit events"
        + (f" (limit {limit} reached)" if len(records) == limit else ""),
        markup=False,
    )
