"""Settings, read from the environment alone (or a TOML file an environment variable names).

``Settings.from_env()`` is the only entry point. It validates everything up
front and raises :class:`~idis.integrations.exceptions.ConfigError` naming the
variable, the value and what was expected, so a bad deploy fails at start,
not at 3 a.m. on the first provider call.

Providers come from, in order of precedence:

1. ``IDIS_PROVIDER_<NAME>_<FIELD>`` environment variables for every name in
   ``IDIS_PROVIDERS`` (comma-separated);
2. the ``[providers.<name>]`` tables of the TOML file named by ``IDIS_CONFIG_FILE``;
3. when neither declares any provider, the embedded defaults: ``crm_provider``,
   ``docs_provider`` and ``enrichment_provider`` on the local simulator
   (``IDIS_SIMULATOR_URL``), so that every command works on a laptop.

``docs/configuration.md`` lists every variable with its default.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from ._timeparse import parse_duration
from .exceptions import ConfigError, UnknownProviderError

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "AuthSettings",
    "BreakerPolicy",
    "EnrichmentSettings",
    "OutboxSettings",
    "ProviderKind",
    "ProviderSettings",
    "RateLimitPolicy",
    "RetryPolicy",
    "Secret",
    "Settings",
    "SyncSettings",
    "TimeoutPolicy",
    "VaultSettings",
    "WebhookSettings",
]

ProviderKind = Literal["crm", "docs", "enrichment"]
SyncMode = Literal["webhook", "polling"]
_KINDS: tuple[str, ...] = ("crm", "docs", "enrichment")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
DEFAULT_SIMULATOR_URL = "http://127.0.0.1:8765"
DEFAULT_DATABASE_URL = "sqlite:///idis-integrations.sqlite3"


class Secret:
    """A secret string whose ``repr``/``str`` never reveal it.

    Every value wrapped here is also registered with the log redaction
    processor, so it is scrubbed even if some code path formats it by hand.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        from .observability._logs import register_secret

        register_secret(value)

    def get_secret_value(self) -> str:
        """Return the secret itself; do not log it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """Per-attempt timeouts and the overall deadline for one logical call."""

    #: Seconds to establish a connection.
    connect: float = 3.0
    #: Seconds to wait for response bytes.
    read: float = 10.0
    #: Seconds to send the request body.
    write: float = 10.0
    #: Seconds to wait for a free pooled connection.
    pool: float = 5.0
    #: Seconds for the whole call, retries and backoff included.
    deadline: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When to retry: exponential backoff with full jitter, bounded by a retry budget."""

    #: Total attempts, the first one included (1 disables retries).
    max_attempts: int = 3
    #: Backoff cap for the first retry, in seconds (full jitter: uniform in [0, cap]).
    initial_backoff: float = 0.2
    #: Largest backoff cap, in seconds.
    max_backoff: float = 10.0
    #: Growth factor of the backoff cap per retry.
    multiplier: float = 2.0
    #: Longest Retry-After we honour, in seconds; longer ones are capped.
    retry_after_cap: float = 60.0
    #: Retries may be at most this fraction of recent calls to the provider.
    budget_ratio: float = 0.2
    #: Retries always allowed per budget window, so low traffic can still retry.
    budget_min_retries: int = 10
    #: Length of the sliding window the budget is computed over, in seconds.
    budget_window: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a provider's circuit opens, and how it closes again.

    It opens on ``failure_threshold`` consecutive provider faults, or when at
    least ``minimum_calls`` calls in the last ``window`` seconds failed at a rate
    of ``failure_rate`` or more: the second rule trips at CRM traffic levels (a
    few calls a minute) where consecutive counts alone never would.
    """

    #: Consecutive provider faults that open the breaker.
    failure_threshold: int = 5
    #: Failure rate (0-1] over the window that opens the breaker.
    failure_rate: float = 0.3
    #: Fewest calls in the window before the failure rate is judged.
    minimum_calls: int = 6
    #: Sliding window for the failure rate, in seconds. Ten minutes, so that a
    #: CRM called twice a minute still has enough calls to judge a rate by.
    window: float = 600.0
    #: Seconds an open breaker waits before letting trial calls through.
    reset_timeout: float = 30.0
    #: Trial calls let through while half-open; all must succeed to close.
    half_open_max_calls: int = 1
    #: Keep one breaker per endpoint as well as the provider-wide one.
    per_endpoint: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """Client-side token bucket; ``rate=None`` disables it."""

    #: Requests per second allowed on average, or None for no limit.
    rate: float | None = None
    #: Bucket size: requests allowed in a burst.
    burst: int = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """How to obtain an OAuth token for a provider."""

    #: "none", "client_credentials" or "refresh_token".
    grant: Literal["none", "client_credentials", "refresh_token"] = "none"
    #: Token endpoint (absolute URL, or a path on the provider's base URL).
    token_url: str = "/oauth/token"  # noqa: S105  # a URL path, not a password
    #: OAuth client id.
    client_id: str = ""
    #: OAuth client secret.
    client_secret: Secret | None = None
    #: Scopes to request.
    scopes: tuple[str, ...] = ()
    #: Refresh this long before expiry, in seconds.
    refresh_margin: float = 300.0
    #: Endpoint of the provider's credential-rotation API, if it has one.
    rotation_url: str | None = None
    #: Read client credentials from Vault at start.
    credentials_from_vault: bool = False
    #: How the client authenticates at the token endpoint.
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    #: Longest wait, in seconds, for another caller's (or replica's) refresh to finish.
    lock_timeout: float = 10.0
    #: Token requests per refresh (network faults, 5xx and 429 are retried with backoff).
    refresh_attempts: int = 3
    #: How long the provider accepts a refresh token again after rotating it, in
    #: seconds (``REFRESH_REUSE_GRACE``; 0: never). A refresh whose answer was lost
    #: (timeout after sending, dropped connection, 5xx) is retried with the same
    #: refresh token only inside this window; see docs/auth.md for providers.
    refresh_reuse_grace: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """One third-party provider and the policies its calls run under."""

    #: Name used in every metric label, log line, CLI flag and table row.
    name: str
    #: What the provider is for.
    kind: ProviderKind
    #: Base URL every endpoint path is joined to.
    base_url: str
    #: Logical endpoint name -> path template (``/records/{id}``).
    endpoints: Mapping[str, str] = field(default_factory=dict)
    #: Connect/read/write/pool timeouts and the overall deadline.
    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    #: Retry policy.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Circuit-breaker policy.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    #: Client-side rate limit.
    rate_limit: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    #: Most calls in flight at once to this provider (bulkhead), also the pool size.
    max_concurrency: int = 16
    #: Seconds a call waits for a bulkhead slot before failing with BulkheadFull.
    bulkhead_wait: float = 1.0
    #: Path of the provider's status/health endpoint, if it has one.
    health_endpoint: str | None = None
    #: OAuth settings.
    auth: AuthSettings = field(default_factory=AuthSettings)
    #: Secrets accepted on inbound webhooks (several during rotation); the first signs outbound.
    webhook_secrets: tuple[Secret, ...] = ()
    #: How far back the provider's replay API retains events.
    replay_retention: timedelta = timedelta(hours=72)
    #: How events and records of one record are ordered: ``version`` (the record
    #: version the provider sends) or ``modified`` (its modification time, for
    #: providers that send no version). See ``providers.ordering_for``.
    order_by: str = "version"
    #: Providers to try, in order, when this one cannot serve (enrichment fallbacks).
    fallbacks: tuple[str, ...] = ()

    def endpoint_path(self, endpoint: str) -> str:
        """Path template for a logical endpoint; an undeclared name is used as the path."""
        return self.endpoints.get(endpoint, "/" + endpoint.lstrip("/"))


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncSettings:
    """Webhook/polling mode control (RB-09 Containment 1, Recovery 5)."""

    #: ``CRM_MODE``: "webhook" (automatic failover on) or "polling" (pinned).
    crm_mode: SyncMode = "webhook"
    #: ``CRM_POLL_INTERVAL``: how often the poller runs while polling.
    crm_poll_interval: timedelta = timedelta(minutes=5)
    #: Switch to polling by itself when webhooks fail.
    auto_failover: bool = True
    #: Webhook lag that fails over: a sentinel poll finds changes this much newer
    #: than the last webhook.
    lag_threshold: timedelta = timedelta(minutes=2)
    #: Webhooks must be healthy this long before returning to webhook mode.
    stable_period: timedelta = timedelta(minutes=10)
    #: How often the sentinel poll checks for changes while in webhook mode.
    sentinel_interval: timedelta = timedelta(minutes=1)
    #: How far each poll window reaches back before the cursor (clock skew, late commits).
    poll_overlap: timedelta = timedelta(minutes=2)
    #: Signature failures per minute at which a receiver records a spike (shown by
    #: ``status``); they never switch modes (a forged request costs an attacker nothing).
    signature_failure_threshold: int = 10
    #: Poller leadership (PostgreSQL advisory lock): how often a standby tries to
    #: take over, and how long a vanished leader's connection may linger.
    lock_timeout: timedelta = timedelta(seconds=15)
    #: Events fetched per change-feed page by the poller and the sentinel.
    page_size: int = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrichmentSettings:
    """Deferred enrichment (RB-09 Containment 2)."""

    #: ``ENRICHMENT_DEFER_ON_ERROR``: defer and mark stale instead of raising.
    defer_on_error: bool = False
    #: Serve the last good result (marked stale) while every provider is down.
    serve_cached: bool = True
    #: ``IDIS_ENRICHMENT_PROVIDER``: primary provider when the caller names none
    #: (default: the first provider of kind ``enrichment``).
    provider: str | None = None
    #: Most deferred requests one worker refreshes per batch, per provider (slow-starts at 1).
    batch_size: int = 50
    #: Pause between two refresh batches of one worker (spreads a recovery's backlog).
    batch_interval: timedelta = timedelta(milliseconds=250)
    #: Idle wait of the deferred worker when nothing is due.
    poll_interval: timedelta = timedelta(seconds=5)
    #: First backoff cap after a failed refresh (doubles per attempt, jittered).
    retry_backoff: timedelta = timedelta(seconds=5)
    #: Largest backoff cap between refresh attempts.
    retry_max_backoff: timedelta = timedelta(minutes=5)
    #: How long a worker's lease on a deferred request lasts.
    lease: timedelta = timedelta(seconds=60)
    #: ``IDIS_IMPACT_DEALS_TABLE``: host table with ``tenant_id`` and the CRM sync-status
    #: columns, counted by ``impact`` (same database as the library's tables).
    impact_deals_table: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    """The persistent retry outbox."""

    #: Retries after the first attempt before a message is dead-lettered.
    max_retries: int = 10
    #: Messages leased per batch.
    batch_size: int = 100
    #: Messages of one batch delivered at once (a batch never holds two of one ordering key).
    concurrency: int = 4
    #: How long a lease lasts before another worker may take the message.
    lease: timedelta = timedelta(seconds=60)
    #: Idle wait between polls when the queue is empty.
    poll_interval: timedelta = timedelta(seconds=1)
    #: First retry delay cap (full jitter, doubling per attempt).
    initial_backoff: timedelta = timedelta(seconds=1)
    #: Largest retry delay cap.
    max_backoff: timedelta = timedelta(minutes=10)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """Inbound webhook verification."""

    #: Accepted clock difference for webhook-timestamp.
    tolerance: timedelta = timedelta(minutes=5)
    #: Largest accepted body, in bytes.
    max_body_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True, kw_only=True)
class VaultSettings:
    """Where credentials live in Vault (KV v2)."""

    #: ``VAULT_ADDR``; empty means Vault is not configured.
    addr: str = ""
    #: ``VAULT_TOKEN``.
    token: Secret | None = None
    #: ``VAULT_ROLE_ID`` for AppRole login (with ``VAULT_SECRET_ID``).
    role_id: str = ""
    #: ``VAULT_SECRET_ID``.
    secret_id: Secret | None = None
    #: ``VAULT_NAMESPACE``.
    namespace: str = ""
    #: KV v2 mount point.
    mount: str = "secret"
    #: Path prefix under the mount; credentials live at ``<prefix>/<provider>``.
    path_prefix: str = "idis/integrations"
    #: Seconds per Vault request.
    timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the library is configured with."""

    #: SQLAlchemy URL of the library's database (``IDIS_DATABASE_URL``).
    database_url: str = DEFAULT_DATABASE_URL
    #: Redis URL for breaker state shared across replicas; None keeps it in-process.
    redis_url: str | None = None
    #: Declared providers by name.
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    #: True when ``providers`` are the embedded simulator defaults.
    embedded_defaults: bool = False
    sync: SyncSettings = field(default_factory=SyncSettings)
    enrichment: EnrichmentSettings = field(default_factory=EnrichmentSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    #: Fernet keys for tokens at rest, newest first (``IDIS_ENCRYPTION_KEYS``).
    encryption_keys: tuple[Secret, ...] = ()
    #: "json" (production) or "console".
    log_format: Literal["json", "console"] = "json"
    #: Log level name.
    log_level: str = "INFO"
    #: Simulator URL the embedded defaults point at.
    simulator_url: str = DEFAULT_SIMULATOR_URL

    def provider(self, name: str) -> ProviderSettings:
        """Return the named provider's settings.

        Raises:
            UnknownProviderError: naming the provider and the declared ones.
        """
        try:
            return self.providers[name]
        except KeyError:
            raise UnknownProviderError(name, tuple(self.providers)) from None

    def with_providers(self, *providers: ProviderSettings) -> Settings:
        """Return a copy with these providers added or replaced."""
        merged = dict(self.providers)
        merged.update({p.name: p for p in providers})
        return replace(self, providers=merged, embedded_defaults=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings from an environment mapping (``os.environ`` by default).

        Raises:
            ConfigError: naming the first invalid variable and the value found.
        """
        return _load(os.environ if environ is None else environ)


# --------------------------------------------------------------------------- parsing

_T = TypeVar("_T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(value: object, name: str) -> bool:
    """Parse true/false/1/0/yes/no/on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean: expected true or false", variable=name)


def _number(value: object, name: str, kind: Callable[[str], _T], *, minimum: float) -> _T:
    try:
        parsed = kind(str(value).strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(f"{name}={value!r} is not {noun}", variable=name) from None
    if float(parsed) < minimum:  # type: ignore[arg-type]  # _T is int or float here
        raise ConfigError(f"{name}={value!r} must be at least {minimum:g}", variable=name)
    return parsed


def _int(value: object, name: str, minimum: int = 0) -> int:
    return _number(value, name, int, minimum=minimum)


def _float(value: object, name: str, minimum: float = 0.0) -> float:
    return _number(value, name, float, minimum=minimum)


def _seconds(value: object, name: str) -> float:
    return parse_duration(value, name=name).total_seconds()  # type: ignore[arg-type]  # TOML gives str/int/float


def _delta(value: object, name: str) -> timedelta:
    return parse_duration(value, name=name)  # type: ignore[arg-type]  # TOML gives str/int/float


_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")


def _table_name(value: object, name: str) -> str | None:
    text = str(value).strip()
    if not text:
        return None
    if not _TABLE_NAME.fullmatch(text):
        raise ConfigError(
            f"{name}={value!r} is not a table name: expected deals or schema.deals",
            variable=name,
        )
    return text


def _ratio(value: object, name: str) -> float:
    parsed = _float(value, name)
    if not 0 < parsed <= 1:
        raise ConfigError(f"{name}={value!r} must be a fraction in (0, 1]", variable=name)
    return parsed


def _url(value: object, name: str) -> str:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"{name}={value!r} is not an http(s) URL: expected e.g. https://api.example.com",
            variable=name,
        )
    return text.rstrip("/")


def _list(value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).replace(" ", ",").split(",") if part.strip())


def _endpoints(value: object, name: str) -> dict[str, str]:
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in _list(value):
            key, sep, path = item.partition("=")
            if not sep or not key or not path:
                raise ConfigError(
                    f"{name}={value!r} is not a list of name=/path pairs "
                    "(e.g. records=/records,record=/records/{id})",
                    variable=name,
                )
            pairs.append((key.strip(), path.strip()))
    for key, path in pairs:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", key) or not path.startswith("/"):
            raise ConfigError(
                f"{name}: endpoint {key}={path!r} is invalid: expected a lowercase name "
                "and a path starting with /",
                variable=name,
            )
    return dict(pairs)


def _rate(value: object, name: str) -> float | None:
    text = str(value).strip().lower()
    if text in ("", "none", "off", "0"):
        return None
    number, _, unit = text.partition("/")
    per = {
        "": 1.0,
        "s": 1.0,
        "sec": 1.0,
        "second": 1.0,
        "m": 60.0,
        "min": 60.0,
        "minute": 60.0,
        "h": 3600.0,
        "hour": 3600.0,
    }
    if unit not in per:
        raise ConfigError(
            f"{name}={value!r} is not a rate: expected e.g. 10/s, 600/m or 5", variable=name
        )
    return _float(number, name, minimum=1e-9) / per[unit]


def _secrets(value: object) -> tuple[Secret, ...]:
    return tuple(Secret(s) for s in _list(value))


# Each provider field: env suffix -> (config key, converter). Converters get the
# raw value and the name to blame, so env vars and TOML keys share one parser.
_Conv = Callable[[object, str], Any]
_PROVIDER_FIELDS: dict[str, tuple[str, _Conv]] = {
    "KIND": ("kind", lambda v, n: _choice(v, n, _KINDS)),
    "BASE_URL": ("base_url", _url),
    "ENDPOINTS": ("endpoints", _endpoints),
    "MAX_CONCURRENCY": ("max_concurrency", lambda v, n: _int(v, n, 1)),
    "BULKHEAD_WAIT": ("bulkhead_wait", _seconds),
    "HEALTH_ENDPOINT": ("health_endpoint", lambda v, n: str(v) or None),
    "WEBHOOK_SECRETS": ("webhook_secrets", lambda v, n: _secrets(v)),
    "REPLAY_RETENTION": ("replay_retention", _delta),
    "ORDER_BY": ("order_by", lambda v, n: _choice(v, n, ("version", "modified"))),
    "FALLBACKS": ("fallbacks", lambda v, n: _list(v)),
    "CONNECT_TIMEOUT": ("timeouts.connect", _seconds),
    "TIMEOUT": ("timeouts.read", _seconds),
    "WRITE_TIMEOUT": ("timeouts.write", _seconds),
    "POOL_TIMEOUT": ("timeouts.pool", _seconds),
    "DEADLINE": ("timeouts.deadline", _seconds),
    "RETRY_MAX_ATTEMPTS": ("retry.max_attempts", lambda v, n: _int(v, n, 1)),
    "RETRY_BACKOFF": ("retry.initial_backoff", _seconds),
    "RETRY_MAX_BACKOFF": ("retry.max_backoff", _seconds),
    "RETRY_MULTIPLIER": ("retry.multiplier", lambda v, n: _float(v, n, 1.0)),
    "RETRY_AFTER_CAP": ("retry.retry_after_cap", _seconds),
    "RETRY_BUDGET_RATIO": ("retry.budget_ratio", _ratio),
    "RETRY_BUDGET_MIN": ("retry.budget_min_retries", lambda v, n: _int(v, n, 0)),
    "RETRY_BUDGET_WINDOW": ("retry.budget_window", _seconds),
    "BREAKER_FAILURE_THRESHOLD": ("breaker.failure_threshold", lambda v, n: _int(v, n, 1)),
    "BREAKER_FAILURE_RATE": ("breaker.failure_rate", _ratio),
    "BREAKER_MINIMUM_CALLS": ("breaker.minimum_calls", lambda v, n: _int(v, n, 1)),
    "BREAKER_WINDOW": ("breaker.window", _seconds),
    "BREAKER_RESET_TIMEOUT": ("breaker.reset_timeout", _seconds),
    "BREAKER_HALF_OPEN_CALLS": ("breaker.half_open_max_calls", lambda v, n: _int(v, n, 1)),
    "BREAKER_PER_ENDPOINT": ("breaker.per_endpoint", parse_bool),
    "RATE_LIMIT": ("rate_limit.rate", _rate),
    "RATE_LIMIT_BURST": ("rate_limit.burst", lambda v, n: _int(v, n, 1)),
    "AUTH_GRANT": (
        "auth.grant",
        lambda v, n: _choice(v, n, ("none", "client_credentials", "refresh_token")),
    ),
    "TOKEN_URL": ("auth.token_url", lambda v, n: str(v).strip()),
    "CLIENT_ID": ("auth.client_id", lambda v, n: str(v).strip()),
    "CLIENT_SECRET": ("auth.client_secret", lambda v, n: Secret(str(v))),
    "SCOPES": ("auth.scopes", lambda v, n: _list(v)),
    "REFRESH_MARGIN": ("auth.refresh_margin", _seconds),
    "ROTATION_URL": ("auth.rotation_url", lambda v, n: str(v).strip() or None),
    "CREDENTIALS_FROM_VAULT": ("auth.credentials_from_vault", parse_bool),
    "CLIENT_AUTH": (
        "auth.client_auth",
        lambda v, n: _choice(v, n, ("client_secret_basic", "client_secret_post")),
    ),
    "TOKEN_LOCK_TIMEOUT": ("auth.lock_timeout", _seconds),
    "REFRESH_ATTEMPTS": ("auth.refresh_attempts", lambda v, n: _int(v, n, 1)),
    "REFRESH_REUSE_GRACE": ("auth.refresh_reuse_grace", _seconds),
}
_SUBSECTIONS: dict[str, type[Any]] = {
    "timeouts": TimeoutPolicy,
    "retry": RetryPolicy,
    "breaker": BreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "auth": AuthSettings,
}
_KEY_TO_SUFFIX = {key: suffix for suffix, (key, _) in _PROVIDER_FIELDS.items()}


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(
            f"{name}={value!r} is not valid: expected one of {', '.join(choices)}", variable=name
        )
    return text


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and key in _SUBSECTIONS and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[dotted] = value
    return flat


def _build_provider(name: str, values: dict[str, tuple[object, str]]) -> ProviderSettings:
    """Build one provider from raw values keyed by dotted field, each with the name to blame."""
    top: dict[str, Any] = {}
    sub: dict[str, dict[str, Any]] = {key: {} for key in _SUBSECTIONS}
    for key, (raw, blame) in values.items():
        suffix = _KEY_TO_SUFFIX.get(key)
        if suffix is None:
            raise ConfigError(
                f"{blame}: unknown provider setting {key!r}: expected one of "
                f"{', '.join(sorted(_KEY_TO_SUFFIX))}",
                variable=blame,
            )
        converted = _PROVIDER_FIELDS[suffix][1](raw, blame)
        head, _, tail = key.partition(".")
        if tail:
            sub[head][tail] = converted
        else:
            top[key] = converted
    for required in ("kind", "base_url"):
        if required not in top:
            env = f"IDIS_PROVIDER_{name.upper()}_{_KEY_TO_SUFFIX[required]}"
            raise ConfigError(
                f"provider {name!r} has no {required}: set {env} or "
                f"providers.{name}.{required} in the config file",
                variable=env,
            )
    for head, cls in _SUBSECTIONS.items():
        if sub[head]:
            top[head] = cls(**sub[head])
    return ProviderSettings(name=name, **top)


def _embedded_providers(simulator_url: str) -> dict[str, ProviderSettings]:
    """The three simulator-backed providers every command works against out of the box."""
    endpoints = {
        "records": "/records",
        "record": "/records/{id}",
        "changes": "/changes",
        "replay": "/replay",
        "enrich": "/enrich/{id}",
        "webhooks": "/webhooks/inbound",
    }
    auth = AuthSettings(
        grant="client_credentials",
        token_url="/oauth/token",  # noqa: S106  # a URL path, not a password
        client_id="idis-local",
        client_secret=Secret("local-simulator-secret"),
        rotation_url="/oauth/rotate",
    )
    return {
        name: ProviderSettings(
            name=name,
            kind=kind,  # type: ignore[arg-type]  # literal from the tuple below
            base_url=f"{simulator_url}/p/{name}",
            endpoints=endpoints,
            health_endpoint="/health",
            auth=auth,
            webhook_secrets=(Secret("whsec_" + "bG9jYWwtc2ltdWxhdG9yLXdlYmhvb2s="),),
        )
        for name, kind in (
            ("crm_provider", "crm"),
            ("docs_provider", "docs"),
            ("enrichment_provider", "enrichment"),
        )
    }


def _read_config_file(path_text: str) -> dict[str, Any]:
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"IDIS_CONFIG_FILE={path_text!r} does not exist: expected a TOML file",
            variable="IDIS_CONFIG_FILE",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"IDIS_CONFIG_FILE={path_text!r} is not valid TOML: {exc}",
            variable="IDIS_CONFIG_FILE",
        ) from None


def _section(
    cls: type[_T],
    environ: Mapping[str, str],
    spec: Mapping[str, tuple[str, _Conv]],
    file_values: Mapping[str, Any],
    file_prefix: str,
) -> _T:
    """Build a settings section: env var beats config file beats default."""
    kwargs: dict[str, Any] = {}
    for attr, (env, conv) in spec.items():
        if env in environ and environ[env].strip() != "":
            kwargs[attr] = conv(environ[env], env)
        elif attr in file_values:
            kwargs[attr] = conv(file_values[attr], f"{file_prefix}.{attr}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # cls is a dataclass
    for key in file_values:
        if key not in known:
            raise ConfigError(
                f"IDIS_CONFIG_FILE: unknown setting {file_prefix}.{key}",
                variable="IDIS_CONFIG_FILE",
            )
    return cls(**kwargs)


def _mode(value: object, name: str) -> str:
    return _choice(value, name, ("webhook", "polling"))


def _load(environ: Mapping[str, str]) -> Settings:
    config_path = environ.get("IDIS_CONFIG_FILE", "").strip()
    document = _read_config_file(config_path) if config_path else {}
    general = document.get("idis", {})

    def env_or_file(env: str, key: str, default: str | None) -> str | None:
        if environ.get(env, "").strip():
            return environ[env].strip()
        if key in general:
            return str(general[key])
        return default

    simulator_url = _url(
        env_or_file("IDIS_SIMULATOR_URL", "simulator_url", DEFAULT_SIMULATOR_URL),
        "IDIS_SIMULATOR_URL",
    )
    database_url = env_or_file("IDIS_DATABASE_URL", "database_url", DEFAULT_DATABASE_URL)
    assert database_url is not None
    _check_database_url(database_url)
    redis_url = env_or_file("IDIS_REDIS_URL", "redis_url", None)
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"IDIS_REDIS_URL={redis_url!r} is not a Redis URL: expected redis://host:6379/0",
            variable="IDIS_REDIS_URL",
        )
    log_format = _choice(
        env_or_file("IDIS_LOG_FORMAT", "log_format", "json"), "IDIS_LOG_FORMAT", ("json", "console")
    )
    log_level = _choice(
        env_or_file("IDIS_LOG_LEVEL", "log_level", "INFO"),
        "IDIS_LOG_LEVEL",
        ("debug", "info", "warning", "error", "critical"),
    ).upper()

    providers = _load_providers(environ, document)
    embedded = not providers
    if embedded:
        providers = _embedded_providers(simulator_url)
    for provider in providers.values():
        for fallback in provider.fallbacks:
            if fallback not in providers:
                raise UnknownProviderError(fallback, tuple(providers))

    sync = _section(
        SyncSettings,
        environ,
        {
            "crm_mode": ("CRM_MODE", _mode),
            "crm_poll_interval": ("CRM_POLL_INTERVAL", _delta),
            "auto_failover": ("IDIS_SYNC_AUTO_FAILOVER", parse_bool),
            "lag_threshold": ("IDIS_SYNC_LAG_THRESHOLD", _delta),
            "stable_period": ("IDIS_SYNC_STABLE_PERIOD", _delta),
            "sentinel_interval": ("IDIS_SYNC_SENTINEL_INTERVAL", _delta),
            "poll_overlap": ("IDIS_SYNC_POLL_OVERLAP", _delta),
            "lock_timeout": ("IDIS_SYNC_LOCK_TIMEOUT", _delta),
            "page_size": ("IDIS_SYNC_PAGE_SIZE", lambda v, n: _int(v, n, 1)),
            "signature_failure_threshold": (
                "IDIS_SYNC_SIGNATURE_FAILURE_THRESHOLD",
                lambda v, n: _int(v, n, 1),
            ),
        },
        document.get("sync", {}),
        "sync",
    )
    if sync.crm_poll_interval <= timedelta(0):
        raise ConfigError(
            f"CRM_POLL_INTERVAL={environ.get('CRM_POLL_INTERVAL')!r} must be positive",
            variable="CRM_POLL_INTERVAL",
        )
    for attr, env in (
        ("sentinel_interval", "IDIS_SYNC_SENTINEL_INTERVAL"),
        ("lock_timeout", "IDIS_SYNC_LOCK_TIMEOUT"),
    ):
        if getattr(sync, attr) <= timedelta(0):
            raise ConfigError(f"{env}={environ.get(env)!r} must be positive", variable=env)
    enrichment = _section(
        EnrichmentSettings,
        environ,
        {
            "defer_on_error": ("ENRICHMENT_DEFER_ON_ERROR", parse_bool),
            "serve_cached": ("IDIS_ENRICHMENT_SERVE_CACHED", parse_bool),
            "provider": ("IDIS_ENRICHMENT_PROVIDER", lambda v, n: str(v).strip() or None),
            "batch_size": ("IDIS_ENRICHMENT_BATCH_SIZE", lambda v, n: _int(v, n, 1)),
            "batch_interval": ("IDIS_ENRICHMENT_BATCH_INTERVAL", _delta),
            "poll_interval": ("IDIS_ENRICHMENT_POLL_INTERVAL", _delta),
            "retry_backoff": ("IDIS_ENRICHMENT_RETRY_BACKOFF", _delta),
            "retry_max_backoff": ("IDIS_ENRICHMENT_RETRY_MAX_BACKOFF", _delta),
            "lease": ("IDIS_ENRICHMENT_LEASE", _delta),
            "impact_deals_table": ("IDIS_IMPACT_DEALS_TABLE", _table_name),
        },
        document.get("enrichment", {}),
        "enrichment",
    )
    for attr, env in (
        ("poll_interval", "IDIS_ENRICHMENT_POLL_INTERVAL"),
        ("lease", "IDIS_ENRICHMENT_LEASE"),
        ("retry_backoff", "IDIS_ENRICHMENT_RETRY_BACKOFF"),
    ):
        if getattr(enrichment, attr) <= timedelta(0):
            raise ConfigError(
                f"{env}={environ.get(env)!r} must be positive: expected a duration like 5s",
                variable=env,
            )
    if enrichment.provider is not None and enrichment.provider not in providers:
        raise ConfigError(
            f"IDIS_ENRICHMENT_PROVIDER={enrichment.provider!r} names no declared provider: "
            f"expected one of {', '.join(sorted(providers))}",
            variable="IDIS_ENRICHMENT_PROVIDER",
        )
    outbox = _section(
        OutboxSettings,
        environ,
        {
            "max_retries": ("IDIS_OUTBOX_MAX_RETRIES", lambda v, n: _int(v, n, 0)),
            "batch_size": ("IDIS_OUTBOX_BATCH_SIZE", lambda v, n: _int(v, n, 1)),
            "concurrency": ("IDIS_OUTBOX_CONCURRENCY", lambda v, n: _int(v, n, 1)),
            "lease": ("IDIS_OUTBOX_LEASE", _delta),
            "poll_interval": ("IDIS_OUTBOX_POLL_INTERVAL", _delta),
            "initial_backoff": ("IDIS_OUTBOX_BACKOFF", _delta),
            "max_backoff": ("IDIS_OUTBOX_MAX_BACKOFF", _delta),
        },
        document.get("outbox", {}),
        "outbox",
    )
    webhooks = _section(
        WebhookSettings,
        environ,
        {
            "tolerance": ("IDIS_WEBHOOK_TOLERANCE", _delta),
            "max_body_bytes": ("IDIS_WEBHOOK_MAX_BODY_BYTES", lambda v, n: _int(v, n, 1)),
        },
        document.get("webhooks", {}),
        "webhooks",
    )
    vault = _section(
        VaultSettings,
        environ,
        {
            "addr": ("VAULT_ADDR", _url),
            "token": ("VAULT_TOKEN", lambda v, n: Secret(str(v).strip())),
            "role_id": ("VAULT_ROLE_ID", lambda v, n: str(v).strip()),
            "secret_id": ("VAULT_SECRET_ID", lambda v, n: Secret(str(v).strip())),
            "namespace": ("VAULT_NAMESPACE", lambda v, n: str(v).strip()),
            "mount": ("IDIS_VAULT_MOUNT", lambda v, n: str(v).strip().strip("/")),
            "path_prefix": ("IDIS_VAULT_PATH_PREFIX", lambda v, n: str(v).strip().strip("/")),
            "timeout": ("IDIS_VAULT_TIMEOUT", _seconds),
        },
        document.get("vault", {}),
        "vault",
    )
    keys = environ.get("IDIS_ENCRYPTION_KEYS", "").strip()
    encryption_keys = _secrets(keys) if keys else ()
    if encryption_keys:
        _check_fernet_keys(encryption_keys)
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        providers=providers,
        embedded_defaults=embedded,
        sync=sync,
        enrichment=enrichment,
        outbox=outbox,
        webhooks=webhooks,
        vault=vault,
        encryption_keys=encryption_keys,
        log_format=log_format,  # type: ignore[arg-type]  # validated by _choice
        log_level=log_level,
        simulator_url=simulator_url,
    )


def _check_database_url(url: str) -> None:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"IDIS_DATABASE_URL={url!r} is not supported: expected sqlite:///path.db "
            "or postgresql://user@host/db",
            variable="IDIS_DATABASE_URL",
        )


def _check_fernet_keys(keys: tuple[Secret, ...]) -> None:
    import base64
    import binascii

    for index, key in enumerate(keys):
        try:
            raw = base64.urlsafe_b64decode(key.get_secret_value().encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            # Never echo the key itself: name its position instead.
            raise ConfigError(
                f"IDIS_ENCRYPTION_KEYS: key #{index + 1} is not a Fernet key "
                "(expected 32 url-safe base64-encoded bytes, e.g. from "
                "`idis-integrations keygen`)",
                variable="IDIS_ENCRYPTION_KEYS",
            )


def _load_providers(
    environ: Mapping[str, str], document: Mapping[str, Any]
) -> dict[str, ProviderSettings]:
    raw: dict[str, dict[str, tuple[object, str]]] = {}
    for name, table in document.get("providers", {}).items():
        if not isinstance(table, Mapping):
            raise ConfigError(
                f"IDIS_CONFIG_FILE: providers.{name} must be a table", variable="IDIS_CONFIG_FILE"
            )
        raw[name] = {
            key: (value, f"providers.{name}.{key}") for key, value in _flatten(table).items()
        }
    declared = _list(environ.get("IDIS_PROVIDERS", ""))
    for name in declared:
        raw.setdefault(name, {})
    for name in raw:
        if not _NAME.fullmatch(name):
            source = "IDIS_PROVIDERS" if name in declared else f"IDIS_CONFIG_FILE providers.{name}"
            raise ConfigError(
                f"{source}: provider name {name!r} is invalid: expected lowercase letters, "
                "digits and underscores, starting with a letter",
                variable="IDIS_PROVIDERS",
            )
    prefixes = {f"IDIS_PROVIDER_{name.upper()}_": name for name in raw}
    for env, value in environ.items():
        if not env.startswith("IDIS_PROVIDER_") or env == "IDIS_PROVIDERS":
            continue
        matches = [p for p in prefixes if env.startswith(p)]
        if not matches:
            raise ConfigError(
                f"{env} names no declared provider: declared are "
                f"{', '.join(sorted(raw)) or 'none'} (IDIS_PROVIDERS)",
                variable=env,
            )
        prefix = max(matches, key=len)
        suffix = env[len(prefix) :]
        if suffix not in _PROVIDER_FIELDS:
            raise ConfigError(
                f"{env}: unknown provider setting {suffix!r}: expected one of "
                f"{', '.join(sorted(_PROVIDER_FIELDS))}",
                variable=env,
            )
        raw[prefixes[prefix]][_PROVIDER_FIELDS[suffix][0]] = (value, env)
    return {name: _build_provider(name, values) for name, values in raw.items()}
