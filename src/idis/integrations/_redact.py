"""The one place that decides what a secret looks like, and masks it.

Everything the library prints goes through here: log events (the ``redact``
structlog processor in :mod:`.observability._logs`), audit rows, exception texts
the CLI shows, ``repr(Settings)``, configuration errors and ``/status``.

Three layers, each catching what the previous one cannot know:

1. **Registered values**: every :class:`~idis.integrations.config.Secret` (and
   every token the OAuth module obtains) registers its value, which is then
   replaced wherever it appears, whatever the shape around it.
2. **Shapes** of secrets that were never registered (a token a provider echoes
   back, a password typed into a URL): ``Bearer``/``Basic`` credentials,
   ``whsec_`` keys, Vault tokens, ``access_token=...`` query and form fields,
   JSON- and repr-style ``"access_token": "..."`` pairs, ``X-Vault-Token: ...``
   headers and the password of ``scheme://user:password@host`` URLs.
3. **Field names**: a log field or mapping key that looks secret
   (``client_secret``, ``password``, ``authorization``, ...) has its value
   replaced whatever it is.

Values that are not text (bytes, ``httpx.URL``, exceptions, any object) are
turned into text first and then masked, so no type slips past the patterns;
datetimes become ISO-8601 strings (a JSON log line never shows a Python repr).
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Mapping
from datetime import date, datetime, time
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "REDACTED",
    "URL_PASSWORD_MASK",
    "mask_url",
    "redact_text",
    "redact_value",
    "register_secret",
    "url_host",
]

REDACTED = "[REDACTED]"
#: What replaces the password of a URL (``postgresql://svc:***@db/idis``), as SQLAlchemy shows it.
URL_PASSWORD_MASK = "***"  # noqa: S105  # a mask, not a password

#: Field names whose values are secret whatever they hold.
_SENSITIVE_KEY = re.compile(
    r"(pass(word|wd)?|secret|token|authorization|api[_-]?key|credential|cookie|private[_-]?key)",
    re.IGNORECASE,
)
#: Field names that contain a sensitive word but hold no secret.
_SAFE_KEYS = frozenset(
    {
        "token_state",
        "token_expires_in",
        "token_url",
        "credential_version",
        "credentials_from_vault",
        "event",
    }
)
# Key names whose value is a secret when they appear inside text (query strings,
# form bodies, JSON or Python reprs of a provider's answer).
_KEY_WORDS = (
    r"[A-Za-z0-9_.-]*(?:access_token|refresh_token|id_token|client_secret|secret_id|password|passwd"
    r"|api[_-]?key|private[_-]?key|vault[_-]?token|auth[_-]?token|session[_-]?token)"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # JSON / repr style, quotes optionally escaped (a JSON body quoted inside a JSON string):
    # "access_token": "abc"  'password': 'x'  \"client_secret\":\"y\"
    (
        re.compile(r"(?i)(\\?[\"']" + _KEY_WORDS + r"\\?[\"']\s*:\s*\\?[\"'])[^\"'\\]*"),
        r"\1" + REDACTED,
    ),
    # Query strings and form bodies: access_token=abc&...
    (re.compile(r"(?i)(\b" + _KEY_WORDS + r"=)[^&\s\"'<>]+"), r"\1" + REDACTED),
    # Headers written out as text.
    (
        re.compile(
            r"(?i)\b(x-vault-token|x-api-key|api-key|cookie|set-cookie)(\s*[:=]\s*)[^\s,;]+"
        ),
        r"\1\2" + REDACTED,
    ),
    # The password of scheme://user:password@host (the user name stays: it helps, it is no secret).
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#@]+@"),
        r"\1" + URL_PASSWORD_MASK + "@",
    ),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+"), "Bearer " + REDACTED),
    (re.compile(r"whsec_[A-Za-z0-9+/=]+"), REDACTED),
    (re.compile(r"\b(hvs|hvb|hvr|s|b)\.[A-Za-z0-9_-]{20,}"), REDACTED),
)
_BASIC = re.compile(r"(?i)\b(basic)(\s+)([A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=])")

_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
#: Short strings would redact ordinary words; secrets are long.
_MIN_SECRET_LEN = 6


def register_secret(value: str | None) -> None:
    """Make ``value`` redacted wherever it appears in a log event, message or output."""
    global _secrets  # noqa: PLW0603  # copy-on-write set read without a lock on the hot path
    if not value or len(value) < _MIN_SECRET_LEN or value in _secrets:
        return
    with _secrets_lock:
        _secrets = _secrets | {value}


def _basic(match: re.Match[str]) -> str:
    # "Basic" is also an English word: mask only what decodes to user:password.
    token = match.group(3)
    if len(token) % 4:
        return match.group(0)
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    if b":" not in decoded:
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}{REDACTED}"


def redact_text(text: str) -> str:
    """Return ``text`` with every registered secret and secret-shaped value replaced."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if "asic" in text or "ASIC" in text:
        text = _BASIC.sub(_basic, text)
    return text


def _is_sensitive(key: str) -> bool:
    return key not in _SAFE_KEYS and _SENSITIVE_KEY.search(key) is not None


def redact_value(value: Any, key: str = "") -> Any:
    """Return a JSON-friendly copy of ``value`` with every secret masked.

    Strings are masked (:func:`redact_text`), and replaced whole under a
    sensitive ``key``; mappings and sequences are walked; numbers, booleans and
    None pass through; datetimes become ISO-8601; bytes, exceptions and any
    other object are turned into text first, then masked.
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if value and key and _is_sensitive(key):
            return REDACTED
        return redact_text(value)
    if isinstance(value, Mapping):
        return {str(k): redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, key) for v in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, BaseException):
        return redact_text(repr(value))
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        # httpx.URL, Path, UUID, Enum, a host's object: its text is what a
        # renderer would show, so that is what gets masked.
        text = str(value)
    if text and key and _is_sensitive(key):
        return REDACTED
    return redact_text(text)


#: A scheme with or without its ':' (``postgresql://``, or ``redis//`` as typed in a hurry),
#: or none (``://svc:pw@db``).
_SCHEME_SLASHES = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*)?:?//")


def mask_url(url: str) -> str:
    """``url`` with the password of its user info masked (``postgresql://svc:***@db/idis``).

    Anything that is not a URL with a password comes back unchanged; other
    secrets in it (a token in the query) are masked as in :func:`redact_text`.
    The user info ends at the *last* ``@`` before the query, so a password with
    an unescaped ``@`` (``svc:p@ss@db``) or a URL missing the ``:`` after its
    scheme (``redis//:pw@cache``) is masked whole, not in part.
    """
    text = redact_text(url)
    scheme = _SCHEME_SLASHES.match(text)
    start = scheme.end() if scheme else 0
    query = text.find("?", start)
    at = text.rfind("@", start, query if query >= 0 else len(text))
    userinfo = text[start:at] if at >= 0 else ""
    user, colon, password = userinfo.partition(":")
    if not colon or "/" in userinfo or password == URL_PASSWORD_MASK:
        return text
    return f"{text[:start]}{user}:{URL_PASSWORD_MASK}{text[at:]}"


def url_host(url: str) -> str:
    """The ``host[:port]`` of ``url``, without any user name or password."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return "<invalid URL>"
    return netloc.rpartition("@")[2]
