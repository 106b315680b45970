"""Run the library's alembic migrations (``idis-integrations db upgrade`` / ``db current``).

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
from .engine import create_db_engine, storage_errors

__all__ = ["VERSION_TABLE", "alembic_config", "current_revision", "head_revision", "upgrade"]

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


def upgrade(url: str, revision: str = "head") -> str | None:
    """Upgrade the database at ``url`` to ``revision``; return the revision reached."""
    with storage_errors():
        command.upgrade(alembic_config(url), revision)
    return current_revision(url)


def current_revision(url: str) -> str | None:
    """The library's revision in the database at ``url`` (None when never migrated)."""
    engine = create_db_engine(url)
    try:
        with storage_errors(), engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this version of the library."""
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return script.get_current_head()
