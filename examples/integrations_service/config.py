"""The service's own settings, read from the environment like the library's.

Everything about providers, the database, sync, outbox and enrichment comes
from the library's :class:`~idis.integrations.Settings` (``docs/configuration.md``).
The service adds only where it listens and how often its own loops run:

* ``IDIS_SERVICE_HOST`` (``127.0.0.1``): address ``python -m integrations_service`` listens on;
* ``IDIS_SERVICE_PORT`` (``8000``): its port;
* ``IDIS_SERVICE_SAMPLE_INTERVAL`` (``15s``): how often the gateway's health is sampled
  into the database for ``idis-integrations status`` and ``postmortem``;
* ``IDIS_SERVICE_API_TOKENS, ``IDIS_SERVICE_AUTH``, ``IDIS_SERVICE_METRICS``,
  ``IDIS_SERVICE_PROBE_INTERVAL`` and ``IDIS_SERVICE_MAX_BODY_BYTES``: who may call the
  API and how much it accepts (:mod:`.security`, README "Security").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from idis.integrations._timeparse import parse_duration
from idis.integrations.exceptions import ConfigError

from .security import ApiToken, is_loopback, parse_api_tokens

__all__ = ["ServiceSettings"]

_MAX_PORT = 65535
_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 8000
_DEFAULT_MAX_BODY = 64 * 1024
_AUTH_MODES = ("tokens", "off")
_METRICS_MODES = ("public", "token")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """Where the service listens and how often its own loops run."""

    host: str = _DEFAULT_HOST
    port: int = _DEFAULT_PORT
    sample_interval: timedelta = timedelta(seconds=15)
    #: Bearer tokens the API accepts (only their SHA-256 digests are kept).
    api_tokens: tuple[ApiToken, ...] = ()
    #: ``tokens`` (default): every route but /healthz, /webhooks and a public /metrics needs
    #: a bearer token; ``off``: every caller is an operator (loopback addresses only).
    auth: str = "tokens"
    #: ``public`` (default): /metrics needs no token (Prometheus scrapes it as today);
    #: ``token``: it needs a token with the ``metrics`` or ``operator`` role.
    metrics: str = "public"
    #: At most one provider-probing /status per this interval (429 otherwise).
    probe_interval: timedelta = timedelta(seconds=10)
    #: Largest request body the API reads (413 beyond, detected while streaming).
    max_body_bytes: int = _DEFAULT_MAX_BODY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Read the ``IDIS_SERVICE_*`` variables (``os.environ`` by default).

        Raises:
            ConfigError: naming the variable, the value and what was expected.
        """
        env = os.environ if environ is None else environ
        host = env.get("IDIS_SERVICE_HOST", _DEFAULT_HOST).strip()
        if not host:
            raise ConfigError(
                "IDIS_SERVICE_HOST='' is empty: expected an address such as 127.0.0.1",
                variable="IDIS_SERVICE_HOST",
            )
        port_text = env.get("IDIS_SERVICE_PORT", str(_DEFAULT_PORT)).strip()
        if not port_text.isdigit() or not 0 < int(port_text) <= _MAX_PORT:
            raise ConfigError(
                f"IDIS_SERVICE_PORT={port_text!r} is invalid: expected a port number 1-65535",
                variable="IDIS_SERVICE_PORT",
            )
        intervals = {}
        for name, variable in (("sample_interval", "IDIS_SERVICE_SAMPLE_INTERVAL"),):
            raw = env.get(variable)
            if raw is None:
                continue
            value = parse_duration(raw, name=variable)
            if value <= timedelta(0):
                raise ConfigError(
                    f"{variable}={raw!r} is invalid: expected a positive duration such as 15s",
                    variable=variable,
                )
            intervals[name] = value
        probe_interval = parse_duration(
            env.get("IDIS_SERVICE_PROBE_INTERVAL", "10s"), name="IDIS_SERVICE_PROBE_INTERVAL"
        )
        auth = _choice(env, "IDIS_SERVICE_AUTH", _AUTH_MODES)
        tokens = parse_api_tokens(env.get("IDIS_SERVICE_API_TOKENS", ""))
        if auth == "tokens" and not tokens:
            raise ConfigError(
                "IDIS_SERVICE_API_TOKENS is not set: the service serves tenant data only to "
                "authenticated callers; set it (a JSON list of tokens, see the README) or, for "
                "a trial on this machine only, IDIS_SERVICE_AUTH=off",
                variable="IDIS_SERVICE_API_TOKENS",
            )
        if auth == "off" and not is_loopback(host):
            raise ConfigError(
                f"IDIS_SERVICE_AUTH=off with IDIS_SERVICE_HOST={host!r}: without authentication "
                "the service only listens on a loopback address; set IDIS_SERVICE_API_TOKENS",
                variable="IDIS_SERVICE_AUTH",
            )
        return cls(
            host=host,
            port=int(port_text),
            api_tokens=tokens,
            auth=auth,
            metrics=_choice(env, "IDIS_SERVICE_METRICS", _METRICS_MODES),
            probe_interval=probe_interval,
            max_body_bytes=_positive_int(env, "IDIS_SERVICE_MAX_BODY_BYTES", _DEFAULT_MAX_BODY),
            **intervals,
        )


def _choice(env: Mapping[str, str], variable: str, choices: tuple[str, ...]) -> str:
    value = env.get(variable, choices[0]).strip().lower()
    if value not in choices:
        raise ConfigError(
            f"{variable}={value!r} is invalid: expected one of {', '.join(choices)}",
            variable=variable,
        )
    return value


def _positive_int(env: Mapping[str, str], variable: str, default: int) -> int:
    raw = env.get(variable, str(default)).strip()
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(
            f"{variable}={raw!r} is invalid: expected a positive number of bytes",
            variable=variable,
        )
    return int(raw)
