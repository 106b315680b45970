"""Translate httpx failures and HTTP statuses into the library's exception tree.

httpx exceptions never leak out of the gateway: :func:`map_httpx_errors`
maps each transport failure to the most specific ``ProviderError`` and chains
the original with ``from``. ``tests/resilience/test_resilience_errors.py``
fails if an httpx exception class has no mapping. Messages name the provider,
endpoint and status, never the URL's query, headers or body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .._http import httpx
from ..exceptions import (
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UsageError,
)

__all__ = [
    "HTTPX_ERRORS",
    "HTTPX_MAPPING",
    "error_for_status",
    "map_httpx_errors",
    "rejection_details",
    "translate_httpx_error",
]

#: httpx exception -> library exception; most specific first.
HTTPX_MAPPING: tuple[tuple[type[Exception], type[Exception]], ...] = (
    (httpx.ConnectTimeout, ProviderTimeout),
    (httpx.ReadTimeout, ProviderTimeout),
    (httpx.WriteTimeout, ProviderTimeout),
    (httpx.PoolTimeout, ProviderTimeout),
    (httpx.TimeoutException, ProviderTimeout),
    (httpx.ConnectError, ProviderConnectionError),
    (httpx.ReadError, ProviderConnectionError),
    (httpx.WriteError, ProviderConnectionError),
    (httpx.CloseError, ProviderConnectionError),
    (httpx.NetworkError, ProviderConnectionError),
    (httpx.RemoteProtocolError, ProviderConnectionError),
    (httpx.LocalProtocolError, UsageError),
    (httpx.ProtocolError, ProviderConnectionError),
    (httpx.ProxyError, ProviderConnectionError),
    (httpx.UnsupportedProtocol, UsageError),
    (httpx.TransportError, ProviderConnectionError),
    (httpx.DecodingError, MalformedResponse),
    (httpx.TooManyRedirects, ProviderRejected),
    (httpx.HTTPStatusError, ProviderError),
    (httpx.RequestError, ProviderConnectionError),
    (httpx.InvalidURL, UsageError),
    (httpx.CookieConflict, UsageError),
    (httpx.StreamConsumed, UsageError),
    (httpx.StreamClosed, UsageError),
    (httpx.ResponseNotRead, UsageError),
    (httpx.RequestNotRead, UsageError),
    (httpx.StreamError, UsageError),
    (httpx.HTTPError, ProviderError),
)

_TIMEOUT_KIND: dict[type[Exception], str] = {
    httpx.ConnectTimeout: "connect timeout",
    httpx.ReadTimeout: "read timeout",
    httpx.WriteTimeout: "write timeout",
    httpx.PoolTimeout: "pool timeout (no free connection)",
}


#: Every httpx exception root (some misuse errors are not HTTPError subclasses).
HTTPX_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.CookieConflict,
    httpx.StreamError,
)


def translate_httpx_error(exc: Exception, provider: str, endpoint: str) -> Exception:
    """The library exception for an httpx exception (raise it ``from`` the original)."""
    for source, target in HTTPX_MAPPING:
        if isinstance(exc, source):
            what = _TIMEOUT_KIND.get(type(exc), type(exc).__name__)
            message = f"{provider} {endpoint}: {what}"
            if issubclass(target, ProviderError):
                return target(message, provider=provider, endpoint=endpoint)
            return target(message)
    return ProviderError(
        f"{provider} {endpoint}: {type(exc).__name__}", provider=provider, endpoint=endpoint
    )


@contextmanager
def map_httpx_errors(provider: str, endpoint: str) -> Iterator[None]:
    """Re-raise httpx exceptions as library exceptions, chained."""
    try:
        yield
    except HTTPX_ERRORS as exc:
        raise translate_httpx_error(exc, provider, endpoint) from exc


def error_for_status(
    status: int, provider: str, endpoint: str, *, retry_after: float | None = None
) -> ProviderError | None:
    """The error a response status means, or None for success (1xx-3xx)."""
    if status < 400:
        return None
    if status == 429:
        suffix = f"; retry after {retry_after:g}s" if retry_after is not None else ""
        return RateLimited(
            f"{provider} {endpoint}: rate limit exceeded (HTTP 429){suffix}",
            provider=provider,
            endpoint=endpoint,
            retry_after=retry_after,
        )
    if status >= 500:
        error = ProviderUnavailable(
            f"{provider} {endpoint}: server error (HTTP {status})",
            provider=provider,
            endpoint=endpoint,
            status_code=status,
        )
        error.retry_after = retry_after
        return error
    if status == 408:
        return ProviderTimeout(
            f"{provider} {endpoint}: provider reported request timeout (HTTP 408)",
            provider=provider,
            endpoint=endpoint,
            status_code=status,
        )
    return ProviderRejected(
        f"{provider} {endpoint}: request rejected (HTTP {status})",
        provider=provider,
        endpoint=endpoint,
        status_code=status,
    )


#: Largest 4xx body whose fields are kept on the error (a refusal states a reason, not a page).
_DETAILS_MAX_BYTES = 4096


def rejection_details(body: bytes) -> dict[str, Any] | None:
    """Top-level scalar fields of a small JSON 4xx body (``ProviderError.details``), else None.

    Adapters read documented fields from it (a replay refusal's
    ``retention_seconds``); nested values are dropped, and nothing of it is
    ever put into a message or a log line.
    """
    if not body or len(body) > _DETAILS_MAX_BYTES:
        return None
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if isinstance(decoded, list) and decoded and isinstance(decoded[0], dict):
        # Some APIs (Salesforce) answer errors as a JSON array of objects: the first
        # one states the error (``errorCode``).
        decoded = decoded[0]
    if not isinstance(decoded, dict):
        return None
    if isinstance(decoded.get("error"), dict):
        # Google (``{"error": {"code", "message", "errors": [{"reason"}]}}``) and People
        # Data Labs (``{"error": {"type", "message"}}``) nest the error: its fields and
        # the first listed error's ``reason`` are what the packs read.
        inner = decoded["error"]
        listed = inner.get("errors")
        first = (
            listed[0] if isinstance(listed, list) and listed and isinstance(listed[0], dict) else {}
        )
        decoded = {**{k: v for k, v in decoded.items() if k != "error"}, **first, **inner}
    return {
        str(key): value
        for key, value in decoded.items()
        if value is None or isinstance(value, str | int | float | bool)
    }
