"""RB-09 Triage 3, exactly as the runbook types it: one readable line per token state, no secret."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tests.auth.conftest import CLIENT_SECRET, env_for, make_settings, run_python
from tests.conftest import free_port

from idis.integrations.auth._tokens import TokenManager
from idis.integrations.cli import main
from idis.integrations.exceptions import AuthError
from idis.integrations.testing import RunningSimulator

P = "crm_provider"
RB09 = "from idis.integrations import check_token; print(check_token('crm_provider'))"


def _prepare(state: str, sim: RunningSimulator, url: str, key: str) -> tuple[str, list[str]]:
    """Put crm_provider's token into ``state``; return the grant and the secrets involved."""
    grant = "client_credentials" if state == "refresh failing" else "refresh_token"
    settings = make_settings(sim, url, key, grant=grant)
    if state == "missing":
        return grant, []
    with TokenManager(settings) as manager:
        if state == "refresh failing":
            sim.control.set_fault(P, "error", endpoint="token", status=503)
            with pytest.raises(AuthError):
                manager.get_token(P)
            return grant, []
        issued = sim.control.issue_tokens(P)
        secrets = [issued["access_token"], issued["refresh_token"]]
        lifetime = {"valid": 3600, "expiring": 60, "expired": -120}.get(state, -120)
        manager.import_token(P, {**issued, "expires_in": lifetime})
        if state == "reauthorization required":
            sim.control.revoke_token(P, issued["refresh_token"])
            with pytest.raises(AuthError):
                manager.get_token(P)
    return grant, secrets


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("valid", ["token VALID", "s left", "scopes: records:read records:write enrich:read"]),
        ("expiring", ["token EXPIRING", "s left"]),
        ("expired", ["token EXPIRED", "s left (expired 2m"]),
        ("missing", ["token MISSING", "last refresh: never", "import-token"]),
        ("refresh failing", ["token REFRESH FAILING", "HTTP 503", "refresh-tokens"]),
        ("reauthorization required", ["token REAUTHORIZATION REQUIRED", "invalid_grant"]),
    ],
)
def test_rb09_check_token_prints_one_line_per_state(
    state: str,
    expected: list[str],
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
) -> None:
    """The runbook's one-liner, with environment configuration only, prints one clear line."""
    grant, secrets = _prepare(state, sim, sqlite_url, fernet_key)

    result = run_python(RB09, env_for(sim, sqlite_url, fernet_key, grant=grant))

    lines = result.stdout.splitlines()
    assert 0 == result.returncode, result.stderr
    assert "" == result.stderr
    assert 1 == len(lines)
    assert lines[0].startswith("crm_provider: token ")
    for fragment in expected:
        assert fragment in lines[0]
    for secret in [*secrets, CLIENT_SECRET, fernet_key]:
        assert secret not in result.stdout


def test_check_token_on_an_uninitialised_database_says_what_to_run(
    sim: RunningSimulator, tmp_path: Path, fernet_key: str
) -> None:
    """No token table yet: one UNKNOWN line naming `db upgrade`, not a traceback."""
    url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    (tmp_path / "fresh.sqlite3").touch()

    result = run_python(RB09, env_for(sim, url, fernet_key))

    assert 0 == result.returncode
    assert 1 == len(result.stdout.splitlines())
    assert "token UNKNOWN" in result.stdout
    assert "idis-integrations db upgrade" in result.stdout


@pytest.mark.postgres
def test_check_token_with_postgres_unreachable_is_one_line(
    sim: RunningSimulator, fernet_key: str
) -> None:
    """An unreachable database is reported in one line, with no password shown."""
    url = f"postgresql://postgres:hunter2-db-password@127.0.0.1:{free_port()}/idis"

    result = run_python(RB09, env_for(sim, url, fernet_key))

    assert 0 == result.returncode, result.stderr
    assert 1 == len(result.stdout.splitlines())
    assert "token UNKNOWN" in result.stdout
    assert "unreachable" in result.stdout
    assert "hunter2-db-password" not in result.stdout + result.stderr


def test_check_token_for_an_unknown_provider_names_the_known_ones(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str
) -> None:
    """A mistyped provider raises UnknownProviderError listing the configured providers."""
    code = "from idis.integrations import check_token; print(check_token('nonexistent'))"

    result = run_python(code, env_for(sim, sqlite_url, fernet_key))

    last = result.stderr.strip().splitlines()[-1]
    assert 1 == result.returncode
    assert "" == result.stdout
    assert last.startswith("idis.integrations.exceptions.UnknownProviderError")
    assert "'nonexistent'" in last
    assert "crm_provider" in last


def test_rb09s_literal_placeholder_is_named_as_such(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str
) -> None:
    """RB-09 Triage 3 run exactly as written (check_token('provider_name')): one clear line
    naming the value as the runbook's placeholder and listing the configured providers."""
    code = "from idis.integrations import check_token; print(check_token('provider_name'))"

    result = run_python(code, env_for(sim, sqlite_url, fernet_key))

    last = result.stderr.strip().splitlines()[-1]
    assert 1 == result.returncode
    assert "" == result.stdout
    assert last == (
        "idis.integrations.exceptions.UnknownProviderError: unknown provider 'provider_name' "
        "(RB-09's placeholder: put the affected provider's name there): expected one of "
        "crm_provider (declare providers in IDIS_PROVIDERS or the IDIS_CONFIG_FILE TOML)"
    )


def test_cli_check_token_json_and_exit_status(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-token --json gives machine-readable fields; a missing token exits 1."""
    for name, value in env_for(sim, sqlite_url, fernet_key, grant="refresh_token").items():
        monkeypatch.setenv(name, value)

    result = CliRunner().invoke(main, ["check-token", "--provider", P, "--json"])
    plain = CliRunner().invoke(main, ["check-token", "--provider", P])
    unknown = CliRunner().invoke(main, ["check-token", "--provider", "nonexistent"])

    data: dict[str, Any] = json.loads(result.stdout)
    assert 1 == result.exit_code
    assert "missing" == data["state"]
    assert False is data["healthy"]
    assert 1 == len(plain.stdout.splitlines())
    assert 2 == unknown.exit_code
    assert "crm_provider" in unknown.output
