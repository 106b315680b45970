"""No secret escapes: logs, audit rows, metrics, exception texts and CLI output are searched.

The scenario runs refreshes (ok, failing, refused), a 401 retry, imports and
rotations (API and stdin; success and failure) through the library and the CLI,
against the simulator and a real OpenBao, twice: once with structlog configured
by ``configure_logging`` into a buffer (what production writes, after
redaction) and once under ``structlog.testing.capture_logs`` (the raw event
dictionaries, before any redaction, so a secret put in an event is caught even
if the redaction processor would have hidden it). Every token the simulator
issued and every client secret it knows is then looked for everywhere.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from click.testing import CliRunner
from prometheus_client import generate_latest
from sqlalchemy import select
from tests.auth.conftest import CLIENT_ID, CLIENT_SECRET, OpenBao, env_for, make_settings
from tests.conftest import opened

from idis.integrations._audit import AuditEvent
from idis.integrations._http import httpx
from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.auth._rotation import rotate_credentials
from idis.integrations.auth._status import token_status
from idis.integrations.auth._tokens import TokenManager, refresh_tokens
from idis.integrations.auth._vault import ClientCredentials, VaultStore
from idis.integrations.cli import main
from idis.integrations.config import Secret
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import IntegrationError
from idis.integrations.observability._logs import configure_logging
from idis.integrations.observability._metrics import Metrics
from idis.integrations.resilience import Gateway
from idis.integrations.testing import RunningSimulator

pytestmark = pytest.mark.vault
P = "crm_provider"
_RW = '["create", "read", "update"]'


def _exception_texts(exc: BaseException) -> list[str]:
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return texts


def _scenario(
    sim: RunningSimulator,
    url: str,
    key: str,
    openbao: OpenBao,
    vault_token: str,
    prefix: str,
    metrics: Metrics,
    relog: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Run every refresh and rotation path; return exception texts and CLI outputs."""
    outputs: list[str] = []
    vault = openbao.settings(token=vault_token, path_prefix=prefix)
    opened(VaultStore(vault)).write_credentials(
        P, ClientCredentials(client_id=CLIENT_ID, client_secret=Secret(CLIENT_SECRET))
    )
    settings = replace(
        make_settings(sim, url, key, grant="refresh_token", credentials_from_vault=True),
        vault=vault,
    )

    def expect_failure(action: Callable[[], object]) -> None:
        with pytest.raises(IntegrationError) as caught:
            action()
        outputs.extend(_exception_texts(caught.value))

    with TokenManager(settings, metrics=metrics) as manager:
        manager.import_token(P, {**sim.control.issue_tokens(P), "expires_in": -5})
        manager.get_token(P)  # refresh with rotation
        manager.refresh(P)
        sim.control.require_auth(P)
        sim.control.expire_tokens(P)
        with Gateway(settings, auth=oauth_auth_factory(settings, manager=manager)) as gateway:
            gateway.get_json(P, "records")  # 401 -> refresh -> retry
        sim.control.set_fault(P, "error", endpoint="token", status=503)
        expect_failure(lambda: manager.refresh(P))
        sim.control.clear_faults(P)
        revoked = sim.control.issue_tokens(P)
        manager.import_token(P, {**revoked, "expires_in": -5})
        sim.control.revoke_token(P, revoked["refresh_token"])
        expect_failure(lambda: manager.get_token(P))
        outputs.append(str(token_status(settings, P)))
        outputs.extend(str(r) for r in refresh_tokens(P, settings=settings, manager=manager))
        manager.import_token(P, sim.control.issue_tokens(P))
        result = rotate_credentials(P, manager=manager, actor="test")
        outputs += [str(result), json.dumps(result.as_dict())]
        expect_failure(
            lambda: rotate_credentials(P, new_secret="wrong-" + uuid.uuid4().hex, manager=manager)
        )

    runner = CliRunner()
    env = env_for(sim, url, key, grant="refresh_token")
    env.update(
        {
            "VAULT_ADDR": openbao.addr,
            "VAULT_TOKEN": vault_token,
            "IDIS_VAULT_PATH_PREFIX": prefix,
            "IDIS_PROVIDER_CRM_PROVIDER_CREDENTIALS_FROM_VAULT": "true",
        }
    )
    for name, value in env.items():
        if name.startswith(("IDIS_", "VAULT_")):
            monkeypatch.setenv(name, value)
    commands: list[tuple[list[str], str | None]] = [
        (["import-token", "--provider", P], json.dumps(sim.control.issue_tokens(P))),
        (["refresh-tokens", "--provider", P], None),
        (["refresh-tokens", "--all", "--json"], None),
        (["check-token", "--provider", P], None),
        (["check-token", "--provider", P, "--json"], None),
        (["rotate-credentials", "--provider", P, "--store-in-vault"], None),
        (["rotate-credentials", "--provider", P, "--from-stdin"], "wrong-" + uuid.uuid4().hex),
        (["refresh-tokens", "--provider", P], None),
    ]
    for args, stdin in commands:
        invoked = runner.invoke(main, args, input=stdin)
        relog()  # the CLI configured logging to its own stderr; take it back
        outputs += [invoked.output, invoked.stdout]
        if invoked.exception is not None and not isinstance(invoked.exception, SystemExit):
            outputs.extend(_exception_texts(invoked.exception))
    return outputs


def _secrets(sim: RunningSimulator, *extra: str) -> set[str]:
    oauth = sim.state.provider(P).oauth
    found = {*oauth.access_tokens, *oauth.refresh_tokens, *extra}
    for client_id, client in oauth.clients.items():
        for secret in (client.secret, *(old.secret for old in client.previous)):
            found.add(secret)
            # The shapes a secret travels in: a Basic header and a form/query field.
            found.add(base64.b64encode(f"{client_id}:{secret}".encode()).decode())
            found.add(quote(secret, safe=""))
    return {s for s in found if s}


def _audit_rows(url: str) -> list[str]:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        rows = [repr(tuple(row)) for row in conn.execute(select(AuditEvent.__table__)).all()]
    engine.dispose()
    return rows


@pytest.mark.parametrize("capture", ["configure_logging", "capture_logs"])
def test_no_secret_in_logs_audit_metrics_errors_or_cli_output(
    capture: str,
    sim: RunningSimulator,
    sqlite_url: str,
    fernet_key: str,
    openbao: OpenBao,
    vault_prefix: str,
    metrics: Metrics,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refresh and rotation, through the library and the CLI, leave no secret anywhere."""
    root = openbao.client()
    policy = f"leak-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_policy(
        name=policy,
        policy=f'path "secret/data/{vault_prefix}/*" {{ capabilities = {_RW} }}',
    )
    vault_token = "idisvaulttoken" + uuid.uuid4().hex
    root.auth.token.create(id=vault_token, policies=[policy], ttl="10m")
    buffer = io.StringIO()

    def relog() -> None:
        if capture == "configure_logging":
            configure_logging("json", "DEBUG", stream=buffer)

    captured: list[dict[str, Any]] = []
    relog()
    if capture == "capture_logs":
        with structlog.testing.capture_logs() as entries:
            outputs = _scenario(
                sim,
                sqlite_url,
                fernet_key,
                openbao,
                vault_token,
                vault_prefix,
                metrics,
                relog,
                monkeypatch,
            )
        captured = list(entries)
    else:
        outputs = _scenario(
            sim,
            sqlite_url,
            fernet_key,
            openbao,
            vault_token,
            vault_prefix,
            metrics,
            relog,
            monkeypatch,
        )

    secrets = _secrets(sim, vault_token, fernet_key)
    logs = buffer.getvalue() if capture == "configure_logging" else repr(captured)
    artifacts = {
        "logs": logs,
        "audit": "\n".join(_audit_rows(sqlite_url)),
        "metrics": generate_latest(metrics.registry).decode(),
        "errors and CLI output": "\n".join(outputs),
    }
    assert len(secrets) >= 10  # the scenario really issued tokens and rotated secrets
    assert "idis.auth.token_refreshed" in logs
    assert "credentials.rotated" in artifacts["audit"]
    assert "credentials.rotation_failed" in artifacts["audit"]
    assert 'outcome="invalid_grant"' in artifacts["metrics"]
    leaks = [
        (where, secret[:6] + "...")
        for where, text in artifacts.items()
        for secret in secrets
        if secret in text
    ]
    assert [] == leaks


# --------------------------------------------------------------------------- reprs

_SECRET = "s3cr3t-never-in-a-repr"
#: Field names that may hold a secret (tokens, secrets, request bodies, encrypted values).
_SECRET_FIELD = ("token", "secret", "body", "password", "values", "headers", "_enc", "key")
#: ...except these, which only look like it.
_NOT_SECRET = ("token_type", "previous_secret_valid_until")


def _auth_dataclasses() -> list[type]:
    """Every dataclass defined in an ``idis.integrations.auth`` module."""
    import dataclasses
    import importlib
    import pkgutil

    import idis.integrations.auth as auth

    found = []
    for info in pkgutil.iter_modules(auth.__path__):
        module = importlib.import_module(f"idis.integrations.auth.{info.name}")
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


def _plain() -> dict[str, Callable[[], Any]]:
    from idis.integrations._clock import system_clock
    from idis.integrations.auth._grant import Action
    from idis.integrations.auth._store import RowSnapshot

    return {
        "GrantType": lambda: "refresh_token",
        "Mode": lambda: "force",
        "TokenState": lambda: "valid",
        "Action": lambda: Action.REFRESH,
        "Any": lambda: None,
        "Clock": lambda: system_clock,
        "httpx.Timeout": lambda: httpx.Timeout(1.0),
        "SyncTokenStore | AsyncTokenStore": lambda: None,
        "Callable[[], VaultStore]": lambda: lambda: None,
        "TokenManager": lambda: None,
        # A snapshot is a detached row: its ciphertext columns hold secret-looking values.
        "RowSnapshot": lambda: RowSnapshot(
            provider="x",
            access_token_enc=_SECRET,
            refresh_token_enc=_SECRET,
            client_secret_enc=_SECRET,
        ),
    }


_PLAIN = _plain()


def _build(cls: type, depth: int = 0) -> Any:
    """An instance of ``cls`` whose secret-looking fields hold ``_SECRET`` (None: cannot build)."""
    import dataclasses
    from datetime import UTC, datetime

    if depth > 3:
        return None
    known = {c.__name__: c for c in _auth_dataclasses()}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = str(f.type)
        secretish = f.name not in _NOT_SECRET and any(part in f.name for part in _SECRET_FIELD)
        if "Secret" in kind:
            values[f.name] = Secret(_SECRET)
        elif kind.startswith("str"):
            values[f.name] = _SECRET if secretish else "x"
        elif kind.startswith(("dict", "Mapping")):
            values[f.name] = {"access_token_enc": _SECRET, "client_secret": _SECRET}
        elif kind.startswith(("list", "tuple")):
            values[f.name] = []
        elif kind.startswith("int"):
            values[f.name] = 1
        elif kind.startswith("float"):
            values[f.name] = 1.0
        elif kind.startswith("bool"):
            values[f.name] = False
        elif kind.startswith("datetime"):
            values[f.name] = datetime(2026, 1, 19, tzinfo=UTC)
        elif kind.split(" ", maxsplit=1)[0] in known:
            values[f.name] = _build(known[kind.split(" ", maxsplit=1)[0]], depth + 1)
        elif "None" in kind:
            values[f.name] = None
        elif f.default is not dataclasses.MISSING:
            continue
        elif kind in _PLAIN:
            values[f.name] = _PLAIN[kind]()
        else:
            return None
    try:
        return cls(**values)
    except TypeError:
        return None


def test_no_repr_or_str_in_the_auth_package_shows_a_secret(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str
) -> None:
    """Every auth dataclass, built with secrets in its secret-looking fields, prints none of them.

    Found by walking the package, so a new class is checked without anyone
    remembering to add it (the refresh plan's repr once showed the refresh token).
    """
    classes = _auth_dataclasses()
    built = {cls.__name__: _build(cls) for cls in classes}
    settings = make_settings(sim, sqlite_url, fernet_key, grant="refresh_token")
    with TokenManager(settings) as manager:
        manager.import_token(P, {"access_token": _SECRET, "refresh_token": _SECRET})
        with manager.hold(P) as hold:
            others = [
                manager,
                hold,
                hold.vault() if settings.vault.addr else None,
                oauth_auth_factory(settings, manager=manager)(settings.provider(P)),
                hold.cipher,
                _PLAIN["RowSnapshot"](),
            ]

    unbuildable = sorted(name for name, instance in built.items() if instance is None)
    leaks = [
        name
        for name, instance in [*built.items(), *((type(o).__name__, o) for o in others)]
        if instance is not None and (_SECRET in repr(instance) or _SECRET in str(instance))
    ]
    assert len(classes) >= 10  # the walk found the package's dataclasses
    assert [] == unbuildable
    assert [] == leaks
