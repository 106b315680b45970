"""``idis-integrations db upgrade`` and ``db current``."""

from __future__ import annotations

import os

import click

from ..config import DEFAULT_DATABASE_URL
from . import main
from ._common import (
    check_database,
    describe_database,
    get_settings,
    handle_errors,
    no_database,
    stdout,
)
from ._common import stderr as err


@main.group("db")
def db() -> None:
    """Create or upgrade the library's tables (own alembic version table)."""


def _url(database_url: str | None) -> tuple[str, bool]:
    """The URL to use, and whether it is the built-in default."""
    if database_url:
        return database_url, False
    url = get_settings().database_url
    return url, url == DEFAULT_DATABASE_URL and "IDIS_DATABASE_URL" not in os.environ


@db.command("upgrade")
@click.option("--revision", default="heads", show_default=True, help="Target revision.")
@click.option("--database-url", default=None, help="Override IDIS_DATABASE_URL.")
@no_database
@handle_errors
def db_upgrade(revision: str, database_url: str | None) -> None:
    """Apply migrations up to REVISION (creates the database file on SQLite)."""
    from ..db._migrate import head_revisions, upgrade  # alembic is slow to import: only here

    url, defaulted = _url(database_url)
    shown = describe_database(url)
    if defaulted:
        err.print(f"database: {shown} (the default: IDIS_DATABASE_URL is not set)", markup=False)
    reached = upgrade(url, revision)
    stdout.print(
        f"{shown} at {', '.join(reached) or 'none'} (heads {', '.join(head_revisions())})",
        markup=False,
    )


@db.command("current")
@click.option("--database-url", default=None, help="Override IDIS_DATABASE_URL.")
@no_database
@handle_errors
def db_current(database_url: str | None) -> None:
    """Show the database's revision and the newest one this version ships."""
    from ..db._migrate import current_revisions, head_revisions

    url, defaulted = _url(database_url)
    check_database(url, defaulted=defaulted)  # a missing database is not created here
    current = current_revisions(url)
    heads = head_revisions()
    state = "up to date" if current == heads else "needs `idis-integrations db upgrade`"
    stdout.print(
        f"{describe_database(url)}  current: {', '.join(current) or 'none'}  "
        f"heads: {', '.join(heads)}  ({state})",
        markup=False,
    )
