"""Provider client credentials in Vault (or OpenBao) KV version 2, through hvac.

Layout: one secret per provider at ``<mount>/<path_prefix>/<provider>``
(``secret/idis/integrations/crm_provider`` by default) holding ``client_id``,
``client_secret`` and who rotated it when. Other fields an operator keeps in
the same secret are preserved: a write reads the current version, merges, and
writes with check-and-set against the version it read, so a concurrent writer
makes the write retry (when it only touched other fields) or fail naming the
conflict, never clobber. Older versions stay for rollback.

**Vault auth that lasts.** With AppRole (``VAULT_ROLE_ID``/``VAULT_SECRET_ID``)
the store logs in, remembers the token's lease, renews a renewable token once
two thirds of its lease have passed (as Vault Agent does), and logs in again
when renewal is not possible (not renewable, past its max TTL, or already
expired). A static ``VAULT_TOKEN`` is renewed the same way when it is
renewable, but cannot be replaced. Vault answers 403 both to an expired or
revoked token and to a policy that does not grant the operation; the store
tells them apart with ``auth/token/lookup-self`` (which the default policy
allows): after a 403 with a dead token it logs in again once and repeats the
operation, and the error says which it was.

**No redirects to another origin.** hvac follows redirects through requests,
and requests drops only ``Authorization`` when the host changes, never
``X-Vault-Token`` (nor the request body, e.g. a new client secret). Redirects
to another scheme, host or port are refused before anything is sent there;
same-origin redirects (a path change on the same server) are followed. An HA
cluster whose standbys redirect clients to the active node needs ``VAULT_ADDR``
to point at the active node or a load balancer (request forwarding, Vault's
default, never redirects).

Every hvac or transport error becomes :class:`SecretStoreError` (unreachable,
sealed: retry later) or :class:`SecretStoreRefused` (Vault said no: final),
naming the address, the path and what to do, never the Vault token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from .._clock import Clock, system_clock
from ..config import Secret, VaultSettings
from ..exceptions import ConfigError, SecretStoreError, SecretStoreRefused
from ..observability._logs import get_logger, redact_text

__all__ = ["OWNED_FIELDS", "ClientCredentials", "VaultStore"]

_log = get_logger()
_T = TypeVar("_T")

#: Fields of the KV secret the library writes; any other field belongs to someone else.
OWNED_FIELDS = ("client_id", "client_secret", "rotated_at", "rotated_by", "source")
#: Renew (or log in again) once this fraction of the token's lease is left.
_RENEW_WHEN_LEFT = 1 / 3
#: Vault reports TTLs in whole seconds from its own clock: count a lease as this
#: much shorter than it says, so renewal is never late.
_LEASE_SLACK = 1.0
#: Read-merge-write rounds when only fields we do not own changed in between.
_WRITE_ATTEMPTS = 3


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


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _cross_origin_session(addr: str) -> Any:
    """A requests Session that refuses to follow a redirect to another origin.

    ``get_redirect_target`` runs before requests builds the redirected request,
    so nothing (no token, no body) reaches the other origin.
    """
    import requests

    class CrossOriginRedirect(requests.exceptions.RequestException):
        """Vault redirected to another origin; the redirect was not followed."""

    class SameOriginSession(requests.Session):
        def get_redirect_target(self, resp: requests.Response) -> str | None:
            target = super().get_redirect_target(resp)
            if target is None:
                return None
            absolute = urljoin(resp.url, target)
            if _origin(absolute) != _origin(addr):
                scheme, host, port = _origin(absolute)
                # requests reads and releases a response only when it follows it;
                # one left open keeps its socket out of the pool until the GC finds it.
                resp.close()
                raise CrossOriginRedirect(f"{scheme}://{host}:{port}")
            return target

    session = SameOriginSession()
    session.trust_env = False  # no .netrc credentials or proxies picked up from the environment
    return session


class VaultStore:
    """Read and write provider credentials in Vault KV v2 (thread-safe).

    Args:
        settings: ``VAULT_ADDR`` and friends.
        client: An ``hvac.Client`` to use instead of building one (tests).
        clock: Time for the token's lease (real time: Vault's TTLs are wall time).

    Raises:
        ConfigError: when ``VAULT_ADDR`` is not set, or neither a token nor
            AppRole credentials are.
    """

    def __init__(
        self, settings: VaultSettings, *, client: Any = None, clock: Clock | None = None
    ) -> None:
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
        # A client handed in belongs to the caller, who closes it.
        self._owns_client = client is None
        self._clock = clock or system_clock
        self._lock = threading.RLock()
        #: Monotonic time the token's lease ends; None: unknown or never.
        self._expires: float | None = None
        self._lease = 0.0
        self._renewable = False

    def close(self) -> None:
        """Close the HTTP session of the client this store built (idempotent).

        The session pools connections to Vault; left to the garbage collector,
        each open socket is reported as a ResourceWarning.
        """
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.adapter.close()

    def __repr__(self) -> str:
        return f"VaultStore(addr={self.settings.addr!r}, mount={self.settings.mount!r})"

    # ------------------------------------------------------------------ plumbing

    def path(self, provider: str) -> str:
        """The KV path (under the mount) of a provider's credentials."""
        prefix = self.settings.path_prefix.strip("/")
        return f"{prefix}/{provider}" if prefix else provider

    def location(self, provider: str) -> str:
        """``<mount>/<path>``, as an operator would type it in ``bao kv get``."""
        return f"{self.settings.mount}/{self.path(provider)}"

    @property
    def _approle(self) -> bool:
        return self.settings.token is None and bool(self.settings.role_id)

    def _hvac(self) -> Any:
        with self._lock:
            if self._client is None:
                import hvac

                client = hvac.Client(
                    url=self.settings.addr,
                    token=self.settings.token.get_secret_value() if self.settings.token else None,
                    namespace=self.settings.namespace or None,
                    timeout=self.settings.timeout,
                    session=_cross_origin_session(self.settings.addr),
                )
                if self._approle:
                    self._login(client)
                else:
                    self._learn_lease(client)
                self._client = client
            else:
                self._keep_alive(self._client)
            return self._client

    def _login(self, client: Any) -> None:
        """Log in with AppRole (the token is set on ``client``)."""
        import hvac.exceptions as vexc

        where = "auth/approle/login"
        started = self._clock.monotonic()
        try:
            with self._errors("log in with AppRole to", where):
                secret_id = self.settings.secret_id
                answer = client.auth.approle.login(
                    role_id=self.settings.role_id,
                    secret_id=secret_id.get_secret_value() if secret_id else None,
                )
        except (SecretStoreRefused, vexc.Forbidden) as exc:  # _errors lets a 403 through
            raise SecretStoreRefused(
                f"Vault at {self.settings.addr} refused the AppRole login "
                f"({getattr(exc, 'reason', 'denied')}): check VAULT_ROLE_ID and VAULT_SECRET_ID "
                "(the secret id may have expired or been used up)",
                reason="login_failed",
            ) from None
        self._set_lease(answer.get("auth") if isinstance(answer, dict) else None, started)
        _log.info(
            "idis.auth.vault_login",
            msg="logged in to Vault with AppRole",
            vault=self.settings.addr,
            token_ttl=round(self._lease),
            renewable=self._renewable,
        )

    def _learn_lease(self, client: Any) -> None:
        """Read a static token's lease (TTL, renewable) so it can be renewed in time."""
        started = self._clock.monotonic()
        # lookup-self not allowed or Vault down: {} and the operation will say.
        data = self._quietly(client.auth.token.lookup_self).get("data")
        if isinstance(data, dict):
            self._set_lease(
                {"lease_duration": data.get("ttl"), "renewable": data.get("renewable")}, started
            )

    @staticmethod
    def _quietly(call: Callable[[], Any]) -> dict[str, Any]:
        """``call()``'s answer; {} when Vault refused, failed or could not be reached."""
        import hvac.exceptions as vexc
        import requests

        try:
            answer = call()
        except (vexc.VaultError, requests.exceptions.RequestException):
            return {}
        return answer if isinstance(answer, dict) else {}

    def _set_lease(self, auth: Mapping[str, Any] | None, started: float) -> None:
        """Remember a lease Vault granted in an answer to a request sent at ``started``."""
        lease = (auth or {}).get("lease_duration")
        self._renewable = bool((auth or {}).get("renewable"))
        if isinstance(lease, int | float) and lease > 0:
            self._lease = float(lease)
            self._expires = started + float(lease) - _LEASE_SLACK
        else:
            self._lease, self._expires = 0.0, None  # root or periodic without TTL: never expires

    def _keep_alive(self, client: Any) -> None:
        """Renew the token, or log in again, once two thirds of its lease have passed."""
        if self._expires is None:
            return
        left = self._expires - self._clock.monotonic()
        if left > self._lease * _RENEW_WHEN_LEFT:
            return
        if self._renewable and left > 0:
            started = self._clock.monotonic()
            auth = self._quietly(client.auth.token.renew_self).get("auth")
            lease = (auth or {}).get("lease_duration")
            # A renewal capped by the token's max TTL buys little: log in again instead.
            if isinstance(lease, int | float) and lease > self._lease * _RENEW_WHEN_LEFT:
                self._set_lease(auth, started)
                _log.info(
                    "idis.auth.vault_token_renewed",
                    msg="Vault token renewed",
                    vault=self.settings.addr,
                    token_ttl=round(self._lease),
                )
                return
        if self._approle:
            self._login(client)

    def _call(self, action: str, where: str, operation: Callable[[Any], _T]) -> _T:
        """Run ``operation(client)``; a 403 with a dead token logs in again once, then repeats."""
        import hvac.exceptions as vexc

        with self._lock:
            client = self._hvac()
        for attempt in (1, 2):
            with self._errors(action, where):
                try:
                    return operation(client)
                except vexc.Forbidden:
                    pass
            # 403: a policy that does not grant it, or a token that expired or was revoked.
            if self._token_alive(client):
                raise SecretStoreRefused(
                    f"Vault at {self.settings.addr} denied permission to {action} {where}: the "
                    f"token is valid but its policy must grant read, create and update on "
                    f"{self._data_path(where)}",
                    reason="denied",
                )
            if not self._approle or attempt == 2:
                what = "the AppRole token" if self._approle else "VAULT_TOKEN"
                raise SecretStoreRefused(
                    f"Vault at {self.settings.addr} rejected {what} while trying to {action} "
                    f"{where}: it expired or was revoked"
                    + (
                        " and could not be renewed: set a new VAULT_TOKEN (or use AppRole, "
                        "which the library logs in with again by itself)"
                        if not self._approle
                        else " right after a new login: check the AppRole's token policies"
                    ),
                    reason="token_expired",
                )
            _log.warning(
                "idis.auth.vault_relogin",
                msg="Vault token expired or revoked; logging in with AppRole again",
                vault=self.settings.addr,
            )
            with self._lock:
                self._login(client)
        raise AssertionError("unreachable")  # pragma: no cover  # the loop returns or raises

    def _token_alive(self, client: Any) -> bool:
        """Whether the token still works (``lookup-self``, allowed by the default policy)."""
        import hvac.exceptions as vexc

        with self._errors("look up its token at", "auth/token/lookup-self"):
            try:
                client.auth.token.lookup_self()
            except (vexc.Forbidden, vexc.Unauthorized):
                return False
        return True

    @contextmanager
    def _errors(self, action: str, where: str) -> Iterator[None]:
        """Translate hvac and transport errors (never naming the token); 403 passes through."""
        import hvac.exceptions as vexc
        import requests

        addr = self.settings.addr or "Vault"
        try:
            yield
        except vexc.Unauthorized:
            raise SecretStoreRefused(
                f"Vault at {addr} rejected the token while trying to {action} {where}: it is "
                "missing, expired or revoked (check VAULT_TOKEN or the AppRole)",
                reason="token_expired",
            ) from None
        except vexc.InvalidPath:
            raise SecretStoreRefused(
                f"Vault at {addr} has no secret at {where} (or the KV v2 mount "
                f"{self.settings.mount!r} does not exist)",
                reason="missing",
            ) from None
        except vexc.InvalidRequest as exc:
            detail = redact_text(", ".join(exc.errors or []) or "invalid request")
            if "check-and-set" in detail:
                raise SecretStoreRefused(
                    f"Vault at {addr}: {where} changed while we were writing it (another "
                    "writer); nothing was written",
                    reason="conflict",
                ) from None
            raise SecretStoreRefused(
                f"Vault at {addr} refused to {action} {where}: {detail}", reason="denied"
            ) from None
        except vexc.Forbidden:
            raise
        except vexc.VaultError as exc:
            raise SecretStoreError(
                f"Vault at {addr} failed to {action} {where} ({type(exc).__name__}): "
                "it may be sealed, down or overloaded; retry later"
            ) from None
        except requests.exceptions.RequestException as exc:
            if type(exc).__name__ == "CrossOriginRedirect":
                raise SecretStoreRefused(
                    f"Vault at {addr} redirected the request to {action} {where} to another "
                    f"origin ({exc}): refused, nothing was sent there (the token and the body "
                    "stay here). Point VAULT_ADDR at the active node or a load balancer",
                    reason="redirect",
                ) from None
            raise SecretStoreError(
                f"Vault at {addr} is unreachable ({type(exc).__name__}) while trying to "
                f"{action} {where}"
            ) from None

    def _data_path(self, where: str) -> str:
        """The API path a policy names for ``where`` (``<mount>/data/<path>`` under the mount)."""
        mount = self.settings.mount
        if where.startswith(mount + "/"):
            return f"{mount}/data/{where[len(mount) + 1 :]}"
        return where

    # ------------------------------------------------------------------ API

    def read_secret(self, provider: str, version: int | None = None) -> tuple[dict[str, Any], int]:
        """Return a provider's secret data and its KV version.

        Raises:
            SecretStoreRefused: denied, token dead, or no such secret/version.
            SecretStoreError: unreachable or sealed.
        """
        location = self.location(provider)
        response = self._call(
            "read",
            location,
            lambda client: client.secrets.kv.v2.read_secret_version(
                path=self.path(provider),
                version=version,
                mount_point=self.settings.mount,
                raise_on_deleted_version=True,
            ),
        )
        if not isinstance(response, dict):
            raise SecretStoreError(
                f"Vault at {self.settings.addr} answered the read of {location} with HTTP "
                f"{getattr(response, 'status_code', '?')} and no secret"
            )
        data = response.get("data") or {}
        return dict(data.get("data") or {}), int((data.get("metadata") or {}).get("version", 0))

    def current(self, provider: str) -> tuple[dict[str, Any], int]:
        """The provider's secret data and version; ``({}, 0)`` when it was never written."""
        try:
            return self.read_secret(provider)
        except SecretStoreRefused as exc:
            if exc.reason == "missing":
                return {}, 0
            raise

    def current_version(self, provider: str) -> int | None:
        """The newest KV version of a provider's secret, or None when it was never written."""
        return self.current(provider)[1] or None

    def writable(self, provider: str) -> bool | None:
        """Whether the token may write the provider's secret (None: Vault would not say).

        Asked before a rotation API hands out a new secret, so that a policy
        without write access fails the rotation before anything changed.
        """
        data_path = self._data_path(self.location(provider))
        try:
            answer = self._call(
                "check capabilities on",
                self.location(provider),
                lambda client: client.sys.get_capabilities(paths=[data_path]),
            )
        except SecretStoreRefused as exc:
            if exc.reason in ("token_expired", "login_failed", "redirect"):
                raise
            return None  # capabilities-self denied or unsupported: find out on write
        if not isinstance(answer, dict):
            return None
        capabilities = answer.get(data_path) or answer.get("capabilities") or []
        if not isinstance(capabilities, list):
            return None
        granted = set(capabilities)
        return bool(granted & {"root", "sudo"}) or {"create", "update"} <= granted

    def read_credentials(self, provider: str, version: int | None = None) -> ClientCredentials:
        """Read a provider's client credentials (the newest version unless ``version``).

        Raises:
            SecretStoreRefused: denied, token dead, missing, or without ``client_secret``.
            SecretStoreError: unreachable or sealed.
        """
        data, found = self.read_secret(provider, version)
        secret = data.get("client_secret")
        if not isinstance(secret, str) or not secret:
            raise SecretStoreRefused(
                f"Vault secret {self.location(provider)} (version {found}) has no client_secret "
                "field: expected client_id and client_secret",
                reason="missing",
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
        base: tuple[Mapping[str, Any], int] | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> int:
        """Write a new KV version of a provider's credentials, keeping fields we do not own.

        Reads the current version, merges ``client_id``, ``client_secret`` and
        ``extra`` into it, and writes with check-and-set against the version
        read. If another writer got in between and changed only fields we do
        not own, it merges again (a few times); if it changed the credentials
        themselves (compared with ``base``), it refuses.

        Args:
            provider: Provider name.
            credentials: The credentials to store.
            base: The secret data and version the caller decided on (rotation's
                prepare step); None: whatever is current.
            extra: Non-secret annotations stored beside them (rotated_at, rotated_by).

        Returns:
            The KV version written.

        Raises:
            SecretStoreRefused: denied, token dead, a conflicting writer
                (``reason="conflict"``: nothing was written), or Vault answered
                without a version (``no_version``: not trusted as written).
            SecretStoreError: unreachable or sealed.
        """
        location = self.location(provider)
        for _ in range(_WRITE_ATTEMPTS):
            data, version = self.current(provider)
            if base is not None and version != base[1]:
                changed = [
                    f for f in ("client_id", "client_secret") if data.get(f) != base[0].get(f)
                ]
                if changed:
                    raise SecretStoreRefused(
                        f"Vault secret {location} changed while rotating: version {version} "
                        f"(expected {base[1]}) has another {' and '.join(changed)}; nothing was "
                        "written. Someone else rotated it: check `bao kv metadata get "
                        f"{location}` before running the rotation again",
                        reason="conflict",
                    )
            payload = {
                **data,
                **dict(extra or {}),
                "client_id": credentials.client_id,
                "client_secret": credentials.client_secret.get_secret_value(),
            }
            try:
                response = self._call(
                    "write", location, _kv_write(self, provider, payload, version)
                )
            except SecretStoreRefused as exc:
                if exc.reason == "conflict":
                    continue  # someone wrote between our read and our write: merge again
                raise
            written = ((response if isinstance(response, dict) else {}).get("data") or {}).get(
                "version"
            )
            if not isinstance(written, int) or written <= version:
                raise SecretStoreRefused(
                    f"Vault at {self.settings.addr} answered the write of {location} without "
                    "a new version: it is not trusted as written (check the secret's versions)",
                    reason="no_version",
                )
            _log.info(
                "idis.auth.vault_written",
                msg="credentials written to Vault",
                provider=provider,
                location=location,
                credential_version=written,
                kept_fields=sorted(set(data) - set(OWNED_FIELDS)),
            )
            return written
        raise SecretStoreRefused(
            f"Vault secret {location} kept changing while we wrote it ({_WRITE_ATTEMPTS} "
            "check-and-set conflicts): nothing was written; retry when the other writer is done",
            reason="conflict",
        )


def _kv_write(
    store: VaultStore, provider: str, payload: Mapping[str, Any], cas: int
) -> Callable[[Any], Any]:
    """The KV v2 write of ``payload`` with check-and-set ``cas``, as an operation for ``_call``."""

    def write(client: Any) -> Any:
        return client.secrets.kv.v2.create_or_update_secret(
            path=store.path(provider),
            secret=dict(payload),
            cas=cas,
            mount_point=store.settings.mount,
        )

    return write
