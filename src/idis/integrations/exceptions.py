"""Every error idis.integrations raises.

The tree::

    IntegrationError                    root; never raised itself
    ├── ConfigError                     bad environment variable / config file / CLI value
    │   └── UnknownProviderError        a provider name nobody declared
    ├── ProviderError                   a call to a provider failed (carries provider, endpoint)
    │   ├── ProviderTimeout             connect/read/write/pool timeout or deadline exceeded
    │   ├── ProviderConnectionError     refused, reset, DNS, TLS: never reached the provider
    │   ├── ProviderUnavailable         5xx from the provider
    │   ├── RateLimited                 429 (or Retry-After pause in force); has retry_after
    │   │   └── QuotaExhausted          a daily/org quota is spent: wait for the reset, no retry
    │   ├── ProviderRejected            4xx we caused; never retried, never trips a breaker
    │   ├── MalformedResponse           2xx whose body is not what the contract says
    │   ├── CircuitOpen                 breaker open: the call was not attempted
    │   ├── BulkheadFull                too many calls in flight to this provider
    │   ├── RetryBudgetExhausted        (no longer raised: the call ends with the provider's error)
    │   └── ReplayWindowExceeded        asked a replay API for more than it retains
    ├── AuthError                       OAuth token could not be obtained or refreshed
    │   ├── ReauthorizationRequired     invalid_grant: a human must re-authorize
    │   │   ├── CredentialsRejected     invalid_client: the client id or secret was refused
    │   │   └── RefreshOutcomeUnknown   a refresh's answer was lost: its refresh token may be spent
    │   ├── TokenRequestRejected        the token endpoint refused the request (another 4xx)
    │   ├── CredentialRotationError     a rotation step failed; the credentials in use are unchanged
    │   └── TokenLockTimeout            waited too long for another refresh; NOT bad credentials
    ├── SecretStoreError                Vault unreachable, sealed or overloaded: retry later
    │   └── SecretStoreRefused          Vault said no (policy, expired token, missing, conflict)
    ├── WebhookVerificationError        signature, timestamp, size or body rejected
    ├── StorageError                    the database is unreachable or refused the statement
    └── UsageError (also RuntimeError)  a programming mistake in the caller; never retried

Each class has a ``retryable`` flag so that one predicate drives every retry
loop. Messages never contain tokens, secrets or request headers: errors carry
provider and endpoint names, status codes and the value that was wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, ClassVar

__all__ = [
    "AuthError",
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
    "CredentialRotationError",
    "CredentialsRejected",
    "IntegrationError",
    "MalformedResponse",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "QuotaExhausted",
    "RateLimited",
    "ReauthorizationRequired",
    "RefreshOutcomeUnknown",
    "ReplayWindowExceeded",
    "RetryBudgetExhausted",
    "SecretStoreError",
    "SecretStoreRefused",
    "StorageError",
    "TokenLockTimeout",
    "TokenRequestRejected",
    "UnknownProviderError",
    "UsageError",
    "WebhookVerificationError",
]


class IntegrationError(Exception):
    """Base of every error this library raises."""

    #: Whether retrying the same operation later may succeed.
    retryable: ClassVar[bool] = False

    def __init__(self, message: str | None = None) -> None:
        # The class docstring's first line is the default message, so a bare
        # ``raise CircuitOpen()`` still says something useful.
        super().__init__(message or (self.__doc__ or type(self).__name__).strip().splitlines()[0])

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""


class ConfigError(IntegrationError, ValueError):
    """Configuration is invalid.

    The message names the variable (or flag, or config-file key), the value
    found and what was expected. Fix the value and restart; nothing was changed.
    """

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        #: The environment variable, flag or config key that was wrong.
        self.variable = variable


#: The provider placeholders of runbook RB-09's commands.
_RUNBOOK_PLACEHOLDERS = frozenset({"provider_name", "affected_provider"})


class UnknownProviderError(ConfigError):
    """The provider name is not declared in the configuration."""

    def __init__(self, name: str, known: list[str] | tuple[str, ...]) -> None:
        listed = ", ".join(sorted(known)) or "none"
        # RB-09 writes these placeholders where on-call puts the provider's name
        # (Triage 3's check_token('provider_name')): say so, not only "unknown".
        placeholder = (
            " (RB-09's placeholder: put the affected provider's name there)"
            if name in _RUNBOOK_PLACEHOLDERS
            else ""
        )
        super().__init__(
            f"unknown provider {name!r}{placeholder}: expected one of {listed} "
            "(declare providers in IDIS_PROVIDERS or the IDIS_CONFIG_FILE TOML)",
            variable="provider",
        )
        self.provider = name
        self.known = tuple(sorted(known))


class ProviderError(IntegrationError):
    """A call to a provider failed."""

    retryable = True

    def __init__(
        self,
        message: str | None = None,
        *,
        provider: str = "",
        endpoint: str = "",
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        #: Provider name as configured.
        self.provider = provider
        #: Logical endpoint name (a bounded label, never a URL).
        self.endpoint = endpoint
        #: HTTP status code, when the provider answered.
        self.status_code = status_code
        #: Seconds the provider asked us to wait (Retry-After), if it said.
        self.retry_after: float | None = None
        #: Requests of this logical call that went out on the wire (0: the provider
        #: never saw it). The gateway sets it; the outbox counts a delivery attempt
        #: only when it is at least 1, so a call refused before sending (open
        #: breaker, full bulkhead, spent budget) never burns a message's attempts.
        self.sent = 0
        #: Top-level scalar fields of a 4xx JSON body (e.g. a replay refusal's
        #: ``retention_seconds``), for adapters; never put into a message or log.
        self.details: Mapping[str, Any] | None = None

    #: Short, bounded name used as the ``error_type`` metric label.
    error_type: ClassVar[str] = "error"

    #: Whether this failure is the provider's fault (counts against its breaker).
    provider_fault: ClassVar[bool] = True


class ProviderTimeout(ProviderError):
    """The provider did not answer in time (timeout or overall deadline)."""

    error_type = "timeout"


class ProviderConnectionError(ProviderError):
    """The provider could not be reached (connection refused, reset or dropped)."""

    error_type = "connection"


class ProviderUnavailable(ProviderError):
    """The provider answered with a server error (5xx)."""

    error_type = "server_error"


class RateLimited(ProviderError):
    """The provider rate-limited us (HTTP 429); wait ``retry_after`` seconds."""

    error_type = "rate_limited"

    def __init__(
        self,
        message: str | None = None,
        *,
        provider: str = "",
        endpoint: str = "",
        status_code: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, endpoint=endpoint, status_code=status_code)
        self.retry_after = retry_after


class QuotaExhausted(RateLimited):
    """A quota that resets on the provider's schedule is spent (HubSpot's daily limit,
    Salesforce's REQUEST_LIMIT_EXCEEDED): retrying before ``retry_after`` only spends more."""

    retryable = False
    error_type = "rate_limited"


class ProviderRejected(ProviderError):
    """The provider rejected the request (4xx): our request is wrong, do not retry."""

    retryable = False
    provider_fault = False
    error_type = "client_error"


class MalformedResponse(ProviderError):
    """The provider answered 2xx with a body that does not match its contract."""

    error_type = "malformed_response"


class CircuitOpen(ProviderError):
    """The provider's circuit breaker is open: the call was not attempted."""

    provider_fault = False
    error_type = "circuit_open"

    def __init__(
        self,
        message: str | None = None,
        *,
        provider: str = "",
        endpoint: str = "",
        retry_in: float | None = None,
    ) -> None:
        super().__init__(message, provider=provider, endpoint=endpoint)
        #: Seconds until the breaker lets a trial call through, if known.
        self.retry_in = retry_in


class BulkheadFull(ProviderError):
    """Too many calls to this provider are already in flight."""

    provider_fault = False
    error_type = "bulkhead_full"


class RetryBudgetExhausted(ProviderError):
    """A retry was due but the provider's retry budget is spent; the last error is chained.

    The gateway no longer raises it: a call whose retry the budget refuses ends
    with the provider's own error (``sent >= 1``), and the refusal is counted in
    ``integration_retry_budget_exhausted_total``. Kept so code that catches it imports.
    """

    provider_fault = False
    error_type = "retry_budget_exhausted"


class ReplayWindowExceeded(ProviderError):
    """The replay API does not retain events that far back.

    Reconcile a shorter window, or run a full resync of the affected records.
    """

    retryable = False
    provider_fault = False
    error_type = "replay_window_exceeded"

    #: The retention the provider stated when it refused (None: it did not say).
    retention: timedelta | None = None


class AuthError(IntegrationError):
    """An OAuth token could not be obtained or refreshed."""

    retryable = True

    def __init__(self, message: str | None = None, *, provider: str = "") -> None:
        super().__init__(message)
        self.provider = provider


class ReauthorizationRequired(AuthError):
    """The provider refused the grant (invalid_grant): a human must re-authorize."""

    retryable = False


class CredentialsRejected(ReauthorizationRequired):
    """The token endpoint rejected the client credentials (invalid_client).

    Check CLIENT_ID / CLIENT_SECRET (or the Vault secret), or rotate them with
    ``idis-integrations rotate-credentials``.
    """


class RefreshOutcomeUnknown(ReauthorizationRequired):
    """A refresh request was sent but its answer was lost; the refresh token may be spent.

    The provider may have rotated the refresh token and sent the new one in the
    answer we never read. Sending the old one again would look like token theft
    to a provider with reuse protection, which then revokes the whole token
    family, so automatic refresh stops: re-authorize and import the new token
    (or, for a provider that tolerates reuse, configure its grace period).
    """

    def __init__(
        self, message: str, *, provider: str = "", reason: str = "", sent_at: datetime | None = None
    ) -> None:
        super().__init__(message, provider=provider)
        #: What was lost: ``timeout``, ``connection``, ``server_error``, ``malformed_response``.
        self.reason = reason
        #: When the first request whose answer was lost was sent.
        self.sent_at = sent_at


class TokenRequestRejected(AuthError):
    """The token endpoint refused the request for a reason retrying will not fix (4xx)."""

    retryable = False


class CredentialRotationError(AuthError):
    """A credential rotation failed at ``step``; the credentials in use did not change.

    The message says which step failed, why, and what (if anything) the
    operator should do; for the rotation API, how long the previous secret
    stays valid. ``retryable`` says whether running it again later may work
    (Vault, the provider or the database was unreachable) or someone must fix
    something first.
    """

    retryable = False

    def __init__(
        self, message: str, *, provider: str, step: str, retry_later: bool = False
    ) -> None:
        super().__init__(message, provider=provider)
        #: prepare, obtain, verify, store or switch.
        self.step = step
        #: True when a dependency was unreachable: the same rotation may work later.
        self.retry_later = retry_later


class TokenLockTimeout(AuthError):
    """Timed out waiting for another process's token refresh; credentials may be fine."""


class SecretStoreError(IntegrationError):
    """The secret store (Vault) is unreachable, sealed or overloaded; retry later."""

    retryable = True


class SecretStoreRefused(SecretStoreError):
    """Vault answered, and the answer is no: retrying will not help until someone acts.

    ``reason`` says which: ``denied`` (the policy does not grant it),
    ``token_expired`` (the token expired or was revoked and could not be
    renewed or re-logged in), ``login_failed`` (AppRole refused the role or
    secret id), ``missing`` (no such secret), ``conflict`` (another writer
    changed the secret: nothing was written), ``redirect`` (Vault redirected to
    another origin: refused, the token was not sent there), ``no_version``
    (a write answered without a version: not trusted as written).
    """

    retryable = False

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: Bounded reason code (see the class docstring).
        self.reason = reason


class WebhookVerificationError(IntegrationError):
    """An inbound webhook failed verification (signature, timestamp, size or body)."""

    def __init__(self, message: str | None = None, *, reason: str = "invalid") -> None:
        super().__init__(message)
        #: Bounded reason code, used as a metric label.
        self.reason = reason


class StorageError(IntegrationError):
    """The database is unreachable or refused a statement."""

    retryable = True


class UsageError(IntegrationError, RuntimeError):
    """The library was called incorrectly; this is a bug in the caller."""
