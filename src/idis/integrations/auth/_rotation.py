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
   read in step 1, keeping every field of the secret the library does not own;
   older versions stay for rollback), or an encrypted copy in the database
   with ``store_in_vault=False``;
5. **switch**: in one database transaction, record the new credentials (and
   their version) in the provider's token row together with the verified
   token, so every process and replica uses them from its next refresh.

The whole rotation holds the provider's token lock (in-process and, on
PostgreSQL, the row lock) through :meth:`TokenManager.hold`, the public token
API for maintenance, so no refresh runs half-way through it. Every
outcome is audited (``credentials.rotated`` / ``credentials.rotation_failed``)
and counted in ``integration_credential_rotations_total{outcome}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from ..config import Secret, Settings
from ..exceptions import (
    AuthError,
    ConfigError,
    CredentialRotationError,
    CredentialsRejected,
    IntegrationError,
    ProviderError,
    ReauthorizationRequired,
    SecretStoreError,
    SecretStoreRefused,
    StorageError,
    TokenLockTimeout,
)
from ..observability._logs import get_logger, redact_text
from ._grant import IssuedToken, basic_authorization, json_object, resolve_url
from ._status import utc_seconds
from ._tokens import TokenHold, TokenManager
from ._vault import ClientCredentials, VaultStore

__all__ = ["CredentialRotationError", "RotationResult", "rotate_credentials"]

_log = get_logger()
#: What each step's failure means for the operator, in the order the steps run.
_STEP_MEANING = {
    "prepare": "stopped before anything changed",
    "obtain": "could not obtain new credentials",
    "verify": "the new credentials did not work (no token could be obtained with them); "
    "nothing was stored",
    "store": "the new credentials work but could not be stored; nothing was switched",
    "switch": "the new credentials were stored but switching to them failed",
}
#: ``integration_credential_rotations_total{outcome}`` values.
OUTCOMES = ("ok", *(f"{step}_failed" for step in _STEP_MEANING))


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
        expiry = utc_seconds(self.token_expires_at) or "no expiry"
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
        expires = self.token_expires_at
        return asdict(self) | {"token_expires_at": expires.isoformat() if expires else None}


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
        CredentialRotationError: a step failed (``.step``; ``.retry_later`` when a
            dependency was unreachable); nothing was switched.
        TokenLockTimeout: a refresh held the token lock too long; nothing changed.
    """
    if new_secret is not None and not new_secret.strip():
        raise ConfigError("the new client secret is empty", variable="new_secret")
    owns = manager is None
    settings = settings or (manager.settings if manager is not None else Settings.from_env())
    manager = manager or TokenManager(settings)
    try:
        rotation = _Rotation(
            manager,
            provider,
            store_in_vault=store_in_vault,
            new_secret=new_secret.strip() if new_secret is not None else None,
            new_client_id=new_client_id,
            vault=vault,
            actor=actor,
        )
        return rotation.run()
    finally:
        if owns:
            manager.close()


@dataclass(slots=True, repr=False)  # the default repr would show the new secret
class _Rotation:
    """One rotation, step by step, on the provider's held token lock."""

    manager: TokenManager
    provider: str
    store_in_vault: bool
    new_secret: str | None
    new_client_id: str | None
    vault: VaultStore | None
    actor: str
    step: str = "prepare"
    #: The credentials in use, as the prepare step found them.
    current: ClientCredentials | None = None
    #: The new credentials (``source``: ``rotation_api`` or ``operator``).
    new: ClientCredentials | None = None
    #: Until when the provider accepts the previous secret, if its rotation API said.
    previous_valid_until: str | None = None
    verified: IssuedToken | None = None
    base: tuple[dict[str, Any], int] | None = None
    previous_version: int | None = None
    version: int = 0
    result: RotationResult | None = None

    def run(self) -> RotationResult:
        """Check the request, hold the lock, run the steps in order; on failure audit and raise."""
        with self.manager.hold(self.provider) as hold:
            store = self._check(hold)
            try:
                for self.step in _STEP_MEANING:  # each step is the method named after it
                    getattr(self, f"_{self.step}")(hold, store)
            except (IntegrationError, ProviderError) as exc:
                if self.step == "prepare" and isinstance(exc, ConfigError):
                    raise
                raise self._failed(hold, exc) from exc
            hold.metrics.credential_rotations.labels(hold.provider.name, "ok").inc()
        assert self.result is not None
        _log.info(
            "idis.auth.credentials_rotated",
            msg="client credentials rotated and in use",
            provider=self.provider,
            client_id=self.result.client_id,
            source=self.result.source,
            stored_in=self.result.stored_in,
            credential_version=self.version,
            actor=self.actor,
        )
        return self.result

    def _check(self, hold: TokenHold) -> VaultStore | None:
        """Refuse a rotation that cannot work, before anything happens (ConfigError)."""
        p = hold.provider
        store = (self.vault or hold.vault()) if self.store_in_vault else None
        if store is None:
            hold.cipher.require(f"the rotated client secret of {p.name!r}")
        if self.new_secret is None and not p.auth.rotation_url:
            raise ConfigError(
                f"provider {p.name!r} has no rotation API (IDIS_PROVIDER_{p.name.upper()}"
                "_ROTATION_URL is not set): supply the new secret (the CLI reads it from stdin)",
                variable=f"IDIS_PROVIDER_{p.name.upper()}_ROTATION_URL",
            )
        return store

    def _prepare(self, hold: TokenHold, store: VaultStore | None) -> None:
        """Read where the credentials are now, and check that Vault will take the new ones."""
        p = hold.provider
        if store is None:
            self.previous_version = hold.snapshot.credential_version
        else:
            self.base = store.current(p.name)
            self.previous_version = self.base[1] or None
            if store.writable(p.name) is False:
                raise SecretStoreRefused(
                    f"the Vault token may not write {store.location(p.name)}: its policy "
                    f"needs create and update on {store.settings.mount}/data/"
                    f"{store.path(p.name)}",
                    reason="denied",
                )
        self.current = hold.credentials()

    def _obtain(self, hold: TokenHold, store: VaultStore | None) -> None:
        """The new secret: the operator's, or one minted by the provider's rotation API."""
        if self.new_secret is None:
            self.new, self.previous_valid_until = _call_rotation_api(hold, self.current)
            return
        client_id = self.new_client_id or (self.current.client_id if self.current else "")
        self.new = ClientCredentials(
            client_id=client_id or hold.provider.auth.client_id,
            client_secret=Secret(self.new_secret),
            source="operator",
        )

    def _verify(self, hold: TokenHold, store: VaultStore | None) -> None:
        """Obtain a token with the new credentials (spends the refresh token, if any)."""
        assert self.new is not None
        try:
            self.verified = hold.request_token(self.new)
        except ReauthorizationRequired as exc:
            if hold.grant == "refresh_token" and not isinstance(exc, CredentialsRejected):
                # The refresh token was refused or its fate is unknown: the token row
                # must say so, as a refresh would have.
                hold.record_failure(exc)
            raise

    def _store(self, hold: TokenHold, store: VaultStore | None) -> None:
        """Write the new credentials to Vault (a new KV version), or count a database rotation."""
        assert self.new is not None
        if store is None:
            self.version = (hold.snapshot.credential_version or 0) + 1
            return
        self.version = store.write_credentials(
            hold.provider.name,
            self.new,
            base=self.base,
            extra={
                "rotated_at": hold.now().isoformat(),
                "rotated_by": self.actor,
                "source": self.new.source,
            },
        )

    def _switch(self, hold: TokenHold, store: VaultStore | None) -> None:
        """Record the new credentials and the verified token in the row: in use from now on."""
        assert self.new is not None
        assert self.verified is not None
        name = hold.provider.name
        r = self.result = RotationResult(
            provider=name,
            client_id=self.new.client_id,
            source=self.new.source,
            stored_in="vault" if store is not None else "database",
            version=self.version,
            previous_version=self.previous_version,
            location=store.location(name) if store is not None else None,
            token_expires_at=self.verified.expires_at,
            previous_secret_valid_until=self.previous_valid_until,
        )
        hold.commit(
            self.verified,
            switch_to=ClientCredentials(
                r.client_id, self.new.client_secret, source=r.stored_in, version=r.version
            ),
            audit={
                "action": "credentials.rotated",
                "provider": name,
                "actor": self.actor,
                "subject_type": "credentials",
                "subject_id": name,
                "details": {
                    "client_id": r.client_id,
                    "source": r.source,
                    "stored_in": r.stored_in,
                    "location": r.location,
                    "credential_version": r.version,
                    "previous_version": r.previous_version,
                },
            },
        )

    def _failed(self, hold: TokenHold, exc: BaseException) -> CredentialRotationError:
        """Audit, count and log the failure; keep a token the verification obtained."""
        p = hold.provider
        message = self._failure_message(exc)
        hold.metrics.credential_rotations.labels(p.name, f"{self.step}_failed").inc()
        _log.error(
            "idis.auth.rotation_failed",
            msg="credential rotation failed; the credentials in use are unchanged",
            provider=p.name,
            step=self.step,
            error=message,
            actor=self.actor,
        )
        try:
            hold.audit(
                {
                    "action": "credentials.rotation_failed",
                    "provider": p.name,
                    "actor": self.actor,
                    "subject_type": "credentials",
                    "subject_id": p.name,
                    "outcome": "failed",
                    "details": {"step": self.step, "error_type": type(exc).__name__},
                    "message": message,
                }
            )
        except IntegrationError as audit_exc:
            _log.error(
                "idis.auth.audit_failed",
                msg="could not audit the failed rotation",
                provider=p.name,
                error=str(audit_exc),
            )
        if self.verified is not None and self.step == "store" and hold.grant == "refresh_token":
            # The verification refresh rotated the refresh token: keep it.
            hold.commit(self.verified)
        return CredentialRotationError(
            message, provider=p.name, step=self.step, retry_later=_retry_later(exc)
        )

    def _failure_message(self, exc: BaseException) -> str:
        grace = ""
        if self.new is not None and self.new.source == "rotation_api":
            until = self.previous_valid_until or "the provider's grace period ends"
            grace = (
                f" The provider already issued a new secret; the current one stays valid until "
                f"{until}: run the rotation again before then."
            )
        return (
            f"credential rotation for {self.provider!r} failed at step {self.step!r}: "
            f"{_STEP_MEANING[self.step]}: {redact_text(str(exc))}. The credentials in use are "
            f"unchanged.{grace}"
        )


def _retry_later(exc: BaseException) -> bool:
    """Whether the same rotation may work later (a dependency was unreachable)."""
    transient = (ProviderError, SecretStoreError, StorageError, TokenLockTimeout)
    return isinstance(exc, transient) and isinstance(exc, IntegrationError) and exc.retryable


def _call_rotation_api(
    hold: TokenHold, current: ClientCredentials | None
) -> tuple[ClientCredentials, str | None]:
    """POST the provider's rotation API once (never retried: each call mints a secret)."""
    from ..resilience._errors import error_for_status

    p = hold.provider
    assert p.auth.rotation_url is not None
    if current is None or not current.client_secret:
        raise AuthError(
            f"provider {p.name!r} has no current client secret to authenticate the rotation "
            "API with: supply the new secret instead (the CLI reads it from stdin)",
            provider=p.name,
        )
    response = hold.post(
        resolve_url(p.base_url, p.auth.rotation_url),
        headers={
            "Authorization": basic_authorization(
                current.client_id, current.client_secret.get_secret_value()
            ),
            "Accept": "application/json",
        },
    )
    if response.status_code == 401:
        raise CredentialsRejected(
            f"{p.name} rotation API rejected the current client credentials (HTTP 401)",
            provider=p.name,
        )
    error = error_for_status(response.status_code, p.name, "rotate")
    if error is not None:
        raise error
    document = json_object(response.content)
    secret = document.get("client_secret") if document is not None else None
    if not isinstance(secret, str) or not secret or document is None:
        raise AuthError(
            f"{p.name} rotation API answered {response.status_code} without a client_secret",
            provider=p.name,
        )
    client_id = document.get("client_id")
    until = document.get("previous_secret_valid_until")
    new = ClientCredentials(
        client_id=client_id if isinstance(client_id, str) and client_id else current.client_id,
        client_secret=Secret(secret),
        source="rotation_api",
    )
    return new, until if isinstance(until, str) else None
