"""The ``idis-integrations`` command: one subcommand per RB-09 step and operation.

Subcommands live in one module per capability (``cli/db.py``, ``cli/status.py``,
...) and attach themselves to :data:`main`; the list below imports them.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["main", "run_script"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Override IDIS_LOG_LEVEL for this command.",
)
@click.version_option(package_name="idis-integrations")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Keep integrations alive and data whole while providers fail (runbook RB-09)."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level.upper() if log_level else None


#: Capability modules whose commands attach to ``main`` on import.
_COMMAND_MODULES = (
    "db",
    "simulate",
    "status",
    "enrichment",
    "outbox",
    "auth",
    "reconcile",
    "sync",
    "drill",
    "providers",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}")


def run_script(command: str, prog_name: str, args: list[str] | None = None) -> None:
    """Run one subcommand as a stand-alone script (RB-09's ``scripts/...py`` wrappers).

    ``--help`` and usage errors then name the script, not ``idis-integrations``.
    """
    import sys

    cmd = main.get_command(click.Context(main), command)
    if cmd is None:
        raise SystemExit(f"{prog_name}: idis-integrations has no command {command!r}")
    cmd.main(sys.argv[1:] if args is None else args, prog_name=prog_name)
