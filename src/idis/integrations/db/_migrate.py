"""Run the library's alembic migrations (``idis-integrations db upgrade`` / ``db current``).

Each capability owns one branch of revisions rooted at ``0001_core`` (labelled with
the capability's name), so capabilities evolve their tables independently;
``upgrade`` always targets every head.

The migrations keep their own version table, ``idis_integrations_alembic_version``,
so they live beside the host service's own alembic history in the same
database without either seeing the other's revisions.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ..exceptions import UsageError
from ._engine import create_db_engine, storage_errors

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current_revisions",
    "head_revisions",
    "is_up_to_date",
    "upgrade",
]

VERSION_TABLE = "idis_integrations_alembic_version"


def migrations_dir() -> Path:
    """Where the migrations are: inside the wheel, or the source tree's ``migrations/``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_migrations", here.parents[2] / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise UsageError("idis-integrations migrations not found: the installation is incomplete")


def alembic_config(url: str) -> Config:
    """An alembic Config pointing at the library's migrations and ``url``."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would treat % in passwords as syntax.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["idis_url"] = url
    return config


def upgrade(url: str, revision: str = "heads") -> tuple[str, ...]:
    """Upgrade the database at ``url`` to ``revision`` (every head by default).

    Returns:
        The revisions the database is at afterwards.
    """
    with storage_errors():
        command.upgrade(alembic_config(url), revision)
    return current_revisions(url)


def current_revisions(url: str) -> tuple[str, ...]:
    """The library's revisions in the database at ``url`` (empty when never migrated)."""
    engine = create_db_engine(url)
    try:
        with storage_errors(), engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return tuple(sorted(context.get_current_heads()))
    finally:
        engine.dispose()


def head_revisions() -> tuple[str, ...]:
    """The newest revision of each branch shipped with this version of the library."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return tuple(sorted(script.get_heads()))


def is_up_to_date(url: str) -> bool:
    """Whether the database at ``url`` is at every head."""
    return current_revisions(url) == head_revisions()
