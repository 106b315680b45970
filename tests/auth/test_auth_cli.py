"""The OAuth commands: import-token, refresh-tokens, rotate-credentials, keygen, reencrypt."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from tests.auth.conftest import CLIENT_SECRET, env_for
from tests.conftest import free_port

from idis.integrations.cli import main
from idis.integrations.simulator import token_fingerprint
from idis.integrations.testing import RunningSimulator

P = "crm_provider"


@pytest.fixture
def runner() -> CliRunner:
    """A click runner."""
    return CliRunner()


def _env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        if name.startswith(("IDIS_", "VAULT_")):
            monkeypatch.setenv(name, value)


def test_import_token_then_check_and_refresh(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token piped to import-token is stored, shows as valid, and refresh-tokens renews it."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key, grant="refresh_token"))
    issued = sim.control.issue_tokens(P)

    imported = runner.invoke(main, ["import-token", "--provider", P], input=json.dumps(issued))
    checked = runner.invoke(main, ["check-token", "--provider", P])
    refreshed = runner.invoke(main, ["refresh-tokens", "--provider", P, "--json"])

    assert 0 == imported.exit_code, imported.output
    assert "token VALID" in imported.output
    assert 0 == checked.exit_code
    assert 0 == refreshed.exit_code, refreshed.output
    result = json.loads(refreshed.stdout)["results"][0]
    assert ("refreshed", 2) == (result["outcome"], result["generation"])
    assert {token_fingerprint(issued["refresh_token"]): 1} == sim.control.stats(P)["oauth"][
        "refresh_requests"
    ]
    for secret in (issued["access_token"], issued["refresh_token"]):
        assert secret not in imported.output + checked.output + refreshed.output


def test_import_token_rejects_bad_input_and_changes_nothing(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Non-JSON, a document without tokens, or no encryption key: exit 2 and a clear reason."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key, grant="refresh_token"))

    not_json = runner.invoke(main, ["import-token", "--provider", P], input="{oops")
    no_token = runner.invoke(main, ["import-token", "--provider", P], input='{"scope": "a"}')
    monkeypatch.delenv("IDIS_ENCRYPTION_KEYS")
    no_key = runner.invoke(
        main, ["import-token", "--provider", P], input='{"refresh_token": "rt_abcdef123"}'
    )
    status = runner.invoke(main, ["check-token", "--provider", P])

    assert (2, 2, 2) == (not_json.exit_code, no_token.exit_code, no_key.exit_code)
    assert "not JSON" in not_json.output
    assert "access_token" in no_token.output
    assert "IDIS_ENCRYPTION_KEYS" in no_key.output
    assert "token MISSING" in status.output


def _dump(url: str) -> list[str]:
    """Every row of the SQLite database, as SQL."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
        return list(conn.iterdump())


def _token_columns(url: str) -> list[tuple[str, bool, bool]]:
    """(grant_type, access token stored, refresh token stored) of each token row."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
        rows = conn.execute(
            "SELECT grant_type, access_token_enc, refresh_token_enc FROM oauth_tokens"
        ).fetchall()
    return [(grant, access is not None, refresh is not None) for grant, access, refresh in rows]


@pytest.mark.parametrize(
    "expiry",
    [{"expires_in": -60}, {"expires_in": 0}, {"expires_at": "2026-01-01T00:00:00Z"}],
)
def test_import_token_refuses_an_expired_access_token_without_a_refresh_token(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    expiry: dict[str, object],
) -> None:
    """An access token already expired, and nothing to refresh it with: exit 2 naming the
    expiry and what was expected; nothing stored (the database is the same, row for row);
    the token appears in no output and no log line."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key, grant="refresh_token"))
    monkeypatch.setenv("IDIS_LOG_LEVEL", "debug")  # every log line, on stderr
    secret = sim.control.issue_tokens(P)["access_token"]
    runner.invoke(main, ["db", "upgrade"])
    before = _dump(sqlite_url)

    result = runner.invoke(
        main, ["import-token", "--provider", P], input=json.dumps({"access_token": secret} | expiry)
    )
    status = runner.invoke(main, ["check-token", "--provider", P])

    assert 2 == result.exit_code, result.output
    assert "the access token expired at 20" in result.stderr
    assert "without a refresh_token" in result.stderr
    assert "expected an access token that has not expired" in result.stderr
    assert "nothing was stored" in result.stderr
    assert "" == result.stdout
    assert before == _dump(sqlite_url)
    assert "token MISSING" in status.output
    assert secret not in result.output + status.output
    assert not any(secret in line for line in before)


def test_import_token_keeps_only_the_refresh_token_of_an_expired_access_token(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expired access token with its refresh token is importable: the note on stderr says
    it expired and is refreshed at first use; only the refresh token is stored, and
    refresh-tokens then gets a valid one. No token in any output or log line."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key, grant="refresh_token"))
    monkeypatch.setenv("IDIS_LOG_LEVEL", "debug")
    issued = sim.control.issue_tokens(P)
    document = {k: issued[k] for k in ("access_token", "refresh_token")} | {"expires_in": -90}

    imported = runner.invoke(main, ["import-token", "--provider", P], input=json.dumps(document))
    stored = _dump(sqlite_url)
    columns = _token_columns(sqlite_url)
    refreshed = runner.invoke(main, ["refresh-tokens", "--provider", P])
    checked = runner.invoke(main, ["check-token", "--provider", P])

    assert 0 == imported.exit_code, imported.output
    assert "idis.auth.token_imported" in imported.stderr  # the log lines are in what is searched
    assert "token EXPIRED" in imported.stdout
    assert "expired 1m30s ago" in imported.stdout  # the real expiry, not the import time
    assert "the access token given expired at 20" in imported.stderr
    assert "only its refresh token was stored" in imported.stderr
    assert "refreshed at first use" in imported.stderr
    assert "refresh-tokens --provider crm_provider" in imported.stderr
    assert [("imported", False, True)] == columns  # no access token stored, even encrypted
    assert 0 == refreshed.exit_code, refreshed.output
    assert "token VALID" in checked.stdout
    for secret in (issued["access_token"], issued["refresh_token"]):
        assert secret not in imported.output + refreshed.output + checked.output
        assert not any(secret in line for line in stored)


def test_refresh_tokens_needs_exactly_one_target(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """refresh-tokens without --provider/--all, or with both, exits 2; a failure exits 1."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key))

    neither = runner.invoke(main, ["refresh-tokens"])
    both = runner.invoke(main, ["refresh-tokens", "--provider", P, "--all"])
    sim.control.set_oauth_client(P, "idis-local", "a-secret-we-do-not-have")
    failing = runner.invoke(main, ["refresh-tokens", "--all"])

    assert (2, 2) == (neither.exit_code, both.exit_code)
    assert 1 == failing.exit_code
    assert "crm_provider: FAILED - CredentialsRejected" in failing.output


def test_refresh_tokens_exits_3_when_the_token_endpoint_is_unreachable(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider that does not answer is a dependency to retry later (3), as every command says.

    It exited 1 ("someone must act"), like credentials the provider refused, while reconcile
    and verify-sync exit 3 for the same unreachable token endpoint. A refusal next to an
    unreachable provider still exits 1: the refusal needs a human whatever happens next.
    """
    env = env_for(sim, sqlite_url, fernet_key)
    env["IDIS_PROVIDER_CRM_PROVIDER_BASE_URL"] = f"http://127.0.0.1:{free_port()}"
    _env(monkeypatch, env)

    unreachable = runner.invoke(main, ["refresh-tokens", "--provider", P])
    as_json = runner.invoke(main, ["refresh-tokens", "--provider", P, "--json"])

    assert 3 == unreachable.exit_code, unreachable.output
    assert "crm_provider: FAILED" in unreachable.output
    assert 3 == as_json.exit_code
    result = json.loads(as_json.stdout)["results"][0]
    assert ("failed", True) == (result["outcome"], result["retryable"])
    assert CLIENT_SECRET not in unreachable.output + as_json.output

    monkeypatch.setenv("IDIS_PROVIDERS", "crm_provider,docs_provider")
    monkeypatch.setenv("IDIS_PROVIDER_DOCS_PROVIDER_KIND", "docs")
    monkeypatch.setenv("IDIS_PROVIDER_DOCS_PROVIDER_BASE_URL", sim.provider_url("docs_provider"))
    monkeypatch.setenv("IDIS_PROVIDER_DOCS_PROVIDER_AUTH_GRANT", "client_credentials")
    monkeypatch.setenv("IDIS_PROVIDER_DOCS_PROVIDER_CLIENT_ID", "idis-local")
    monkeypatch.setenv("IDIS_PROVIDER_DOCS_PROVIDER_CLIENT_SECRET", "a-secret-we-do-not-have")
    mixed = runner.invoke(main, ["refresh-tokens", "--all"])

    assert 1 == mixed.exit_code, mixed.output
    assert "docs_provider: FAILED - CredentialsRejected" in mixed.output


def test_rotate_credentials_reads_the_secret_from_stdin_when_there_is_no_rotation_api(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ROTATION_URL the new secret comes from stdin, is verified, stored, and used."""
    env = env_for(sim, sqlite_url, fernet_key)
    env.pop("IDIS_PROVIDER_CRM_PROVIDER_ROTATION_URL")
    _env(monkeypatch, env)
    new_secret = "cs_rotated_by_hand_0123456789"
    sim.control.set_oauth_client(P, "idis-local", new_secret)

    rotated = runner.invoke(
        main,
        ["rotate-credentials", "--provider", P, "--store-in-database"],
        input=new_secret + "\n",
    )
    refreshed = runner.invoke(main, ["refresh-tokens", "--provider", P])

    assert 0 == rotated.exit_code, rotated.output
    assert "stored encrypted in the database" in rotated.output
    assert 0 == refreshed.exit_code, refreshed.output
    assert new_secret not in rotated.output + refreshed.output
    assert 0 == sim.control.stats(P)["oauth"]["invalid_client"]


def test_rotate_credentials_into_vault_without_vault_configured_changes_nothing(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--store-in-vault with no VAULT_ADDR fails first (exit 2) and mints no new secret."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key))

    result = runner.invoke(main, ["rotate-credentials", "--provider", P, "--store-in-vault"])

    assert 2 == result.exit_code
    assert "VAULT_ADDR" in result.output
    assert 0 == sim.control.stats(P)["oauth"]["rotations"]


def test_keygen_and_reencrypt(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """keygen prints a usable Fernet key; reencrypt-tokens moves stored tokens to it."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key))
    assert 0 == runner.invoke(main, ["refresh-tokens", "--provider", P]).exit_code

    key = runner.invoke(main, ["keygen"]).output.strip()
    monkeypatch.setenv("IDIS_ENCRYPTION_KEYS", f"{key},{fernet_key}")
    moved = runner.invoke(main, ["reencrypt-tokens"])
    monkeypatch.setenv("IDIS_ENCRYPTION_KEYS", key)
    refreshed_with_new_key_only = runner.invoke(main, ["refresh-tokens", "--provider", P])

    assert 44 == len(key)
    assert Fernet(key.encode())
    assert 0 == moved.exit_code, moved.output
    assert "re-encrypted 1 token row" in moved.output
    assert 0 == refreshed_with_new_key_only.exit_code, refreshed_with_new_key_only.output


def test_rotate_credentials_with_a_wrong_secret_exits_1_and_keeps_the_old_one(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A secret that fails verification: exit 1, step named, and refreshes still work."""
    _env(monkeypatch, env_for(sim, sqlite_url, fernet_key))

    rotated = runner.invoke(
        main,
        ["rotate-credentials", "--provider", P, "--store-in-database", "--from-stdin"],
        input="cs_not_what_the_provider_has\n",
    )
    refreshed = runner.invoke(main, ["refresh-tokens", "--provider", P])

    assert 1 == rotated.exit_code
    assert "failed at step 'verify'" in rotated.output
    assert "cs_not_what_the_provider_has" not in rotated.output
    assert 0 == refreshed.exit_code, refreshed.output


def test_an_auth_failure_in_reconcile_exits_1_final_not_2_bad_input(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    runner: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refused credentials are final (1), not "bad input" (2): the command line was fine."""
    env = env_for(sim, sqlite_url, fernet_key)
    env["IDIS_PROVIDER_CRM_PROVIDER_CLIENT_SECRET"] = "not-the-secret-the-provider-has"
    _env(monkeypatch, env)
    sim.control.require_auth(P)

    result = runner.invoke(
        main, ["reconcile", "--provider", P, "--since", "1 hour ago", "--dry-run"]
    )

    assert 1 == result.exit_code, result.output
    assert "CredentialsRejected" in result.output
    assert "not-the-secret-the-provider-has" not in result.output


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("ConfigError", 2),
        ("ReplayWindowExceeded", 2),
        ("StorageError", 3),
        ("SecretStoreError", 3),
        ("ProviderTimeout", 3),
        ("TokenLockTimeout", 3),
        ("SecretStoreRefused", 1),
        ("ReauthorizationRequired", 1),
        ("CredentialsRejected", 1),
        ("RefreshOutcomeUnknown", 1),
    ],
)
def test_exit_codes_are_1_final_2_bad_input_3_retry_later(error: str, code: int) -> None:
    """One mapping for every command: refusals are final, outages retry later."""
    from idis.integrations import exceptions
    from idis.integrations.cli._common import exit_code

    cls = getattr(exceptions, error)
    exc = cls("x", reason="denied") if error == "SecretStoreRefused" else cls("x")

    assert code == exit_code(exc)
