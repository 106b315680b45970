"""RB-09 enrichment commands: ``create-stale-defects``, ``clear-stale-defects``, ``impact``,
and ``enrichment run-deferred`` / ``enrichment defects``.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime

import click

from .._audit import cli_actor
from ..enrichment._assessment import impact
from ..enrichment._defects import (
    clear_stale_defects,
    create_stale_defects,
    list_defects,
)
from ..enrichment._worker import run_deferred
from . import main
from ._common import (
    get_settings,
    handle_errors,
    json_option,
    print_json,
    print_table,
    provider_option,
    since_option,
    stderr,
    stdout,
)


def _note_other_providers(provider: str, since: datetime) -> None:
    """When ``provider`` had nothing stale, name the providers whose stale defects are open.

    Stale data is kept under the provider enrichment was asked of: RB-09 names crm_provider,
    a service may enrich through enrichment_provider. "0 stale subject(s)" alone reads as
    "nothing is stale" while other providers' defects are open.
    """
    from collections import Counter

    others = Counter(
        row.provider
        for row in list_defects(status="OPEN", since=since, settings=get_settings(), limit=None)
        if row.provider != provider
    )
    if not others:
        return
    counts = ", ".join(f"{name}: {count}" for name, count in sorted(others.items()))
    first = sorted(others)[0]
    stderr.print(
        f"note: nothing stale is recorded under {provider}; OPEN STALE_ENRICHMENT defects of "
        f"other providers created since {since.isoformat()}: {counts}. Stale data is kept "
        f"under the provider enrichment was asked of: run with --provider {first}",
        markup=False,
    )


@main.command("create-stale-defects")
@provider_option()
@since_option()
@json_option
@handle_errors
def create_stale_defects_cmd(provider: str, since: datetime, as_json: bool) -> None:
    """Open STALE_ENRICHMENT defects for subjects stale since --since (RB-09 Containment 3).

    Idempotent: subjects that already have an OPEN defect are reported, not duplicated. Each
    subject also gets a deferred refresh, so its defect resolves once the provider recovers.
    """
    result = create_stale_defects(provider, since, settings=get_settings(), actor=cli_actor())
    if result.subjects == 0:
        _note_other_providers(provider, result.since)
    if as_json:
        print_json(asdict(result))
        return
    stdout.print(
        f"{provider}: {result.subjects} stale subject(s) since {result.since.isoformat()}: "
        f"{result.created} defect(s) created, {result.already_open} already open, "
        f"{result.requests_enqueued} refresh(es) queued",
        markup=False,
    )


@main.command("clear-stale-defects")
@provider_option()
@since_option()
@json_option
@handle_errors
def clear_stale_defects_cmd(provider: str, since: datetime, as_json: bool) -> None:
    """Resolve OPEN STALE_ENRICHMENT defects created after --since (RB-09 Recovery 4).

    Sets status RESOLVED, resolution 'Data refreshed after provider recovery' and resolved_at.
    """
    result = clear_stale_defects(provider, since, settings=get_settings(), actor=cli_actor())
    if result.resolved == 0:
        _note_other_providers(provider, result.since)
    if as_json:
        print_json(asdict(result))
        return
    stdout.print(
        f"{provider}: {result.resolved} stale defect(s) resolved "
        f"(created after {result.since.isoformat()})",
        markup=False,
    )


@main.command("impact")
@provider_option()
@since_option()
@click.option(
    "--deals-table",
    default=None,
    help="Host table on CrmSyncStatusMixin to count failed syncs in (default "
    "IDIS_IMPACT_DEALS_TABLE).",
)
@json_option
@handle_errors
def impact_cmd(provider: str, since: datetime, deals_table: str | None, as_json: bool) -> None:
    """Affected tenants with counts, most affected first (RB-09 Triage 5)."""
    rows = impact(provider, since, deals_table=deals_table, settings=get_settings())
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    if not rows:
        stdout.print(f"{provider}: no affected tenants since {since.isoformat()}", markup=False)
        return
    print_table(
        f"Impact of {provider} since {since.isoformat()}",
        ["tenant", "failed to sync", "enrichment deferred", "open defects"],
        [
            [
                row.tenant_id,
                "-" if row.failed_to_sync is None else row.failed_to_sync,
                row.enrichment_deferred,
                row.open_defects,
            ]
            for row in rows
        ],
    )


@main.group("enrichment")
def enrichment() -> None:
    """Deferred enrichment: run deferred refreshes, list stale defects."""


@enrichment.command("run-deferred")
@click.option("--once", is_flag=True, help="Refresh what can be refreshed now, then exit.")
@json_option
@handle_errors
def run_deferred_cmd(once: bool, as_json: bool) -> None:
    """Refresh deferred enrichments as providers recover (until SIGTERM, or --once)."""
    stats = run_deferred(get_settings(), once=once)
    if as_json:
        print_json(stats.as_dict())
        return
    # Requests given up because their refresh kept stopping the worker: said only when any.
    given_up = f", given up {stats.given_up}" if stats.given_up else ""
    stdout.print(
        f"refreshed {stats.refreshed}, rescheduled {stats.rescheduled}, failed {stats.failed}"
        f"{given_up}, defects resolved {stats.defects_resolved} ({stats.passes} pass(es))",
        markup=False,
    )


@enrichment.command("defects")
@provider_option(required=False)
@click.option(
    "--status",
    type=click.Choice(["OPEN", "RESOLVED"], case_sensitive=False),
    default=None,
    help="Only OPEN or RESOLVED defects.",
)
@since_option(required=False)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@json_option
@handle_errors
def defects_cmd(
    provider: str | None, status: str | None, since: datetime | None, limit: int, as_json: bool
) -> None:
    """List STALE_ENRICHMENT defects, oldest first."""
    rows = list_defects(
        provider=provider,
        status=status.upper() if status else None,
        since=since,
        settings=get_settings(),
        limit=limit,
    )
    if as_json:
        # The defect rows as listed: every field but the type (always STALE) and the details.
        hidden = ("defect_type", "details")
        print_json([{k: v for k, v in asdict(r).items() if k not in hidden} for r in rows])
        return
    print_table(
        "Stale enrichment defects",
        ["id", "provider", "tenant", "subject", "status", "created", "resolved"],
        [
            [
                r.id,
                r.provider,
                r.tenant_id,
                f"{r.subject_type}:{r.subject_id}",
                r.status,
                r.created_at.isoformat(timespec="seconds"),
                r.resolved_at.isoformat(timespec="seconds") if r.resolved_at else "",
            ]
            for r in rows
        ],
    )
