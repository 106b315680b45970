"""OAuth token managers: the sync and the asyncio face of one token flow.

:class:`TokenManager` (threads) and :class:`AsyncTokenManager` (asyncio) hand
out tokens, refresh them ahead of expiry, after a 401 or on demand, once
however many callers, replicas and processes need them, and persist them
encrypted. Both run the same flow (``_flow.py``: every step and every error
decision), driven by :func:`~idis.integrations._flow.drive` or
:func:`~idis.integrations._flow.adrive`; what differs is only the in-process
single-flight lock (``threading.Lock`` vs ``asyncio.Lock``) and the I/O
clients they hand the flow.

Token requests use their own HTTP client, not the Gateway: see docs/auth.md.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from .._clock import Clock, system_clock
from .._flow import Effect, Flow, async_face, drive, sync_face
from .._http import httpx
from .._timeparse import format_duration
from ..config import ProviderSettings, Settings
from ..exceptions import ConfigError, IntegrationError
from ..observability._logs import get_logger, redact_text
from ..observability._metrics import Metrics
from ._crypto import TokenCipher
from ._flow import (
    SECRET_COLUMNS,
    GrantType,
    TokenCore,
    TokenIO,
    credentials,
    import_flow,
    obtain,
    request_token,
)
from ._grant import AccessToken, IssuedToken, Mode, parse_imported_token
from ._status import token_status, utc_seconds
from ._store import AsyncTokenStore, RowHandle, RowSnapshot, SyncTokenStore
from ._vault import ClientCredentials, VaultStore

__all__ = [
    "AccessToken",
    "AsyncTokenManager",
    "RefreshResult",
    "TokenHold",
    "TokenManager",
    "import_token",
    "reencrypt_tokens",
    "refresh_tokens",
]

_log = get_logger()
T = TypeVar("T")

#: Token requests are rare (one per provider per token lifetime) and each must
#: reach the server on a connection of its own: a pooled connection the server
#: already closed would turn "not sent" into "answer lost" (see lost_answer).
_NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)


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
    #: Whether the failure may pass by itself (the provider or the token store unreachable):
    #: retry later. False for a refusal someone must act on (credentials rejected, invalid_grant).
    retryable: bool = False

    @property
    def ok(self) -> bool:
        """Whether the provider now has a fresh token (or needs none)."""
        return self.outcome != "failed"

    def __str__(self) -> str:
        if self.outcome == "refreshed":
            left = (
                f"expires in {int(self.seconds_left)}s ({utc_seconds(self.expires_at)})"
                if self.seconds_left is not None
                else "no expiry given"
            )
            return f"{self.provider}: refreshed, {left}, generation {self.generation}"
        if self.outcome == "skipped":
            return f"{self.provider}: skipped ({self.error})"
        return f"{self.provider}: FAILED - {self.error_type}: {self.error}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (no secret)."""
        return asdict(self) | {
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "seconds_left": None if self.seconds_left is None else round(self.seconds_left),
        }


class _Acquire(Effect[None]):
    """Take the provider's lock (``threading.Lock`` or ``asyncio.Lock``) within ``lock_timeout``."""

    __slots__ = ("core", "lock", "p")

    def __init__(self, lock: Any, core: TokenCore, p: ProviderSettings) -> None:
        self.lock, self.core, self.p = lock, core, p

    def run(self, io: Any) -> None:
        """Block on the thread lock."""
        if not self.lock.acquire(timeout=self.p.auth.lock_timeout):
            raise self.core.lock_timeout(self.p)

    async def arun(self, io: Any) -> None:
        """Await the asyncio lock."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can time out after the
            # lock was granted and leak it.
            async with asyncio.timeout(self.p.auth.lock_timeout):
                await self.lock.acquire()
        except TimeoutError:
            raise self.core.lock_timeout(self.p) from None


class _Face:
    """What both faces share: the token core (settings, clock, caches) and the I/O it runs on."""

    _core: TokenCore
    _io: TokenIO

    def _start(
        self,
        settings: Settings,
        metrics: Metrics | None,
        clock: Clock | None,
        vault: Any,
        seed: int | None,
    ) -> None:
        self._core = TokenCore(
            settings, metrics=metrics, clock=clock or system_clock, vault=vault, seed=seed
        )

    @property
    def settings(self) -> Settings:
        """The settings this manager was built with."""
        return self._core.settings

    @property
    def clock(self) -> Clock:
        """The clock this manager reads time from."""
        return self._core.clock

    def _lock(self, p: ProviderSettings) -> Any:
        """The provider's in-process single-flight lock (a thread's or a task's)."""
        raise NotImplementedError

    def _single_flight(self, p: ProviderSettings, flow: Flow[T]) -> Flow[T]:
        """``flow`` holding the provider's in-process lock, waited on at most ``lock_timeout``."""
        lock = self._lock(p)
        yield _Acquire(lock, self._core, p)
        try:
            return (yield from flow)
        finally:
            lock.release()

    def _get_token(self, provider: str) -> Flow[AccessToken]:
        """Return a token valid for at least ``refresh_margin`` (or the best still valid).

        Raises:
            ReauthorizationRequired: the refresh token was refused; a human must act.
            RefreshOutcomeUnknown: a refresh's answer was lost; a human must re-authorize.
            TokenLockTimeout: another refresh held the lock longer than ``lock_timeout``.
            AuthError: the refresh failed (network, 5xx) and no valid token is left.
            ConfigError: unknown provider, no OAuth, missing secret, key or Vault settings.
            StorageError: the token table is unreachable.
        """
        p = self._core.provider(provider)
        fresh = self._core.fast(provider, p.auth.refresh_margin)
        return fresh or (yield from self._obtain(p, "ensure"))

    def _token_rejected(self, provider: str, token: AccessToken) -> Flow[AccessToken]:
        """The provider answered 401 to ``token``: return a newer one (refresh once if needed)."""
        return (
            yield from self._obtain(self._core.provider(provider), "rejected", token.generation)
        )

    def _refresh(self, provider: str) -> Flow[AccessToken]:
        """Refresh now, whatever the cached token's expiry or failure backoff.

        A refresh whose previous answer was lost (``refresh_outcome_unknown``)
        is still refused: only re-authorizing (``import_token``) clears it.
        """
        return (yield from self._obtain(self._core.provider(provider), "force"))

    def _obtain(
        self, p: ProviderSettings, mode: Mode, rejected: int | None = None
    ) -> Flow[AccessToken]:
        token: AccessToken = yield from self._single_flight(
            p, obtain(self._core, p, mode, rejected)
        )
        return token

    def _import_token(
        self, provider: str, document: Mapping[str, Any], *, actor: str = "system"
    ) -> Flow[AccessToken | None]:
        """Store a token obtained elsewhere (the authorization-code bootstrap).

        ``document`` is a token response as RFC 6749 section 5.1 defines it:
        ``access_token`` and/or ``refresh_token``, ``token_type``, ``expires_in``
        (or ``expires_at``, epoch seconds or ISO-8601) and ``scope``. It replaces
        the stored token, clears any failure or re-authorization state, and is
        audited as ``token.imported``.

        An access token that has already expired is useless: with a refresh token it is
        dropped and only the refresh token stored (the first call refreshes, as when only
        a refresh token is given); without one the import is refused.

        Returns:
            The imported access token, or None when only a refresh token was given or
            kept (the first call then refreshes).

        Raises:
            ConfigError: a malformed document (naming the field), an expired access token
                without a refresh token (naming the expiry; nothing stored) or no
                encryption key.
            TokenLockTimeout: another refresh held the token lock too long.
        """
        core = self._core
        p = core.provider(provider)
        core.cipher.require(f"imported tokens of {provider!r}")
        issued = expired_access_dropped(
            provider,
            parse_imported_token(document, now=core.now(), default_scopes=p.auth.scopes),
        )
        flow = import_flow(core, p, issued, actor=actor)
        imported: AccessToken | None = yield from self._single_flight(p, flow)
        return imported


def expired_access_dropped(provider: str, issued: IssuedToken) -> IssuedToken:
    """``issued`` without its access token if that has already expired (its refresh token
    gets a new one at first use).

    Raises:
        ConfigError: the access token has expired and there is no refresh token to replace
            it; names the expiry, never a token.
    """
    expires_at = issued.expires_at
    if not issued.access_token or expires_at is None or expires_at > issued.issued_at:
        return issued
    if issued.refresh_token is None:
        ago = format_duration((issued.issued_at - expires_at).total_seconds())
        raise ConfigError(
            f"{provider}: the access token expired at {utc_seconds(expires_at)} ({ago} ago) "
            "and comes without a refresh_token: expected an access token that has not "
            "expired (expires_in > 0, or expires_at in the future), or one with its "
            "refresh_token; nothing was stored",
            variable="expires_at",
        )
    return replace(issued, access_token="")


class TokenManager(_Face):
    """Hands out OAuth access tokens for providers, refreshing them once however many ask.

    Thread-safe; share one per process. ``get_token`` is lock-free while the
    cached token is fresh.

    Args:
        settings: Library settings (providers' auth, database, keys, Vault).
        engine: SQLAlchemy engine for the token table (default: one for
            ``settings.database_url``, disposed by :meth:`close`).
        metrics: Metrics to record into (default: the process-wide set).
        clock: Time source and waits between token requests (tests pass a ``ManualClock``).
        transport: httpx transport for token requests (tests).
        vault: Vault store (default: built from ``settings.vault`` when needed).
        seed: Seed for the jitter of the waits between token requests and after failed
            refreshes (reproducible tests and drills; default: seeded from the system).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Any = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
        vault: VaultStore | None = None,
        seed: int | None = None,
    ) -> None:
        from ..db._engine import create_db_engine

        self._start(settings, metrics, clock, vault, seed)
        self._owns_engine = engine is None
        self._engine = engine if engine is not None else create_db_engine(settings.database_url)
        self._store = SyncTokenStore(self._engine)
        self._http = httpx.Client(transport=transport, follow_redirects=False, limits=_NO_KEEPALIVE)
        self._io = TokenIO(
            clock=self._core.clock, store=self._store, http=self._http, vault=self._core.vault
        )
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    get_token = sync_face(_Face._get_token)
    token_rejected = sync_face(_Face._token_rejected)
    refresh = sync_face(_Face._refresh)
    import_token = sync_face(_Face._import_token)

    @contextmanager
    def hold(self, provider: str) -> Iterator[TokenHold]:
        """Hold the provider's token lock (in-process and the row) for a maintenance operation.

        Credential rotation runs inside it, so no refresh runs half-way through.
        The row lock is released when the hold commits or when the block ends.

        Raises:
            TokenLockTimeout: another refresh held the lock longer than ``lock_timeout``.
        """
        p = self._core.provider(provider)
        lock = self._lock(p)
        _Acquire(lock, self._core, p).run(self._io)
        try:
            with self._store.locked(p.name, p.auth.lock_timeout) as handle:
                yield TokenHold(self, p, handle)
        finally:
            lock.release()

    def close(self) -> None:
        """Close the HTTP client (and the engine, if this manager created it)."""
        self._http.close()
        self._core.close()
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> TokenManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self, p: ProviderSettings) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(p.name, threading.Lock())


class AsyncTokenManager(_Face):
    """The asyncio face of :class:`TokenManager` (same methods, awaited); one per event loop.

    Coroutines of one loop queue on a per-provider ``asyncio.Lock``; replicas on
    PostgreSQL on the row lock. Vault reads (rare) run in a worker thread.
    Arguments as for :class:`TokenManager`, with an async engine and transport.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Any = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        vault: VaultStore | None = None,
        seed: int | None = None,
    ) -> None:
        from ..db._engine import create_async_db_engine

        self._start(settings, metrics, clock, vault, seed)
        self._owns_engine = engine is None
        self._engine = (
            engine if engine is not None else create_async_db_engine(settings.database_url)
        )
        self._store = AsyncTokenStore(self._engine)
        self._http = httpx.AsyncClient(
            transport=transport, follow_redirects=False, limits=_NO_KEEPALIVE
        )
        self._io = TokenIO(
            clock=self._core.clock, store=self._store, http=self._http, vault=self._core.vault
        )
        self._locks: dict[str, asyncio.Lock] = {}

    get_token = async_face(_Face._get_token)
    token_rejected = async_face(_Face._token_rejected)
    refresh = async_face(_Face._refresh)
    import_token = async_face(_Face._import_token)

    async def aclose(self) -> None:
        """Close the HTTP client (and the engine, if this manager created it)."""
        await self._http.aclose()
        self._core.close()
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> AsyncTokenManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _lock(self, p: ProviderSettings) -> asyncio.Lock:
        lock = self._locks.get(p.name)
        if lock is None:
            lock = self._locks[p.name] = asyncio.Lock()
        return lock


# --------------------------------------------------------------------------- maintenance


class TokenHold:
    """A provider's token lock, held: the public token API for maintenance (rotation).

    Obtained from :meth:`TokenManager.hold`; valid inside its ``with`` block.
    Nothing here is cached or counted until :meth:`commit`.
    """

    def __init__(self, manager: TokenManager, provider: ProviderSettings, handle: RowHandle):
        self._manager = manager
        self._core = manager._core
        self._handle = handle
        #: The provider's settings.
        self.provider = provider

    def __repr__(self) -> str:
        return f"TokenHold(provider={self.provider.name!r}, locked={self._handle.locked})"

    @property
    def snapshot(self) -> RowSnapshot:
        """The provider's token row as read when the lock was taken."""
        return self._handle.snapshot

    @property
    def grant(self) -> GrantType:
        """The grant a token request uses for this provider."""
        return self._core.grant_for(self.provider)

    @property
    def cipher(self) -> TokenCipher:
        """The encryption keys in use."""
        return self._core.cipher

    def vault(self) -> VaultStore:
        """The Vault store of the manager (built from the settings on first use)."""
        return self._core.vault()

    def now(self) -> datetime:
        """The manager's clock."""
        return self._core.now()

    def credentials(self) -> ClientCredentials | None:
        """The client credentials token requests use now (may read Vault)."""
        found: ClientCredentials | None = drive(
            credentials(self._core, self.provider, self.snapshot), self._manager._io
        )
        return found

    def refresh_token(self) -> str | None:
        """The refresh token a request would send now (None for client_credentials)."""
        _, refresh, _ = self._core.candidate(self.provider, self.snapshot)
        return refresh

    def request_token(self, client: ClientCredentials) -> IssuedToken:
        """Obtain a token with ``client`` (retries as for a refresh; nothing is stored).

        With the refresh-token grant this spends the current refresh token:
        :meth:`commit` (or :meth:`keep`) the result.
        """
        issued: IssuedToken = drive(
            request_token(self._core, self.provider, client, self.grant, self.refresh_token()),
            self._manager._io,
        )
        return issued

    def post(self, url: str, *, headers: Mapping[str, str]) -> httpx.Response:
        """POST ``url`` once with the provider's timeouts (no redirects; never retried)."""
        from ..resilience._errors import map_httpx_errors

        with map_httpx_errors(self.provider.name, "rotate"):
            return self._manager._http.post(
                url, headers=dict(headers), timeout=self._core.timeout(self.provider)
            )

    def commit(
        self,
        issued: IssuedToken,
        *,
        switch_to: ClientCredentials | None = None,
        audit: Mapping[str, Any] | None = None,
    ) -> AccessToken:
        """Persist ``issued`` (and, with ``switch_to``, the new credentials) in one transaction.

        Every process and replica uses them from its next refresh. Releases the
        row lock.

        Args:
            issued: A token obtained with :meth:`request_token`.
            switch_to: New credentials to record in the row, their ``source`` where they are
                stored (``vault`` or ``database``) and their ``version`` the KV version or
                rotation counter; the secret is kept as an encrypted copy when a key is
                configured (needed when stored in the database).
            audit: An audit entry written with it (besides ``token.refreshed``).

        Raises:
            ConfigError: credentials to keep in the database but no encryption key.
            StorageError: the database failed; nothing was switched.
        """
        core, p, snap = self._core, self.provider, self.snapshot
        previous = self.refresh_token()
        token, values, entries = core.success(
            p, snap, issued, grant=self.grant, previous_refresh=previous, mode="force"
        )
        if switch_to is not None:
            secret = switch_to.client_secret.get_secret_value()
            copy: str | None
            if switch_to.source == "database":
                copy = core.cipher.encrypt(
                    secret, provider=p.name, field="client_secret", what="the rotated client secret"
                )
            else:
                # The encrypted copy lets replicas without Vault access follow.
                copy = core.cipher.encrypt_optional(secret, provider=p.name, field="client_secret")
            values.update(
                client_id=switch_to.client_id,
                client_secret_enc=copy,
                credential_source=switch_to.source,
                credential_version=switch_to.version,
                credentials_rotated_at=issued.issued_at,
            )
        if audit is not None:
            entries.insert(0, dict(audit))
        self._manager._store.write(self._handle, values, expect_generation=None, audit=entries)
        if switch_to is not None and switch_to.source == "vault":
            core.vault_credentials[p.name] = switch_to
        core.after_success(p, token, mode="force", rotated=False)
        return token

    def record_failure(self, exc: BaseException) -> None:
        """Record a failed token request in the row as a refresh failure would (releases the lock).

        For a verification that spent or lost the refresh token: the row must say
        ``reauthorization_required`` or ``refresh_outcome_unknown``.
        """
        core, p = self._core, self.provider
        outcome, values, entries, error = core.failure(p, self.snapshot, exc)
        self._manager._store.write(self._handle, values, expect_generation=None, audit=entries)
        core.after_failure(p, outcome, error, values)

    def audit(self, entry: Mapping[str, Any]) -> None:
        """Write one audit row on its own (e.g. a failed rotation); touches no token row."""
        self._manager._store.audit_only([dict(entry)])

    @property
    def metrics(self) -> Metrics:
        """The metrics the manager records into."""
        return self._core.metrics


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
    names = (
        [settings.provider(provider).name] if provider is not None else sorted(settings.providers)
    )
    owns = manager is None
    manager = manager or TokenManager(settings)

    def refresh(name: str) -> RefreshResult:
        if settings.provider(name).auth.grant == "none":
            return RefreshResult(provider=name, outcome="skipped", error="no OAuth (grant none)")
        try:
            token = manager.refresh(name)
        except IntegrationError as exc:
            return RefreshResult(
                provider=name,
                outcome="failed",
                error=redact_text(str(exc)),
                error_type=type(exc).__name__,
                retryable=exc.retryable,
            )
        return RefreshResult(
            provider=name,
            outcome="refreshed",
            expires_at=token.expires_at,
            seconds_left=token.seconds_left(manager.clock.now()),
            generation=token.generation,
        )

    try:
        return [refresh(name) for name in names]
    finally:
        if owns:
            manager.close()


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
    settings = settings or Settings.from_env()
    with TokenManager(settings) as manager:
        manager.import_token(provider, token, actor=actor)
        return token_status(settings, provider, engine=manager._engine, clock=manager.clock)


def reencrypt_tokens(*, settings: Settings | None = None, engine: Any = None) -> int:
    """Re-encrypt every stored token and secret with the newest key (key rotation).

    Put the new key first in ``IDIS_ENCRYPTION_KEYS`` (keep the old ones after
    it), run this, then drop the old keys. Each row is rewritten under its
    token lock and only if no newer token was written meanwhile. Values written
    before ciphertexts were bound to their provider and field become bound.

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
                # Also binds values written before ciphertexts were bound to their row.
                values = {
                    column: cipher.reencrypt(getattr(snap, column), provider=provider, field=field)
                    for column, field in SECRET_COLUMNS.items()
                    if getattr(snap, column)
                }
                if values and store.write(row, values, expect_generation=snap.generation):
                    done += 1
    finally:
        if own:
            engine.dispose()
    _log.info("idis.auth.reencrypted", msg="stored tokens re-encrypted", rows=done)
    return done
