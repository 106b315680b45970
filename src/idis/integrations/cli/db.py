"""``idis-integrations db upgrade`` and ``db current``."""

from __future__ import annotations

import click

from . import main
from ._common import get_settings, handle_errors, stdout


@main.group("db")
def db() -> None:
    """Create or upgrade the library's tables (own alembic version table)."""


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True, help="Target revision.")
@click.option("--database-url", default=None, help="Override IDIS_DATABASE_URL.")
@handle_errors
def db_upgrade(revision: str, database_url: str | None) -> None:
    """Apply migrations up to REVISION."""
    from ..db._migrate import head_revisions, upgrade  # alembic is slow to import: only here

    url = database_url or get_settings().database_url
    reached = upgrade(url, revision)
    stdout.print(
        f"database at {', '.join(reached) or 'none'} (heads {', '.join(head_revisions())})",
        markup=False,
    )


@db.command("current")
@click.option("--database-url", default=None, help="Override IDIS_DATABASE_URL.")
@handle_errors
def db_current(database_url: str | None) -> None:
    """Show the database's revision and the newest one this version ships."""
    from ..db._migrate import current_revisions, head_revisions

    url = database_url or get_settings().database_url
    current = current_revisions(url)
    heads = head_revisions()
    state = "up to date" if current == heads else "needs `idis-integrations db upgrade`"
    stdout.print(
        f"current: {', '.join(current) or 'none'}  heads: {', '.join(heads)}  ({state})",
        markup=False,
    )
