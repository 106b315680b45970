"""``idis-integrations drill`` (rehearse RB-09) and ``postmortem`` (rebuild an incident)."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ..ops._drill import APIS, BREAKABLE, DEFAULT_SPEED, SCENARIOS, DrillOptions, run_drill
from . import main
from ._common import (
    EXIT_CHECK_FAILED,
    database_engine,
    describe_database,
    handle_errors,
    no_database,
    provider_option,
    since_option,
    stderr,
    stdout,
    until_option,
    writable_file,
)


@main.command("drill")
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default="full-outage",
    show_default=True,
    help="Which outage to rehearse.",
)
@click.option("--provider", default="crm_provider", show_default=True, help="CRM provider.")
@click.option(
    "--api",
    default="generic",
    show_default=True,
    help=f"Provider API to rehearse against the simulator's dialect: {', '.join(APIS)} "
    "(generic: the embedded defaults).",
)
@click.option(
    "--speed",
    type=float,
    default=DEFAULT_SPEED,
    show_default=True,
    help="Simulated seconds per tick (1-120): higher runs faster and coarser.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Random seed.")
@click.option(
    "--database-url",
    default=None,
    help="Run against this database (e.g. PostgreSQL) instead of a temporary SQLite file.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=writable_file,
    default=Path("drill-report.html"),
    show_default=True,
    help="Where to write the HTML report.",
)
@click.option(
    "--break",
    "broken",
    type=click.Choice(BREAKABLE),
    multiple=True,
    help="Disable a piece on purpose, to see the drill fail (repeatable).",
)
@no_database  # its own temporary database (or --database-url, which it migrates)
@handle_errors
def drill(broken: tuple[str, ...], **options: Any) -> None:
    """Run RB-09 against the built-in simulator on a compressed clock; exit 1 if a check fails.

    Names its database on stderr first, as every command does (a temporary SQLite
    file unless --database-url), prints each phase as it happens, the verification
    table and a summary, and writes the HTML report.
    """
    temporary = "" if options["database_url"] else " (temporary: deleted after the drill)"

    def name_database(url: str) -> None:
        stderr.print(f"database: {describe_database(url)}{temporary}", markup=False)

    result = run_drill(
        DrillOptions(broken=frozenset(broken), **options),
        echo=lambda line: stdout.print(line, markup=False),
        on_database=name_database,
    )
    verdict = "PASSED" if result.ok else "FAILED"
    stdout.print(f"drill {verdict}; report: {result.report_path}", markup=False)
    if not result.ok:
        sys.exit(EXIT_CHECK_FAILED)


@main.command("postmortem")
@provider_option()
@since_option()
@until_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["html", "markdown"]),
    default="markdown",
    show_default=True,
    help="Report format.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=writable_file,
    default=None,
    help="Write the report here instead of stdout.",
)
@handle_errors
def postmortem(
    provider: str, since: datetime, until: datetime | None, fmt: str, output: Path | None
) -> None:
    """Rebuild an incident (RB-09 Postmortem) from the audit trail and recorded health."""
    from ..db._engine import storage_errors
    from ..ops._postmortem import build_postmortem
    from ..ops._report import render_html, render_markdown

    with database_engine() as engine, storage_errors():
        report, _facts = build_postmortem(engine, provider, since, until)
    text = render_html(report) if fmt == "html" else render_markdown(report)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        stdout.print(f"postmortem written to {output}", markup=False)
