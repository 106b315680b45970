"""Settings, read from the environment alone (or a TOML file an environment variable names).

``Settings.from_env()`` is the only entry point. It validates everything up
front and raises :class:`~idis.integrations.exceptions.ConfigError` naming the
variable, the value and what was expected, so a bad deploy fails at start,
not at 3 a.m. on the first provider call.

Every setting is declared once, on its field: ``_setting(default, "ENV_NAME",
parser, "meaning", check=...)`` (a ``field`` whose metadata is its ``_var``;
a field without a default is ``field(metadata=_var(...))``). The loader walks
those declarations (environment beats config file beats default), and
``docs/configuration.md``'s tables are generated from them
(``python scripts/config_reference.py``; a test keeps the two equal). To add a
setting, add one field with its ``_var`` next to its neighbours.

Providers come from, in order of precedence:

1. ``IDIS_PROVIDER_<NAME>_<FIELD>`` environment variables for every name in
   ``IDIS_PROVIDERS`` (comma-separated);
2. the ``[providers.<name>]`` tables of the TOML file named by ``IDIS_CONFIG_FILE``;
3. when neither declares any provider, the embedded defaults: ``crm_provider``,
   ``docs_provider`` and ``enrichment_provider`` on the local simulator
   (``IDIS_SIMULATOR_URL``), so that every command works on a laptop.

The embedded defaults carry a webhook secret that is published (README, docs),
so a webhook receiver or an outbound webhook refuses to use it unless
``IDIS_ALLOW_EMBEDDED_DEFAULTS=true`` says this machine only talks to the
simulator (:meth:`Settings.checked_webhook_secrets`).
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from ._redact import mask_url, redact_text
from ._timeparse import format_duration, parse_duration
from .exceptions import ConfigError, UnknownProviderError

__all__ = [
    "DEFAULT_SIMULATOR_URL",
    "EMBEDDED_WEBHOOK_SECRET",
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
#: The webhook secret of the embedded simulator providers. It is printed in the
#: README and the simulator's docs, so it authenticates nothing: a receiver or an
#: outbound webhook uses it only with ``IDIS_ALLOW_EMBEDDED_DEFAULTS=true``.
EMBEDDED_WEBHOOK_SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLXdlYmhvb2s="  # noqa: S105  # public on purpose
#: The embedded providers' outbound signing secret (the simulator's receiver's):
#: published too, and distinct from the inbound one.
EMBEDDED_OUTBOUND_WEBHOOK_SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLW91dGJvdW5k"  # noqa: S105  # public on purpose
#: The opt-in variable for the embedded defaults' published secrets.
ALLOW_EMBEDDED_DEFAULTS = "IDIS_ALLOW_EMBEDDED_DEFAULTS"


class Secret:
    """A secret string whose ``repr``/``str`` never reveal it.

    Every value wrapped here is also registered with the log redaction
    processor, so it is scrubbed even if some code path formats it by hand.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        from ._redact import register_secret

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


# --------------------------------------------------------------------------- parsers
# Each parser takes the raw value (environment text, or whatever TOML gave) and
# the name to blame (the variable, or the config-file key), and returns the
# field's value or raises ConfigError naming both.

_T = TypeVar("_T")
_Conv = Callable[[object, str], Any]
#: A check after parsing: (parsed value, raw value, name to blame) -> None, or ConfigError.
_Check = Callable[[Any, object, str], None]
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bad(name: str, value: object, why: str) -> ConfigError:
    """The error for a bad value: ``NAME='value' <why>``, naming the variable."""
    return ConfigError(f"{name}={value!r} {why}", variable=name)


def parse_bool(value: object, name: str) -> bool:
    """Parse true/false/1/0/yes/no/on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _bad(name, value, "is not a boolean: expected true or false")


#: Largest integer setting: what a PostgreSQL INTEGER (or LIMIT) takes; far beyond any use.
INT_SETTING_MAX = 2**31 - 1


def _number(value: object, name: str, kind: Callable[[str], _T], *, minimum: float) -> _T:
    try:
        parsed = kind(str(value).strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise _bad(name, value, f"is not {noun}") from None
    # Compared as they are: float() of a 400-digit integer overflows, and nan passes every
    # "at least" comparison (each is False), so it and inf are refused first.
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise _bad(name, value, "is not a finite number")
    if parsed < minimum:  # type: ignore[operator]  # _T is int or float here
        raise _bad(name, value, f"must be at least {minimum:g}")
    if isinstance(parsed, int) and parsed > INT_SETTING_MAX:
        raise _bad(name, value, f"must be at most {INT_SETTING_MAX}")
    return parsed


def _int(value: object, name: str, minimum: int = 0) -> int:
    return _number(value, name, int, minimum=minimum)


def _float(value: object, name: str, minimum: float = 0.0) -> float:
    return _number(value, name, float, minimum=minimum)


def _at_least(minimum: int) -> _Conv:
    """An integer parser with a lower bound."""
    return partial(_int, minimum=minimum)


def _seconds(value: object, name: str) -> float:
    return parse_duration(value, name=name).total_seconds()  # type: ignore[arg-type]  # TOML gives str/int/float


def _delta(value: object, name: str) -> timedelta:
    return parse_duration(value, name=name)  # type: ignore[arg-type]  # TOML gives str/int/float


def _text(value: object, name: str) -> str:
    return str(value).strip()


def _text_or_none(value: object, name: str) -> str | None:
    return str(value).strip() or None


def _path_part(value: object, name: str) -> str:
    return str(value).strip().strip("/")


def _secret(value: object, name: str) -> Secret:
    return Secret(str(value).strip())


_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")


def _table_name(value: object, name: str) -> str | None:
    text = str(value).strip()
    if not text:
        return None
    if not _TABLE_NAME.fullmatch(text):
        raise _bad(name, value, "is not a table name: expected deals or schema.deals")
    return text


def _ratio(value: object, name: str) -> float:
    parsed = _float(value, name)
    if not 0 < parsed <= 1:
        raise _bad(name, value, "must be a fraction in (0, 1]")
    return parsed


def _url(value: object, name: str) -> str:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _bad(
            name,
            mask_url(str(value)),
            "is not an http(s) URL: expected e.g. https://api.example.com",
        )
    return text.rstrip("/")


_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _entry_point(value: object, name: str) -> str:
    text = str(value).strip()
    if not _ENTRY_POINT.fullmatch(text):
        raise _bad(name, text, "is invalid: expected package.module:factory")
    return text


def _database_url(value: object, name: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = str(value).strip()
    scheme = urlsplit(url).scheme.split("+")[0]
    # The URL may carry a password: every error shows it masked.
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise _bad(
            name,
            mask_url(url),
            "is not supported: expected sqlite:///path.db or postgresql://user@host/db",
        )
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise _bad(
            name,
            mask_url(url),
            "is not a database URL: expected sqlite:///path.db or postgresql://user@host:5432/db",
        ) from None
    if "@" in (parsed.host or ""):
        # The rest of the password would be taken as the host name, and shown as one.
        raise _bad(
            name,
            mask_url(url),
            "has an '@' in its user name or password: percent-encode it as %40",
        )
    problem = _libpq_options_problem(parsed.query) if scheme != "sqlite" else None
    if problem is not None:
        raise _bad(name, mask_url(url), f"has a bad connection option: {problem}")
    if scheme == "sqlite" and parsed.host:
        raise _bad(
            name,
            url,
            f"names a host ({parsed.host!r}): expected sqlite:///relative/path.db "
            "or sqlite:////absolute/path.db",
        )
    return url


def _libpq_options_problem(query: Mapping[str, str | tuple[str, ...]]) -> str | None:
    """What libpq would refuse in a PostgreSQL URL's query (``?sslmod=require``), if anything.

    Checked at start: at the first connection psycopg raises a ProgrammingError,
    which no command turns into a one-line error. None without psycopg installed.
    """
    if not query:
        return None
    try:
        from psycopg import Error as PsycopgError
        from psycopg import conninfo
    except ImportError:  # pragma: no cover  # the postgres extra is not installed
        return None
    options = {k: v if isinstance(v, str) else v[-1] for k, v in query.items()}
    try:
        conninfo.make_conninfo("", **options)  # libpq parses it: unknown option names
        check_timeout = getattr(conninfo, "timeout_from_conninfo", None)
        if check_timeout is not None:
            check_timeout(options)  # connect_timeout must be a number
    except PsycopgError as exc:
        return redact_text(str(exc).strip().splitlines()[0])
    return None


def _redis_url(value: object, name: str) -> str | None:
    url = str(value).strip()
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise _bad(name, mask_url(url), "is not a Redis URL: expected redis://host:6379/0")
    return url or None


def _list(value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).replace(" ", ",").split(",") if part.strip())


def _names(value: object, name: str) -> tuple[str, ...]:
    return _list(value)


def _endpoints(value: object, name: str) -> dict[str, str]:
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for item in _list(value):
            key, sep, path = item.partition("=")
            if not sep or not key or not path:
                raise _bad(
                    name,
                    value,
                    "is not a list of name=/path pairs "
                    "(e.g. records=/records,record=/records/{id})",
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


#: Seconds per unit of a rate (``10/s``, ``600/min``; none: per second).
_RATE_UNITS = {
    **dict.fromkeys(("", "s", "sec", "second"), 1.0),
    **dict.fromkeys(("m", "min", "minute"), 60.0),
    **dict.fromkeys(("h", "hour"), 3600.0),
}


def _rate(value: object, name: str) -> float | None:
    text = str(value).strip().lower()
    if text in ("", "none", "off", "0"):
        return None
    number, _, unit = text.partition("/")
    if unit not in _RATE_UNITS:
        raise _bad(name, value, "is not a rate: expected e.g. 10/s, 600/m or 5")
    try:
        return _float(number, name, minimum=1e-9) / _RATE_UNITS[unit]
    except ConfigError as exc:  # name the whole value, not its number alone
        why = str(exc).partition(f"{number!r} ")[2]
        raise _bad(name, value, f"{why}: expected e.g. 10/s, 600/m or 5") from None


def _secrets(value: object, name: str = "") -> tuple[Secret, ...]:
    return tuple(Secret(s) for s in _list(value))


def _fernet_keys(value: object, name: str) -> tuple[Secret, ...]:
    import base64
    import binascii

    keys = _secrets(value)
    for index, key in enumerate(keys):
        try:
            raw = base64.urlsafe_b64decode(key.get_secret_value().encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            # Never echo the key itself: name its position instead.
            raise ConfigError(
                f"{name}: key #{index + 1} is not a Fernet key "
                "(expected 32 url-safe base64-encoded bytes, e.g. from "
                "`idis-integrations keygen`)",
                variable=name,
            )
    return keys


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise _bad(name, value, f"is not valid: expected one of {', '.join(choices)}")
    return text


def _one_of(*choices: str) -> _Conv:
    """A parser accepting one of ``choices`` (case-insensitive)."""
    return partial(_choice, choices=choices)


def _pack_name(value: object, name: str) -> str:
    text = str(value).strip().lower()
    if not _NAME.fullmatch(text):
        raise _bad(
            name,
            value,
            "is not a provider pack name: expected lowercase letters, digits "
            "and underscores (generic, hubspot, salesforce)",
        )
    return text


def _time_zone(value: object, name: str) -> str:
    """An IANA time zone name that ``zoneinfo`` knows (``UTC``, ``US/Eastern``, ...), or empty."""
    import zoneinfo

    text = str(value).strip()
    if not text:
        return ""
    try:
        known = zoneinfo.ZoneInfo(text) is not None
    except (ValueError, OSError, zoneinfo.ZoneInfoNotFoundError):
        known = False
    if not known:
        raise _bad(
            name,
            value,
            "is not a time zone: expected an IANA name such as UTC, America/New_York or US/Eastern",
        )
    return text


def _log_level(value: object, name: str) -> str:
    return _choice(value, name, ("debug", "info", "warning", "error", "critical")).upper()


def _positive(value: timedelta, raw: object, name: str) -> None:
    if value <= timedelta(0):
        raise _bad(name, raw, "must be positive: expected a duration like 5s")


def _linger(value: timedelta, raw: object, name: str) -> None:
    if not timedelta(0) <= value <= timedelta(seconds=1):
        raise _bad(name, raw, "must be between 0 and 1s: expected a short duration like 2ms")


# --------------------------------------------------------------------------- declarations

_META = "idis.setting"


@dataclass(frozen=True, slots=True)
class _Var:
    """How one field is read: its variable, parser, check and meaning (for the docs)."""

    #: Environment variable; for provider fields, the suffix after ``IDIS_PROVIDER_<NAME>_``.
    env: str
    #: (raw value, name to blame) -> field value.
    parse: _Conv
    #: One line for docs/configuration.md.
    doc: str
    #: Extra validation of the parsed value.
    check: _Check | None = None
    #: The default as the docs show it, when the value itself does not say it well.
    shown: str | None = None
    #: Also read from the config file (the field's name in its table).
    from_file: bool = True

    def read(self, raw: object, blame: str) -> Any:
        """Parse and check ``raw``; a bad value's error names ``blame``."""
        value = self.parse(raw, blame)
        if self.check is not None:
            self.check(value, raw, blame)
        return value


def _var(
    env: str,
    parse: _Conv,
    doc: str,
    *,
    check: _Check | None = None,
    shown: str | None = None,
    from_file: bool = True,
) -> dict[str, _Var]:
    """Field metadata declaring how the field is read from the environment."""
    return {_META: _Var(env, parse, doc, check, shown, from_file)}


def _setting(
    default: _T,
    env: str,
    parse: _Conv,
    doc: str,
    *,
    check: _Check | None = None,
    shown: str | None = None,
    from_file: bool = True,
) -> _T:
    """A field with ``default``, read from the environment as ``_var`` declares it."""
    return field(
        default=default,
        metadata=_var(env, parse, doc, check=check, shown=shown, from_file=from_file),
    )


def _declared(cls: Any) -> Iterator[tuple[Field[Any], _Var]]:
    for item in fields(cls):
        var = item.metadata.get(_META)
        if var is not None:
            yield item, var


def _safe_repr(self: Any) -> str:
    # Dataclass repr, with the password of any URL field masked (base URLs,
    # database and Redis URLs may embed credentials).
    parts = []
    for item in fields(self):
        if item.repr:
            value = getattr(self, item.name)
            shown = mask_url(value) if isinstance(value, str) else value
            parts.append(f"{item.name}={shown!r}")
    return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutPolicy:
    """Per-attempt timeouts and the overall deadline for one logical call (seconds)."""

    connect: float = _setting(3.0, "CONNECT_TIMEOUT", _seconds, "Connect timeout per attempt.")
    read: float = _setting(10.0, "TIMEOUT", _seconds, "Read timeout per attempt.")
    write: float = _setting(10.0, "WRITE_TIMEOUT", _seconds, "Write timeout per attempt.")
    pool: float = _setting(5.0, "POOL_TIMEOUT", _seconds, "Wait for a free pooled connection.")
    deadline: float = _setting(30.0, "DEADLINE", _seconds, "Whole call, retries included.")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When to retry: exponential backoff with full jitter, bounded by a retry budget."""

    max_attempts: int = _setting(
        3, "RETRY_MAX_ATTEMPTS", _at_least(1), "Attempts including the first."
    )
    initial_backoff: float = _setting(
        0.2, "RETRY_BACKOFF", _seconds, "First backoff cap (full jitter)."
    )
    max_backoff: float = _setting(10.0, "RETRY_MAX_BACKOFF", _seconds, "Largest backoff cap.")
    multiplier: float = _setting(
        2.0, "RETRY_MULTIPLIER", lambda v, n: _float(v, n, 1.0), "Growth of the cap per retry."
    )
    retry_after_cap: float = _setting(
        60.0, "RETRY_AFTER_CAP", _seconds, "Longest Retry-After honoured."
    )
    budget_ratio: float = _setting(
        0.2, "RETRY_BUDGET_RATIO", _ratio, "Retries at most this fraction of recent calls."
    )
    budget_min_retries: int = _setting(
        10, "RETRY_BUDGET_MIN", _at_least(0), "Retries always allowed per window."
    )
    budget_window: float = _setting(
        10.0, "RETRY_BUDGET_WINDOW", _seconds, "Window the budget is computed over."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a provider's circuit opens, and how it closes again.

    It opens on ``failure_threshold`` consecutive provider faults, or when at
    least ``minimum_calls`` calls in the last ``window`` seconds failed at a rate
    of ``failure_rate`` or more: the second rule trips at CRM traffic levels (a
    few calls a minute) where consecutive counts alone never would.
    """

    failure_threshold: int = _setting(
        5, "BREAKER_FAILURE_THRESHOLD", _at_least(1), "Consecutive faults that open."
    )
    failure_rate: float = _setting(
        0.3, "BREAKER_FAILURE_RATE", _ratio, "Failure rate (0-1] over the window that opens."
    )
    minimum_calls: int = _setting(
        6, "BREAKER_MINIMUM_CALLS", _at_least(1), "Calls in the window before the rate counts."
    )
    window: float = _setting(
        600.0,
        "BREAKER_WINDOW",
        _seconds,
        "Sliding window of the failure rate (long enough for low-traffic CRMs).",
    )
    reset_timeout: float = _setting(
        30.0, "BREAKER_RESET_TIMEOUT", _seconds, "Open → half-open after this."
    )
    half_open_max_calls: int = _setting(
        1,
        "BREAKER_HALF_OPEN_CALLS",
        _at_least(1),
        "Trial calls while half-open; all must succeed to close.",
    )
    per_endpoint: bool = _setting(
        False, "BREAKER_PER_ENDPOINT", parse_bool, "Also keep one breaker per endpoint."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """Client-side token bucket; ``rate=None`` disables it."""

    rate: float | None = _setting(
        None,
        "RATE_LIMIT",
        _rate,
        "Client-side limit, requests per second on average: `10/s`, `600/m`.",
    )
    burst: int = _setting(10, "RATE_LIMIT_BURST", _at_least(1), "Requests allowed in a burst.")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthSettings:
    """How to obtain an OAuth token for a provider."""

    grant: Literal["none", "client_credentials", "refresh_token"] = _setting(
        "none",
        "AUTH_GRANT",
        _one_of("none", "client_credentials", "refresh_token"),
        "`none`, `client_credentials`, `refresh_token`.",
    )
    token_url: str = _setting(
        "/oauth/token",  # a URL path, not a password
        "TOKEN_URL",
        _text,
        "Token endpoint: absolute, or relative to the base URL.",
    )
    client_id: str = _setting("", "CLIENT_ID", _text, "OAuth client id.", shown="empty")
    client_secret: Secret | None = _setting(
        None, "CLIENT_SECRET", lambda v, n: Secret(str(v)), "OAuth client secret. Never logged."
    )
    scopes: tuple[str, ...] = _setting((), "SCOPES", _names, "Comma-separated.", shown="empty")
    refresh_margin: float = _setting(
        300.0, "REFRESH_MARGIN", _seconds, "Refresh this long before expiry."
    )
    rotation_url: str | None = _setting(
        None, "ROTATION_URL", _text_or_none, "Provider's credential-rotation API."
    )
    credentials_from_vault: bool = _setting(
        False, "CREDENTIALS_FROM_VAULT", parse_bool, "Read client credentials from Vault at start."
    )
    client_auth: Literal["client_secret_basic", "client_secret_post"] = _setting(
        "client_secret_basic",
        "CLIENT_AUTH",
        _one_of("client_secret_basic", "client_secret_post"),
        "Client authentication at the token endpoint: `client_secret_basic` or "
        "`client_secret_post`.",
    )
    lock_timeout: float = _setting(
        10.0,
        "TOKEN_LOCK_TIMEOUT",
        _seconds,
        "Longest wait for another caller's (or replica's) token refresh; then `TokenLockTimeout`.",
    )
    refresh_attempts: int = _setting(
        3,
        "REFRESH_ATTEMPTS",
        _at_least(1),
        "Token requests per refresh (faults before the request went out, and 429, are "
        "retried with backoff; a refresh whose answer was lost is not, see "
        "`REFRESH_REUSE_GRACE`).",
    )
    #: A refresh whose answer was lost (timeout after sending, dropped connection,
    #: 5xx) is retried with the same refresh token only inside this window.
    refresh_reuse_grace: float = _setting(
        0.0,
        "REFRESH_REUSE_GRACE",
        _seconds,
        "How long the provider accepts a rotated-out refresh token again. A refresh whose "
        "answer was lost is retried with the same refresh token only inside this window; "
        "otherwise the state becomes `refresh_outcome_unknown` (re-authorize). See "
        "[auth.md](auth.md#a-refresh-whose-answer-was-lost).",
        shown="`0` (never)",
    )

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """One third-party provider and the policies its calls run under."""

    #: Name used in every metric label, log line, CLI flag and table row.
    name: str
    kind: ProviderKind = field(
        metadata=_var("KIND", _one_of(*_KINDS), "`crm`, `docs` or `enrichment`.", shown="required")
    )
    base_url: str = field(
        metadata=_var(
            "BASE_URL",
            _url,
            "Every endpoint path is joined to it: `https://api.example.com/v2`.",
            shown="required",
        )
    )
    endpoints: Mapping[str, str] = field(
        default_factory=dict,
        metadata=_var(
            "ENDPOINTS",
            _endpoints,
            "`records=/records,record=/records/{id}`: logical name → path template.",
            shown="`{}`",
        ),
    )
    #: Connect/read/write/pool timeouts and the overall deadline.
    timeouts: TimeoutPolicy = field(default_factory=TimeoutPolicy)
    #: Retry policy.
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Circuit-breaker policy.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    #: Client-side rate limit.
    rate_limit: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    max_concurrency: int = _setting(
        16,
        "MAX_CONCURRENCY",
        _at_least(1),
        "Bulkhead: calls in flight at once (also the connection pool size).",
    )
    bulkhead_wait: float = _setting(
        1.0, "BULKHEAD_WAIT", _seconds, "How long a call waits for a bulkhead slot."
    )
    health_endpoint: str | None = _setting(
        None,
        "HEALTH_ENDPOINT",
        lambda v, n: str(v) or None,
        "Status/health path probed by `status`.",
    )
    #: OAuth settings.
    auth: AuthSettings = field(default_factory=AuthSettings)
    webhook_secrets: tuple[Secret, ...] = _setting(
        (),
        "WEBHOOK_SECRETS",
        _secrets,
        "`whsec_...` secrets that verify the provider's inbound webhooks, comma-separated "
        "(several during rotation). Never used to sign outbound ones.",
    )
    webhook_public_url: str = _setting(
        "",
        "WEBHOOK_PUBLIC_URL",
        lambda v, n: _url(v, n) if str(v).strip() else "",
        "Scheme and host the provider calls our webhook receiver at "
        "(`https://hooks.example.com`), for signatures over the full URL (HubSpot v3); "
        "empty: `https://` and the request's Host header.",
        shown="empty",
    )
    outbound_webhook_secret: Secret | None = _setting(
        None,
        "OUTBOUND_WEBHOOK_SECRET",
        _secret,
        "`whsec_...` secret that signs the webhooks we send to the provider; must differ "
        "from every inbound secret, so a captured outbound delivery never verifies at our "
        "receiver. Outbound webhooks wait (a configuration error) until it is set.",
        shown="unset",
    )
    replay_retention: timedelta = _setting(
        timedelta(hours=72),
        "REPLAY_RETENTION",
        _delta,
        "How far back the provider's replay API goes; `reconcile --since` older than this "
        "fails before any call and names the `--resync` fallback.",
        shown="`72h`",
    )
    order_by: str = _setting(
        "version",
        "ORDER_BY",
        _one_of("version", "modified"),
        "How events of one record are ordered: `version` (the record version the provider "
        "sends) or `modified` (its modification time, for providers that send no version). "
        "See docs/sync.md.",
    )
    fallbacks: tuple[str, ...] = _setting(
        (), "FALLBACKS", _names, "Providers to try in order when this one cannot serve."
    )
    api: str = _setting(
        "generic",
        "API",
        _pack_name,
        "Provider pack (the API this provider speaks): `generic` (the simulator's shape), "
        "`hubspot`, `salesforce`. `idis-integrations providers` lists them. See "
        "docs/providers/.",
    )
    api_token: Secret | None = _setting(
        None,
        "API_TOKEN",
        lambda v, n: Secret(str(v)),
        "Static bearer token (a HubSpot private-app token) used instead of OAuth. Never logged.",
    )
    api_version: str = _setting(
        "",
        "API_VERSION",
        _text,
        "API version the pack speaks (Salesforce: `v60.0`); empty: the pack's default.",
        shown="empty",
    )
    app_id: str = _setting(
        "",
        "APP_ID",
        _text,
        "The provider's id of our app (HubSpot: the app id that webhook subscriptions "
        "and the webhooks journal belong to).",
        shown="empty",
    )
    quota_timezone: str = _setting(
        "",
        "QUOTA_TIMEZONE",
        _time_zone,
        "IANA time zone the provider's daily quota resets in, at local midnight (`UTC`, "
        "`US/Eastern`); a spent daily quota pauses the provider until then. Empty: the "
        "pack's default (HubSpot asks the account's `timeZone` once, from "
        "`GET /account-info/v3/details`, and falls back to UTC; other packs: UTC).",
        shown="empty",
    )

    __repr__ = _safe_repr

    def endpoint_path(self, endpoint: str) -> str:
        """Path template for a logical endpoint: ``ENDPOINTS``, else the pack's own
        (``ProviderPack.endpoints``), else the name used as the path."""
        declared = self.endpoints.get(endpoint)
        if declared is not None:
            return declared
        # The generic pack's table documents the simulator's shape: a generic provider
        # keeps using undeclared names as paths, as it always did.
        if self.api != "generic":
            from .providers._pack import _load

            pack = _load(self.api)
            if pack is not None and endpoint in pack.endpoints:
                return pack.endpoints[endpoint]
        return "/" + endpoint.lstrip("/")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncSettings:
    """Webhook/polling mode control (RB-09 Containment 1, Recovery 5)."""

    crm_mode: SyncMode = _setting(
        "webhook",
        "CRM_MODE",
        _one_of("webhook", "polling"),
        "RB-09 switch. `webhook`: webhooks with automatic failover to polling. "
        "`polling`: pinned to polling.",
    )
    crm_poll_interval: timedelta = _setting(
        timedelta(minutes=5),
        "CRM_POLL_INTERVAL",
        _delta,
        "RB-09 switch. Poll interval while polling.",
        check=_positive,
    )
    auto_failover: bool = _setting(
        True,
        "IDIS_SYNC_AUTO_FAILOVER",
        parse_bool,
        "Fail over to polling automatically when webhooks fail.",
    )
    lag_threshold: timedelta = _setting(
        timedelta(minutes=2),
        "IDIS_SYNC_LAG_THRESHOLD",
        _delta,
        "Webhook lag that triggers failover: a sentinel poll finds changes this much newer "
        "than the last webhook.",
    )
    stable_period: timedelta = _setting(
        timedelta(minutes=10),
        "IDIS_SYNC_STABLE_PERIOD",
        _delta,
        "Healthy webhook time before returning to webhook mode.",
    )
    sentinel_interval: timedelta = _setting(
        timedelta(minutes=1),
        "IDIS_SYNC_SENTINEL_INTERVAL",
        _delta,
        "Sentinel poll interval in webhook mode.",
        check=_positive,
    )
    poll_overlap: timedelta = _setting(
        timedelta(minutes=2),
        "IDIS_SYNC_POLL_OVERLAP",
        _delta,
        "A poll whose cursor has no feed position (first poll, time-ordered feeds) reaches "
        "back this far before its watermark; with a position it reads after it.",
    )
    signature_failure_threshold: int = _setting(
        10,
        "IDIS_SYNC_SIGNATURE_FAILURE_THRESHOLD",
        _at_least(1),
        "Signature failures per minute at which a receiver records a spike (`status` shows "
        "it). Bad signatures never switch modes; they feed "
        '`integration_webhooks_received_total{outcome="bad_signature"}` and the '
        "`IDISIntegrationWebhookSignatureFailures` alert.",
    )
    lock_timeout: timedelta = _setting(
        timedelta(seconds=15),
        "IDIS_SYNC_LOCK_TIMEOUT",
        _delta,
        "Poller leadership (PostgreSQL advisory lock; on SQLite the lease length): a standby "
        "tries every third of it and takes over from a dead leader within it. Each "
        "leadership takes a fencing epoch.",
        check=_positive,
    )
    page_size: int = _setting(
        500,
        "IDIS_SYNC_PAGE_SIZE",
        _at_least(1),
        "Change-feed events per page for the poller and the sentinel.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrichmentSettings:
    """Deferred enrichment (RB-09 Containment 2)."""

    defer_on_error: bool = _setting(
        False,
        "ENRICHMENT_DEFER_ON_ERROR",
        parse_bool,
        "RB-09 switch. Defer enrichment and mark data stale instead of raising.",
    )
    serve_cached: bool = _setting(
        True,
        "IDIS_ENRICHMENT_SERVE_CACHED",
        parse_bool,
        "Serve the last good result (marked stale) while every provider is down.",
    )
    no_match_ttl: timedelta = _setting(
        timedelta(hours=24),
        "IDIS_ENRICHMENT_NO_MATCH_TTL",
        _delta,
        'How long a subject every provider answered "no match" (404/410) is answered '
        "from the cache without asking again; 0 asks every time.",
    )
    provider: str | None = _setting(
        None,
        "IDIS_ENRICHMENT_PROVIDER",
        _text_or_none,
        "Primary provider when a caller names none (its `FALLBACKS` follow it).",
        shown="first provider of kind `enrichment`",
    )
    batch_size: int = _setting(
        50,
        "IDIS_ENRICHMENT_BATCH_SIZE",
        _at_least(1),
        "Most deferred requests one worker refreshes per batch and provider (slow-starts "
        "at 1 after an outage).",
    )
    batch_interval: timedelta = _setting(
        timedelta(milliseconds=250),
        "IDIS_ENRICHMENT_BATCH_INTERVAL",
        _delta,
        "Pause between two refresh batches of one worker (±20% jitter).",
    )
    poll_interval: timedelta = _setting(
        timedelta(seconds=5),
        "IDIS_ENRICHMENT_POLL_INTERVAL",
        _delta,
        "Idle wait of the deferred worker when nothing is due (±20% jitter).",
        check=_positive,
    )
    retry_backoff: timedelta = _setting(
        timedelta(seconds=5),
        "IDIS_ENRICHMENT_RETRY_BACKOFF",
        _delta,
        "First backoff cap after a failed refresh; doubles per attempt, delay uniform in "
        "[cap/2, cap].",
        check=_positive,
    )
    retry_max_backoff: timedelta = _setting(
        timedelta(minutes=5),
        "IDIS_ENRICHMENT_RETRY_MAX_BACKOFF",
        _delta,
        "Largest backoff cap between refresh attempts.",
    )
    lease: timedelta = _setting(
        timedelta(seconds=60),
        "IDIS_ENRICHMENT_LEASE",
        _delta,
        "How long a worker holds a batch of deferred requests (at least twice the sum of the "
        "chain's call deadlines, so a live refresh never outlasts it); a crashed worker's "
        "requests return after it.",
        check=_positive,
    )
    max_takeovers: int = _setting(
        3,
        "IDIS_ENRICHMENT_MAX_TAKEOVERS",
        _at_least(1),
        "Times the worker refreshing a deferred request may stop without settling it (its "
        "lease lapses and is taken over) before the request is given up: `failed`, defect "
        "left OPEN. Outages never count.",
    )
    impact_deals_table: str | None = _setting(
        None,
        "IDIS_IMPACT_DEALS_TABLE",
        _table_name,
        "Host table (`deals` or `schema.deals`, in the library's database) with "
        "`tenant_id` and the `CrmSyncStatusMixin` columns; `impact` counts its FAILED rows.",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxSettings:
    """The persistent retry outbox."""

    max_retries: int = _setting(
        10,
        "IDIS_OUTBOX_MAX_RETRIES",
        _at_least(0),
        "Retries after the first attempt before dead-lettering (a message is tried at most "
        "1 + this times); per-message `max_retries` and `queue-webhook-retries "
        "--max-retries` override it.",
    )
    batch_size: int = _setting(
        100, "IDIS_OUTBOX_BATCH_SIZE", _at_least(1), "Messages leased per batch."
    )
    concurrency: int = _setting(
        4,
        "IDIS_OUTBOX_CONCURRENCY",
        _at_least(1),
        "Messages of a batch delivered at once (a batch never holds two of one ordering "
        "key); `1` delivers one by one.",
    )
    lease: timedelta = _setting(
        timedelta(seconds=60),
        "IDIS_OUTBOX_LEASE",
        _delta,
        "Lease length; a crashed worker's messages return after it.",
        check=_positive,
    )
    poll_interval: timedelta = _setting(
        timedelta(seconds=1),
        "IDIS_OUTBOX_POLL_INTERVAL",
        _delta,
        "Idle wait when the queue is empty.",
        check=_positive,
    )
    initial_backoff: timedelta = _setting(
        timedelta(seconds=1),
        "IDIS_OUTBOX_BACKOFF",
        _delta,
        "First retry delay cap (full jitter, doubling).",
    )
    max_backoff: timedelta = _setting(
        timedelta(minutes=10), "IDIS_OUTBOX_MAX_BACKOFF", _delta, "Largest retry delay cap."
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """Inbound webhook verification."""

    tolerance: timedelta = _setting(
        timedelta(minutes=5),
        "IDIS_WEBHOOK_TOLERANCE",
        _delta,
        "Accepted `webhook-timestamp` skew either way (replay guard).",
        check=_positive,
    )
    max_body_bytes: int = _setting(
        1_048_576, "IDIS_WEBHOOK_MAX_BODY_BYTES", _at_least(1), "Largest accepted body."
    )
    body_timeout: timedelta = _setting(
        timedelta(seconds=10),
        "IDIS_WEBHOOK_BODY_TIMEOUT",
        _delta,
        "Longest time the ASGI receiver waits for a request's whole body; a slower "
        "client gets 408 and its connection back.",
        check=_positive,
    )
    batch_linger: timedelta = _setting(
        timedelta(milliseconds=2),
        "IDIS_WEBHOOK_BATCH_LINGER",
        _delta,
        "Longest wait of the receiver's group commit on an event loop (ASGI apps, "
        "`AsyncWebhookReceiver`), while busy, for as many deliveries as the largest of "
        "its last 8 transactions held before starting the next (`0`: none, at most "
        "`1s`); an idle receiver never waits.",
        check=_linger,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class VaultSettings:
    """Where credentials live in Vault (KV v2)."""

    addr: str = _setting("", "VAULT_ADDR", _url, "Vault/OpenBao address.", shown="unset")
    token: Secret | None = _setting(None, "VAULT_TOKEN", _secret, "Token (or use AppRole below).")
    role_id: str = _setting(
        "", "VAULT_ROLE_ID", _text, "AppRole login (with `VAULT_SECRET_ID`).", shown="unset"
    )
    secret_id: Secret | None = _setting(None, "VAULT_SECRET_ID", _secret, "AppRole secret id.")
    namespace: str = _setting("", "VAULT_NAMESPACE", _text, "Enterprise namespace.", shown="unset")
    mount: str = _setting("secret", "IDIS_VAULT_MOUNT", _path_part, "KV v2 mount.")
    path_prefix: str = _setting(
        "idis/integrations",
        "IDIS_VAULT_PATH_PREFIX",
        _path_part,
        "Credentials live at `<prefix>/<provider>`.",
    )
    timeout: float = _setting(10.0, "IDIS_VAULT_TIMEOUT", _seconds, "Per request.")

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the library is configured with."""

    database_url: str = _setting(
        DEFAULT_DATABASE_URL,
        "IDIS_DATABASE_URL",
        _database_url,
        "The library's database (SQLite or PostgreSQL), e.g. `postgresql://svc@db/idis`.",
    )
    redis_url: str | None = _setting(
        None,
        "IDIS_REDIS_URL",
        _redis_url,
        "Share breaker state across replicas, e.g. `redis://127.0.0.1:6379/0`.",
        shown="unset (in-process)",
    )
    #: Declared providers by name.
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    #: True when ``providers`` are the embedded simulator defaults.
    embedded_defaults: bool = False
    allow_embedded_defaults: bool = _setting(
        False,
        ALLOW_EMBEDDED_DEFAULTS,
        parse_bool,
        "Let a webhook receiver or an outbound webhook use the embedded simulator "
        "providers' published webhook secret. Only where the library talks to the "
        "simulator alone (the drill, the README tour, tests); elsewhere start-up refuses "
        "that secret and names the variables to set.",
    )
    sync: SyncSettings = field(default_factory=SyncSettings)
    enrichment: EnrichmentSettings = field(default_factory=EnrichmentSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    encryption_keys: tuple[Secret, ...] = _setting(
        (),
        "IDIS_ENCRYPTION_KEYS",
        _fernet_keys,
        "Fernet keys for tokens at rest, newest first (key rotation; `idis-integrations "
        "keygen` makes one). Unset: tokens stay in memory, only their metadata is stored; "
        "refresh-token grants and `import-token` refuse to run. See `auth.md`.",
        shown="unset",
        from_file=False,
    )
    log_format: Literal["json", "console"] = _setting(
        "json",
        "IDIS_LOG_FORMAT",
        _one_of("json", "console"),
        "Log rendering for the CLI and the example service: `json` or `console`.",
    )
    log_level: str = _setting("INFO", "IDIS_LOG_LEVEL", _log_level, "Log level.", shown="`info`")
    host_records: str | None = _setting(
        None,
        "IDIS_HOST_RECORDS",
        _entry_point,
        "The host's records for `verify-sync` (`package.module:factory`, called with "
        "`provider`, `engine`, `settings`; returns a `HostRecordSource`), e.g. "
        "`integrations_service.host_records:deal_records`. Unset: `verify-sync` compares "
        "the provider with the inbox's version ledger only, which cannot see a row "
        "changed or created in the host's table (see `reconcile.md`).",
        shown="unset (the inbox's ledger)",
    )
    simulator_url: str = _setting(
        DEFAULT_SIMULATOR_URL,
        "IDIS_SIMULATOR_URL",
        _url,
        "Where the embedded default providers point.",
    )

    __repr__ = _safe_repr

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

    def checked_webhook_secrets(
        self, name: str, *, use: Literal["verify", "sign"]
    ) -> tuple[Secret, ...]:
        """The provider's webhook secrets, refusing the published simulator secret.

        The embedded providers' secret is printed in the README: whoever read it
        could forge deliveries (``verify``) or replay our signed outbound webhooks
        (``sign``). It is used only with ``IDIS_ALLOW_EMBEDDED_DEFAULTS=true``.

        Raises:
            UnknownProviderError: for an undeclared provider.
            ConfigError: naming the variables to set, when a secret is the published one.
        """
        secrets = self.provider(name).webhook_secrets
        if self.allow_embedded_defaults or not any(_is_published(s) for s in secrets):
            return secrets
        env = f"IDIS_PROVIDER_{name.upper()}_WEBHOOK_SECRETS"
        what = "verify inbound" if use == "verify" else "sign outbound"
        declare = (
            f"declare the provider in IDIS_PROVIDERS and set {env}"
            if self.embedded_defaults
            else f"set {env}"
        )
        raise ConfigError(
            f"provider {name!r} would {what} webhooks with the embedded simulator secret, which "
            f"is published: {declare} to your own secret (`idis-integrations keygen` style "
            f"whsec_ value), or set {ALLOW_EMBEDDED_DEFAULTS}=true where only the simulator "
            "is talked to",
            variable=env,
        )

    def checked_outbound_webhook_secret(self, name: str) -> Secret:
        """The secret that signs outbound webhooks to ``name``: its own, never an inbound one.

        Raises:
            UnknownProviderError: for an undeclared provider.
            ConfigError: naming the variable, when it is unset, equal to an inbound
                secret, or the published simulator secret without the opt-in.
        """
        provider = self.provider(name)
        env = f"IDIS_PROVIDER_{name.upper()}_OUTBOUND_WEBHOOK_SECRET"
        secret = provider.outbound_webhook_secret
        if secret is None or not secret.get_secret_value().strip():
            raise ConfigError(
                f"provider {name!r} has no secret to sign outbound webhooks: set {env} to a "
                "whsec_ value of its own (not one of its inbound WEBHOOK_SECRETS)",
                variable=env,
            )
        key = secret.get_secret_value().strip().removeprefix("whsec_")
        inbound = {
            s.get_secret_value().strip().removeprefix("whsec_") for s in provider.webhook_secrets
        }
        if key in inbound:
            raise ConfigError(
                f"provider {name!r} would sign outbound webhooks with one of its inbound "
                f"secrets: a captured delivery would then verify at our receiver; set {env} "
                "to a secret of its own",
                variable=env,
            )
        if key == EMBEDDED_OUTBOUND_WEBHOOK_SECRET.removeprefix("whsec_") and not (
            self.allow_embedded_defaults
        ):
            raise ConfigError(
                f"provider {name!r} would sign outbound webhooks with the embedded simulator "
                f"secret, which is published: set {env} to your own secret, or set "
                f"{ALLOW_EMBEDDED_DEFAULTS}=true where only the simulator is talked to",
                variable=env,
            )
        return secret

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate settings from an environment mapping (``os.environ`` by default).

        Raises:
            ConfigError: naming the first invalid variable and the value found.
        """
        return _load(os.environ if environ is None else environ)


def _is_published(secret: Secret) -> bool:
    published = EMBEDDED_WEBHOOK_SECRET.removeprefix("whsec_")
    return secret.get_secret_value().strip().removeprefix("whsec_") == published


# --------------------------------------------------------------------------- loading


def _read_fields(
    cls: Any, environ: Mapping[str, str], table: Mapping[str, Any], table_name: str
) -> dict[str, Any]:
    """Parse every declared field of ``cls``: env var beats config file beats default.

    Raises:
        ConfigError: for a bad value, or a key of ``table`` that names no setting.
    """
    values: dict[str, Any] = {}
    for item, var in _declared(cls):
        if environ.get(var.env, "").strip():
            raw: object = environ[var.env]
            blame = var.env
        elif var.from_file and item.name in table:
            raw, blame = table[item.name], f"{table_name}.{item.name}"
        else:
            continue
        values[item.name] = var.read(raw, blame)
    readable = {item.name for item, var in _declared(cls) if var.from_file}
    for key in table:
        if key not in readable:
            raise ConfigError(
                f"IDIS_CONFIG_FILE: unknown setting {table_name}.{key}",
                variable="IDIS_CONFIG_FILE",
            )
    return values


def _read_config_file(path_text: str) -> dict[str, Any]:
    """Read the TOML file, refusing one that someone else could have written.

    The file names the providers' URLs and may hold a Vault token or client
    secrets: whoever can write it can send our credentials anywhere.
    """
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            _check_file_owner_and_mode(os.fstat(handle.fileno()), path_text)
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


def _check_file_owner_and_mode(info: os.stat_result, path_text: str) -> None:
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # Windows: no POSIX modes to judge
        return
    mode = stat.S_IMODE(info.st_mode)
    writable = [who for who, bit in (("group", 0o020), ("world", 0o002)) if mode & bit]
    if writable:
        raise ConfigError(
            f"IDIS_CONFIG_FILE={path_text!r} is {'- and '.join(writable)}-writable (mode "
            f"{mode:04o}): whoever can write it decides where credentials are sent; "
            f"run `chmod go-w {path_text}`",
            variable="IDIS_CONFIG_FILE",
        )
    if info.st_uid not in (getuid(), 0):
        raise ConfigError(
            f"IDIS_CONFIG_FILE={path_text!r} is owned by another user (uid {info.st_uid}, mode "
            f"{mode:04o}): expected a file owned by this user (uid {getuid()}) or root",
            variable="IDIS_CONFIG_FILE",
        )


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and key in _SUBSECTIONS and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[dotted] = value
    return flat


def _provider_fields() -> dict[str, tuple[str, _Var]]:
    """Env suffix -> (dotted config key, declaration), top-level fields first."""
    table = {var.env: (item.name, var) for item, var in _declared(ProviderSettings)}
    for head, cls in _SUBSECTIONS.items():
        for item, var in _declared(cls):
            table[var.env] = (f"{head}.{item.name}", var)
    return table


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
        converted = _PROVIDER_FIELDS[suffix][1].read(raw, blame)
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
        if not matches and not raw:
            embedded = [n for n in _EMBEDDED_KINDS if env.startswith(f"IDIS_PROVIDER_{n.upper()}_")]
            if embedded:
                # crm_provider exists (it is an embedded default), so "declared are none"
                # reads as a contradiction: say why the field cannot apply, and what can.
                upper = embedded[0].upper()
                raise ConfigError(
                    f"{env} sets a field of {embedded[0]}, one of the embedded default "
                    "providers, which cannot be changed one field at a time: declare it, "
                    f"e.g. IDIS_PROVIDERS={embedded[0]} with IDIS_PROVIDER_{upper}_KIND and "
                    f"IDIS_PROVIDER_{upper}_BASE_URL (docs/configuration.md, Providers)",
                    variable=env,
                )
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


#: Logical endpoint name -> path on a simulator provider (the embedded defaults' and
#: ``testing.simulator_settings``').
SIMULATOR_ENDPOINTS: Mapping[str, str] = MappingProxyType(
    {
        "records": "/records",
        "record": "/records/{id}",
        "changes": "/changes",
        "replay": "/replay",
        "enrich": "/enrich/{id}",
        "webhooks": "/webhooks/inbound",
    }
)


def _simulator_provider(name: str, kind: str, simulator_url: str) -> ProviderSettings:
    """A provider served by the simulator at ``simulator_url``, on its client credentials."""
    return ProviderSettings(
        name=name,
        kind=kind,  # type: ignore[arg-type]  # one of the three kinds
        base_url=f"{simulator_url}/p/{name}",
        endpoints=dict(SIMULATOR_ENDPOINTS),
        health_endpoint="/health",
        auth=AuthSettings(
            grant="client_credentials",
            token_url="/oauth/token",  # noqa: S106  # a URL path, not a password
            client_id="idis-local",
            client_secret=Secret("local-simulator-secret"),
            rotation_url="/oauth/rotate",
        ),
        webhook_secrets=(Secret(EMBEDDED_WEBHOOK_SECRET),),
        outbound_webhook_secret=Secret(EMBEDDED_OUTBOUND_WEBHOOK_SECRET),
    )


#: The embedded default providers and their kinds.
_EMBEDDED_KINDS = {
    "crm_provider": "crm",
    "docs_provider": "docs",
    "enrichment_provider": "enrichment",
}


def _embedded_providers(simulator_url: str) -> dict[str, ProviderSettings]:
    """The three simulator-backed providers every command works against out of the box."""
    return {
        name: _simulator_provider(name, kind, simulator_url)
        for name, kind in _EMBEDDED_KINDS.items()
    }


def _check_cross_references(settings: Settings) -> None:
    """Names that must refer to declared providers."""
    providers = settings.providers
    for provider in providers.values():
        for fallback in provider.fallbacks:
            if fallback not in providers:
                raise UnknownProviderError(fallback, tuple(providers))
    chosen = settings.enrichment.provider
    if chosen is not None and chosen not in providers:
        raise ConfigError(
            f"IDIS_ENRICHMENT_PROVIDER={chosen!r} names no declared provider: "
            f"expected one of {', '.join(sorted(providers))}",
            variable="IDIS_ENRICHMENT_PROVIDER",
        )


def _load(environ: Mapping[str, str]) -> Settings:
    config_path = environ.get("IDIS_CONFIG_FILE", "").strip()
    document = _read_config_file(config_path) if config_path else {}
    general = _read_fields(Settings, environ, document.get("idis", {}), "idis")
    sections = {
        name: cls(**_read_fields(cls, environ, document.get(name, {}), name))
        for name, cls in _SECTIONS.items()
    }
    providers = _load_providers(environ, document)
    embedded = not providers
    if embedded:
        providers = _embedded_providers(general.get("simulator_url", DEFAULT_SIMULATOR_URL))
    settings = Settings(**general, **sections, providers=providers, embedded_defaults=embedded)
    _check_cross_references(settings)
    return settings


#: Settings sections, each from the environment or its own config-file table.
_SECTIONS: dict[str, type[Any]] = {
    item.name: item.default_factory  # type: ignore[misc]  # a dataclass type
    for item in fields(Settings)
    if item.default_factory is not MISSING and is_dataclass(item.default_factory)
}
#: Provider sub-policies, each a ``[providers.<name>.<head>]`` table.
_SUBSECTIONS: dict[str, type[Any]] = {
    "timeouts": TimeoutPolicy,
    "retry": RetryPolicy,
    "breaker": BreakerPolicy,
    "rate_limit": RateLimitPolicy,
    "auth": AuthSettings,
}
_PROVIDER_FIELDS = _provider_fields()
_KEY_TO_SUFFIX = {key: suffix for suffix, (key, _) in _PROVIDER_FIELDS.items()}


# --------------------------------------------------------------------------- reference docs

#: Variables read outside the field declarations (they choose where settings come from).
_META_VARS = (
    (
        "IDIS_CONFIG_FILE",
        "unset",
        "TOML file with `[idis]`, `[providers.<name>]`, `[sync]`, `[enrichment]`, `[outbox]`, "
        "`[webhooks]`, `[vault]` tables; refused when group- or world-writable or owned by "
        "another user than this one or root.",
    ),
    (
        "IDIS_PROVIDERS",
        "unset (embedded defaults)",
        "Provider names, comma-separated (lowercase, digits, `_`); each is configured by the "
        "`IDIS_PROVIDER_<NAME>_*` fields below.",
    ),
)


def _shown_default(item: Field[Any], var: _Var) -> str:
    if var.shown is not None:
        return var.shown
    if item.default is not MISSING:
        value: Any = item.default
    elif item.default_factory is not MISSING:
        value = item.default_factory()
    else:
        return "required"
    if value is None or value in ("", ()):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, timedelta) or var.parse is _seconds:
        return f"`{format_duration(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def reference_tables() -> dict[str, str]:
    """The Markdown tables of ``docs/configuration.md``, generated from the declarations.

    Keys: ``general``, ``providers`` and one per section (``sync``, ``enrichment``,
    ``outbox``, ``webhooks``, ``vault``).
    """
    header = [_row("Variable", "Default", "Meaning"), _row("---", "---", "---")]
    general = [
        *header,
        *(
            _row(f"`{var.env}`", _shown_default(item, var), var.doc)
            for item, var in _declared(Settings)
        ),
        *(_row(f"`{env}`", shown, doc) for env, shown, doc in _META_VARS),
    ]
    tables = {"general": "\n".join(general)}
    provider_rows = [
        _row("Field (env suffix)", "TOML key", "Default", "Meaning"),
        _row("---", "---", "---", "---"),
    ]
    for suffix, (key, var) in _PROVIDER_FIELDS.items():
        head, _, tail = key.partition(".")
        cls = _SUBSECTIONS[head] if tail else ProviderSettings
        item = next(f for f in fields(cls) if f.name == (tail or head))
        provider_rows.append(_row(f"`{suffix}`", f"`{key}`", _shown_default(item, var), var.doc))
    tables["providers"] = "\n".join(provider_rows)
    for name, cls in _SECTIONS.items():
        rows = [
            _row(f"`{var.env}`", _shown_default(item, var), var.doc) for item, var in _declared(cls)
        ]
        tables[name] = "\n".join([*header, *rows])
    return tables
