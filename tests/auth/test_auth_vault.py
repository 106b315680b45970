"""Credentials in a real OpenBao (Vault API): rotation, rollback versions, least privilege."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import select
from tests.auth.conftest import CLIENT_ID, CLIENT_SECRET, OpenBao, make_settings
from tests.conftest import free_port, sample

from idis.integrations._audit import AuditEvent
from idis.integrations.auth._rotation import CredentialRotationError, rotate_credentials
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.auth._vault import ClientCredentials, VaultStore
from idis.integrations.config import Secret, Settings, VaultSettings
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import ConfigError, SecretStoreError
from idis.integrations.observability._metrics import Metrics
from idis.integrations.testing import RunningSimulator

pytestmark = pytest.mark.vault
P = "crm_provider"


def _settings(
    sim: RunningSimulator,
    url: str,
    key: str,
    vault: VaultSettings,
    *,
    from_vault: bool = True,
    **auth: Any,
) -> Settings:
    base = make_settings(sim, url, key, credentials_from_vault=from_vault, **auth)
    return replace(base, vault=vault)


def _seed(openbao: OpenBao, prefix: str, secret: str = CLIENT_SECRET) -> int:
    store = VaultStore(openbao.settings(path_prefix=prefix))
    return store.write_credentials(
        P, ClientCredentials(client_id=CLIENT_ID, client_secret=Secret(secret)), cas=0
    )


def _scoped_token(openbao: OpenBao, prefix: str, capabilities: list[str]) -> str:
    """A token whose policy covers only crm_provider's path under ``prefix``."""
    root = openbao.client()
    name = f"idis-{uuid.uuid4().hex[:8]}"
    caps = ", ".join(f'"{c}"' for c in capabilities)
    root.sys.create_or_update_policy(
        name=name, policy=f'path "secret/data/{prefix}/{P}" {{ capabilities = [{caps}] }}'
    )
    return str(root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"])


def _audit_actions(url: str) -> list[tuple[str, str]]:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(AuditEvent.action, AuditEvent.outcome).order_by(AuditEvent.id)
        ).all()
    engine.dispose()
    return [(row[0], row[1]) for row in rows]


def test_rotation_writes_a_new_version_keeps_the_previous_and_switches(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
    metrics: Metrics,
) -> None:
    """Rotation via the provider's API stores KV version 2, keeps 1, and every process uses 2."""
    first_version = _seed(openbao, vault_prefix)
    settings = _settings(sim, sqlite_url, fernet_key, openbao.settings(path_prefix=vault_prefix))
    sim.control.configure_oauth(P, rotation_grace_seconds=0)  # the old secret dies at once
    with TokenManager(settings, metrics=metrics) as manager:
        manager.get_token(P)  # credentials read from Vault at start

        result = rotate_credentials(P, manager=manager, actor="test")
        after = manager.refresh(P)
    with TokenManager(settings, metrics=metrics) as other_process:
        other = other_process.refresh(P)

    store = VaultStore(openbao.settings(path_prefix=vault_prefix))
    previous, _ = store.read_secret(P, version=first_version)
    current = store.read_credentials(P)
    issued_secret = sim.state.provider(P).oauth.clients[CLIENT_ID].secret
    assert (2, 1) == (result.version, result.previous_version)
    assert CLIENT_SECRET == previous["client_secret"]
    assert issued_secret == current.client_secret.get_secret_value()
    assert 2 == current.version
    assert "rotation_api" == result.source
    assert after.generation < other.generation
    assert 1 == sim.control.stats(P)["oauth"]["rotations"]
    assert ("credentials.rotated", "ok") in _audit_actions(sqlite_url)
    assert 1.0 == sample(
        metrics, "integration_credential_rotations_total", provider=P, outcome="ok"
    )
    assert "version 1 kept for rollback" in str(result)
    assert issued_secret not in str(result)


def test_failed_verification_leaves_vault_and_running_credentials_unchanged(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
    metrics: Metrics,
) -> None:
    """A secret that obtains no token changes nothing: Vault version and live creds stay."""
    _seed(openbao, vault_prefix)
    settings = _settings(sim, sqlite_url, fernet_key, openbao.settings(path_prefix=vault_prefix))
    with TokenManager(settings, metrics=metrics) as manager:
        before = manager.get_token(P)
        with pytest.raises(CredentialRotationError) as caught:
            rotate_credentials(P, new_secret="not-the-real-secret-at-all", manager=manager)
        still_working = manager.refresh(P)

    store = VaultStore(openbao.settings(path_prefix=vault_prefix))
    assert "verify" == caught.value.step
    assert "unchanged" in str(caught.value)
    assert "not-the-real-secret-at-all" not in str(caught.value)
    assert 1 == store.current_version(P)
    assert CLIENT_SECRET == store.read_credentials(P).client_secret.get_secret_value()
    assert before.generation + 1 == still_working.generation
    assert ("credentials.rotation_failed", "failed") in _audit_actions(sqlite_url)
    assert 1.0 == sample(
        metrics, "integration_credential_rotations_total", provider=P, outcome="verify_failed"
    )


def test_a_token_scoped_to_the_provider_path_is_enough(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, openbao: OpenBao, vault_prefix: str
) -> None:
    """A Vault token allowed only crm_provider's path reads, rotates and writes; nothing else."""
    _seed(openbao, vault_prefix)
    token = _scoped_token(openbao, vault_prefix, ["create", "read", "update"])
    vault = openbao.settings(token=token, path_prefix=vault_prefix)
    settings = _settings(sim, sqlite_url, fernet_key, vault)

    with TokenManager(settings) as manager:
        result = rotate_credentials(P, manager=manager)
        refreshed = manager.refresh(P)
    with pytest.raises(SecretStoreError) as denied:
        VaultStore(vault).read_credentials("docs_provider")

    assert 2 == result.version
    assert 2 == refreshed.generation
    assert "denied" in str(denied.value)
    assert token not in str(denied.value)


def test_a_read_only_token_fails_the_rotation_before_the_provider_is_asked(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, openbao: OpenBao, vault_prefix: str
) -> None:
    """Without write access the rotation stops at 'prepare': no new secret is minted."""
    _seed(openbao, vault_prefix)
    token = _scoped_token(openbao, vault_prefix, ["read"])
    settings = _settings(
        sim, sqlite_url, fernet_key, openbao.settings(token=token, path_prefix=vault_prefix)
    )

    with TokenManager(settings) as manager, pytest.raises(CredentialRotationError) as caught:
        rotate_credentials(P, manager=manager)

    assert "prepare" == caught.value.step
    assert "create and update" in str(caught.value)
    assert 0 == sim.control.stats(P)["oauth"]["rotations"]
    assert 1 == VaultStore(openbao.settings(path_prefix=vault_prefix)).current_version(P)


def test_credentials_are_read_from_vault_when_configured(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, openbao: OpenBao, vault_prefix: str
) -> None:
    """With CREDENTIALS_FROM_VAULT the Vault secret is used, not the one in the settings."""
    _seed(openbao, vault_prefix)
    settings = _settings(
        sim,
        sqlite_url,
        fernet_key,
        openbao.settings(path_prefix=vault_prefix),
        client_secret=Secret("stale-secret-in-the-environment"),
    )

    with TokenManager(settings) as manager:
        token = manager.get_token(P)

    assert 1 == token.generation
    assert 0 == sim.control.stats(P)["oauth"]["invalid_client"]


def test_approle_login_reads_credentials(openbao: OpenBao, vault_prefix: str) -> None:
    """VAULT_ROLE_ID/VAULT_SECRET_ID log in through AppRole and read the provider's secret."""
    _seed(openbao, vault_prefix)
    root = openbao.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    policy = f"idis-approle-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_policy(
        name=policy, policy=f'path "secret/data/{vault_prefix}/*" {{ capabilities = ["read"] }}'
    )
    role = f"idis-{uuid.uuid4().hex[:8]}"
    root.auth.approle.create_or_update_approle(role_name=role, token_policies=[policy])
    role_id = root.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]

    store = VaultStore(
        VaultSettings(
            addr=openbao.addr,
            role_id=role_id,
            secret_id=Secret(secret_id),
            path_prefix=vault_prefix,
        )
    )

    assert CLIENT_SECRET == store.read_credentials(P).client_secret.get_secret_value()


def test_vault_errors_name_the_problem_never_the_token(openbao: OpenBao, vault_prefix: str) -> None:
    """Missing secret, bad token, unreachable Vault: SecretStoreError, never the token."""
    bad_token = "definitely-not-a-valid-vault-token-" + uuid.uuid4().hex
    missing = VaultStore(openbao.settings(path_prefix=vault_prefix))
    rejected = VaultStore(openbao.settings(token=bad_token, path_prefix=vault_prefix))
    down = VaultStore(
        VaultSettings(addr=f"http://127.0.0.1:{free_port()}", token=Secret(bad_token), timeout=2)
    )

    errors = []
    for store in (missing, rejected, down):
        with pytest.raises(SecretStoreError) as caught:
            store.read_credentials(P)
        errors.append(str(caught.value))

    assert "has no secret" in errors[0]
    assert "rejected the token" in errors[1] or "denied" in errors[1]
    assert "unreachable" in errors[2]
    assert all(bad_token not in text for text in errors)
    with pytest.raises(ConfigError) as unset:
        VaultStore(VaultSettings())
    assert "VAULT_ADDR" == unset.value.variable
