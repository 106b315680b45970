"""Structured logging: stable event names, bound context, and secret redaction.

The library only *emits* through ``structlog.get_logger("idis.integrations")``
and never configures logging on import: that is the application's job. The
CLI and the example service call :func:`configure_logging` once at start.

Event names are namespaced and stable (``idis.gateway.rate_limited``); each
carries a human ``msg`` written so that RB-09's ``grep -i "rate limit\\|429"``
and "timeout" searches find the right lines.

Redaction is belt and braces: :class:`~idis.integrations.config.Secret`
registers every secret value here, and the ``redact`` processor scrubs those
values, bearer tokens, ``whsec_`` keys, Vault tokens and any field whose
name looks secret from every event before it is rendered.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "redact",
    "redact_text",
    "register_secret",
]

REDACTED = "[REDACTED]"
_SENSITIVE_KEY = re.compile(
    r"(pass(word)?|secret|token|authorization|api[_-]?key|credential|cookie|private[_-]?key)",
    re.IGNORECASE,
)
# Shapes of secrets that may reach a message without having been registered.
_PATTERNS = (
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"whsec_[A-Za-z0-9+/=]+"),
    re.compile(r"\b(hvs|hvb|s|b)\.[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?i)(access_token|refresh_token|client_secret|password)=[^&\s\"']+"),
)
_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
#: Short strings would redact ordinary words; secrets are long.
_MIN_SECRET_LEN = 6


def register_secret(value: str | None) -> None:
    """Make ``value`` redacted wherever it appears in a log event or message."""
    global _secrets  # noqa: PLW0603  # copy-on-write set read without a lock on the hot path
    if not value or len(value) < _MIN_SECRET_LEN or value in _secrets:
        return
    with _secrets_lock:
        _secrets = _secrets | {value}


def redact_text(text: str) -> str:
    """Return ``text`` with every registered secret and secret-shaped token replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if _SENSITIVE_KEY.search(key) and value and key not in _SAFE_KEYS:
            return REDACTED
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    return value


# Field names that contain a sensitive word but hold no secret.
_SAFE_KEYS = frozenset({"token_state", "token_expires_in", "credential_version", "event"})


def redact(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub secrets from every field of the event."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _redact_value(key, value)
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
