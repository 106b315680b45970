"""The token flow: hand out, refresh and import OAuth tokens, written once for both managers.

Every step of getting a token lives here, as generators that yield the I/O
they need (:mod:`idis.integrations._flow`): lock and read the provider's row,
read Vault, send a token request, sleep between attempts, write the row. The
sync :class:`~.TokenManager` drives them with :func:`drive`, the asyncio
:class:`~.AsyncTokenManager` with :func:`adrive`; the order of the steps and
the error handling exist once. Only the single-flight lock has two bodies: a
``threading.Lock`` or an ``asyncio.Lock`` per provider, taken by the manager
before it starts the flow, and the PostgreSQL row lock, whose connection
lifecycle the sync and async stores implement (``_store.py``). This is the
split httpx documents for ``Auth``: one ``auth_flow``, and separate
``sync_auth_flow``/``async_auth_flow`` only where a lock or I/O of its own is
needed.

One refresh, however many callers:

1. **in memory**: a token valid for more than ``refresh_margin`` is handed out
   with no lock and no I/O (the managers' fast path);
2. **in the process**: callers queue on the per-provider lock; the first one
   in does the work, the rest find the fresh token when they get in
   (:meth:`TokenCore.memory_decision`);
3. **across processes** (PostgreSQL): the one in the lead takes
   ``SELECT ... FOR UPDATE`` on the provider's ``oauth_tokens`` row, re-reads
   it, and refreshes only if no other replica already has.

A refresh whose answer is lost after the request went out is **not** sent
again with the same refresh token (unless the provider tolerates reuse for
``refresh_reuse_grace`` seconds): the provider may have rotated it, and
sending a rotated-out refresh token makes a provider with reuse protection
revoke the whole token family. The row's state becomes
``refresh_outcome_unknown`` instead; see docs/auth.md.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from .._clock import Clock
from .._flow import Awaited, Effect, Flow, Sleep, perform
from .._http import httpx
from ..config import ProviderSettings, Secret, Settings
from ..exceptions import (
    AuthError,
    ConfigError,
    CredentialsRejected,
    IntegrationError,
    ProviderError,
    ReauthorizationRequired,
    RefreshOutcomeUnknown,
    StorageError,
    TokenLockTimeout,
    TokenRequestRejected,
)
from ..observability._logs import get_logger, redact_text
from ..observability._metrics import Metrics, get_metrics
from ._crypto import TokenCipher
from ._grant import (
    REFRESH_FAILURE_BACKOFF,
    TOKEN_ENDPOINT,
    AccessToken,
    Action,
    IssuedToken,
    Mode,
    PreparedTokenRequest,
    build_token_request,
    decide,
    is_retryable,
    lost_answer,
    parse_token_response,
    retry_wait,
)
from ._store import AsyncTokenStore, RowHandle, RowSnapshot, SyncTokenStore
from ._vault import ClientCredentials, VaultStore

__all__ = [
    "OUTCOMES",
    "GrantType",
    "RefreshPlan",
    "TokenCore",
    "TokenIO",
    "import_flow",
    "obtain",
    "request_token",
    "request_with_credentials",
]

_log = get_logger()
GrantType = Literal["client_credentials", "refresh_token"]

#: ``token_refreshes_total{outcome}`` values.
OUTCOMES = (
    "ok",  # a new token was obtained
    "reused",  # another process/replica had refreshed: its token was adopted, no request made
    "failed",  # network fault, timeout, 5xx, 429 or malformed answer, after retries
    "outcome_unknown",  # a refresh's answer was lost; its refresh token may be spent
    "invalid_grant",  # the refresh token was refused: re-authorization required
    "invalid_client",  # the client credentials were refused
    "rejected",  # another 4xx from the token endpoint
    "lock_timeout",  # waited too long for another refresh
    "backoff",  # not attempted: earlier failures put refreshes on hold
)
#: ``token_reauthorization_required{reason}`` values.
REAUTHORIZATION_REASONS = ("invalid_grant", "invalid_client", "outcome_unknown")
#: A failed refresh's error class -> its outcome label and the row's new state (first match;
#: any other failure is ``failed``, ``refresh_failing``).
_FAILURES = (
    (RefreshOutcomeUnknown, "outcome_unknown", "refresh_outcome_unknown"),
    (CredentialsRejected, "invalid_client", "reauthorization_required"),
    (ReauthorizationRequired, "invalid_grant", "reauthorization_required"),
    (TokenRequestRejected, "rejected", "refresh_failing"),
)
#: Column of the row -> the field name its ciphertext is bound to.
SECRET_COLUMNS = {
    "access_token_enc": "access_token",
    "refresh_token_enc": "refresh_token",
    "client_secret_enc": "client_secret",
}


# --------------------------------------------------------------------------- I/O


@dataclass(slots=True)
class TokenIO:
    """What the token effects run against: a sync or an async set of clients."""

    clock: Clock
    #: :class:`SyncTokenStore` for the sync face, :class:`AsyncTokenStore` for the async one.
    store: SyncTokenStore | AsyncTokenStore
    #: ``httpx.Client`` or ``httpx.AsyncClient`` (no redirects, no keep-alive).
    http: Any
    #: The Vault store, built on first use.
    vault: Callable[[], VaultStore]


@dataclass(frozen=True, slots=True)
class OnStore(Awaited[Any]):
    """Call ``method`` of the face's token store: the sync and the async store share names.

    ``lock`` (read the row; on PostgreSQL lock it), ``write`` (commit, releasing
    the lock; False when the compare-and-set lost), ``release``, ``reread``.
    """

    method: str
    # The arguments hold row values (ciphertext): noise in a traceback, so not in ``repr``.
    args: tuple[Any, ...] = field(default=(), repr=False)
    kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def call(self, io: TokenIO) -> Any:
        """On the face's store (blocking, or async and awaited)."""
        return getattr(io.store, self.method)(*self.args, **self.kwargs)


def _lock(p: ProviderSettings) -> OnStore:
    return OnStore("lock", (p.name, p.auth.lock_timeout))


def _write(
    handle: RowHandle,
    values: Mapping[str, Any],
    expect_generation: int | None,
    audit: list[dict[str, Any]] | None = None,
) -> OnStore:
    kwargs = {"expect_generation": expect_generation, "audit": audit or []}
    return OnStore("write", (handle, values), kwargs)


@dataclass(frozen=True, slots=True)
class SendTokenRequest(Awaited[httpx.Response]):
    """POST a prepared token request with the provider's timeouts."""

    request: PreparedTokenRequest
    timeout: httpx.Timeout

    def call(self, io: TokenIO) -> Any:
        """``Client.post`` (``AsyncClient.post``, awaited)."""
        return io.http.post(
            self.request.url,
            content=self.request.body,
            headers=self.request.headers,
            timeout=self.timeout,
        )


@dataclass(frozen=True, slots=True)
class ReadVault(Effect[ClientCredentials]):
    """Read a provider's client credentials from Vault (hvac blocks: a thread under asyncio)."""

    provider: str

    def run(self, io: TokenIO) -> ClientCredentials:
        """In the calling thread."""
        return io.vault().read_credentials(self.provider)

    async def arun(self, io: TokenIO) -> ClientCredentials:
        """In a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(io.vault().read_credentials, self.provider)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """A refresh to make: the grant, the refresh token to send, and what to fall back on."""

    grant: GrantType
    #: Never in ``repr``: this object sits in tracebacks and debuggers.
    refresh_token: str | None = field(repr=False)
    #: The current token if it is still valid (ahead-of-expiry refresh): used if refresh fails.
    fallback: AccessToken | None


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A token obtained but not yet committed (the database failed right after)."""

    token: AccessToken
    #: The row's new values (ciphertexts: never in ``repr``).
    values: dict[str, Any] = field(repr=False)
    base_generation: int


class TokenCore:
    """What both managers share: settings, caches, and every decision and bookkeeping step.

    Thread-safe for what threads share (the caches are plain dict operations
    under the GIL; Vault is built once under a lock).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None,
        clock: Clock,
        vault: VaultStore | None,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.cipher = TokenCipher(settings.encryption_keys)
        self._metrics = metrics
        self.clock = clock
        #: Jitter of the waits between token requests and after failed refreshes: one
        #: seed gives one sequence (a drill, a test); None seeds it from the system.
        self.rng = random.Random(seed)  # noqa: S311  # jitter, not cryptography
        self._vault = vault
        # A store handed in belongs to the caller; one built here is closed by close().
        self._owns_vault = vault is None
        self.cache: dict[str, AccessToken] = {}
        self.pending: dict[str, PendingWrite] = {}
        self.vault_credentials: dict[str, ClientCredentials] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ lookups

    @property
    def metrics(self) -> Metrics:
        """The metrics to record into (the process-wide set unless one was given)."""
        return self._metrics if self._metrics is not None else get_metrics()

    def now(self) -> datetime:
        """The clock's current time."""
        return self.clock.now()

    def provider(self, name: str) -> ProviderSettings:
        """The provider's settings; it must use OAuth.

        Raises:
            UnknownProviderError: not configured.
            ConfigError: no OAuth, or a refresh-token grant without an encryption key.
        """
        provider = self.settings.provider(name)
        if provider.auth.grant == "none":
            raise ConfigError(
                f"provider {name!r} does not use OAuth (IDIS_PROVIDER_{name.upper()}_AUTH_GRANT="
                "none): expected client_credentials or refresh_token",
                variable=f"IDIS_PROVIDER_{name.upper()}_AUTH_GRANT",
            )
        if provider.auth.grant == "refresh_token":
            # A refresh token that cannot be persisted is lost on restart, or
            # worse, after the provider rotated it: refuse up front.
            self.cipher.require(f"refresh tokens of {name!r}")
        return provider

    def vault(self) -> VaultStore:
        """The Vault store (built from the settings on first use).

        Raises:
            ConfigError: Vault is not configured (names the variables to set).
        """
        with self._guard:
            if self._vault is None:
                self._vault = VaultStore(self.settings.vault, clock=self.clock)
            return self._vault

    def close(self) -> None:
        """Close the Vault store built by :meth:`vault`, if any."""
        with self._guard:
            vault, owned = self._vault, self._owns_vault
            if owned:
                self._vault = None
        if vault is not None and owned:
            vault.close()

    def fast(self, provider: str, margin: float) -> AccessToken | None:
        """The cached token if it is fresh (no lock, no I/O)."""
        token, now = self.cache.get(provider), self.now()
        if token is None or not token.is_fresh(now, margin):
            return None
        self.gauge(token, now)
        return token

    def gauge(self, token: AccessToken, now: datetime) -> None:
        """Export the seconds left on ``token``."""
        left = token.seconds_left(now)
        if left is not None:
            self.metrics.token_expiry.labels(token.provider).set(left)

    def count(self, provider: str, outcome: str) -> None:
        """Count a refresh outcome."""
        self.metrics.token_refreshes.labels(provider, outcome).inc()

    def count_error(self, provider: str, exc: BaseException) -> None:
        """Count a failed token request in ``integration_errors_total``."""
        error_type = exc.error_type if isinstance(exc, ProviderError) else "auth_error"
        self.metrics.errors.labels(provider, TOKEN_ENDPOINT, error_type).inc()

    def mark_stopped(self, provider: str, reason: str | None) -> None:
        """Set the re-authorization gauge: 1 for ``reason``, 0 for the others (None: all 0)."""
        gauge = self.metrics.token_reauthorization_required
        for each in REAUTHORIZATION_REASONS:
            gauge.labels(provider, each).set(1.0 if each == reason else 0.0)

    # ------------------------------------------------------------------ tokens from rows

    def decrypt(self, p: ProviderSettings, snap: RowSnapshot, column: str) -> str | None:
        """The plaintext of a ``*_enc`` column of ``snap`` (None when empty)."""
        ciphertext = getattr(snap, column)
        if not ciphertext:
            return None
        return self.cipher.decrypt(ciphertext, provider=p.name, field=SECRET_COLUMNS[column])

    def stored(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> tuple[AccessToken | None, str | None]:
        """The row's token and refresh token, decrypted (None where absent or unreadable)."""
        if not self.cipher.available:
            return None, None
        try:
            access = self.decrypt(p, snap, "access_token_enc")
            refresh = self.decrypt(p, snap, "refresh_token_enc")
        except AuthError:
            if p.auth.grant == "refresh_token":
                raise
            # A client_credentials token can simply be obtained again.
            _log.warning(
                "idis.auth.stored_token_unreadable",
                msg="stored token unreadable with IDIS_ENCRYPTION_KEYS; obtaining a new one",
                provider=p.name,
            )
            return None, None
        if access is None:
            return None, refresh
        token = AccessToken(
            provider=p.name,
            access_token=access,
            token_type=snap.token_type or "Bearer",
            expires_at=snap.expires_at,
            scopes=tuple(snap.scopes),
            generation=snap.generation,
            refresh_token=refresh,
            instance_url=snap.instance_url,
        )
        return token, refresh

    def candidate(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> tuple[AccessToken | None, str | None, bool]:
        """The newest known token, the refresh token to use, and whether it came from the row.

        The row wins when it is newer than memory: another process refreshed,
        and its refresh token is the only one still valid after a rotation.
        """
        memory = self.cache.get(p.name)
        stored, stored_refresh = self.stored(p, snap)
        if stored is not None and (memory is None or stored.generation > memory.generation):
            return stored, stored.refresh_token, True
        if memory is not None and memory.generation >= snap.generation:
            return memory, memory.refresh_token or stored_refresh, False
        return memory, stored_refresh, False

    def grant_for(self, p: ProviderSettings) -> GrantType:
        """The grant a refresh uses."""
        return "refresh_token" if p.auth.grant == "refresh_token" else "client_credentials"

    def credentials_plan(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> tuple[ClientCredentials | None, bool]:
        """Credentials known without I/O, or (None, True) when Vault must be read.

        Precedence: Vault when ``CREDENTIALS_FROM_VAULT`` is on (it is the source
        of truth: read at start, again when a rotation recorded a newer version);
        otherwise the encrypted copy a rotation left in the row; otherwise Vault
        if a rotation stored them only there; otherwise the settings.

        Raises:
            ConfigError: the credentials live somewhere this process cannot read
                (names the variables to set).
        """
        if p.auth.credentials_from_vault:
            wanted = snap.credential_version if snap.credential_source == "vault" else None
            return self._from_vault(p, snap, wanted)
        if snap.client_secret_enc:
            if not self.cipher.available:
                return self._from_vault(p, snap, snap.credential_version, copy_unreadable=True)
            secret = self.decrypt(p, snap, "client_secret_enc")
            return (
                ClientCredentials(
                    client_id=snap.client_id or p.auth.client_id,
                    client_secret=Secret(secret or ""),
                    source=snap.credential_source or "database",
                    version=snap.credential_version,
                ),
                False,
            )
        if snap.credential_source == "vault":
            return self._from_vault(p, snap, snap.credential_version)
        if p.auth.client_secret is None and self.grant_for(p) == "client_credentials":
            variable = f"IDIS_PROVIDER_{p.name.upper()}_CLIENT_SECRET"
            raise ConfigError(
                f"{variable} is not set: the client_credentials grant needs a client secret "
                f"(or set IDIS_PROVIDER_{p.name.upper()}_CREDENTIALS_FROM_VAULT=true)",
                variable=variable,
            )
        return (
            ClientCredentials(
                client_id=p.auth.client_id,
                client_secret=p.auth.client_secret or Secret(""),
                source="settings",
            ),
            False,
        )

    def _from_vault(
        self,
        p: ProviderSettings,
        snap: RowSnapshot,
        version: int | None,
        *,
        copy_unreadable: bool = False,
    ) -> tuple[ClientCredentials | None, bool]:
        """The cached Vault credentials if at least ``version``; else (None, True): read Vault."""
        cached = self.vault_credentials.get(p.name)
        if cached is not None and (cached.version or 0) >= (version or 0):
            return cached, False
        self._require_vault(p, snap, copy_unreadable=copy_unreadable)
        return None, True

    def _require_vault(
        self, p: ProviderSettings, snap: RowSnapshot, *, copy_unreadable: bool = False
    ) -> None:
        """Raise a ConfigError naming what to set when Vault holds the credentials but is unset.

        A service started without the Vault variables after a rotation into
        Vault must say so, in words, every time (not a bare ``ConfigError``).
        """
        vault = self.settings.vault
        if self._vault is not None or (vault.addr and (vault.token or vault.role_id)):
            return
        where = f"{vault.mount}/{vault.path_prefix.strip('/')}/{p.name}".replace("//", "/")
        if p.auth.credentials_from_vault:
            why = (
                f"IDIS_PROVIDER_{p.name.upper()}_CREDENTIALS_FROM_VAULT=true: the client "
                f"credentials of {p.name!r} are read from Vault ({where})"
            )
        else:
            version = f" version {snap.credential_version}" if snap.credential_version else ""
            why = (
                f"the client credentials of {p.name!r} were rotated into Vault "
                f"({where}{version}) and the settings' CLIENT_SECRET is no longer valid"
            )
        if copy_unreadable:
            why += (
                "; the encrypted copy in the token row needs IDIS_ENCRYPTION_KEYS, which is "
                "not set either"
            )
        missing = "VAULT_ADDR" if not vault.addr else "VAULT_TOKEN"
        raise ConfigError(
            f"{why}, but {missing} is not set: set VAULT_ADDR and VAULT_TOKEN (or VAULT_ROLE_ID "
            "and VAULT_SECRET_ID for AppRole)"
            + (" or IDIS_ENCRYPTION_KEYS" if copy_unreadable else ""),
            variable=missing,
        )

    def may_reread_vault(self, credentials: ClientCredentials | None) -> bool:
        """After invalid_client: whether reading Vault again might find newer credentials."""
        return (
            credentials is not None
            and credentials.source == "vault"
            and (self._vault is not None or bool(self.settings.vault.addr))
        )

    def remember_vault(
        self, p: ProviderSettings, credentials: ClientCredentials
    ) -> ClientCredentials:
        """Cache credentials read from Vault (with the configured client id if none was stored)."""
        if not credentials.client_id:
            credentials = replace(credentials, client_id=p.auth.client_id)
        self.vault_credentials[p.name] = credentials
        return credentials

    # ------------------------------------------------------------------ requests

    def timeout(self, p: ProviderSettings) -> httpx.Timeout:
        """The provider's connect/read/write/pool timeouts."""
        t = p.timeouts
        return httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)

    def parse(self, p: ProviderSettings, response: httpx.Response, grant: GrantType) -> IssuedToken:
        """Read a token endpoint's answer (see :func:`parse_token_response`)."""
        from ..resilience._policy import parse_retry_after

        now = self.now()
        retry_after = parse_retry_after(
            response.headers.get("Retry-After"), now=now, cap=p.retry.retry_after_cap
        )
        return parse_token_response(
            p.name,
            response.status_code,
            response.content,
            now=now,
            grant_type=grant,
            requested_scopes=p.auth.scopes,
            retry_after=retry_after,
        )

    def retry_delay(self, p: ProviderSettings, attempt: int, exc: BaseException) -> float:
        """Seconds before the next token request of this refresh (logged)."""
        delay = retry_wait(p.retry, attempt, exc, self.rng)
        _log.info(
            "idis.auth.token_retry",
            msg=f"token request failed, retrying in {delay:.2f}s",
            provider=p.name,
            attempt=attempt,
            error_type=getattr(exc, "error_type", type(exc).__name__),
        )
        return delay

    # ------------------------------------------------------------------ outcomes

    def success(
        self,
        p: ProviderSettings,
        snap: RowSnapshot,
        issued: IssuedToken,
        *,
        grant: GrantType,
        previous_refresh: str | None,
        mode: Mode,
    ) -> tuple[AccessToken, dict[str, Any], list[dict[str, Any]]]:
        """The new token, the row values that persist it, and the audit rows."""
        # client_credentials tokens are re-obtained, never refreshed: no refresh token kept.
        kept = previous_refresh if grant != "client_credentials" else None
        refresh = issued.refresh_token or kept
        token = AccessToken(
            provider=p.name,
            access_token=issued.access_token,
            token_type=issued.token_type,
            expires_at=issued.expires_at,
            scopes=issued.scopes,
            generation=snap.generation + 1,
            refresh_token=refresh,
            # Salesforce names it on every token response; keep the last one otherwise.
            instance_url=issued.instance_url or snap.instance_url,
        )
        now = issued.issued_at
        cipher, name = self.cipher, p.name
        values: dict[str, Any] = {
            "grant_type": grant,
            "state": "ok",
            "generation": token.generation,
            "token_type": token.token_type,
            # One UPDATE replaces the old refresh token with the rotated one: the old
            # one is never dropped before the new one is committed.
            "access_token_enc": cipher.encrypt_optional(
                token.access_token, provider=name, field="access_token"
            ),
            "refresh_token_enc": cipher.encrypt_optional(
                refresh, provider=name, field="refresh_token"
            ),
            "scopes": list(token.scopes),
            "instance_url": token.instance_url,
            "issued_at": now,
            "expires_at": token.expires_at,
            "last_refresh_at": now,
            "last_attempt_at": now,
            "last_outcome": "ok",
            "last_error": None,
            "consecutive_failures": 0,
            "next_attempt_at": None,
            "updated_at": now,
        }
        if snap.client_secret_enc and cipher.available:
            # Bind a copy written before values were bound, now that we hold the lock.
            secret = self.decrypt(p, snap, "client_secret_enc")
            values["client_secret_enc"] = cipher.encrypt_optional(
                secret, provider=name, field="client_secret"
            )
        audit = [
            {
                "action": "token.refreshed",
                "provider": p.name,
                "subject_type": "token",
                "subject_id": p.name,
                "details": {
                    "grant": grant,
                    "reason": mode,
                    "generation": token.generation,
                    "expires_at": token.expires_at.isoformat() if token.expires_at else None,
                    "refresh_rotated": issued.refresh_token is not None
                    and issued.refresh_token != previous_refresh,
                },
            }
        ]
        return token, values, audit

    def failure(
        self, p: ProviderSettings, snap: RowSnapshot, exc: BaseException
    ) -> tuple[str, dict[str, Any], list[dict[str, Any]], Exception]:
        """Outcome label, row values, audit rows and the error to raise for a failed refresh."""
        now = self.now()
        outcome, state = next(
            ((o, s) for kind, o, s in _FAILURES if isinstance(exc, kind)),
            ("failed", "refresh_failing"),
        )
        failures = snap.consecutive_failures + 1
        message = redact_text(str(exc))
        reauthorize = isinstance(exc, ReauthorizationRequired)
        delay = None if reauthorize else REFRESH_FAILURE_BACKOFF.delay(failures, self.rng)
        attempted = now
        if isinstance(exc, RefreshOutcomeUnknown) and exc.sent_at is not None:
            # The reuse grace counts from the request whose answer was lost.
            attempted = exc.sent_at
        values: dict[str, Any] = {
            "state": state,
            "last_attempt_at": attempted,
            "last_outcome": outcome,
            "last_error": message[:1000],
            "consecutive_failures": failures,
            "next_attempt_at": now + timedelta(seconds=delay) if delay is not None else None,
            "updated_at": now,
        }
        audit: list[dict[str, Any]] = []
        if snap.state != state:
            audit.append(
                {
                    "action": f"token.{state}",
                    "provider": p.name,
                    "subject_type": "token",
                    "subject_id": p.name,
                    "outcome": "failed",
                    "details": {"outcome": outcome, "consecutive_failures": failures},
                    "message": message,
                }
            )
        if isinstance(exc, AuthError):
            error: Exception = exc
        else:
            error = AuthError(
                f"token refresh for {p.name!r} failed: {message}; next automatic attempt in "
                f"{delay:.0f}s",
                provider=p.name,
            )
        return outcome, values, audit, error

    def after_success(
        self, p: ProviderSettings, token: AccessToken, *, mode: Mode, rotated: bool
    ) -> None:
        """Cache, count, export and log a new token."""
        now = self.now()
        self.cache[p.name] = token
        self.pending.pop(p.name, None)
        self.count(p.name, "ok")
        self.gauge(token, now)
        self.mark_stopped(p.name, None)
        left = token.seconds_left(now)
        _log.info(
            "idis.auth.token_refreshed",
            msg="OAuth token refreshed",
            provider=p.name,
            reason=mode,
            generation=token.generation,
            token_expires_in=None if left is None else round(left),
            refresh_rotated=rotated,
        )

    def after_failure(
        self, p: ProviderSettings, outcome: str, error: Exception, values: Mapping[str, Any]
    ) -> None:
        """Count and log a failed refresh."""
        self.count(p.name, outcome)
        if outcome in REAUTHORIZATION_REASONS:
            self.mark_stopped(p.name, outcome)
            _log.error(
                "idis.auth.reauthorization_required",
                msg="OAuth re-authorization required: automatic refresh stopped",
                provider=p.name,
                outcome=outcome,
                error=str(error),
            )
        else:
            _log.warning(
                "idis.auth.refresh_failed",
                msg="OAuth token refresh failed",
                provider=p.name,
                outcome=outcome,
                error=str(error),
                consecutive_failures=values.get("consecutive_failures"),
            )

    def adopt(self, p: ProviderSettings, token: AccessToken) -> AccessToken:
        """Use a token another process or thread obtained."""
        now = self.now()
        previous = self.cache.get(p.name)
        self.cache[p.name] = token
        if previous is None or token.generation > previous.generation:
            self.pending.pop(p.name, None)
        self.gauge(token, now)
        return token

    def blocked(
        self, p: ProviderSettings, snap: RowSnapshot, action: Action, retry_in: float
    ) -> Exception:
        """The error for a refresh that is not attempted (stopped or on hold)."""
        if action is Action.OUTCOME_UNKNOWN:
            self.mark_stopped(p.name, "outcome_unknown")
            return RefreshOutcomeUnknown(
                f"refresh outcome unknown for {p.name!r}: re-authorize, then "
                f"`idis-integrations import-token --provider {p.name}` ("
                f"{snap.last_error or 'the answer to a refresh was lost'}; resending the "
                "refresh token could make the provider revoke the whole token family, so "
                "automatic refresh is stopped)",
                provider=p.name,
                sent_at=snap.last_attempt_at,
            )
        if action is Action.REAUTHORIZE:
            self.mark_stopped(p.name, self._stop_reason(snap))
            return ReauthorizationRequired(
                f"re-authorization required for {p.name!r}: "
                f"{snap.last_error or 'the provider refused the grant'} (automatic refresh is "
                f"stopped; after re-authorizing run `idis-integrations import-token --provider "
                f"{p.name}`, or `idis-integrations refresh-tokens --provider {p.name}` to retry)",
                provider=p.name,
            )
        self.count(p.name, "backoff")
        return AuthError(
            f"token refresh for {p.name!r} is failing ({snap.consecutive_failures} consecutive "
            f"failures; last error: {snap.last_error or 'unknown'}); next attempt in "
            f"{retry_in:.0f}s",
            provider=p.name,
        )

    @staticmethod
    def _stop_reason(snap: RowSnapshot) -> str | None:
        if snap.state == "refresh_outcome_unknown":
            return "outcome_unknown"
        return snap.last_outcome if snap.last_outcome in REAUTHORIZATION_REASONS else None

    def note_lock_timeout(self, p: ProviderSettings) -> None:
        """Count and log a lock timeout (never a credentials problem)."""
        self.count(p.name, "lock_timeout")
        _log.warning(
            "idis.auth.lock_timeout",
            msg="timed out waiting for another token refresh (not a credentials problem)",
            provider=p.name,
            lock_timeout=p.auth.lock_timeout,
        )

    def storage_fallback(self, p: ProviderSettings, mode: Mode, exc: StorageError) -> AccessToken:
        """The database failed: keep going on a still-valid cached token, else re-raise."""
        token = self.cache.get(p.name)
        if mode == "ensure" and token is not None and not token.is_expired(self.now()):
            _log.warning(
                "idis.auth.store_unavailable",
                msg="token store unavailable; using the cached token until it expires",
                provider=p.name,
                error=str(exc),
            )
            return token
        raise exc

    def lock_timeout(self, p: ProviderSettings) -> TokenLockTimeout:
        """The error for a process lock not granted within ``lock_timeout``."""
        self.note_lock_timeout(p)
        return TokenLockTimeout(
            f"waited {p.auth.lock_timeout:g}s for another caller's token refresh of "
            f"{p.name!r}; the credentials may be fine - retry shortly",
            provider=p.name,
        )

    def memory_decision(
        self, p: ProviderSettings, mode: Mode, rejected: int | None
    ) -> AccessToken | None:
        """Inside the process lock: a token another thread/task just obtained, if usable."""
        token = self.cache.get(p.name)
        decision = decide(
            mode=mode,
            candidate=token,
            stored_state="ok",
            next_attempt_at=None,
            now=self.now(),
            margin=p.auth.refresh_margin,
            rejected_generation=rejected,
        )
        return token if decision.action is Action.USE else None

    def reuse_until(self, p: ProviderSettings, snap: RowSnapshot) -> datetime | None:
        """Until when the refresh token whose answer was lost may be sent again (None: never)."""
        grace = p.auth.refresh_reuse_grace
        if snap.state != "refresh_outcome_unknown" or grace <= 0 or snap.last_attempt_at is None:
            return None
        return snap.last_attempt_at + timedelta(seconds=grace)

    def plan(
        self, p: ProviderSettings, snap: RowSnapshot, mode: Mode, rejected: int | None
    ) -> AccessToken | RefreshPlan:
        """On the (locked) row: a token to use, or how to request a new one.

        Raises:
            ReauthorizationRequired: automatic refresh is stopped, or there is no refresh token.
            RefreshOutcomeUnknown: the last refresh's answer was lost (re-authorize).
            AuthError: refreshes are on hold after failures and no valid token is left.
        """
        candidate, refresh_token, from_row = self.candidate(p, snap)
        now = self.now()
        decision = decide(
            mode=mode,
            candidate=candidate,
            stored_state=snap.state,
            next_attempt_at=snap.next_attempt_at,
            now=now,
            margin=p.auth.refresh_margin,
            rejected_generation=rejected,
            reuse_until=self.reuse_until(p, snap),
        )
        if decision.action is Action.USE and candidate is not None:
            if from_row:
                self.count(p.name, "reused")
            if snap.state in ("reauthorization_required", "refresh_outcome_unknown"):
                # Still serving on a valid token, but refresh is stopped: a replica that
                # (re)started meanwhile must raise the alert too.
                self.mark_stopped(p.name, self._stop_reason(snap))
            return self.adopt(p, candidate)
        if decision.action is not Action.REFRESH:
            raise self.blocked(p, snap, decision.action, decision.retry_in)
        grant = self.grant_for(p)
        if grant == "refresh_token" and not refresh_token:
            # Nothing was ever imported (or it was lost): that is "missing", not a refusal,
            # so the row's state is left alone.
            _log.warning(
                "idis.auth.token_missing",
                msg="no refresh token stored: import one with `idis-integrations import-token`",
                provider=p.name,
            )
            raise ReauthorizationRequired(
                f"provider {p.name!r} has no refresh token stored: complete the authorization "
                f"and import the token with `idis-integrations import-token --provider {p.name}`",
                provider=p.name,
            )
        fallback = (
            candidate
            if mode == "ensure" and candidate is not None and not candidate.is_expired(now)
            else None
        )
        return RefreshPlan(grant, refresh_token, fallback)

    def fallback_after_failure(self, p: ProviderSettings, plan: RefreshPlan) -> AccessToken | None:
        """A still-valid token to keep calls going after a failed ahead-of-expiry refresh.

        Also after a refusal or a lost answer: the token is valid until it
        expires (the provider answers 401 if it revoked it), and the state,
        the gauge and the alert already say that someone must act.
        """
        if plan.fallback is None or plan.fallback.is_expired(self.now()):
            return None
        return self.adopt(p, plan.fallback)

    def pending_write(self, p: ProviderSettings, snap: RowSnapshot) -> PendingWrite | None:
        """A token this process obtained but could not persist, if the row did not move on."""
        pending = self.pending.get(p.name)
        if pending is None:
            return None
        if snap.generation != pending.base_generation:
            self.pending.pop(p.name, None)  # someone wrote a newer token since
            return None
        return pending


# --------------------------------------------------------------------------- flows


_AGAIN = object()


def obtain(core: TokenCore, p: ProviderSettings, mode: Mode, rejected: int | None) -> Flow[Any]:
    """Get a usable token for ``p`` (the caller holds the in-process lock).

    Returns the token; raises what the refresh decided (see ``TokenManager.get_token``).
    """
    token = core.memory_decision(p, mode, rejected)
    if token is not None:
        return token
    try:
        while True:
            handle = yield _lock(p)
            try:
                result = yield from _on_row(core, p, handle, mode, rejected)
            finally:
                yield OnStore("release", (handle,))
            if result is not _AGAIN:
                return result
    except TokenLockTimeout:
        core.note_lock_timeout(p)
        raise
    except StorageError as exc:
        return core.storage_fallback(p, mode, exc)


def _on_row(
    core: TokenCore, p: ProviderSettings, handle: RowHandle, mode: Mode, rejected: int | None
) -> Flow[Any]:
    """Decide on the (locked) row and act: a token, or ``_AGAIN`` to decide on a fresh lock."""
    snap = handle.snapshot
    pending = core.pending_write(p, snap)
    if pending is not None:
        written = yield _write(handle, pending.values, snap.generation)
        if written:
            core.pending.pop(p.name, None)
            # The commit released the row lock: decide again on a freshly locked row.
            return _AGAIN
    plan = core.plan(p, snap, mode, rejected)
    if isinstance(plan, AccessToken):
        return plan
    try:
        issued = yield from request_with_credentials(core, p, snap, plan.grant, plan.refresh_token)
    except (IntegrationError, ProviderError) as exc:
        if isinstance(exc, ConfigError | StorageError | TokenLockTimeout):
            raise
        outcome, values, audit, error = core.failure(p, snap, exc)
        written = yield _write(handle, values, snap.generation, audit)
        if not written:
            # SQLite: another process refreshed meanwhile; use its token.
            fresh = yield OnStore("reread", (handle,))
            token, _, _ = core.candidate(p, fresh)
            if token is not None and not token.is_expired(core.now()):
                core.count(p.name, "reused")
                return core.adopt(p, token)
        core.after_failure(p, outcome, error, values)
        fallback = core.fallback_after_failure(p, plan)
        if fallback is not None:
            return fallback
        if error is exc:
            raise
        raise error from exc
    token, values, audit = core.success(
        p, snap, issued, grant=plan.grant, previous_refresh=plan.refresh_token, mode=mode
    )
    try:
        yield _write(handle, values, None, audit)
    except StorageError as exc:
        # The provider may already have rotated the refresh token: keep the new
        # one in memory and persist it at the next chance rather than lose it.
        core.pending[p.name] = PendingWrite(token, values, snap.generation)
        _log.error(
            "idis.auth.persist_failed",
            msg="new token obtained but not persisted; kept in memory, retried next time",
            provider=p.name,
            error=str(exc),
        )
    core.after_success(
        p,
        token,
        mode=mode,
        rotated=plan.grant == "refresh_token"
        and issued.refresh_token not in (None, plan.refresh_token),
    )
    return token


def credentials(core: TokenCore, p: ProviderSettings, snap: RowSnapshot) -> Flow[Any]:
    """The client credentials a token request uses now (reads Vault when it must)."""
    known, from_vault = core.credentials_plan(p, snap)
    if from_vault:
        read = yield from perform(ReadVault(p.name))
        known = core.remember_vault(p, read)
    return known


def request_with_credentials(
    core: TokenCore,
    p: ProviderSettings,
    snap: RowSnapshot,
    grant: GrantType,
    refresh_token: str | None,
) -> Flow[IssuedToken]:
    """A token request with the current credentials; after invalid_client, Vault once more."""
    current: ClientCredentials | None = yield from credentials(core, p, snap)
    try:
        return (yield from request_token(core, p, current, grant, refresh_token))
    except CredentialsRejected:
        if current is None or not core.may_reread_vault(current):
            raise
        # Another replica may have rotated the secret: read Vault again, once.
        latest = core.remember_vault(p, (yield from perform(ReadVault(p.name))))
        if latest.version == current.version:
            raise
        return (yield from request_token(core, p, latest, grant, refresh_token))


def request_token(
    core: TokenCore,
    p: ProviderSettings,
    client: ClientCredentials | None,
    grant: GrantType,
    refresh_token: str | None = None,
) -> Flow[IssuedToken]:
    """One token request with retries (no locking, no persistence: callers do that).

    Faults before the request went out, 429 and (for ``client_credentials``)
    every retryable fault are retried with backoff, at most
    ``refresh_attempts`` times and within the provider's deadline. A
    refresh-token request whose answer was lost is retried only inside the
    provider's ``refresh_reuse_grace``; otherwise :class:`RefreshOutcomeUnknown`.
    """
    from ..resilience._errors import map_httpx_errors

    prepared = build_token_request(p, client, grant, refresh_token=refresh_token)
    deadline = core.clock.monotonic() + p.timeouts.deadline
    grace = p.auth.refresh_reuse_grace
    lost_since: datetime | None = None
    lost: ProviderError | None = None
    attempt = 0
    while True:
        attempt += 1
        sent_at = core.now()
        try:
            with map_httpx_errors(p.name, TOKEN_ENDPOINT):
                response = yield from perform(SendTokenRequest(prepared, core.timeout(p)))
            return core.parse(p, response, grant)
        except (ProviderError, AuthError) as exc:
            core.count_error(p.name, exc)
            unknown = lost_answer(exc) if grant == "refresh_token" else None
            if unknown is not None and isinstance(exc, ProviderError):
                lost_since, lost = lost_since or sent_at, exc
            may_resend = lost_since is None or (
                grace > 0 and (core.now() - lost_since).total_seconds() < grace
            )
            give_up = not is_retryable(exc) or attempt >= p.auth.refresh_attempts or not may_resend
            delay = None if give_up else core.retry_delay(p, attempt, exc)
            if delay is None or core.clock.monotonic() + delay > deadline:
                if lost is not None and lost_since is not None and is_retryable(exc):
                    raise _outcome_unknown(p, lost, lost_since) from exc
                raise
            yield Sleep(delay)


def _outcome_unknown(p: ProviderSettings, exc: ProviderError, since: datetime) -> Exception:
    reason = lost_answer(exc) or "unknown"
    what = {
        "timeout": "timed out after it was sent",
        "connection": "lost its connection before the answer arrived",
        "server_error": f"got HTTP {exc.status_code or '5xx'} after the server received it",
        "malformed_response": "got an answer that could not be read",
    }.get(reason, "lost its answer")
    grace = p.auth.refresh_reuse_grace
    hint = (
        f"the provider's reuse grace ({grace:g}s) ran out"
        if grace > 0
        else f"if {p.name} tolerates refresh-token reuse, set "
        f"IDIS_PROVIDER_{p.name.upper()}_REFRESH_REUSE_GRACE"
    )
    return RefreshOutcomeUnknown(
        f"refresh outcome unknown for {p.name!r}: the refresh request {what}, so the provider "
        "may have rotated the refresh token; it is not sent again (a provider with reuse "
        "protection would revoke the whole token family): re-authorize, then "
        f"`idis-integrations import-token --provider {p.name}` ({hint})",
        provider=p.name,
        reason=reason,
        sent_at=since,
    )


def import_flow(
    core: TokenCore, p: ProviderSettings, issued: IssuedToken, *, actor: str
) -> Flow[Any]:
    """Store a token obtained elsewhere (the caller holds the in-process lock)."""
    handle = yield _lock(p)
    try:
        snap = handle.snapshot
        token, values, audit = core.success(
            p, snap, issued, grant=core.grant_for(p), previous_refresh=None, mode="force"
        )
        values["grant_type"] = "imported"
        if not issued.access_token:
            # Only a refresh token (or an expired access token was dropped): the status
            # shows an expired token, since when it expired, and the first call refreshes.
            values["access_token_enc"] = None
            expired = issued.expires_at
            values["expires_at"] = (
                expired if expired is not None and expired < issued.issued_at else issued.issued_at
            )
        audit[0].update(
            action="token.imported",
            actor=actor,
            details={
                "generation": token.generation,
                "has_refresh_token": issued.refresh_token is not None,
                "expires_at": issued.expires_at.isoformat() if issued.expires_at else None,
            },
        )
        yield _write(handle, values, None, audit)
    finally:
        yield OnStore("release", (handle,))
    core.pending.pop(p.name, None)
    core.mark_stopped(p.name, None)
    _log.info(
        "idis.auth.token_imported",
        msg="OAuth token imported",
        provider=p.name,
        generation=token.generation,
        actor=actor,
    )
    if not issued.access_token:
        core.cache.pop(p.name, None)
        return None
    core.cache[p.name] = token
    core.gauge(token, core.now())
    return token
