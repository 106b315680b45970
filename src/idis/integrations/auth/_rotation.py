"""Credential rotation: new client secret -> verified -> stored (Vault KV v2) -> switched.

RB-09 Recovery 2 (``rotate-credentials --provider P --store-in-vault``). The
steps run in this order, and a failure at any of them leaves the credentials
in use unchanged:

1. **prepare**: resolve the current credentials; with Vault, read the current
   KV version and check that the token may write the path (so a read-only
   policy fails here, before the provider hands out a secret);
2. **obtain**: ask the provider's rotation API (``ROTATION_URL``) for a new
   secret, authenticated with the current one, or take the secret the
   operator supplied (the CLI reads it from stdin, never from an argument);
3. **verify**: obtain a token with the new credentials;
4. **store**: write a new Vault KV version (check-and-set against the version
   read in step 1; older versions stay for rollback), or an encrypted copy in
   the database with ``store_in_vault=False``;
5. **switch**: in one database transaction, record the new credentials (and
   their version) in the provider's token row together with the verified
   token, so every process and replica uses them from its next refresh.

The whole rotation holds the provider's token lock (in-process and, on
PostgreSQL, the row lock), so no refresh runs half-way through it. Every
outcome is audited (``credentials.rotated`` / ``credentials.rotation_failed``)
and counted in ``integration_credential_rotations_total{outcome}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..config import ProviderSettings, Secret, Settings
from ..exceptions import (
    AuthError,
    ConfigError,
    IntegrationError,
    ProviderError,
    SecretStoreError,
)
from ..observability._logs import get_logger, redact_text
from ._grant import basic_authorization, resolve_url
from ._tokens import TokenManager
from ._vault import ClientCredentials, VaultStore

__all__ = ["CredentialRotationError", "RotationResult", "rotate_credentials"]

_log = get_logger()
#: ``integration_credential_rotations_total{outcome}`` values.
OUTCOMES = (
    "ok",
    "prepare_failed",
    "obtain_failed",
    "verify_failed",
    "store_failed",
    "switch_failed",
)


class CredentialRotationError(AuthError):
    """A credential rotation failed at ``step``; the credentials in use did not change.

    The message says which step failed, why, and what (if anything) the
    operator should do; for the rotation API, how long the previous secret
    stays valid.
    """

    retryable = False

    def __init__(self, message: str, *, provider: str, step: str) -> None:
        super().__init__(message, provider=provider)
        #: prepare, obtain, verify, store or switch.
        self.step = step


@dataclass(frozen=True, slots=True)
class RotationResult:
    """A completed rotation; prints as one line with no secret in it."""

    #: Provider name.
    provider: str
    #: Client id now in use.
    client_id: str
    #: Where the new secret came from: ``rotation_api`` or ``operator``.
    source: str
    #: Where it is stored: ``vault`` or ``database``.
    stored_in: str
    #: KV version written (Vault), or the rotation counter (database).
    version: int
    #: The version it replaced (kept in Vault for rollback); None if there was none.
    previous_version: int | None
    #: ``mount/path`` in Vault, when stored there.
    location: str | None
    #: Expiry of the token obtained to verify the new credentials.
    token_expires_at: datetime | None
    #: Until when the provider accepts the previous secret, if it said.
    previous_secret_valid_until: str | None = None

    def __str__(self) -> str:
        origin = (
            "from the provider's rotation API"
            if self.source == "rotation_api"
            else "supplied by the operator"
        )
        if self.stored_in == "vault":
            kept = (
                f", version {self.previous_version} kept for rollback"
                if self.previous_version
                else ""
            )
            where = f"stored in Vault {self.location} version {self.version}{kept}"
        else:
            where = f"stored encrypted in the database (rotation {self.version})"
        expiry = (
            self.token_expires_at.replace(microsecond=0).isoformat().replace("+00:00", "Z")
            if self.token_expires_at
            else "no expiry"
        )
        grace = (
            f"; the previous secret stays valid until {self.previous_secret_valid_until}"
            if self.previous_secret_valid_until
            else ""
        )
        return (
            f"{self.provider}: credentials rotated (client {self.client_id}, new secret {origin}); "
            f"verified (token expires {expiry}); {where}; now in use{grace}"
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no secret)."""
        return {
            "provider": self.provider,
            "client_id": self.client_id,
            "source": self.source,
            "stored_in": self.stored_in,
            "version": self.version,
            "previous_version": self.previous_version,
            "location": self.location,
            "token_expires_at": (
                self.token_expires_at.isoformat() if self.token_expires_at else None
            ),
            "previous_secret_valid_until": self.previous_secret_valid_until,
        }


@dataclass(frozen=True, slots=True)
class _NewCredentials:
    credentials: ClientCredentials
    source: str
    previous_valid_until: str | None


def _call_rotation_api(
    manager: TokenManager, p: ProviderSettings, current: ClientCredentials | None
) -> _NewCredentials:
    """POST the provider's rotation API once (never retried: each call mints a secret)."""
    from ..resilience._errors import error_for_status, map_httpx_errors

    assert p.auth.rotation_url is not None
    if current is None or not current.client_secret:
        raise AuthError(
            f"provider {p.name!r} has no current client secret to authenticate the rotation "
            "API with: supply the new secret instead (the CLI reads it from stdin)",
            provider=p.name,
        )
    url = resolve_url(p.base_url, p.auth.rotation_url)
    headers = {
        "Authorization": basic_authorization(
            current.client_id, current.client_secret.get_secret_value()
        ),
        "Accept": "application/json",
    }
    with map_httpx_errors(p.name, "rotate"):
        response = manager._http.post(url, headers=headers, timeout=manager._core.timeout(p))
    if response.status_code == 401:
        raise AuthError(
            f"{p.name} rotation API rejected the current client credentials (HTTP 401)",
            provider=p.name,
        )
    error = error_for_status(response.status_code, p.name, "rotate")
    if error is not None:
        raise error
    try:
        document = json.loads(response.content or b"null")
    except ValueError:
        document = None
    secret = document.get("client_secret") if isinstance(document, dict) else None
    if not isinstance(secret, str) or not secret:
        raise AuthError(
            f"{p.name} rotation API answered {response.status_code} without a client_secret",
            provider=p.name,
        )
    assert isinstance(document, dict)
    client_id = document.get("client_id")
    until = document.get("previous_secret_valid_until")
    return _NewCredentials(
        credentials=ClientCredentials(
            client_id=client_id if isinstance(client_id, str) and client_id else current.client_id,
            client_secret=Secret(secret),
            source="rotation_api",
        ),
        source="rotation_api",
        previous_valid_until=until if isinstance(until, str) else None,
    )


def _failure_message(
    provider: str, step: str, exc: BaseException, new: _NewCredentials | None
) -> str:
    reason = redact_text(str(exc))
    grace = ""
    if new is not None and new.source == "rotation_api":
        until = new.previous_valid_until or "the provider's grace period ends"
        grace = (
            f" The provider already issued a new secret; the current one stays valid until "
            f"{until}: run the rotation again before then."
        )
    what = {
        "prepare": "stopped before anything changed",
        "obtain": "could not obtain new credentials",
        "verify": "the new credentials did not work (no token could be obtained with them); "
        "nothing was stored",
        "store": "the new credentials work but could not be stored; nothing was switched",
        "switch": "the new credentials were stored but switching to them failed",
    }[step]
    return (
        f"credential rotation for {provider!r} failed at step {step!r}: {what}: {reason}. "
        f"The credentials in use are unchanged.{grace}"
    )


def rotate_credentials(
    provider: str,
    store_in_vault: bool = True,
    new_secret: str | None = None,
    *,
    new_client_id: str | None = None,
    settings: Settings | None = None,
    manager: TokenManager | None = None,
    vault: VaultStore | None = None,
    actor: str = "system",
) -> RotationResult:
    """Rotate a provider's client credentials (RB-09 Recovery 2).

    Args:
        provider: Provider name.
        store_in_vault: Write the new credentials to Vault KV v2 (a new version;
            the previous stays for rollback). False keeps them encrypted in the
            database instead (needs ``IDIS_ENCRYPTION_KEYS``).
        new_secret: The new client secret, when the provider has no rotation API
            (or to install one made by hand). Never pass it on a command line.
        new_client_id: A new client id to go with ``new_secret``.
        settings: Settings (default: from the environment).
        manager: The process's token manager (default: a temporary one).
        vault: A Vault store (default: built from the settings).
        actor: Who rotates, for the audit trail.

    Returns:
        What was rotated and where it is stored.

    Raises:
        ConfigError: unknown provider, no OAuth, Vault not configured, no key,
            no rotation API and no secret given. Nothing changed.
        CredentialRotationError: a step failed (``.step``); nothing was switched.
        TokenLockTimeout: a refresh held the token lock too long; nothing changed.
    """
    if new_secret is not None and not new_secret.strip():
        raise ConfigError("the new client secret is empty", variable="new_secret")
    owns = manager is None
    settings = settings or (manager.settings if manager is not None else Settings.from_env())
    manager = manager or TokenManager(settings)
    try:
        return _rotate(
            manager,
            provider,
            store_in_vault=store_in_vault,
            new_secret=new_secret.strip() if new_secret is not None else None,
            new_client_id=new_client_id,
            vault=vault,
            actor=actor,
        )
    finally:
        if owns:
            manager.close()


def _rotate(
    manager: TokenManager,
    provider: str,
    *,
    store_in_vault: bool,
    new_secret: str | None,
    new_client_id: str | None,
    vault: VaultStore | None,
    actor: str,
) -> RotationResult:
    core = manager._core
    p = core.provider(provider)
    store = (vault or core.vault()) if store_in_vault else None
    if store is None:
        core.cipher.require(f"the rotated client secret of {provider!r}")
    if new_secret is None and not p.auth.rotation_url:
        raise ConfigError(
            f"provider {provider!r} has no rotation API (IDIS_PROVIDER_{provider.upper()}"
            "_ROTATION_URL is not set): supply the new secret (the CLI reads it from stdin)",
            variable=f"IDIS_PROVIDER_{provider.upper()}_ROTATION_URL",
        )
    grant = core.grant_for(p)
    lock = manager._lock(p.name)
    if not lock.acquire(timeout=p.auth.lock_timeout):
        raise core.lock_timeout(p)
    try:
        with manager._store.locked(p.name, p.auth.lock_timeout) as row:
            snap = row.snapshot
            step = "prepare"
            new: _NewCredentials | None = None
            verified = None
            try:
                previous_version = (
                    store.current_version(p.name) if store is not None else snap.credential_version
                )
                if store is not None and store.writable(p.name) is False:
                    raise SecretStoreError(
                        f"the Vault token may not write {store.location(p.name)}: its policy "
                        f"needs create and update on {store.settings.mount}/data/"
                        f"{store.path(p.name)}"
                    )
                current = manager._credentials(p, snap)
                step = "obtain"
                if new_secret is not None:
                    client_id = new_client_id or (current.client_id if current else "")
                    new = _NewCredentials(
                        ClientCredentials(
                            client_id=client_id or p.auth.client_id,
                            client_secret=Secret(new_secret),
                            source="operator",
                        ),
                        "operator",
                        None,
                    )
                else:
                    new = _call_rotation_api(manager, p, current)
                step = "verify"
                _, refresh_token, _ = core.candidate(p, snap)
                verified = manager.request_token(p, new.credentials, grant, refresh_token)
                token, values, audit = core.success(
                    p, snap, verified, grant=grant, previous_refresh=refresh_token, mode="force"
                )
                step = "store"
                now = core.now()
                secret = new.credentials.client_secret.get_secret_value()
                if store is not None:
                    version = store.write_credentials(
                        p.name,
                        new.credentials,
                        cas=previous_version or 0,
                        extra={
                            "rotated_at": now.isoformat(),
                            "rotated_by": actor,
                            "source": new.source,
                        },
                    )
                    # The encrypted copy lets replicas without Vault access follow.
                    secret_enc = core.cipher.encrypt_optional(secret)
                else:
                    version = (snap.credential_version or 0) + 1
                    secret_enc = core.cipher.encrypt(secret, what="the rotated client secret")
                step = "switch"
                values.update(
                    client_id=new.credentials.client_id,
                    client_secret_enc=secret_enc,
                    credential_source="vault" if store is not None else "database",
                    credential_version=version,
                    credentials_rotated_at=now,
                )
                location = store.location(p.name) if store is not None else None
                audit.insert(
                    0,
                    {
                        "action": "credentials.rotated",
                        "provider": p.name,
                        "actor": actor,
                        "subject_type": "credentials",
                        "subject_id": p.name,
                        "details": {
                            "client_id": new.credentials.client_id,
                            "source": new.source,
                            "stored_in": "vault" if store is not None else "database",
                            "location": location,
                            "credential_version": version,
                            "previous_version": previous_version,
                        },
                    },
                )
                row.write(values, expect_generation=None, audit=audit)
            except (IntegrationError, ProviderError) as exc:
                if step == "prepare" and isinstance(exc, ConfigError):
                    raise
                _record_failure(manager, p, step, exc, new=new, actor=actor)
                if verified is not None and step == "store" and grant == "refresh_token":
                    # The verification refresh rotated the refresh token: keep it.
                    token, values, audit = core.success(
                        p, snap, verified, grant=grant, previous_refresh=refresh_token, mode="force"
                    )
                    row.write(values, expect_generation=None, audit=audit)
                    core.cache[p.name] = token
                raise CredentialRotationError(
                    _failure_message(p.name, step, exc, new), provider=p.name, step=step
                ) from exc
    finally:
        lock.release()
    assert new is not None
    assert verified is not None
    credentials = ClientCredentials(
        client_id=new.credentials.client_id,
        client_secret=new.credentials.client_secret,
        source="vault" if store is not None else "database",
        version=version,
    )
    if store is not None:
        core.vault_credentials[p.name] = credentials
    core.after_success(p, token, mode="force", rotated=False)
    core.metrics.credential_rotations.labels(p.name, "ok").inc()
    result = RotationResult(
        provider=p.name,
        client_id=credentials.client_id,
        source=new.source,
        stored_in="vault" if store is not None else "database",
        version=version,
        previous_version=previous_version,
        location=location,
        token_expires_at=token.expires_at,
        previous_secret_valid_until=new.previous_valid_until,
    )
    _log.info(
        "idis.auth.credentials_rotated",
        msg="client credentials rotated and in use",
        provider=p.name,
        client_id=credentials.client_id,
        source=new.source,
        stored_in=result.stored_in,
        credential_version=version,
        actor=actor,
    )
    return result


def _record_failure(
    manager: TokenManager,
    p: ProviderSettings,
    step: str,
    exc: BaseException,
    *,
    new: _NewCredentials | None,
    actor: str,
) -> None:
    message = _failure_message(p.name, step, exc, new)
    manager._core.metrics.credential_rotations.labels(p.name, f"{step}_failed").inc()
    _log.error(
        "idis.auth.rotation_failed",
        msg="credential rotation failed; the credentials in use are unchanged",
        provider=p.name,
        step=step,
        error=message,
        actor=actor,
    )
    try:
        manager._store.audit_only(
            [
                {
                    "action": "credentials.rotation_failed",
                    "provider": p.name,
                    "actor": actor,
                    "subject_type": "credentials",
                    "subject_id": p.name,
                    "outcome": "failed",
                    "details": {"step": step, "error_type": type(exc).__name__},
                    "message": message,
                }
            ]
        )
    except IntegrationError as audit_exc:
        _log.error(
            "idis.auth.audit_failed",
            msg="could not audit the failed rotation",
            provider=p.name,
            error=str(audit_exc),
        )
