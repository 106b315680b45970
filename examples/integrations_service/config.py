"""The service's own settings, read from the environment like the library's.

Everything about providers, the database, sync, outbox and enrichment comes
from the library's :class:`~idis.integrations.Settings` (``docs/configuration.md``).
The service adds only where it listens and how often its own loops run:

* ``IDIS_SERVICE_HOST`` (``127.0.0.1``): address ``python -m integrations_service`` listens on;
* ``IDIS_SERVICE_PORT`` (``8000``): its port;
* ``IDIS_SERVICE_SAMPLE_INTERVAL`` (``15s``): how often the gateway's health is sampled
  into the database for ``idis-integrations status`` and ``postmortem``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from idis.integrations._timeparse import parse_duration
from idis.integrations.exceptions import ConfigError

__all__ = ["ServiceSettings"]

_MAX_PORT = 65535
_DEFAULT_HOST = "127.0.0.1"
_DEFAULT_PORT = 8000


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """Where the service listens and how often its own loops run."""

    host: str = _DEFAULT_HOST
    port: int = _DEFAULT_PORT
    sample_interval: timedelta = timedelta(seconds=15)

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
        return cls(host=host, port=int(port_text), **intervals)
