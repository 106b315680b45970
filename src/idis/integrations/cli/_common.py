"""Shared pieces of the ``idis-integrations`` commands: settings, flags, output, errors.

Every command loads settings from the environment once, validates its flags
before touching anything, and maps library errors to exit codes:

* 0: done;
* 1: final: a check failed (verify-sync mismatch, reconcile failures), or the
  operation failed for a reason retrying will not fix (credentials refused,
  Vault policy denial, re-authorization required);
* 2: bad input (flag, environment, unknown provider): nothing was changed;
* 3: retry later: a dependency is unreachable (database, Vault, provider).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .._timeparse import parse_since
from ..config import Settings
from ..exceptions import (
    ConfigError,
    IntegrationError,
    ReplayWindowExceeded,
    SecretStoreError,
    StorageError,
    UsageError,
)
from ..observability._logs import configure_logging, redact_text

__all__ = [
    "EXIT_CHECK_FAILED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "exit_code",
    "fail",
    "get_settings",
    "handle_errors",
    "json_option",
    "print_json",
    "print_table",
    "provider_option",
    "resolve_provider",
    "since_option",
    "stdout",
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


def get_settings(ctx: click.Context | None = None) -> Settings:
    """The settings for this invocation, read from the environment once."""
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
    return root.obj["settings"]  # type: ignore[no-any-return]  # click's obj is untyped


def resolve_provider(name: str) -> str:
    """Validate a provider name against the configuration; exit 2 naming it if unknown."""
    get_settings().provider(name)
    return name


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
        get_settings(ctx).provider(value)
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


def provider_option(*, required: bool = True) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``--provider P``, validated against the configured providers."""
    return click.option(
        "--provider",
        required=required,
        callback=_validate_provider,
        help="Provider name as configured (e.g. crm_provider).",
    )


def since_option(
    *, required: bool = True, default: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """``--since "2 hours ago"`` (or ISO-8601), parsed into an aware UTC datetime."""
    return click.option(
        "--since",
        required=required and default is None,
        default=default,
        callback=_validate_since,
        help='Start of the window: "1 hour ago", "90 minutes ago", "2h", or ISO-8601.',
    )


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def print_json(data: Any) -> None:
    """Print ``data`` as JSON (redacted) on stdout."""
    click.echo(redact_text(json.dumps(data, default=_default, indent=2, sort_keys=True)))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a readable table on stdout."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(redact_text("" if cell is None else str(cell)) for cell in row))
    stdout.print(table)


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal, nothing otherwise; yields ``advance(n)``."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.progress import Progress

    with Progress(console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
