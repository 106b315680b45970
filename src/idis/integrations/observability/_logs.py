"""Structured logging: stable event names, bound context, and secret redaction.

The library only *emits* through ``structlog.get_logger("idis.integrations")``
and never configures logging on import: that is the application's job. The
CLI and the example service call :func:`configure_logging` once at start.

Event names are namespaced and stable (``idis.gateway.rate_limited``); each
carries a human ``msg`` written so that RB-09's ``grep -i "rate limit\\|429"``
and "timeout" searches find the right lines.

Redaction is belt and braces: :class:`~idis.integrations.config.Secret`
registers every secret value, and the ``redact`` processor scrubs those
values, secret-shaped text (bearer and basic credentials, ``whsec_`` keys,
Vault tokens, ``access_token`` in queries and JSON, URL passwords) and any
field whose name looks secret from every event before it is rendered. The
rules live in one module, :mod:`idis.integrations._redact`, shared with the
audit trail, the CLI and ``repr(Settings)``.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

from .._redact import REDACTED, redact_text, redact_value, register_secret

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "redact",
    "redact_text",
    "register_secret",
]


def redact(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub secrets from every field of the event.

    Every value comes out JSON-friendly: text masked, datetimes as ISO-8601,
    bytes and other objects (an ``httpx.URL``) as masked text, never a repr.
    """
    for key, value in list(event_dict.items()):
        event_dict[key] = redact_value(value, key)
    return event_dict


def get_logger(**initial: Any) -> Any:
    """Return the library's structlog logger, optionally with bound values."""
    return structlog.get_logger("idis.integrations", **initial)


_configured_lock = threading.Lock()


def configure_logging(fmt: str = "json", level: str = "INFO", *, stream: Any = None) -> None:
    """Configure structlog and stdlib logging for an application or the CLI.

    JSON lines in production (``fmt="json"``), coloured key-value output on a
    terminal (``fmt="console"``). Context bound with
    ``structlog.contextvars.bind_contextvars`` (provider, tenant, request id)
    appears on every line. Redaction runs last before rendering.
    """
    target = stream if stream is not None else sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=target.isatty())
    )
    with _configured_lock:
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.PrintLoggerFactory(file=target),
            cache_logger_on_first_use=False,
        )
