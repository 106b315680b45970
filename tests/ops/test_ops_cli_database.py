"""Every command names its database and stops on one without the library's tables (issue 15).

Without ``IDIS_DATABASE_URL`` a command used ``./idis-integrations.sqlite3`` of
the current directory: from the repository root ``queue-webhook-retries``
re-queued 0 from the wrong database, and from an empty folder a command failed
on a missing table and left an empty database file behind.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tests.conftest import POSTGRES_URL, free_port

from idis.integrations.cli import main
from idis.integrations.cli._common import LIBRARY_VERSION_TABLE, describe_database
from idis.integrations.db._migrate import VERSION_TABLE

#: Commands that need no migrated database: they create it, or use none of their own.
EXEMPT = {"db upgrade", "simulate", "keygen", "drill", "providers"}
#: Values for each command's required options.
VALUES = {
    "provider": ["--provider", "crm_provider"],
    "since": ["--since", "1 hour ago"],
    "max_retries": ["--max-retries", "10"],
    "older_than": ["--older-than", "7d"],
}
#: Commands that need more than their required options to get past usage checks.
EXTRA = {"refresh-tokens": ["--all"]}
#: What a command reads on stdin before it needs the database.
STDIN = {
    "import-token": '{"access_token": "at", "refresh_token": "rt", "expires_in": 3600}',
    "rotate-credentials": "",
}


def _commands() -> Iterator[tuple[str, list[str]]]:
    def walk(command: click.Command, path: list[str]) -> Iterator[tuple[str, list[str]]]:
        if isinstance(command, click.Group):
            for name, sub in sorted(command.commands.items()):
                yield from walk(sub, [*path, name])
            return
        args = [
            arg
            for param in command.params
            if getattr(param, "required", False)
            for arg in VALUES[str(param.name)]
        ]
        name = " ".join(path)
        yield name, [*path, *args, *EXTRA.get(name, [])]

    yield from walk(main, [])


def _cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "idis.integrations", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_table_name_is_the_migrations_one() -> None:
    """The check looks for the version table the migrations create."""
    assert VERSION_TABLE == LIBRARY_VERSION_TABLE


def test_from_an_empty_folder_a_command_stops_and_creates_nothing(tmp_path: Path) -> None:
    """No IDIS_DATABASE_URL, no database here: exit 2 naming the path and db upgrade; no file."""
    result = _cli(
        "queue-webhook-retries", "--provider", "crm_provider", "--max-retries", "10", cwd=tmp_path
    )

    assert 2 == result.returncode, result.stderr
    assert [] == list(tmp_path.iterdir())
    expected = str(tmp_path.resolve() / "idis-integrations.sqlite3")
    assert f"database: sqlite:///{expected} (the default: IDIS_DATABASE_URL is not set)" in (
        result.stderr
    )
    assert "no database file" in result.stderr
    assert "set IDIS_DATABASE_URL" in result.stderr
    assert "idis-integrations db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command", [name for name, _ in _commands() if name not in EXEMPT], ids=str
)
def test_every_command_checks_its_database(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command that uses the database refuses an empty folder the same way."""
    args = dict(_commands())[command]
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(main, args, input=STDIN.get(command))

    assert 2 == result.exit_code, result.output
    assert "looked in sqlite:///" in result.output
    assert "idis-integrations db upgrade" in result.output
    assert [] == list(tmp_path.iterdir())


def test_an_empty_file_stays_empty(tmp_path: Path) -> None:
    """An existing empty file is not turned into a database (read-only look)."""
    empty = tmp_path / "empty.sqlite3"
    empty.touch()

    result = _cli(
        "status", "--no-probe", cwd=tmp_path, env={"IDIS_DATABASE_URL": f"sqlite:///{empty}"}
    )

    assert 2 == result.returncode
    assert "no idis-integrations tables" in result.stderr
    assert f"looked in sqlite:///{empty}" in result.stderr
    assert 0 == empty.stat().st_size
    assert ["empty.sqlite3"] == sorted(p.name for p in tmp_path.iterdir())


def test_a_database_of_another_application_is_refused(tmp_path: Path) -> None:
    """A SQLite file with tables, but not the library's, is refused and left as it was."""
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE deals (id TEXT)")
    before = other.read_bytes()

    result = _cli(
        "audit",
        "--provider",
        "crm_provider",
        "--since",
        "1 hour ago",
        cwd=tmp_path,
        env={"IDIS_DATABASE_URL": f"sqlite:///{other}"},
    )

    assert 2 == result.returncode
    assert "no idis-integrations tables" in result.stderr
    assert before == other.read_bytes()


def test_db_current_does_not_create_a_database(tmp_path: Path) -> None:
    """`db current` on a missing file stops the same way instead of creating it."""
    result = _cli("db", "current", cwd=tmp_path)

    assert 2 == result.returncode
    assert [] == list(tmp_path.iterdir())


def test_db_upgrade_then_a_command_names_the_database(tmp_path: Path) -> None:
    """`db upgrade` creates the tables (saying where); then commands run and name it first."""
    upgraded = _cli("db", "upgrade", cwd=tmp_path)
    audit = _cli("audit", "--provider", "crm_provider", "--since", "1 hour ago", cwd=tmp_path)

    path = tmp_path.resolve() / "idis-integrations.sqlite3"
    assert 0 == upgraded.returncode, upgraded.stderr
    assert f"sqlite:///{path}" in upgraded.stdout
    assert "IDIS_DATABASE_URL is not set" in upgraded.stderr
    assert 0 == audit.returncode, audit.stderr
    assert audit.stderr.startswith(f"database: sqlite:///{path}")


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """A new, empty PostgreSQL database (no library tables)."""
    import psycopg

    name = f"idis_empty_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_postgres_without_tables_is_refused_without_the_password(
    empty_pg: str, tmp_path: Path
) -> None:
    """The message names user, host, port and database, never the password; nothing is created."""
    import psycopg

    url = f"postgresql://postgres:hunter2-db-password@127.0.0.1:5432/{empty_pg}"

    result = _cli("status", "--no-probe", cwd=tmp_path, env={"IDIS_DATABASE_URL": url})

    assert 2 == result.returncode
    assert f"database: postgresql://postgres@127.0.0.1:5432/{empty_pg}" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    base = POSTGRES_URL.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/{empty_pg}", connect_timeout=3) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert (0,) == tables


def test_an_unreachable_postgres_exits_3_without_the_password(tmp_path: Path) -> None:
    """A database that does not answer is a dependency failure (3), password hidden."""
    url = f"postgresql://postgres:hunter2-db-password@127.0.0.1:{free_port()}/idis"

    result = _cli("outbox", "status", cwd=tmp_path, env={"IDIS_DATABASE_URL": url})

    assert 3 == result.returncode, result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "database: postgresql://postgres@127.0.0.1:" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:hunter2-db@tail-of-it@127.0.0.1:5432/idis",
        "postgresql://postgres:hunter2-db-password@127.0.0.1:port/idis",
        "postgresql//postgres:hunter2-db-password@127.0.0.1:5432/idis",
    ],
)
def test_a_mistyped_database_url_exits_2_in_one_line_without_the_password(
    tmp_path: Path, url: str
) -> None:
    """An '@' left unescaped in the password, a port that is no number, a missing ':'.

    Each printed the password (or its tail as a host name) or a traceback; each is bad
    input: exit 2, one line naming IDIS_DATABASE_URL, nothing of the password.
    """
    result = _cli("status", "--no-probe", cwd=tmp_path, env={"IDIS_DATABASE_URL": url})

    assert 2 == result.returncode, result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "tail-of-it" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: IDIS_DATABASE_URL=")
    assert 1 == len(result.stderr.strip().splitlines())
    assert [] == list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@db.example:5432/idis", "postgresql://u@db.example:5432/idis"),
        (
            "postgresql+psycopg://u:pw@h/idis?sslmode=require&password=pw2",
            "postgresql+psycopg://u@h/idis?sslmode=require",
        ),
        ("sqlite:////var/lib/idis.sqlite3", "sqlite:////var/lib/idis.sqlite3"),
    ],
)
def test_describe_database_never_shows_a_password(url: str, shown: str) -> None:
    """Passwords in the URL or its query are dropped; SQLite paths are absolute."""
    assert shown == describe_database(url)
