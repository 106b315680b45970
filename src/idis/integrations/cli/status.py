"""``idis-integrations status``: per provider, breaker state, error rate and health facts.

The output is one block per provider (a field per line), laid out side by side
as far as the terminal's real width allows: a 160-column terminal shows two
blocks per row, 80 or 100 columns one, and nothing is ever cut off (long values
wrap). Through a pipe the width is ``COLUMNS``, or 100.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .._timeparse import format_duration
from ..observability._logs import redact_text
from ..ops._status import ProviderStatus, collect_status
from . import main
from ._common import get_settings, handle_errors, json_option, print_json

#: Width of one provider's block when several fit side by side.
BLOCK_WIDTH = 76
#: Width through a pipe without ``COLUMNS`` (what issue 15 asks status to fit).
PIPE_WIDTH = 100


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _age(seconds: Any) -> str:
    return format_duration(float(seconds))


def console_width() -> int:
    """The real terminal width on a terminal; ``COLUMNS`` or 100 through a pipe."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return Console().width  # rich asks the terminal (os.get_terminal_size)
    return PIPE_WIDTH


def status_fields(status: ProviderStatus) -> list[tuple[str, str]]:
    """``(label, value)`` lines of one provider, the known facts first, then any others."""
    facts = dict(status.facts)
    transition = (
        f"{status.last_transition} at {status.last_transition_at:%Y-%m-%d %H:%M:%SZ}"
        if status.last_transition and status.last_transition_at
        else "none recorded"
    )
    fields = [
        ("breaker", f"{status.breaker_state} ({status.breaker_source})"),
        ("last transition", transition),
        ("errors (15m)", f"{_rate(status.error_rate)} of {status.calls} call(s)"),
        ("health", status.probe),
    ]
    if "sync_mode" in facts:
        sync = str(facts.pop("sync_mode"))
        age = facts.pop("last_webhook_age_seconds", None)
        fields.append(("sync", sync if age is None else f"{sync}; last webhook {_age(age)} ago"))
    if "outbox_pending" in facts:
        outbox = f"{facts.pop('outbox_pending')} pending, {facts.pop('outbox_dead', 0)} dead"
        oldest = facts.pop("outbox_oldest_pending_age_seconds", None)
        fields.append(("outbox", outbox if oldest is None else f"{outbox}; oldest {_age(oldest)}"))
    if "token" in facts:
        fields.append(("token", str(facts.pop("token"))))
    if "open_defects" in facts:
        fields.append(("defects", f"{facts.pop('open_defects')} open"))
    # The other facts: none that is unset (an empty row reads as a missing value), and
    # ages in seconds said as the rows above say them (1m35s, not 95.0).
    for key, value in sorted(facts.items()):
        if value is None or value == "":
            continue
        if key.endswith("_seconds") and isinstance(value, int | float):
            fields.append((key.removesuffix("_seconds").replace("_", " "), _age(value)))
        else:
            fields.append((key.replace("_", " "), str(value)))
    return fields


def _block(status: ProviderStatus, width: int) -> Table:
    table = Table(
        title=Text(f"{status.provider} ({status.kind}, {status.host})", style="bold"),
        title_justify="left",
        show_header=False,
        box=box.SIMPLE,
        width=width,
        padding=(0, 1),
    )
    table.add_column("field", no_wrap=True, style="dim")
    table.add_column("value", overflow="fold", ratio=1)
    for label, value in status_fields(status):
        table.add_row(label, Text(redact_text(value)))
    return table


def render_status(statuses: list[ProviderStatus], notes: list[str], console: Console) -> None:
    """Print the provider blocks, as many per row as ``console.width`` fits, then the notes."""
    width = console.width
    per_row = max(1, min(len(statuses), (width + 1) // (BLOCK_WIDTH + 1)))
    block_width = width if per_row == 1 else (width - (per_row - 1)) // per_row
    console.print(Text("idis-integrations status", style="italic"))
    for start in range(0, len(statuses), per_row):
        row = Table.grid(padding=(0, 1))
        for _ in range(per_row):
            row.add_column(width=block_width)
        row.add_row(*(_block(s, block_width) for s in statuses[start : start + per_row]))
        console.print(row)
    for note in notes:
        console.print(Text(f"note: {redact_text(note)}"))


@main.command("status")
@click.option("--provider", "providers", multiple=True, help="Only these providers (repeatable).")
@click.option("--no-probe", is_flag=True, help="Do not call the providers' health endpoints.")
@json_option
@handle_errors
def status(providers: tuple[str, ...], no_probe: bool, as_json: bool) -> None:
    """Show each provider's breaker state, recent error rate and health facts."""
    settings = get_settings(check=False)
    for name in providers:
        settings.provider(name)
    get_settings()  # then name the database and check it
    statuses, notes = collect_status(
        settings, providers=list(providers) or None, probe=not no_probe
    )
    if as_json:
        print_json({"providers": [s.as_dict() for s in statuses], "notes": notes})
        return
    render_status(statuses, notes, Console(highlight=False, width=console_width()))
