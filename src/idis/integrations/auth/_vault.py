"""Provider client credentials in Vault (or OpenBao) KV version 2, through hvac.

Layout: one secret per provider at ``<mount>/<path_prefix>/<provider>``
(``secret/idis/integrations/crm_provider`` by default) holding ``client_id``,
``client_secret`` and who rotated it when. Every write is a new KV version
(check-and-set against the version read, so two rotations cannot silently
overwrite each other); older versions stay for rollback.

A token whose policy grants ``read``, ``create`` and ``update`` on
``<mount>/data/<path_prefix>/<provider>`` is all the library needs.

Every hvac or transport error becomes :class:`SecretStoreError` naming the
address, the path and what to do, never the Vault token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import Secret, VaultSettings
from ..exceptions import ConfigError, SecretStoreError
from ..observability._logs import get_logger, redact_text

__all__ = ["ClientCredentials", "VaultStore"]

_log = get_logger()


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """A provider's OAuth client credentials; the secret never prints."""

    #: OAuth client id (not a secret).
    client_id: str
    #: OAuth client secret.
    client_secret: Secret
    #: Where they came from: ``settings``, ``vault`` or ``database``.
    source: str = "settings"
    #: KV version (Vault) or rotation counter (database); None for settings.
    version: int | None = None


class VaultStore:
    """Read and write provider credentials in Vault KV v2 (thread-safe).

    Args:
        settings: ``VAULT_ADDR`` and friends.
        client: An ``hvac.Client`` to use instead of building one (tests).

    Raises:
        ConfigError: when ``VAULT_ADDR`` is not set, or neither a token nor
            AppRole credentials are.
    """

    def __init__(self, settings: VaultSettings, *, client: Any = None) -> None:
        if not settings.addr and client is None:
            raise ConfigError(
                "VAULT_ADDR is not set: Vault is needed to read or store credentials "
                "(set VAULT_ADDR and VAULT_TOKEN, or VAULT_ROLE_ID and VAULT_SECRET_ID)",
                variable="VAULT_ADDR",
            )
        if client is None and settings.token is None and not settings.role_id:
            raise ConfigError(
                "VAULT_TOKEN is not set and no AppRole is configured: set VAULT_TOKEN, or "
                "VAULT_ROLE_ID and VAULT_SECRET_ID",
                variable="VAULT_TOKEN",
            )
        self.settings = settings
        self._client = client
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def path(self, provider: str) -> str:
        """The KV path (under the mount) of a provider's credentials."""
        prefix = self.settings.path_prefix.strip("/")
        return f"{prefix}/{provider}" if prefix else provider

    def location(self, provider: str) -> str:
        """``<mount>/<path>``, as an operator would type it in ``bao kv get``."""
        return f"{self.settings.mount}/{self.path(provider)}"

    def _connect(self) -> Any:
        import hvac

        client = hvac.Client(
            url=self.settings.addr,
            token=self.settings.token.get_secret_value() if self.settings.token else None,
            namespace=self.settings.namespace or None,
            timeout=self.settings.timeout,
        )
        if self.settings.token is None and self.settings.role_id:
            with self._errors("log in with AppRole to", "auth/approle"):
                client.auth.approle.login(
                    role_id=self.settings.role_id,
                    secret_id=(
                        self.settings.secret_id.get_secret_value()
                        if self.settings.secret_id
                        else None
                    ),
                )
        return client

    def _hvac(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    @contextmanager
    def _errors(self, action: str, where: str) -> Iterator[None]:
        """Translate hvac and transport errors into SecretStoreError (never naming the token)."""
        import hvac.exceptions as vexc
        import requests

        addr = self.settings.addr or "Vault"
        try:
            yield
        except vexc.Forbidden:
            raise SecretStoreError(
                f"Vault at {addr} denied permission to {action} {where}: the token's policy "
                f"must grant read, create and update on {self._data_path(where)}"
            ) from None
        except vexc.Unauthorized:
            raise SecretStoreError(
                f"Vault at {addr} rejected the token while trying to {action} {where}: it is "
                "missing, expired or revoked (check VAULT_TOKEN or the AppRole)"
            ) from None
        except vexc.InvalidPath:
            raise SecretStoreError(
                f"Vault at {addr} has no secret at {where} (or the KV v2 mount "
                f"{self.settings.mount!r} does not exist)"
            ) from None
        except vexc.InvalidRequest as exc:
            detail = redact_text(", ".join(exc.errors or []) or "invalid request")
            if "check-and-set" in detail:
                raise SecretStoreError(
                    f"Vault at {addr}: {where} changed while we were writing it (another "
                    "rotation?); nothing was written, read it again and retry"
                ) from None
            raise SecretStoreError(
                f"Vault at {addr} refused to {action} {where}: {detail}"
            ) from None
        except vexc.VaultError as exc:
            raise SecretStoreError(
                f"Vault at {addr} failed to {action} {where} ({type(exc).__name__}): "
                "it may be sealed, down or overloaded; retry later"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise SecretStoreError(
                f"Vault at {addr} is unreachable ({type(exc).__name__}) while trying to "
                f"{action} {where}"
            ) from None

    def _data_path(self, where: str) -> str:
        mount = self.settings.mount
        if where.startswith(mount + "/"):
            return f"{mount}/data/{where[len(mount) + 1 :]}"
        return where

    # ------------------------------------------------------------------ API

    def read_secret(self, provider: str, version: int | None = None) -> tuple[dict[str, Any], int]:
        """Return a provider's secret data and its KV version.

        Raises:
            SecretStoreError: unreachable, denied, or no such secret/version.
        """
        client = self._hvac()
        with self._errors("read", self.location(provider)):
            response = client.secrets.kv.v2.read_secret_version(
                path=self.path(provider),
                version=version,
                mount_point=self.settings.mount,
                raise_on_deleted_version=True,
            )
        data = response.get("data") or {}
        return dict(data.get("data") or {}), int((data.get("metadata") or {}).get("version", 0))

    def current_version(self, provider: str) -> int | None:
        """The newest KV version of a provider's secret, or None when it was never written."""
        try:
            return self.read_secret(provider)[1]
        except SecretStoreError as exc:
            if "has no secret" in str(exc):
                return None
            raise

    def writable(self, provider: str) -> bool | None:
        """Whether the token may write the provider's secret (None: Vault would not say).

        Asked before a rotation API hands out a new secret, so that a policy
        without write access fails the rotation before anything changed.
        """
        client = self._hvac()
        data_path = f"{self.settings.mount}/data/{self.path(provider)}"
        try:
            with self._errors("check capabilities on", self.location(provider)):
                answer = client.sys.get_capabilities(paths=[data_path])
        except SecretStoreError:
            return None  # capabilities-self denied or unsupported: find out on write
        capabilities = answer.get(data_path) or answer.get("capabilities") or []
        if not isinstance(capabilities, list):
            return None
        granted = set(capabilities)
        return bool(granted & {"root", "sudo"}) or {"create", "update"} <= granted

    def read_credentials(self, provider: str, version: int | None = None) -> ClientCredentials:
        """Read a provider's client credentials (the newest version unless ``version``).

        Raises:
            SecretStoreError: unreachable, denied, missing, or without ``client_secret``.
        """
        data, found = self.read_secret(provider, version)
        secret = data.get("client_secret")
        if not isinstance(secret, str) or not secret:
            raise SecretStoreError(
                f"Vault secret {self.location(provider)} (version {found}) has no client_secret "
                "field: expected client_id and client_secret"
            )
        return ClientCredentials(
            client_id=str(data.get("client_id") or ""),
            client_secret=Secret(secret),
            source="vault",
            version=found,
        )

    def write_credentials(
        self,
        provider: str,
        credentials: ClientCredentials,
        *,
        cas: int | None,
        extra: Mapping[str, str] | None = None,
    ) -> int:
        """Write a new KV version of a provider's credentials and return its number.

        Args:
            provider: Provider name.
            credentials: The credentials to store.
            cas: The version the caller read (0 when none existed); the write fails
                if someone wrote in between. None disables the check.
            extra: Non-secret annotations stored beside them (rotated_at, rotated_by).

        Raises:
            SecretStoreError: unreachable, denied, or the check-and-set failed.
        """
        client = self._hvac()
        payload = {
            **dict(extra or {}),
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret.get_secret_value(),
        }
        with self._errors("write", self.location(provider)):
            response = client.secrets.kv.v2.create_or_update_secret(
                path=self.path(provider),
                secret=payload,
                cas=cas,
                mount_point=self.settings.mount,
            )
        version = int(((response or {}).get("data") or {}).get("version", 0))
        _log.info(
            "idis.auth.vault_written",
            msg="credentials written to Vault",
            provider=provider,
            location=self.location(provider),
            credential_version=version,
        )
        return version
