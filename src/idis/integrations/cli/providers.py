"""``idis-integrations providers``: the provider packs and what each supports."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import click

from . import main
from ._common import get_settings, handle_errors, json_option, no_database, print_json


def pack_rows() -> list[dict[str, Any]]:
    """One mapping per pack: name, summary and capabilities (what ``providers`` prints)."""
    from ..providers import known_packs

    return [
        {"name": pack.name, "summary": pack.summary, **asdict(pack.capabilities)}
        for pack in known_packs()
    ]


def _label(field_name: str) -> str:
    """A capability as people read it: ``rate_limit_headers`` is "rate-limit headers"."""
    return field_name.replace("rate_limit", "rate-limit").replace("_", " ")


def _shown(value: Any) -> str:
    if value is None:
        return "not supported"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return str(value)


@main.command("providers")
@json_option
@no_database
@handle_errors
def providers_command(as_json: bool) -> None:
    """List the provider packs (IDIS_PROVIDER_<NAME>_API) and what each supports.

    Also names the pack each configured provider uses.
    """
    from ..providers import pack_for
    from ..providers._pack import Capabilities

    settings = get_settings()
    rows = pack_rows()
    using = {name: pack_for(p).name for name, p in sorted(settings.providers.items())}
    if as_json:
        print_json({"packs": rows, "providers": using})
        return
    for row in rows:
        click.echo(f"{row['name']}: {row['summary']}")
        for item in fields(Capabilities):
            click.echo(f"  {_label(item.name) + ':':<20}{_shown(row[item.name])}")
        users = [name for name, pack in using.items() if pack == row["name"]]
        click.echo(f"  {'used by:':<20}{', '.join(users) or 'no configured provider'}")
        click.echo("")
