"""Standard Webhooks signing and signature checking: the one HMAC implementation.

Both directions use it: the inbound receiver verifies what providers send,
the outbox signs what we send. The scheme (https://www.standardwebhooks.com):

* secret: ``whsec_`` + base64 of the key bytes (the prefix is optional on input);
* signed content: ``"{webhook-id}.{webhook-timestamp}.{body}"`` (timestamp in
  integer Unix seconds, body as the exact bytes sent);
* signature: HMAC-SHA256 of that content, base64-encoded, sent as
  ``webhook-signature: v1,<base64>``; several space-separated signatures are
  allowed (the sender signing with old and new secret during rotation).

Comparisons are constant-time (:func:`hmac.compare_digest`). Nothing here logs,
and no error message contains a secret or a signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, cast

from ..exceptions import ConfigError

if TYPE_CHECKING:
    from ..config import Secret

__all__ = [
    "MIN_KEY_BYTES",
    "SECRET_PREFIX",
    "SVIX_ID",
    "SVIX_SIGNATURE",
    "SVIX_TIMESTAMP",
    "WEBHOOK_ID",
    "WEBHOOK_SIGNATURE",
    "WEBHOOK_TIMESTAMP",
    "any_match",
    "decode_secret",
    "generate_secret",
    "new_message_id",
    "sign",
    "sign_headers",
    "signatures_match",
    "signed_content",
]

#: Header names (lower-case; HTTP headers are case-insensitive).
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
#: The same three headers as Svix names them (same signed content, same signature format:
#: https://docs.svix.com/receiving/verifying-payloads/how-manual).
SVIX_ID = "svix-id"
SVIX_TIMESTAMP = "svix-timestamp"
SVIX_SIGNATURE = "svix-signature"
#: Prefix of Standard Webhooks secrets.
SECRET_PREFIX = "whsec_"  # noqa: S105  # a prefix, not a password
_VERSION = "v1"
#: Shortest key we accept: HMAC-SHA256 keys below 128 bits are guessable.
MIN_KEY_BYTES = 16


def decode_secret(secret: str | bytes | Secret, *, name: str = "webhook secret") -> bytes:
    """Return the HMAC key of a ``whsec_...`` secret (raw bytes pass through).

    Args:
        secret: ``whsec_<base64>``, bare base64, raw key bytes, or a ``Secret`` holding one.
        name: What the secret is, for the error (never the secret itself).

    Raises:
        ConfigError: when the secret is not base64 or its key is shorter than 16 bytes.
    """
    if isinstance(secret, bytes):
        key = secret
    else:
        text = secret if isinstance(secret, str) else secret.get_secret_value()
        text = text.strip().removeprefix(SECRET_PREFIX)
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{name} is not a Standard Webhooks secret: expected whsec_ followed by "
                "base64 (e.g. from `idis.integrations.webhooks._signing.generate_secret()`)",
                variable=name,
            ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{name} is too short: expected at least {MIN_KEY_BYTES} key bytes", variable=name
        )
    return key


def generate_secret(nbytes: int = 32) -> str:
    """A new random ``whsec_`` secret with ``nbytes`` of key."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode()


def new_message_id() -> str:
    """A new unique webhook-id (``msg_`` + 26 url-safe characters)."""
    return "msg_" + _secrets.token_urlsafe(20)[:26]


def signed_content(msg_id: str, timestamp: str | int, body: bytes) -> bytes:
    """The bytes a Standard Webhooks signature covers."""
    return f"{msg_id}.{timestamp}.".encode() + body


def _digest(key: bytes, content: bytes) -> bytes:
    return hmac.new(key, content, hashlib.sha256).digest()


def any_match(keys: Iterable[bytes], content: bytes, offered: Sequence[bytes]) -> bool:
    """Whether any ``offered`` HMAC-SHA256 of ``content`` was made with any of ``keys``."""
    matched = False
    for key in keys:
        expected = _digest(key, content)
        for candidate in offered:
            # No early exit: every comparison runs whatever matched first.
            matched |= hmac.compare_digest(expected, candidate)
    return matched


def _signature(key: bytes, content: bytes) -> str:
    return f"{_VERSION},{base64.b64encode(_digest(key, content)).decode()}"


def sign(secret: str | bytes | Secret, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) for one message."""
    return _signature(decode_secret(secret), signed_content(msg_id, int(timestamp), body))


def sign_headers(
    secrets: str | bytes | Secret | Sequence[str | bytes | Secret],
    body: bytes,
    *,
    msg_id: str | None = None,
    timestamp: int | float | datetime | None = None,
) -> dict[str, str]:
    """Headers that sign ``body``: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

    Args:
        secrets: One secret, or several (each adds a signature: rotation).
        body: The exact bytes that will be sent.
        msg_id: The message id (default: a new one); keep it across retries.
        timestamp: Send time (datetime or Unix seconds; default: now).
    """
    chosen: list[str | bytes | Secret]
    if isinstance(secrets, str | bytes) or not isinstance(secrets, Sequence):
        chosen = [secrets]
    else:
        chosen = list(cast("Sequence[str | bytes | Secret]", secrets))
    if timestamp is None:
        ts = int(time.time())
    elif isinstance(timestamp, datetime):
        ts = int(timestamp.timestamp())
    else:
        ts = int(timestamp)
    ident = msg_id or new_message_id()
    content = signed_content(ident, ts, body)
    signature = " ".join(_signature(decode_secret(s), content) for s in chosen)
    return {WEBHOOK_ID: ident, WEBHOOK_TIMESTAMP: str(ts), WEBHOOK_SIGNATURE: signature}


def signatures_match(
    keys: Iterable[bytes], msg_id: str, timestamp: str, body: bytes, signature_header: str
) -> bool:
    """Whether any ``v1`` signature in the header was made with any of ``keys``.

    Args:
        keys: Decoded HMAC keys (:func:`decode_secret`); several during rotation.
        msg_id: The ``webhook-id`` header.
        timestamp: The ``webhook-timestamp`` header, exactly as received.
        body: The raw body.
        signature_header: The ``webhook-signature`` header.
    """
    offered: list[bytes] = []
    for part in signature_header.split():
        version, sep, value = part.partition(",")
        if not sep or version != _VERSION:
            continue
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return bool(offered) and any_match(keys, signed_content(msg_id, timestamp, body), offered)
