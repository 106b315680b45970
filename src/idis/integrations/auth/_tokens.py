"""OAuth tokens: obtain, cache, refresh ahead of expiry, single-flight, persisted encrypted.

:class:`TokenManager` (threads) and :class:`AsyncTokenManager` (asyncio) share
every decision (``_grant.py``, ``_store.py`` and :class:`_ManagerCore`); they
differ only in how they wait and do I/O. One refresh, however many callers:

1. **in memory**: a token valid for more than ``refresh_margin`` is handed out
   with no lock and no I/O;
2. **in the process**: otherwise callers queue on a per-provider
   ``threading.Lock`` / ``asyncio.Lock`` (bounded by ``lock_timeout``) and the
   first one in does the work; the rest find the fresh token when they get in;
3. **across processes** (PostgreSQL): the one in the lead takes
   ``SELECT ... FOR UPDATE`` on the provider's ``oauth_tokens`` row (again
   bounded: a timeout raises :class:`TokenLockTimeout`, never an
   invalid-credentials error), re-reads it, and refreshes only if no other
   replica already has.

A rotated refresh token is written in the same UPDATE that drops the old one,
and committed before anyone uses the new access token. ``invalid_grant``
stops automatic refreshes (state ``reauthorization_required``, error
:class:`ReauthorizationRequired`) until an operator imports a token or runs
``refresh-tokens``; network faults, 5xx and 429 are retried with backoff
and, once exhausted, put further automatic attempts on a shared backoff so
an outage costs one attempt per interval, not one per call.

Token requests use their own HTTP client, not the Gateway: see docs/auth.md.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from .._clock import Clock, system_clock
from .._http import httpx
from ..config import ProviderSettings, Secret, Settings
from ..exceptions import (
    AuthError,
    ConfigError,
    IntegrationError,
    ProviderError,
    ReauthorizationRequired,
    StorageError,
    TokenLockTimeout,
)
from ..observability._logs import get_logger, redact_text
from ..observability._metrics import Metrics, get_metrics
from ._crypto import TokenCipher
from ._grant import (
    TOKEN_ENDPOINT,
    AccessToken,
    Action,
    CredentialsRejected,
    IssuedToken,
    Mode,
    TokenRequestRejected,
    build_token_request,
    decide,
    failure_backoff,
    is_retryable,
    parse_token_response,
    retry_wait,
)
from ._store import AsyncTokenStore, RowSnapshot, SyncTokenStore
from ._vault import ClientCredentials, VaultStore

__all__ = [
    "AccessToken",
    "AsyncTokenManager",
    "CredentialsRejected",
    "RefreshResult",
    "TokenManager",
    "TokenRequestRejected",
    "import_token",
    "refresh_tokens",
]

_log = get_logger()
GrantType = Literal["client_credentials", "refresh_token"]

#: ``token_refreshes_total{outcome}`` values.
OUTCOMES = (
    "ok",  # a new token was obtained
    "reused",  # another process/replica had refreshed: its token was adopted, no request made
    "failed",  # network fault, timeout, 5xx, 429 or malformed answer, after retries
    "invalid_grant",  # the refresh token was refused: re-authorization required
    "invalid_client",  # the client credentials were refused
    "rejected",  # another 4xx from the token endpoint
    "lock_timeout",  # waited too long for another refresh
    "backoff",  # not attempted: earlier failures put refreshes on hold
)


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """The outcome of one explicit refresh (``refresh_tokens``); prints as one line."""

    #: Provider name.
    provider: str
    #: ``refreshed``, ``failed`` or ``skipped`` (no OAuth for this provider).
    outcome: str
    #: New expiry, when refreshed.
    expires_at: datetime | None = None
    #: Seconds until that expiry when refreshed.
    seconds_left: float | None = None
    #: The token generation now in use.
    generation: int | None = None
    #: Why it failed (redacted), or why it was skipped.
    error: str | None = None
    #: Exception class name of the failure.
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the provider now has a fresh token (or needs none)."""
        return self.outcome != "failed"

    def __str__(self) -> str:
        if self.outcome == "refreshed":
            when = (
                self.expires_at.replace(microsecond=0).isoformat().replace("+00:00", "Z")
                if self.expires_at
                else None
            )
            left = (
                f"expires in {int(self.seconds_left)}s ({when})"
                if self.seconds_left is not None
                else "no expiry given"
            )
            return f"{self.provider}: refreshed, {left}, generation {self.generation}"
        if self.outcome == "skipped":
            return f"{self.provider}: skipped ({self.error})"
        return f"{self.provider}: FAILED - {self.error_type}: {self.error}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no secret)."""
        return {
            "provider": self.provider,
            "outcome": self.outcome,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "seconds_left": None if self.seconds_left is None else round(self.seconds_left),
            "generation": self.generation,
            "error": self.error,
            "error_type": self.error_type,
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """A refresh to make: the grant, the refresh token to send, and what to fall back on."""

    grant: GrantType
    refresh_token: str | None
    #: The current token if it is still valid (ahead-of-expiry refresh): used if refresh fails.
    fallback: AccessToken | None


@dataclass(frozen=True, slots=True)
class _Pending:
    """A token obtained but not yet committed (the database failed right after)."""

    token: AccessToken
    values: dict[str, Any]
    base_generation: int


class _ManagerCore:
    """Everything the two managers share: settings, caches, decisions, bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None,
        clock: Clock | None,
        vault: VaultStore | None,
        rng: random.Random | None,
    ) -> None:
        self.settings = settings
        self.cipher = TokenCipher(settings.encryption_keys)
        self._metrics = metrics
        self.clock = clock or system_clock
        self._vault = vault
        self._rng = rng
        self.cache: dict[str, AccessToken] = {}
        self.pending: dict[str, _Pending] = {}
        self.vault_credentials: dict[str, ClientCredentials] = {}
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ lookups

    @property
    def metrics(self) -> Metrics:
        return self._metrics if self._metrics is not None else get_metrics()

    def now(self) -> datetime:
        return self.clock.now()

    def provider(self, name: str) -> ProviderSettings:
        """The provider's settings; it must use OAuth."""
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
        with self._guard:
            if self._vault is None:
                self._vault = VaultStore(self.settings.vault)
            return self._vault

    def fast(self, provider: str, margin: float) -> AccessToken | None:
        """The cached token if it is fresh (no lock, no I/O)."""
        token = self.cache.get(provider)
        if token is None:
            return None
        now = self.now()
        if not token.is_fresh(now, margin):
            return None
        self.gauge(token, now)
        return token

    def gauge(self, token: AccessToken, now: datetime) -> None:
        left = token.seconds_left(now)
        if left is not None:
            self.metrics.token_expiry.labels(token.provider).set(left)

    def count(self, provider: str, outcome: str) -> None:
        self.metrics.token_refreshes.labels(provider, outcome).inc()

    def count_error(self, provider: str, exc: BaseException) -> None:
        error_type = exc.error_type if isinstance(exc, ProviderError) else "auth_error"
        self.metrics.errors.labels(provider, TOKEN_ENDPOINT, error_type).inc()

    # ------------------------------------------------------------------ tokens from rows

    def stored(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> tuple[AccessToken | None, str | None]:
        """The row's token and refresh token, decrypted (None where absent or unreadable)."""
        if not self.cipher.available:
            return None, None
        try:
            access = (
                self.cipher.decrypt(snap.access_token_enc, provider=p.name)
                if snap.access_token_enc
                else None
            )
            refresh = (
                self.cipher.decrypt(snap.refresh_token_enc, provider=p.name)
                if snap.refresh_token_enc
                else None
            )
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
        return "refresh_token" if p.auth.grant == "refresh_token" else "client_credentials"

    def credentials_plan(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> tuple[ClientCredentials | None, bool]:
        """Credentials known without I/O, or (None, True) when Vault must be read.

        Precedence: Vault when ``CREDENTIALS_FROM_VAULT`` is on (it is the source
        of truth: read at start, again when a rotation recorded a newer version);
        otherwise the encrypted copy a rotation left in the row; otherwise Vault
        if a rotation stored them only there; otherwise the settings.
        """
        if p.auth.credentials_from_vault:
            cached = self.vault_credentials.get(p.name)
            wanted = snap.credential_version if snap.credential_source == "vault" else None
            if cached is None or (wanted is not None and (cached.version or 0) < wanted):
                return None, True
            return cached, False
        if snap.client_secret_enc:
            secret = self.cipher.decrypt(snap.client_secret_enc, provider=p.name)
            return (
                ClientCredentials(
                    client_id=snap.client_id or p.auth.client_id,
                    client_secret=Secret(secret),
                    source=snap.credential_source or "database",
                    version=snap.credential_version,
                ),
                False,
            )
        if snap.credential_source == "vault":
            cached = self.vault_credentials.get(p.name)
            if cached is None or (cached.version or 0) < (snap.credential_version or 0):
                return None, True
            return cached, False
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
        if not credentials.client_id:
            credentials = replace(credentials, client_id=p.auth.client_id)
        self.vault_credentials[p.name] = credentials
        return credentials

    # ------------------------------------------------------------------ plans

    def timeout(self, p: ProviderSettings) -> httpx.Timeout:
        t = p.timeouts
        return httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool)

    def parse(self, p: ProviderSettings, response: httpx.Response, grant: GrantType) -> IssuedToken:
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
        delay = retry_wait(p.retry, attempt, exc, self._rng)
        _log.info(
            "idis.auth.token_retry",
            msg=f"token request failed, retrying in {delay:.2f}s",
            provider=p.name,
            attempt=attempt,
            error_type=getattr(exc, "error_type", type(exc).__name__),
        )
        return delay

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
        refresh = issued.refresh_token or previous_refresh
        if refresh is not None and grant == "client_credentials" and issued.refresh_token is None:
            refresh = None  # client_credentials tokens are re-obtained, never refreshed
        token = AccessToken(
            provider=p.name,
            access_token=issued.access_token,
            token_type=issued.token_type,
            expires_at=issued.expires_at,
            scopes=issued.scopes,
            generation=snap.generation + 1,
            refresh_token=refresh,
        )
        now = issued.issued_at
        values: dict[str, Any] = {
            "grant_type": grant,
            "state": "ok",
            "generation": token.generation,
            "token_type": token.token_type,
            # One UPDATE replaces the old refresh token with the rotated one: the old
            # one is never dropped before the new one is committed.
            "access_token_enc": self.cipher.encrypt_optional(token.access_token),
            "refresh_token_enc": self.cipher.encrypt_optional(refresh),
            "scopes": list(token.scopes),
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
        reauthorize = isinstance(exc, ReauthorizationRequired)
        if isinstance(exc, CredentialsRejected):
            outcome = "invalid_client"
        elif reauthorize:
            outcome = "invalid_grant"
        elif isinstance(exc, TokenRequestRejected):
            outcome = "rejected"
        else:
            outcome = "failed"
        failures = snap.consecutive_failures + 1
        message = redact_text(str(exc))
        state = "reauthorization_required" if reauthorize else "refresh_failing"
        delay = None if reauthorize else failure_backoff(failures)
        values: dict[str, Any] = {
            "state": state,
            "last_attempt_at": now,
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
                    "action": (
                        "token.reauthorization_required" if reauthorize else "token.refresh_failing"
                    ),
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
        now = self.now()
        self.cache[p.name] = token
        self.pending.pop(p.name, None)
        self.count(p.name, "ok")
        self.gauge(token, now)
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
        self.count(p.name, outcome)
        if outcome in ("invalid_grant", "invalid_client"):
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
        if action is Action.REAUTHORIZE:
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

    def note_lock_timeout(self, p: ProviderSettings) -> None:
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
        if token is None or mode == "force":
            return None
        now = self.now()
        if mode == "ensure" and token.is_fresh(now, p.auth.refresh_margin):
            return token
        if (
            mode == "rejected"
            and rejected is not None
            and token.generation > rejected
            and not token.is_expired(now)
        ):
            return token
        return None

    def plan(
        self, p: ProviderSettings, snap: RowSnapshot, mode: Mode, rejected: int | None
    ) -> AccessToken | _Plan:
        """On the (locked) row: a token to use, or how to request a new one.

        Raises:
            ReauthorizationRequired: automatic refresh is stopped, or there is no refresh token.
            AuthError: refreshes are on hold after failures and no valid token is left.
        """
        candidate, refresh_token, from_row = self.candidate(p, snap)
        decision = decide(
            mode=mode,
            candidate=candidate,
            stored_state=snap.state,
            next_attempt_at=snap.next_attempt_at,
            now=self.now(),
            margin=p.auth.refresh_margin,
            rejected_generation=rejected,
        )
        if decision.action is Action.USE and candidate is not None:
            if from_row:
                self.count(p.name, "reused")
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
            if mode == "ensure" and candidate is not None and not candidate.is_expired(self.now())
            else None
        )
        return _Plan(grant, refresh_token, fallback)

    def fallback_after_failure(
        self, p: ProviderSettings, plan: _Plan, error: Exception
    ) -> AccessToken | None:
        """A still-valid token to keep calls going after a retryable refresh failure."""
        if plan.fallback is None or isinstance(error, ReauthorizationRequired):
            return None
        if plan.fallback.is_expired(self.now()):
            return None
        return self.adopt(p, plan.fallback)

    def pending_write(self, p: ProviderSettings, snap: RowSnapshot) -> _Pending | None:
        pending = self.pending.get(p.name)
        if pending is None:
            return None
        if snap.generation != pending.base_generation:
            self.pending.pop(p.name, None)  # someone wrote a newer token since
            return None
        return pending


def _absolute_expiry(raw: object, now: datetime) -> datetime | None:
    if isinstance(raw, bool):
        return None
    try:
        if isinstance(raw, int | float):
            return datetime.fromtimestamp(float(raw), now.tzinfo)
        parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed if parsed.tzinfo is not None else None


def _relative_expiry(raw: object, now: datetime) -> datetime | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        return now + timedelta(seconds=float(raw))
    except (ValueError, OverflowError):
        return None


def parse_imported_token(
    document: Mapping[str, Any], *, now: datetime, default_scopes: tuple[str, ...] = ()
) -> IssuedToken:
    """Validate a token document given by an operator (``import-token``).

    Raises:
        ConfigError: naming the field that is missing or malformed (never its value).
    """
    if not isinstance(document, Mapping):
        raise ConfigError("the token must be a JSON object (a token endpoint response)")
    access = document.get("access_token")
    refresh = document.get("refresh_token")
    for name, value in (("access_token", access), ("refresh_token", refresh)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"token field {name!r} must be a non-empty string", variable=name)
    if not access and not refresh:
        raise ConfigError(
            "the token has neither 'access_token' nor 'refresh_token': expected a token "
            "endpoint response (RFC 6749 section 5.1)",
            variable="access_token",
        )
    expires_at: datetime | None = None
    if document.get("expires_at") is not None:
        expires_at = _absolute_expiry(document["expires_at"], now)
        if expires_at is None:
            raise ConfigError(
                "token field 'expires_at' must be epoch seconds or an ISO-8601 time with an "
                "offset (e.g. 2026-01-19T10:00:00Z)",
                variable="expires_at",
            )
    elif document.get("expires_in") is not None:
        expires_at = _relative_expiry(document["expires_in"], now)
        if expires_at is None:
            raise ConfigError(
                "token field 'expires_in' must be a number of seconds", variable="expires_in"
            )
    scope = document.get("scope", document.get("scopes"))
    if scope is None:
        scopes = tuple(default_scopes)
    elif isinstance(scope, str):
        scopes = tuple(scope.split())
    elif isinstance(scope, list | tuple) and all(isinstance(s, str) for s in scope):
        scopes = tuple(scope)
    else:
        raise ConfigError(
            "token field 'scope' must be a space-separated string or a list of strings",
            variable="scope",
        )
    token_type = document.get("token_type") or "Bearer"
    if not isinstance(token_type, str):
        raise ConfigError("token field 'token_type' must be a string", variable="token_type")
    return IssuedToken(
        access_token=str(access or ""),
        token_type=token_type,
        expires_at=expires_at,
        refresh_token=str(refresh) if refresh else None,
        scopes=scopes,
        issued_at=now,
    )


# =========================================================================== sync


class TokenManager:
    """Hands out OAuth access tokens for providers, refreshing them once however many ask.

    Thread-safe; share one per process. ``get_token`` is lock-free while the
    cached token is fresh.

    Args:
        settings: Library settings (providers' auth, database, keys, Vault).
        engine: SQLAlchemy engine for the token table (default: one for
            ``settings.database_url``, disposed by :meth:`close`).
        metrics: Metrics to record into (default: the process-wide set).
        clock: Time source (tests pass a ``ManualClock``).
        sleep: How to wait between token request retries.
        transport: httpx transport for token requests (tests).
        vault: Vault store (default: built from ``settings.vault`` when needed).
        rng: Random source for backoff jitter.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Any = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        vault: VaultStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        from ..db._engine import create_db_engine

        self._core = _ManagerCore(settings, metrics=metrics, clock=clock, vault=vault, rng=rng)
        self._owns_engine = engine is None
        self._engine = engine if engine is not None else create_db_engine(settings.database_url)
        self._store = SyncTokenStore(self._engine)
        self._sleep = sleep or time.sleep
        self._http = httpx.Client(transport=transport, follow_redirects=False)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @property
    def settings(self) -> Settings:
        """The settings this manager was built with."""
        return self._core.settings

    @property
    def store(self) -> SyncTokenStore:
        """The token table access (used by rotation and status)."""
        return self._store

    @property
    def cipher(self) -> TokenCipher:
        """The encryption keys in use."""
        return self._core.cipher

    def _lock(self, provider: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(provider)
            if lock is None:
                lock = self._locks[provider] = threading.Lock()
            return lock

    # ------------------------------------------------------------------ public

    def get_token(self, provider: str) -> AccessToken:
        """Return a token valid for at least ``refresh_margin`` (or the best still valid).

        Raises:
            ReauthorizationRequired: the refresh token was refused; a human must act.
            TokenLockTimeout: another refresh held the lock longer than ``lock_timeout``.
            AuthError: the refresh failed (network, 5xx) and no valid token is left.
            ConfigError: unknown provider, no OAuth, missing secret or encryption key.
            StorageError: the token table is unreachable.
        """
        p = self._core.provider(provider)
        token = self._core.fast(provider, p.auth.refresh_margin)
        if token is not None:
            return token
        return self._obtain(p, "ensure", None)

    def token_rejected(self, provider: str, token: AccessToken) -> AccessToken:
        """The provider answered 401 to ``token``: return a newer one (refresh once if needed)."""
        p = self._core.provider(provider)
        return self._obtain(p, "rejected", token.generation)

    def refresh(self, provider: str) -> AccessToken:
        """Refresh now, whatever the cached token's expiry or failure backoff."""
        p = self._core.provider(provider)
        return self._obtain(p, "force", None)

    def import_token(
        self, provider: str, document: Mapping[str, Any], *, actor: str = "system"
    ) -> AccessToken | None:
        """Store a token obtained elsewhere (the authorization-code bootstrap).

        ``document`` is a token response as RFC 6749 section 5.1 defines it:
        ``access_token`` and/or ``refresh_token``, ``token_type``, ``expires_in``
        (or ``expires_at``, epoch seconds or ISO-8601) and ``scope``. It replaces
        the stored token, clears any failure or re-authorization state, and is
        audited as ``token.imported``.

        Returns:
            The imported access token, or None when only a refresh token was given
            (the first call then refreshes).

        Raises:
            ConfigError: a malformed document (naming the field) or no encryption key.
            TokenLockTimeout: another refresh held the token lock too long.
        """
        core = self._core
        p = core.provider(provider)
        core.cipher.require(f"imported tokens of {provider!r}")
        issued = parse_imported_token(document, now=core.now(), default_scopes=p.auth.scopes)
        lock = self._lock(p.name)
        if not lock.acquire(timeout=p.auth.lock_timeout):
            raise core.lock_timeout(p)
        try:
            with self._store.locked(p.name, p.auth.lock_timeout) as row:
                snap: RowSnapshot = row.snapshot
                token, values, audit = core.success(
                    p, snap, issued, grant=core.grant_for(p), previous_refresh=None, mode="force"
                )
                values["grant_type"] = "imported"
                if not issued.access_token:
                    # Only a refresh token: the status shows an expired token, and the
                    # first call refreshes it.
                    values["access_token_enc"] = None
                    values["expires_at"] = issued.issued_at
                audit[0].update(
                    action="token.imported",
                    actor=actor,
                    details={
                        "generation": token.generation,
                        "has_refresh_token": issued.refresh_token is not None,
                        "expires_at": issued.expires_at.isoformat() if issued.expires_at else None,
                    },
                )
                row.write(values, expect_generation=None, audit=audit)
        finally:
            lock.release()
        core.pending.pop(p.name, None)
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

    def close(self) -> None:
        """Close the HTTP client (and the engine, if this manager created it)."""
        self._http.close()
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> TokenManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ driver

    def _obtain(self, p: ProviderSettings, mode: Mode, rejected: int | None) -> AccessToken:
        core = self._core
        lock = self._lock(p.name)
        if not lock.acquire(timeout=p.auth.lock_timeout):
            raise core.lock_timeout(p)
        try:
            token = core.memory_decision(p, mode, rejected)
            if token is not None:
                return token
            try:
                with self._store.locked(p.name, p.auth.lock_timeout) as row:
                    return self._decide_and_act(p, row, mode, rejected)
            except TokenLockTimeout:
                core.note_lock_timeout(p)
                raise
            except StorageError as exc:
                return core.storage_fallback(p, mode, exc)
        finally:
            lock.release()

    def _decide_and_act(
        self, p: ProviderSettings, row: Any, mode: Mode, rejected: int | None
    ) -> AccessToken:
        core = self._core
        snap: RowSnapshot = row.snapshot
        pending = core.pending_write(p, snap)
        if pending is not None and row.write(pending.values, expect_generation=snap.generation):
            core.pending.pop(p.name, None)
            # The commit released the row lock: decide again on a freshly locked row.
            with self._store.locked(p.name, p.auth.lock_timeout) as again:
                return self._decide_and_act(p, again, mode, rejected)
        plan = core.plan(p, snap, mode, rejected)
        if isinstance(plan, AccessToken):
            return plan
        grant, refresh_token = plan.grant, plan.refresh_token
        try:
            issued = self._request_with_credentials(p, snap, grant, refresh_token)
        except (IntegrationError, ProviderError) as exc:
            if isinstance(exc, ConfigError | StorageError | TokenLockTimeout):
                raise
            outcome, values, audit, error = core.failure(p, snap, exc)
            if not row.write(values, expect_generation=snap.generation, audit=audit):
                # SQLite: another process refreshed meanwhile; use its token.
                fresh = row.reread()
                token, _, _ = core.candidate(p, fresh)
                if token is not None and not token.is_expired(core.now()):
                    core.count(p.name, "reused")
                    return core.adopt(p, token)
            core.after_failure(p, outcome, error, values)
            fallback = core.fallback_after_failure(p, plan, error)
            if fallback is not None:
                return fallback
            if error is exc:
                raise
            raise error from exc
        token, values, audit = core.success(
            p, snap, issued, grant=grant, previous_refresh=refresh_token, mode=mode
        )
        try:
            row.write(values, expect_generation=None, audit=audit)
        except StorageError as exc:
            # The provider may already have rotated the refresh token: keep the new
            # one in memory and persist it at the next chance rather than lose it.
            core.pending[p.name] = _Pending(token, values, snap.generation)
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
            rotated=grant == "refresh_token" and issued.refresh_token not in (None, refresh_token),
        )
        return token

    def _credentials(self, p: ProviderSettings, snap: RowSnapshot) -> ClientCredentials | None:
        credentials, from_vault = self._core.credentials_plan(p, snap)
        if from_vault:
            credentials = self._core.remember_vault(p, self._core.vault().read_credentials(p.name))
        return credentials

    def _request_with_credentials(
        self, p: ProviderSettings, snap: RowSnapshot, grant: GrantType, refresh_token: str | None
    ) -> IssuedToken:
        credentials = self._credentials(p, snap)
        try:
            return self.request_token(p, credentials, grant, refresh_token)
        except CredentialsRejected:
            if credentials is None or not self._core.may_reread_vault(credentials):
                raise
            # Another replica may have rotated the secret: read Vault again, once.
            latest = self._core.remember_vault(p, self._core.vault().read_credentials(p.name))
            if latest.version == credentials.version:
                raise
            return self.request_token(p, latest, grant, refresh_token)

    def request_token(
        self,
        p: ProviderSettings,
        credentials: ClientCredentials | None,
        grant: GrantType,
        refresh_token: str | None = None,
    ) -> IssuedToken:
        """One token request with retries (no locking, no persistence: callers do that)."""
        from ..resilience._errors import map_httpx_errors

        core = self._core
        prepared = build_token_request(p, credentials, grant, refresh_token=refresh_token)
        deadline = core.clock.monotonic() + p.timeouts.deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                with map_httpx_errors(p.name, TOKEN_ENDPOINT):
                    response = self._http.post(
                        prepared.url,
                        content=prepared.body,
                        headers=prepared.headers,
                        timeout=core.timeout(p),
                    )
                return core.parse(p, response, grant)
            except (ProviderError, AuthError) as exc:
                core.count_error(p.name, exc)
                if not is_retryable(exc) or attempt >= p.auth.refresh_attempts:
                    raise
                delay = core.retry_delay(p, attempt, exc)
                if core.clock.monotonic() + delay > deadline:
                    raise
                self._sleep(delay)


# =========================================================================== async


class AsyncTokenManager:
    """Asyncio twin of :class:`TokenManager`; share one per event loop.

    Coroutines of one loop queue on a per-provider ``asyncio.Lock``; replicas on
    PostgreSQL on the row lock. Vault reads (rare) run in a worker thread.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Any = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        vault: VaultStore | None = None,
        rng: random.Random | None = None,
    ) -> None:
        from ..db._engine import create_async_db_engine

        self._core = _ManagerCore(settings, metrics=metrics, clock=clock, vault=vault, rng=rng)
        self._owns_engine = engine is None
        self._engine = (
            engine if engine is not None else create_async_db_engine(settings.database_url)
        )
        self._store = AsyncTokenStore(self._engine)
        self._sleep = sleep or asyncio.sleep
        self._http = httpx.AsyncClient(transport=transport, follow_redirects=False)
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def settings(self) -> Settings:
        """The settings this manager was built with."""
        return self._core.settings

    def _lock(self, provider: str) -> asyncio.Lock:
        lock = self._locks.get(provider)
        if lock is None:
            lock = self._locks[provider] = asyncio.Lock()
        return lock

    async def get_token(self, provider: str) -> AccessToken:
        """Async :meth:`TokenManager.get_token`."""
        p = self._core.provider(provider)
        token = self._core.fast(provider, p.auth.refresh_margin)
        if token is not None:
            return token
        return await self._obtain(p, "ensure", None)

    async def token_rejected(self, provider: str, token: AccessToken) -> AccessToken:
        """Async :meth:`TokenManager.token_rejected`."""
        p = self._core.provider(provider)
        return await self._obtain(p, "rejected", token.generation)

    async def refresh(self, provider: str) -> AccessToken:
        """Async :meth:`TokenManager.refresh`."""
        p = self._core.provider(provider)
        return await self._obtain(p, "force", None)

    async def aclose(self) -> None:
        """Close the HTTP client (and the engine, if this manager created it)."""
        await self._http.aclose()
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> AsyncTokenManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _obtain(self, p: ProviderSettings, mode: Mode, rejected: int | None) -> AccessToken:
        core = self._core
        lock = self._lock(p.name)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can time out after the
            # lock was granted and leak it.
            async with asyncio.timeout(p.auth.lock_timeout):
                await lock.acquire()
        except TimeoutError:
            raise core.lock_timeout(p) from None
        try:
            token = core.memory_decision(p, mode, rejected)
            if token is not None:
                return token
            try:
                async with self._store.locked(p.name, p.auth.lock_timeout) as row:
                    return await self._decide_and_act(p, row, mode, rejected)
            except TokenLockTimeout:
                core.note_lock_timeout(p)
                raise
            except StorageError as exc:
                return core.storage_fallback(p, mode, exc)
        finally:
            lock.release()

    async def _decide_and_act(
        self, p: ProviderSettings, row: Any, mode: Mode, rejected: int | None
    ) -> AccessToken:
        core = self._core
        snap: RowSnapshot = row.snapshot
        pending = core.pending_write(p, snap)
        if pending is not None and await row.write(
            pending.values, expect_generation=snap.generation
        ):
            core.pending.pop(p.name, None)
            async with self._store.locked(p.name, p.auth.lock_timeout) as again:
                return await self._decide_and_act(p, again, mode, rejected)
        plan = core.plan(p, snap, mode, rejected)
        if isinstance(plan, AccessToken):
            return plan
        grant, refresh_token = plan.grant, plan.refresh_token
        try:
            issued = await self._request_with_credentials(p, snap, grant, refresh_token)
        except (IntegrationError, ProviderError) as exc:
            if isinstance(exc, ConfigError | StorageError | TokenLockTimeout):
                raise
            outcome, values, audit, error = core.failure(p, snap, exc)
            if not await row.write(values, expect_generation=snap.generation, audit=audit):
                fresh = await row.reread()
                token, _, _ = core.candidate(p, fresh)
                if token is not None and not token.is_expired(core.now()):
                    core.count(p.name, "reused")
                    return core.adopt(p, token)
            core.after_failure(p, outcome, error, values)
            fallback = core.fallback_after_failure(p, plan, error)
            if fallback is not None:
                return fallback
            if error is exc:
                raise
            raise error from exc
        token, values, audit = core.success(
            p, snap, issued, grant=grant, previous_refresh=refresh_token, mode=mode
        )
        try:
            await row.write(values, expect_generation=None, audit=audit)
        except StorageError as exc:
            core.pending[p.name] = _Pending(token, values, snap.generation)
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
            rotated=grant == "refresh_token" and issued.refresh_token not in (None, refresh_token),
        )
        return token

    async def _credentials(
        self, p: ProviderSettings, snap: RowSnapshot
    ) -> ClientCredentials | None:
        credentials, from_vault = self._core.credentials_plan(p, snap)
        if from_vault:
            read = await asyncio.to_thread(self._core.vault().read_credentials, p.name)
            credentials = self._core.remember_vault(p, read)
        return credentials

    async def _request_with_credentials(
        self, p: ProviderSettings, snap: RowSnapshot, grant: GrantType, refresh_token: str | None
    ) -> IssuedToken:
        credentials = await self._credentials(p, snap)
        try:
            return await self.request_token(p, credentials, grant, refresh_token)
        except CredentialsRejected:
            if credentials is None or not self._core.may_reread_vault(credentials):
                raise
            read = await asyncio.to_thread(self._core.vault().read_credentials, p.name)
            latest = self._core.remember_vault(p, read)
            if latest.version == credentials.version:
                raise
            return await self.request_token(p, latest, grant, refresh_token)

    async def request_token(
        self,
        p: ProviderSettings,
        credentials: ClientCredentials | None,
        grant: GrantType,
        refresh_token: str | None = None,
    ) -> IssuedToken:
        """Async :meth:`TokenManager.request_token`."""
        from ..resilience._errors import map_httpx_errors

        core = self._core
        prepared = build_token_request(p, credentials, grant, refresh_token=refresh_token)
        deadline = core.clock.monotonic() + p.timeouts.deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                with map_httpx_errors(p.name, TOKEN_ENDPOINT):
                    response = await self._http.post(
                        prepared.url,
                        content=prepared.body,
                        headers=prepared.headers,
                        timeout=core.timeout(p),
                    )
                return core.parse(p, response, grant)
            except (ProviderError, AuthError) as exc:
                core.count_error(p.name, exc)
                if not is_retryable(exc) or attempt >= p.auth.refresh_attempts:
                    raise
                delay = core.retry_delay(p, attempt, exc)
                if core.clock.monotonic() + delay > deadline:
                    raise
                await self._sleep(delay)


# =========================================================================== maintenance API


def refresh_tokens(
    provider: str | None = None,
    all: bool = False,  # mirrors the --all flag (the builtin is not used here)
    *,
    settings: Settings | None = None,
    manager: TokenManager | None = None,
) -> list[RefreshResult]:
    """Refresh OAuth tokens now (RB-09 Recovery 1), whatever their expiry.

    A refresh that fails is reported in its result, not raised, so ``all=True``
    gets through every provider. A success also clears a ``refresh_failing``
    or ``reauthorization_required`` state.

    Args:
        provider: The provider to refresh.
        all: Refresh every provider that uses OAuth instead (others are ``skipped``).
        settings: Settings (default: from the environment).
        manager: Token manager to use (default: a temporary one).

    Returns:
        One :class:`RefreshResult` per provider; ``str()`` of each is one line.

    Raises:
        ConfigError: neither or both of ``provider`` and ``all``; unknown provider.
    """
    if (provider is None) == (not all):
        raise ConfigError(
            "refresh_tokens: name one provider or pass all=True (not both)",
            variable="provider",
        )
    settings = settings or (manager.settings if manager is not None else Settings.from_env())
    if provider is not None:
        names = [settings.provider(provider).name]
    else:
        names = sorted(settings.providers)
    owns = manager is None
    manager = manager or TokenManager(settings)
    results: list[RefreshResult] = []
    try:
        for name in names:
            if settings.provider(name).auth.grant == "none":
                results.append(
                    RefreshResult(provider=name, outcome="skipped", error="no OAuth (grant none)")
                )
                continue
            try:
                token = manager.refresh(name)
            except IntegrationError as exc:
                results.append(
                    RefreshResult(
                        provider=name,
                        outcome="failed",
                        error=redact_text(str(exc)),
                        error_type=type(exc).__name__,
                    )
                )
                continue
            results.append(
                RefreshResult(
                    provider=name,
                    outcome="refreshed",
                    expires_at=token.expires_at,
                    seconds_left=token.seconds_left(manager._core.now()),
                    generation=token.generation,
                )
            )
    finally:
        if owns:
            manager.close()
    return results


def import_token(
    provider: str,
    token: Mapping[str, Any],
    *,
    settings: Settings | None = None,
    actor: str = "system",
) -> Any:
    """Store a token obtained outside the library (authorization-code bootstrap).

    Args:
        provider: Provider name.
        token: A token endpoint response (``access_token`` and/or
            ``refresh_token``, ``expires_in`` or ``expires_at``, ``scope``).
        settings: Settings (default: from the environment).
        actor: Who imports it, for the audit trail.

    Returns:
        The provider's :class:`~idis.integrations.auth._status.TokenStatus` afterwards.

    Raises:
        ConfigError: malformed token (names the field), no encryption key, unknown provider.
    """
    from ._status import token_status

    settings = settings or Settings.from_env()
    with TokenManager(settings) as manager:
        manager.import_token(provider, token, actor=actor)
        return token_status(settings, provider, engine=manager._engine)


def reencrypt_tokens(*, settings: Settings | None = None, engine: Any = None) -> int:
    """Re-encrypt every stored token and secret with the newest key (key rotation).

    Put the new key first in ``IDIS_ENCRYPTION_KEYS`` (keep the old ones after
    it), run this, then drop the old keys. Each row is rewritten under its
    token lock and only if no newer token was written meanwhile.

    Returns:
        The number of rows re-encrypted.

    Raises:
        ConfigError: no key configured.
        AuthError: a value no configured key decrypts (names the provider; that row is
            left as it is).
    """
    from sqlalchemy import select

    from ..db._engine import create_db_engine
    from ._store import TABLE

    settings = settings or Settings.from_env()
    cipher = TokenCipher(settings.encryption_keys)
    cipher.require("stored tokens")
    own = engine is None
    engine = engine if engine is not None else create_db_engine(settings.database_url)
    store = SyncTokenStore(engine)
    done = 0
    try:
        with engine.connect() as conn:
            providers = list(conn.execute(select(TABLE.c.provider)).scalars())
        for provider in providers:
            timeout = (
                settings.providers[provider].auth.lock_timeout
                if provider in settings.providers
                else 10.0
            )
            with store.locked(provider, timeout) as row:
                snap: RowSnapshot = row.snapshot
                values = {
                    column: cipher.reencrypt(getattr(snap, column), provider=provider)
                    for column in ("access_token_enc", "refresh_token_enc", "client_secret_enc")
                    if getattr(snap, column)
                }
                if values and row.write(values, expect_generation=snap.generation):
                    done += 1
    finally:
        if own:
            engine.dispose()
    _log.info("idis.auth.reencrypted", msg="stored tokens re-encrypted", rows=done)
    return done
