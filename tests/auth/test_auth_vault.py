"""Credentials in a real OpenBao (Vault API): rotation, rollback versions, least privilege."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select
from tests.auth.conftest import CLIENT_ID, CLIENT_SECRET, OpenBao, make_settings
from tests.auth.loopback import Answer, Recorded, http_server
from tests.conftest import free_port, opened, sample

from idis.integrations._audit import AuditEvent
from idis.integrations._http import httpx
from idis.integrations.auth._rotation import CredentialRotationError, rotate_credentials
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.auth._vault import ClientCredentials, VaultStore
from idis.integrations.config import Secret, Settings, VaultSettings
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import ConfigError, SecretStoreError, SecretStoreRefused
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
    store = opened(VaultStore(openbao.settings(path_prefix=prefix)))
    return store.write_credentials(
        P, ClientCredentials(client_id=CLIENT_ID, client_secret=Secret(secret))
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


def _open_connections_to(port: int) -> int:
    """Sockets of this process still connected to 127.0.0.1:``port`` (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == port and fields[9] in ours and fields[3] != "07":  # 07: CLOSE
            count += 1
    return count


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

    store = opened(VaultStore(openbao.settings(path_prefix=vault_prefix)))
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

    store = opened(VaultStore(openbao.settings(path_prefix=vault_prefix)))
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
        opened(VaultStore(vault)).read_credentials("docs_provider")

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
    assert 1 == opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).current_version(P)


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


def test_vault_errors_name_the_problem_never_the_token(openbao: OpenBao, vault_prefix: str) -> None:
    """Missing secret, bad token, unreachable Vault: a reason each, never the token."""
    bad_token = "definitely-not-a-valid-vault-token-" + uuid.uuid4().hex
    missing = opened(VaultStore(openbao.settings(path_prefix=vault_prefix)))
    rejected = opened(VaultStore(openbao.settings(token=bad_token, path_prefix=vault_prefix)))
    down = opened(
        VaultStore(
            VaultSettings(
                addr=f"http://127.0.0.1:{free_port()}", token=Secret(bad_token), timeout=2
            )
        )
    )

    errors = []
    for store in (missing, rejected, down):
        with pytest.raises(SecretStoreError) as caught:
            store.read_credentials(P)
        errors.append(caught.value)

    assert "has no secret" in str(errors[0])
    assert "missing" == getattr(errors[0], "reason", None)
    assert "token_expired" == getattr(errors[1], "reason", None)
    assert "expired or was revoked" in str(errors[1])
    assert "unreachable" in str(errors[2])
    assert errors[2].retryable
    assert not errors[0].retryable
    assert not errors[1].retryable
    assert all(bad_token not in str(error) for error in errors)
    with pytest.raises(ConfigError) as unset:
        opened(VaultStore(VaultSettings()))
    assert "VAULT_ADDR" == unset.value.variable


def test_a_policy_denial_and_a_dead_token_are_told_apart(
    openbao: OpenBao, vault_prefix: str
) -> None:
    """403 from a policy says "policy"; 403 from a revoked token says "expired or revoked"."""
    _seed(openbao, vault_prefix)
    token = _scoped_token(openbao, vault_prefix, ["read"])
    store = opened(VaultStore(openbao.settings(token=token, path_prefix=vault_prefix)))

    with pytest.raises(SecretStoreRefused) as denied:
        store.read_credentials("docs_provider")  # valid token, path outside its policy
    openbao.client().auth.token.revoke(token)
    with pytest.raises(SecretStoreRefused) as dead:
        store.read_credentials(P)  # allowed path, dead token

    assert "denied" == denied.value.reason
    assert "policy" in str(denied.value)
    assert "token_expired" == dead.value.reason
    assert "expired or was revoked" in str(dead.value)
    assert "policy" not in str(dead.value)
    assert token not in str(denied.value) + str(dead.value)


# --------------------------------------------------------------------------- AppRole


def _approle(openbao: OpenBao, prefix: str, *, ttl: str, max_ttl: str = "1h") -> VaultSettings:
    """An AppRole whose tokens live ``ttl`` and may read and write the prefix."""
    root = openbao.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        with contextlib.suppress(Exception):  # another test may have enabled it meanwhile
            root.sys.enable_auth_method("approle")
    policy = f"idis-approle-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_policy(
        name=policy,
        policy=f'path "secret/data/{prefix}/*" {{ capabilities = ["create", "read", "update"] }}',
    )
    role = f"idis-{uuid.uuid4().hex[:8]}"
    root.auth.approle.create_or_update_approle(
        role_name=role, token_policies=[policy], token_ttl=ttl, token_max_ttl=max_ttl
    )
    role_id = root.auth.approle.read_role_id(role_name=role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role_name=role)["data"]["secret_id"]
    return VaultSettings(
        addr=openbao.addr, role_id=role_id, secret_id=Secret(secret_id), path_prefix=prefix
    )


def _wait_until_dead(openbao: OpenBao, accessor: str) -> None:
    """Advance real time only until Vault itself says the token is gone (polls, no timing)."""
    import hvac.exceptions

    root = openbao.client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            root.auth.token.lookup_accessor(accessor)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
            return
        time.sleep(0.2)
    pytest.fail("the AppRole token did not expire within 60 s")


def test_approle_login_reads_credentials(openbao: OpenBao, vault_prefix: str) -> None:
    """VAULT_ROLE_ID/VAULT_SECRET_ID log in through AppRole and read the provider's secret."""
    _seed(openbao, vault_prefix)
    store = opened(VaultStore(_approle(openbao, vault_prefix, ttl="10m")))

    assert CLIENT_SECRET == store.read_credentials(P).client_secret.get_secret_value()


def test_an_expired_approle_token_is_replaced_by_a_new_login(
    openbao: OpenBao, vault_prefix: str
) -> None:
    """A 2-second AppRole token: after it expires, the next read logs in again and works."""
    _seed(openbao, vault_prefix)
    store = opened(VaultStore(_approle(openbao, vault_prefix, ttl="2s", max_ttl="2s")))
    with structlog.testing.capture_logs() as logs:
        store.read_credentials(P)
        first = store._hvac().auth.token.lookup_self()["data"]["accessor"]
        _wait_until_dead(openbao, first)

        again = store.read_credentials(P)

    assert CLIENT_SECRET == again.client_secret.get_secret_value()
    assert 2 == sum(1 for entry in logs if entry["event"] == "idis.auth.vault_login")


def test_a_403_from_a_revoked_approle_token_logs_in_again_once(
    openbao: OpenBao, vault_prefix: str
) -> None:
    """Vault revoked the token early (store still thinks it valid): one re-login, then it works."""
    _seed(openbao, vault_prefix)
    store = opened(VaultStore(_approle(openbao, vault_prefix, ttl="10m")))
    store.read_credentials(P)
    openbao.client().auth.token.revoke_accessor(
        store._hvac().auth.token.lookup_self()["data"]["accessor"]
    )

    with structlog.testing.capture_logs() as logs:
        again = store.read_credentials(P)

    assert CLIENT_SECRET == again.client_secret.get_secret_value()
    assert ["idis.auth.vault_relogin", "idis.auth.vault_login"] == [
        entry["event"] for entry in logs if entry["event"].startswith("idis.auth.vault_")
    ]


def test_a_renewable_approle_token_is_renewed_before_it_expires(
    openbao: OpenBao, vault_prefix: str
) -> None:
    """Past two thirds of its lease, a renewable token is renewed (same token, no new login)."""
    _seed(openbao, vault_prefix)
    # 12 s: renewal is due in the last 4 s by the store's (conservative) count; waiting
    # until Vault reports at most 3 s left lands inside it with seconds to spare.
    store = opened(VaultStore(_approle(openbao, vault_prefix, ttl="12s", max_ttl="1h")))
    with structlog.testing.capture_logs() as logs:
        store.read_credentials(P)
        client = store._hvac()
        accessor = client.auth.token.lookup_self()["data"]["accessor"]
        # Wait (real time, polled) until the token is inside the last third of its lease.
        deadline = time.monotonic() + 30
        while client.auth.token.lookup_self()["data"]["ttl"] > 3:
            if time.monotonic() > deadline:
                pytest.fail("the token's TTL did not go down")
            time.sleep(0.2)

        store.read_credentials(P)
        after = store._hvac().auth.token.lookup_self()["data"]

    events = [entry["event"] for entry in logs if entry["event"].startswith("idis.auth.vault_")]
    assert ["idis.auth.vault_login", "idis.auth.vault_token_renewed"] == events
    assert accessor == after["accessor"]
    assert after["ttl"] > 3


def test_a_provider_reading_credentials_from_vault_survives_its_approle_token_expiring(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
    mode: str,
    tokens: Any,
) -> None:
    """CREDENTIALS_FROM_VAULT: after the AppRole token expired, a re-read of Vault still works."""
    _seed(openbao, vault_prefix)
    role = _approle(openbao, vault_prefix, ttl="2s", max_ttl="2s")
    settings = _settings(sim, sqlite_url, fernet_key, role)
    manager = tokens(settings)
    manager.get_token(P)  # reads Vault once
    accessor = manager.manager._core.vault()._hvac().auth.token.lookup_self()["data"]["accessor"]
    _wait_until_dead(openbao, accessor)
    # Another replica rotates the secret: provider and Vault have a new one.
    rotated = "cs_rotated_elsewhere_" + uuid.uuid4().hex
    sim.control.set_oauth_client(P, CLIENT_ID, rotated)
    opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).write_credentials(
        P, ClientCredentials(client_id=CLIENT_ID, client_secret=Secret(rotated))
    )

    refreshed = manager.refresh(P)  # invalid_client -> Vault re-read (new login) -> works

    assert 2 == refreshed.generation
    assert 1 == sim.control.stats(P)["oauth"]["invalid_client"]


def test_rotation_after_the_approle_token_expired_logs_in_again_instead_of_blaming_the_policy(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, openbao: OpenBao, vault_prefix: str
) -> None:
    """The AppRole token of a long-running process expired: rotation still works."""
    _seed(openbao, vault_prefix)
    settings = _settings(
        sim, sqlite_url, fernet_key, _approle(openbao, vault_prefix, ttl="2s", max_ttl="2s")
    )
    with TokenManager(settings) as manager:
        manager.get_token(P)  # logs in, reads the credentials
        with manager.hold(P) as hold:
            accessor = hold.vault()._hvac().auth.token.lookup_self()["data"]["accessor"]
        _wait_until_dead(openbao, accessor)

        result = rotate_credentials(P, manager=manager, actor="test")

    assert 2 == result.version
    assert 2 == opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).current_version(P)


# --------------------------------------------------------------------------- writes


def test_rotation_keeps_the_fields_of_the_secret_it_does_not_own(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, openbao: OpenBao, vault_prefix: str
) -> None:
    """Fields an operator keeps beside the credentials survive a rotation (read-merge-CAS)."""
    root = openbao.client()
    root.secrets.kv.v2.create_or_update_secret(
        path=f"{vault_prefix}/{P}",
        secret={
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "owner": "crm-team@example.com",
            "webhook_secret": "whsec_kept_by_another_tool",
        },
        cas=0,
    )
    settings = _settings(sim, sqlite_url, fernet_key, openbao.settings(path_prefix=vault_prefix))

    with TokenManager(settings) as manager:
        result = rotate_credentials(P, manager=manager, actor="test")

    data, version = opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).read_secret(P)
    assert 2 == version == result.version
    assert "crm-team@example.com" == data["owner"]
    assert "whsec_kept_by_another_tool" == data["webhook_secret"]
    assert data["client_secret"] != CLIENT_SECRET
    assert "test" == data["rotated_by"]


class _WriterDuringVerify(httpx.BaseTransport):
    """Forwards token requests to the simulator; before the first, another writer edits Vault."""

    def __init__(self, write: Any) -> None:
        self._inner = httpx.HTTPTransport()
        self._write = write

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._write is not None and request.url.path.endswith("/oauth/token"):
            self._write()
            self._write = None
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("edit", ["another field", "the secret"])
def test_a_concurrent_writer_is_merged_or_refused_never_clobbered(
    edit: str,
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
) -> None:
    """A write between prepare and store: another field is merged; another secret stops it."""
    _seed(openbao, vault_prefix)
    root = openbao.client()

    def concurrent_write() -> None:
        data = root.secrets.kv.v2.read_secret_version(
            path=f"{vault_prefix}/{P}", raise_on_deleted_version=True
        )["data"]["data"]
        if edit == "another field":
            data["note"] = "added by the operator mid-rotation"
        else:
            data["client_secret"] = "cs_written_by_someone_else"
        root.secrets.kv.v2.create_or_update_secret(path=f"{vault_prefix}/{P}", secret=data)

    settings = _settings(
        sim, sqlite_url, fernet_key, openbao.settings(path_prefix=vault_prefix), from_vault=False
    )
    with TokenManager(settings, transport=_WriterDuringVerify(concurrent_write)) as manager:
        if edit == "another field":
            result = rotate_credentials(P, manager=manager)
        else:
            with pytest.raises(CredentialRotationError) as caught:
                rotate_credentials(P, manager=manager)

    data, version = opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).read_secret(P)
    if edit == "another field":
        assert 3 == version == result.version
        assert "added by the operator mid-rotation" == data["note"]
        assert data["client_secret"] not in (CLIENT_SECRET, "cs_written_by_someone_else")
    else:
        assert 2 == version  # the other writer's version, untouched
        assert "cs_written_by_someone_else" == data["client_secret"]
        assert "store" == caught.value.step
        assert "changed while rotating" in str(caught.value)
        assert not caught.value.retry_later


def test_a_permission_error_in_rotation_exits_1_final(
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Vault policy that may not write: exit 1 (final), not 3 (retry later)."""
    from click.testing import CliRunner
    from tests.auth.conftest import env_for

    from idis.integrations.cli import main

    _seed(openbao, vault_prefix)
    token = _scoped_token(openbao, vault_prefix, ["read"])
    env = env_for(sim, sqlite_url, fernet_key)
    env.update(
        {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": token, "IDIS_VAULT_PATH_PREFIX": vault_prefix}
    )
    for name, value in env.items():
        if name.startswith(("IDIS_", "VAULT_")):
            monkeypatch.setenv(name, value)

    result = CliRunner().invoke(main, ["rotate-credentials", "--provider", P, "--store-in-vault"])

    assert 1 == result.exit_code, result.output
    assert "failed at step 'prepare'" in result.output
    assert token not in result.output


# --------------------------------------------------------------------------- redirects


def test_a_redirect_to_another_origin_gets_neither_the_token_nor_the_secret(
    vault_prefix: str,
) -> None:
    """307 to another loopback server: refused before sending; the other server sees nothing."""
    vault_token = "hvs.test-token-" + uuid.uuid4().hex
    with http_server(lambda _r: Answer(200, b'{"data": {"version": 0}}')) as elsewhere:

        def redirect(request: Recorded) -> Answer:
            return Answer(307, headers={"Location": elsewhere.url + request.path})

        with http_server(redirect) as vault:
            store = opened(
                VaultStore(
                    VaultSettings(
                        addr=vault.url, token=Secret(vault_token), path_prefix=vault_prefix
                    )
                )
            )
            with pytest.raises(SecretStoreRefused) as on_write:
                store.write_credentials(
                    P,
                    ClientCredentials(client_id=CLIENT_ID, client_secret=Secret("cs_new_secret")),
                )
            with pytest.raises(SecretStoreRefused) as on_read:
                store.read_credentials(P)
            # The refused 307's connection is closed at once, not left open for the
            # garbage collector to find (a ResourceWarning in some later test).
            assert 0 == _open_connections_to(int(vault.url.rsplit(":", 1)[1]))

    assert [] == elsewhere.requests
    assert "redirect" == on_write.value.reason == on_read.value.reason
    assert "another origin" in str(on_write.value)
    assert vault_token not in str(on_write.value) + str(on_read.value)


def test_a_same_origin_redirect_is_followed_and_a_write_without_version_fails(
    vault_prefix: str,
) -> None:
    """Same-origin 307s are followed; a write answered without a version is not a success."""
    kv = json.dumps(
        {
            "data": {
                "data": {"client_id": CLIENT_ID, "client_secret": "cs"},
                "metadata": {"version": 4},
            }
        }
    ).encode()

    def vault(request: Recorded) -> Answer:
        if not request.path.startswith("/moved"):
            return Answer(307, headers={"Location": "/moved" + request.path})
        if request.method == "GET":
            return Answer(200, kv, {"Content-Type": "application/json"})
        return Answer(200, b"{}", {"Content-Type": "application/json"})  # no version

    with http_server(vault) as server:
        store = opened(
            VaultStore(
                VaultSettings(
                    addr=server.url, token=Secret("t-" + uuid.uuid4().hex), path_prefix=vault_prefix
                )
            )
        )
        read = store.read_credentials(P)
        with pytest.raises(SecretStoreRefused) as written:
            store.write_credentials(
                P, ClientCredentials(client_id=CLIENT_ID, client_secret=Secret("cs_new"))
            )

    assert 4 == read.version
    assert "no_version" == written.value.reason
    assert "not trusted as written" in str(written.value)
