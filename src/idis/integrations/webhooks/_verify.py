"""Inbound webhook verification: pluggable signature schemes, a body limit and strict JSON.

A :class:`VerificationScheme` checks one request (method, URI, headers, raw
body) at a given time and either returns the delivery's message id or raises
:class:`~idis.integrations.exceptions.WebhookVerificationError` with a bounded
``reason``:

=================== ======= ==================================================
reason              status  meaning
=================== ======= ==================================================
``missing_headers`` 400     a header the scheme needs is absent or empty
``bad_timestamp``   400     the timestamp header is not integer Unix seconds up to year 9999
``stale_timestamp`` 401     the timestamp is outside the tolerance (replay guard)
``bad_signature``   401     no offered signature matches any configured secret
``too_large``       413     the body exceeds ``WebhookSettings.max_body_bytes``
``malformed_json``  400     not strict JSON (see :func:`parse_json_strict`)
``invalid_event``   400     JSON, but not an event the inbox can take
=================== ======= ==================================================

Schemes shipped:

* :class:`StandardWebhooksScheme`: ``webhook-id``/``webhook-timestamp``/
  ``webhook-signature`` (or Svix's ``svix-*`` names for the same scheme) with
  several ``whsec_`` secrets at once (rotation) and a ±``tolerance`` window
  (default 5 minutes, ``IDIS_WEBHOOK_TOLERANCE``).
* :class:`HmacScheme`: HMAC-SHA256 in a named header, over the body alone or
  over method + URI + body + timestamp (hex or base64, optional prefix such as
  ``sha256=``), for providers with their own scheme. Keys are at least 16
  bytes; a timestamp is trusted only when it is signed (``signed="request"``).

Every comparison is constant-time. Error messages name the header that was
wrong, never a secret, a signature or the body.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..exceptions import ConfigError, WebhookVerificationError
from ._signing import (
    MIN_KEY_BYTES,
    SVIX_ID,
    SVIX_SIGNATURE,
    SVIX_TIMESTAMP,
    WEBHOOK_ID,
    WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP,
    any_match,
    decode_secret,
    signatures_match,
)

if TYPE_CHECKING:
    from ..config import Secret

__all__ = [
    "REASON_STATUS",
    "HmacScheme",
    "InboundRequest",
    "StandardWebhooksScheme",
    "VerificationScheme",
    "VerifiedWebhook",
    "check_body_size",
    "normalize_headers",
    "parse_json_strict",
    "parse_json_value",
]

#: HTTP status answered for each rejection reason.
REASON_STATUS: Mapping[str, int] = {
    "missing_headers": 400,
    "bad_timestamp": 400,
    "stale_timestamp": 401,
    "bad_signature": 401,
    "too_large": 413,
    "malformed_json": 400,
    "invalid_event": 400,
}
#: Longest header value we look at; longer ones are rejected before any work.
MAX_HEADER_VALUE = 8192
#: Deepest JSON nesting accepted (the stdlib parser recurses).
MAX_JSON_DEPTH = 64
#: 9999-12-31T23:59:59Z: a later "timestamp" is malformed, not merely stale.
_LAST_UNIX_SECOND = 253_402_300_799


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """One inbound webhook request, as the receiver got it."""

    #: HTTP method (upper-case).
    method: str
    #: Path and query string as received (``/webhooks/crm_provider?x=1``).
    uri: str
    #: Header names lower-cased; one value per name.
    headers: Mapping[str, str]
    #: The raw body.
    body: bytes


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """A request that passed verification, with its strictly parsed JSON object."""

    #: Delivery id from the scheme's id header (``webhook-id``), if it has one.
    message_id: str | None
    #: The JSON object in the body.
    payload: dict[str, Any]


class VerificationScheme(Protocol):
    """A way to authenticate a provider's webhook requests."""

    #: Short scheme name for logs (``standard_webhooks``, ``hmac``).
    name: str

    def verify(self, request: InboundRequest, now: datetime) -> str | None:
        """Authenticate ``request`` at time ``now``; return its message id, if any.

        Raises:
            WebhookVerificationError: with a reason from :data:`REASON_STATUS`.
        """
        ...


class _Normalized(dict[str, str]):
    """What :func:`normalize_headers` returns: normalizing it again returns it as is."""

    __slots__ = ()


def normalize_headers(
    headers: Mapping[str, str] | Iterable[tuple[bytes | str, bytes | str]],
) -> dict[str, str]:
    """Lower-cased header names to values (the first value wins for repeated names).

    Accepts a mapping or ASGI's list of ``(name, value)`` byte pairs; bytes are
    decoded as Latin-1, as HTTP/1.1 prescribes, so no header can fail to decode.
    """
    if type(headers) is _Normalized:
        # The ASGI app normalizes once (for Content-Length) and verification reuses it.
        return headers
    items: Iterable[tuple[bytes | str, bytes | str]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    result = _Normalized()
    for name, value in items:
        key = (name.decode("latin-1") if isinstance(name, bytes) else str(name)).lower()
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        result.setdefault(key, text)
    return result


def check_body_size(body: bytes, limit: int) -> None:
    """Reject a body over ``limit`` bytes.

    Raises:
        WebhookVerificationError: reason ``too_large``.
    """
    if len(body) > limit:
        raise WebhookVerificationError(
            f"webhook body of {len(body)} bytes exceeds the limit of {limit} bytes",
            reason="too_large",
        )


def _header(request: InboundRequest, name: str) -> str:
    value = request.headers.get(name, "").strip()
    if not value:
        raise WebhookVerificationError(
            f"webhook request has no {name} header", reason="missing_headers"
        )
    if len(value) > MAX_HEADER_VALUE:
        raise WebhookVerificationError(
            f"webhook {name} header is longer than {MAX_HEADER_VALUE} characters",
            reason="bad_signature" if "signature" in name else "missing_headers",
        )
    return value


def _check_timestamp(name: str, value: str, now: datetime, tolerance: timedelta) -> None:
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise WebhookVerificationError(
            f"webhook {name} header is not integer Unix seconds", reason="bad_timestamp"
        )
    sent = int(value)
    if sent > _LAST_UNIX_SECOND:
        raise WebhookVerificationError(
            f"webhook {name} header is not a Unix time (it lies after the year 9999)",
            reason="bad_timestamp",
        )
    # Integer seconds, never a datetime: the header is not authenticated yet, and
    # datetime.fromtimestamp(999999999999) overflows (year 33658).
    skew = abs(now.timestamp() - sent)
    if skew > tolerance.total_seconds():
        raise WebhookVerificationError(
            f"webhook {name} is {skew:.0f} s away from our clock; the tolerance is "
            f"{tolerance.total_seconds():.0f} s",
            reason="stale_timestamp",
        )


_HEADERS = (WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE)
_SVIX_HEADERS = (SVIX_ID, SVIX_TIMESTAMP, SVIX_SIGNATURE)


class StandardWebhooksScheme:
    """Standard Webhooks verification with several secrets at once.

    Args:
        secrets: ``whsec_`` secrets (strings or ``Secret``); every one is accepted,
            so a provider can rotate without a window of rejected deliveries.
        tolerance: Largest accepted difference between ``webhook-timestamp`` and now.

    Raises:
        ConfigError: when no secret is given or one is not a whsec_ secret.
    """

    name = "standard_webhooks"

    def __init__(
        self,
        secrets: Sequence[str | bytes | Secret],
        *,
        tolerance: timedelta = timedelta(minutes=5),
        label: str = "webhook secret",
    ) -> None:
        if not secrets:
            raise ConfigError(f"{label}: no webhook secret configured", variable=label)
        self._keys = tuple(
            decode_secret(s, name=f"{label} #{i + 1}") for i, s in enumerate(secrets)
        )
        self.tolerance = tolerance

    def __repr__(self) -> str:
        return f"StandardWebhooksScheme(secrets={len(self._keys)}, tolerance={self.tolerance})"

    def verify(self, request: InboundRequest, now: datetime) -> str | None:
        """Check the three Standard Webhooks headers; return ``webhook-id``.

        Svix (and senders built on its libraries) send the same scheme under
        ``svix-id``/``svix-timestamp``/``svix-signature``; those are read when
        ``webhook-id`` is absent.
        """
        names = (
            _SVIX_HEADERS
            if WEBHOOK_ID not in request.headers and SVIX_ID in request.headers
            else _HEADERS
        )
        msg_id = _header(request, names[0])
        timestamp = _header(request, names[1])
        signature = _header(request, names[2])
        _check_timestamp(names[1], timestamp, now, self.tolerance)
        if not signatures_match(self._keys, msg_id, timestamp, request.body, signature):
            raise WebhookVerificationError(
                "webhook signature does not match any configured secret", reason="bad_signature"
            )
        return msg_id


class HmacScheme:
    """HMAC-SHA256 in a named header, over the body or over method + URI + body + timestamp.

    Args:
        secrets: Shared secrets (the UTF-8 bytes of each are the HMAC key, at least
            16 bytes); several are accepted at once for rotation.
        header: Header carrying the signature (e.g. ``x-signature``).
        signed: ``"body"`` signs the raw body; ``"request"`` signs
            ``METHOD + separator + URI + separator + body + separator + timestamp``.
        timestamp_header: Header with integer Unix seconds, signed with the request;
            required for ``signed="request"`` and refused with ``signed="body"``
            (a timestamp outside the signature proves nothing: anyone can replay a
            captured body with a fresh one).
        encoding: ``"hex"`` or ``"base64"`` signature encoding.
        prefix: Text before the signature in the header (e.g. ``sha256=``).
        separator: Bytes between the parts of a ``"request"`` signature.
        id_header: Header with the delivery id, if the provider sends one.
        tolerance: Accepted clock difference for the timestamp.
        label: What the secrets are, for errors: name the provider
            (``"IDIS_PROVIDER_CRM_WEBHOOK_SECRETS"``, ``"crm webhook secret"``).

    Raises:
        ConfigError: without secrets, with a key shorter than 16 bytes, for
            ``signed="request"`` without a timestamp header, or ``signed="body"`` with one.
    """

    name = "hmac"

    def __init__(
        self,
        secrets: Sequence[str | bytes | Secret],
        *,
        header: str = "x-signature",
        signed: Literal["body", "request"] = "body",
        timestamp_header: str | None = None,
        encoding: Literal["hex", "base64"] = "hex",
        prefix: str = "",
        separator: bytes = b"",
        id_header: str | None = None,
        tolerance: timedelta = timedelta(minutes=5),
        label: str = "webhook secret",
    ) -> None:
        if not secrets:
            raise ConfigError(f"{label}: no webhook secret configured", variable=label)
        if signed == "request" and not timestamp_header:
            raise ConfigError(
                "HmacScheme(signed='request') needs timestamp_header", variable="timestamp_header"
            )
        if signed == "body" and timestamp_header:
            # Checking an unsigned timestamp would look like a replay guard and be none.
            raise ConfigError(
                f"{label}: HmacScheme(signed='body') cannot trust timestamp_header: the body "
                "signature does not cover it, so a captured delivery replays with a fresh "
                "timestamp; use signed='request' (which signs it) or drop timestamp_header "
                "(the inbox ignores a replayed event id)",
                variable="timestamp_header",
            )
        self._keys = tuple(
            s
            if isinstance(s, bytes)
            else (s if isinstance(s, str) else s.get_secret_value()).encode()
            for s in secrets
        )
        for index, key in enumerate(self._keys):
            if len(key) < MIN_KEY_BYTES:
                # Name the secret by its position and owner, never its value or length.
                raise ConfigError(
                    f"{label} #{index + 1} is too short: expected at least {MIN_KEY_BYTES} "
                    "bytes of key (e.g. from `idis.integrations.webhooks._signing."
                    "generate_secret()`)",
                    variable=label,
                )
        self.header = header.lower()
        self.signed = signed
        self.timestamp_header = timestamp_header.lower() if timestamp_header else None
        self.encoding = encoding
        self.prefix = prefix
        self.separator = separator
        self.id_header = id_header.lower() if id_header else None
        self.tolerance = tolerance

    def __repr__(self) -> str:
        return (
            f"HmacScheme(secrets={len(self._keys)}, header={self.header!r}, signed={self.signed!r})"
        )

    def content(self, request: InboundRequest, timestamp: str | None) -> bytes:
        """The bytes the provider signed for ``request``."""
        if self.signed == "body":
            return request.body
        sep = self.separator
        return (
            request.method.upper().encode("latin-1", "replace")
            + sep
            + request.uri.encode("latin-1", "replace")
            + sep
            + request.body
            + sep
            + (timestamp or "").encode("latin-1", "replace")
        )

    def _decode(self, value: str) -> bytes | None:
        if self.prefix:
            if not value.startswith(self.prefix):
                return None
            value = value[len(self.prefix) :]
        try:
            if self.encoding == "hex":
                return bytes.fromhex(value)
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            return None

    def verify(self, request: InboundRequest, now: datetime) -> str | None:
        """Check the signature header (and timestamp); return the id header's value."""
        signature = _header(request, self.header)
        timestamp: str | None = None
        if self.timestamp_header:
            timestamp = _header(request, self.timestamp_header)
            _check_timestamp(self.timestamp_header, timestamp, now, self.tolerance)
        offered = [d for d in (self._decode(p) for p in signature.split()) if d is not None]
        if not any_match(self._keys, self.content(request, timestamp), offered):
            raise WebhookVerificationError(
                f"webhook {self.header} header does not match any configured secret",
                reason="bad_signature",
            )
        if self.id_header:
            value = request.headers.get(self.id_header, "").strip()
            return value[:255] or None
        return None


# --------------------------------------------------------------------------- strict JSON


def _malformed(message: str) -> WebhookVerificationError:
    return WebhookVerificationError(message, reason="malformed_json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Built by dict() in C: a repeated key shows as fewer entries than pairs.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return result


def _nesting_depth(body: bytes) -> int:
    # Structural depth, ignoring brackets inside strings: bounds the recursion
    # of json.loads before it starts.
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _has_unstorable(value: Any) -> bool:
    """Lone surrogates and NUL cannot be stored in PostgreSQL text or JSONB."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_unstorable(k) or _has_unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unstorable(v) for v in value)
    return False


def parse_json_strict(body: bytes) -> dict[str, Any]:
    """Parse a webhook body as strict JSON: one UTF-8 object, nothing JSON does not allow.

    See :func:`parse_json_value` (this one also requires the top level to be an object).

    Raises:
        WebhookVerificationError: reason ``malformed_json``, saying what was wrong
            (never echoing the body).
    """
    payload = parse_json_value(body)
    if not isinstance(payload, dict):
        raise _malformed(f"webhook body is a JSON {type(payload).__name__}, expected an object")
    return payload


def parse_json_value(body: bytes) -> Any:
    """Parse a webhook body as strict JSON: one UTF-8 value, nothing JSON does not allow.

    A batched body (HubSpot's JSON array of events) is parsed with this one.

    Rejected: invalid UTF-8 (or a BOM), NaN/Infinity, duplicate keys, nesting deeper
    than 64, and ``\\u0000`` or lone surrogate escapes (they cannot be stored).

    Raises:
        WebhookVerificationError: reason ``malformed_json``, saying what was wrong
            (never echoing the body).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("webhook body is not UTF-8") from None
    if text.startswith("\ufeff"):
        raise _malformed("webhook body starts with a byte-order mark")
    # Counting is C-speed; the byte scan only runs when nesting could be too deep.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nesting_depth(body) > MAX_JSON_DEPTH:
        raise _malformed(f"webhook body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        payload = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, duplicate keys, NaN and huge ints;
        # the message names the position or the key, never the body.
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise _malformed(f"webhook body is not valid JSON: {detail}") from None
    # Escapes are the only way to spell NUL or a lone surrogate in valid UTF-8.
    if "\\u" in text and _has_unstorable(payload):
        raise _malformed("webhook body contains \\u0000 or a lone surrogate")
    return payload
