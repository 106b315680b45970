"""Shared pieces of the ``idis-integrations`` commands: settings, flags, output, errors.

Every command loads settings from the environment once, validates its flags
before touching anything, and maps library errors to exit codes:

* 0: done;
* 1: final: a check failed (verify-sync mismatch, reconcile failures), or the
  operation failed for a reason retrying will not fix (credentials refused,
  Vault policy denial, re-authorization required);
* 2: bad input (flag, environment, unknown provider) or bad setup (a database without the
  library's tables): nothing was changed;
* 3: retry later: a dependency is unreachable (database, Vault, provider).

Every command that uses the database names it on stderr first (``database:
postgresql://user@host:5432/db``, never a password), and stops before doing
anything if it has none of the library's tables (:func:`check_database`):
the database a command silently defaults to, ``./idis-integrations.sqlite3``
of the current directory, is rarely the service's.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .._timeparse import parse_since
from ..config import DEFAULT_DATABASE_URL, Settings
from ..exceptions import (
    ConfigError,
    IntegrationError,
    ReplayWindowExceeded,
    SecretStoreError,
    StorageError,
    UsageError,
)
from ..observability._logs import configure_logging, redact_text
from ._progress import progress  # the one progress helper; commands import it from here too

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "check_database",
    "database_engine",
    "describe_database",
    "exit_code",
    "fail",
    "get_settings",
    "handle_errors",
    "handler_registry",
    "handlers_option",
    "json_option",
    "no_database",
    "print_json",
    "print_table",
    "progress",
    "provider_option",
    "since_option",
    "stdout",
    "until_option",
]

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

P = ParamSpec("P")
R = TypeVar("R")

# Piped output (logs, CI, `kubectl exec`) gets wide tables instead of 80 columns.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``message`` (redacted) to stderr and exit with ``code``."""
    stderr.print(f"error: {redact_text(message)}", markup=False)
    sys.exit(code)


def get_settings(ctx: click.Context | None = None, *, check: bool = True) -> Settings:
    """The settings for this invocation, read from the environment once.

    Unless the command is marked :func:`no_database`, the first call with ``check``
    (every command body makes one) names the database and stops if it lacks the
    library's tables. Option callbacks pass ``check=False``, so that a bad flag is
    reported before the database is looked at.
    """
    context = ctx or click.get_current_context()
    root = context.find_root()
    root.ensure_object(dict)
    if "settings" not in root.obj:
        try:
            root.obj["settings"] = Settings.from_env()
        except ConfigError as exc:
            fail(str(exc))
        settings: Settings = root.obj["settings"]
        # Commands print their own summary; library info lines on stderr would
        # bury it, so a command logs warnings and up unless asked for more.
        level = root.obj.get("log_level") or (
            settings.log_level if os.environ.get("IDIS_LOG_LEVEL") else "WARNING"
        )
        configure_logging(settings.log_format, level)
    if check and not root.obj.get("database_checked") and not _exempt(context):
        root.obj["database_checked"] = True
        url = root.obj["settings"].database_url
        defaulted = url == DEFAULT_DATABASE_URL and "IDIS_DATABASE_URL" not in os.environ
        check_database(url, defaulted=defaulted)
    return root.obj["settings"]  # type: ignore[no-any-return]  # click's obj is untyped


# --------------------------------------------------------------------------- the database

#: The library's alembic version table (db/_migrate.py; not imported: alembic is slow
#: to import and most commands never migrate). Its presence means "db upgrade ran here".
LIBRARY_VERSION_TABLE = "idis_integrations_alembic_version"
_SENSITIVE_QUERY = re.compile(r"pass|secret|token|key", re.IGNORECASE)


def no_database(func: Callable[P, R]) -> Callable[P, R]:
    """Mark a command that needs no migrated database (``db upgrade``, ``drill``)."""
    func.__dict__["_idis_no_database"] = True
    return func


def _exempt(context: click.Context) -> bool:
    callback = context.command.callback
    return bool(callback is not None and getattr(callback, "_idis_no_database", False))


def describe_database(url: str) -> str:
    """``url`` as an operator should read it: no password, an absolute SQLite path."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return "an unparseable IDIS_DATABASE_URL"
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not path.startswith("file:"):
            return f"sqlite:///{Path(path).resolve()}"
        return parsed.render_as_string(hide_password=False)
    query = {k: v for k, v in parsed.query.items() if not _SENSITIVE_QUERY.search(k)}
    # URL.set() ignores None, so the password is dropped with the NamedTuple _replace.
    return parsed._replace(password=None).set(query=query).render_as_string(hide_password=False)


def check_database(url: str, *, defaulted: bool = False) -> None:
    """Name the database on stderr; exit 2 (creating nothing) if it lacks the library's tables.

    Args:
        url: the database URL the command is about to use.
        defaulted: the URL is the built-in default (no ``IDIS_DATABASE_URL``): say so.
    """
    shown = describe_database(url)
    origin = " (the default: IDIS_DATABASE_URL is not set)" if defaulted else ""
    stderr.print(f"database: {shown}{origin}", markup=False)
    problem = _missing_tables(url)
    if problem is None:
        return
    hint = (
        "set IDIS_DATABASE_URL to the service's database, "
        if defaulted
        else "check IDIS_DATABASE_URL, "
    )
    fail(
        f"{problem}: looked in {shown}{origin}; nothing was changed. {hint}or create the "
        "library's tables there with `idis-integrations db upgrade`"
    )


def _missing_tables(url: str) -> str | None:
    """Why ``url`` has no library tables, or None when it has them. Creates nothing."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from ..db._engine import create_db_engine, storage_errors

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return None  # nothing to look at without creating it
        file = Path(path).resolve()
        if not file.is_file():
            return "no database file"
        try:
            # Read-only: connecting normally would turn an empty file into a database.
            with closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True)) as conn:
                found = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (LIBRARY_VERSION_TABLE,),
                ).fetchone()
        except sqlite3.DatabaseError as exc:
            return f"not a readable SQLite database ({exc})"
        return None if found else "no idis-integrations tables (db upgrade never ran there)"
    engine = create_db_engine(url)
    try:
        with storage_errors(), engine.connect() as conn:
            found = inspect(conn).has_table(LIBRARY_VERSION_TABLE)
    except StorageError as exc:
        fail(str(exc), EXIT_UNAVAILABLE)
    finally:
        engine.dispose()
    return None if found else "no idis-integrations tables (db upgrade never ran there)"


@contextmanager
def database_engine() -> Iterator[Engine]:
    """An engine on the configured database for one command, disposed of afterwards."""
    from ..db._engine import create_db_engine

    engine = create_db_engine(get_settings().database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Map library errors to exit codes and one redacted line on stderr."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
        except (StorageError, SecretStoreError) as exc:
            fail(str(exc), exit_code(exc))  # the message names the store already
        except IntegrationError as exc:
            fail(f"{type(exc).__name__}: {exc}", exit_code(exc))

    return wrapper


def exit_code(exc: IntegrationError) -> int:
    """The exit status a library error means: 2 bad input, 3 retry later, 1 final.

    A refusal (an auth failure, a Vault policy denial) is final, never "bad
    input": the command line was fine, and retrying will not help until
    someone acts. Only what the operator typed (or configured) is bad input.
    """
    if isinstance(exc, ConfigError | UsageError | ReplayWindowExceeded):
        return EXIT_USAGE
    return EXIT_UNAVAILABLE if exc.retryable else EXIT_CHECK_FAILED


def _validate_provider(
    ctx: click.Context, _param: click.Parameter, value: str | None
) -> str | None:
    if value is None:
        return None
    try:
        get_settings(ctx, check=False).provider(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _validate_since(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_since(value, name=f"--{param.name}")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def writable_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A click callback: refuse a report path that cannot be written, before any work.

    The file is written last (after a drill's whole incident, or after reading
    the audit trail): a missing or read-only folder found then would waste the
    run and end in an OSError traceback.
    """
    if value is None:
        return None
    folder = value.parent
    if not folder.is_dir():
        raise click.BadParameter(f"{value}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (value.exists() and not os.access(value, os.W_OK)):
        raise click.BadParameter(f"{value}: not writable")
    return value


def provider_option(*, required: bool = True) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``--provider P``, validated against the configured providers."""
    return click.option(
        "--provider",
        required=required,
        callback=_validate_provider,
        help="Provider name as configured (e.g. crm_provider).",
    )


def since_option(*, required: bool = True) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``--since "2 hours ago"`` (or any form of :func:`parse_since`), an aware UTC datetime."""
    return click.option(
        "--since",
        required=required,
        callback=_validate_since,
        help=(
            'Start of the window: a duration ago ("1 hour ago", "2h ago"), the same without'
            ' "ago" ("5 minutes", "2h"), "now", or an ISO-8601 date or time (UTC without'
            " an offset)."
        ),
    )


until_option = click.option(
    "--until",
    default=None,
    callback=_validate_since,
    help="End of the window (default: now); same forms as --since.",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")

handlers_option = click.option(
    "--handlers",
    envvar="IDIS_HANDLERS",
    default=None,
    help="Host handler modules to import (package.module or package.module:function, "
    "comma-separated); default $IDIS_HANDLERS.",
)


def handler_registry(handlers: str | None) -> Any:
    """The handlers ``--handlers`` names (imported now), else the host's registered ones."""
    from ..reconciliation._handlers import load_handlers
    from ..sync._inbox import get_registry

    return load_handlers(handlers) if handlers else get_registry()


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON (redacted) on stdout."""
    click.echo(redact_text(json.dumps(data, default=_default, indent=2, sort_keys=True)))


def print_result(result: Any, as_json: bool, text: Callable[[Any], None]) -> None:
    """``result.as_dict()`` as JSON with ``--json``; else ``text(result)`` prints it for people."""
    if as_json:
        print_json(result.as_dict())
    else:
        text(result)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a readable table on stdout."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(redact_text("" if cell is None else str(cell)) for cell in row))
    stdout.print(table)
