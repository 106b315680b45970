"""``idis-integrations status``: per provider, breaker state, error rate and health facts."""

from __future__ import annotations

import click

from ..ops._status import collect_status
from . import main
from ._common import get_settings, handle_errors, json_option, print_json, print_table, stdout


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


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
    extra = sorted({key for s in statuses for key in s.facts})
    rows = []
    for s in statuses:
        transition = (
            f"{s.last_transition} at {s.last_transition_at:%Y-%m-%d %H:%M:%SZ}"
            if s.last_transition and s.last_transition_at
            else "none recorded"
        )
        rows.append(
            [
                s.provider,
                s.kind,
                s.host,
                f"{s.breaker_state} ({s.breaker_source})",
                f"{_rate(s.error_rate)} of {s.calls}",
                transition,
                s.probe,
                *(s.facts.get(key, "") for key in extra),
            ]
        )
    print_table(
        "idis-integrations status",
        [
            "provider",
            "kind",
            "host",
            "breaker",
            "errors (15m)",
            "last transition",
            "health",
            *extra,
        ],
        rows,
    )
    for note in notes:
        stdout.print(f"note: {note}", markup=False)
