"""Verification schemes: checks a deliberately broken verifier cannot pass.

Each case here was run against a mutated verifier (a prefix-only comparison, a
loop keeping only the last secret, svix headers ignored) and failed there:

* a shortened signature (Standard Webhooks and HMAC) is a bad signature;
* every rotated secret verifies, the first as well as the last (HMAC and Standard);
* Svix senders (``svix-*`` headers) verify like ``webhook-*`` ones, against the
  test vector Svix publishes and against the ``standardwebhooks`` reference library;
* HMAC keys are at least 16 bytes, and an unsigned timestamp is never trusted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime

import pytest
import standardwebhooks

from idis.integrations.exceptions import ConfigError, WebhookVerificationError
from idis.integrations.webhooks._signing import generate_secret, sign, sign_headers
from idis.integrations.webhooks._verify import (
    HmacScheme,
    InboundRequest,
    StandardWebhooksScheme,
    normalize_headers,
)

# The vector Svix publishes with its libraries (svix-webhooks, python/tests/test_webhooks.py).
SVIX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SVIX_MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SVIX_TIMESTAMP = 1614265330
SVIX_BODY = b'{"test": 2432232314}'
SVIX_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
SVIX_NOW = datetime.fromtimestamp(SVIX_TIMESTAMP, UTC)
FIRST = "first-hmac-secret-0123456789"
SECOND = "second-hmac-secret-0123456789"


def _request(headers: dict[str, str], body: bytes) -> InboundRequest:
    return InboundRequest("POST", "/crm", normalize_headers(headers), body)


def _reason(scheme: object, headers: dict[str, str], body: bytes, now: datetime) -> str:
    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(_request(headers, body), now)  # type: ignore[attr-defined]
    return info.value.reason


# --------------------------------------------------------------------------- Svix


def test_svix_headers_verify_with_the_published_vector() -> None:
    """svix-id/svix-timestamp/svix-signature with Svix's own vector verify; svix-id is returned."""
    scheme = StandardWebhooksScheme([SVIX_SECRET])
    headers = {
        "Svix-Id": SVIX_MSG_ID,
        "Svix-Timestamp": str(SVIX_TIMESTAMP),
        "Svix-Signature": SVIX_SIGNATURE,
    }

    assert SVIX_MSG_ID == scheme.verify(_request(headers, SVIX_BODY), SVIX_NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"svix-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="}, "bad_signature"),
        ({"svix-timestamp": str(SVIX_TIMESTAMP + 1)}, "bad_signature"),
        ({"svix-id": "msg_other"}, "bad_signature"),
        ({"svix-signature": ""}, "missing_headers"),
        ({"svix-timestamp": "hello"}, "bad_timestamp"),
    ],
)
def test_svix_headers_are_checked_like_webhook_headers(change: dict[str, str], reason: str) -> None:
    """A changed svix header fails the way the webhook-* one would."""
    scheme = StandardWebhooksScheme([SVIX_SECRET])
    headers = {
        "svix-id": SVIX_MSG_ID,
        "svix-timestamp": str(SVIX_TIMESTAMP),
        "svix-signature": SVIX_SIGNATURE,
        **change,
    }

    assert reason == _reason(scheme, headers, SVIX_BODY, SVIX_NOW)


def test_svix_missing_signature_names_the_svix_header() -> None:
    """Without svix-signature the error names it, not webhook-signature."""
    scheme = StandardWebhooksScheme([SVIX_SECRET])
    headers = {"svix-id": SVIX_MSG_ID, "svix-timestamp": str(SVIX_TIMESTAMP)}

    with pytest.raises(WebhookVerificationError, match="svix-signature"):
        scheme.verify(_request(headers, SVIX_BODY), SVIX_NOW)


def test_the_reference_library_and_ours_agree_both_ways() -> None:
    """standardwebhooks (PyPI) verifies what we sign, and we verify what it signs."""
    secret = generate_secret()
    body = b'{"id": "evt_ref", "n": 1}'
    now = datetime.now(UTC)
    reference = standardwebhooks.Webhook(secret)

    ours = sign_headers(secret, body, msg_id="msg_ref", timestamp=now)
    reference.verify(body, ours)
    theirs = {
        "webhook-id": "msg_ref2",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": reference.sign("msg_ref2", now, body),
    }

    assert "msg_ref2" == StandardWebhooksScheme([secret]).verify(_request(theirs, body), now)
    assert reference.sign("msg_ref2", now, body) == sign(
        secret, "msg_ref2", int(now.timestamp()), body
    )


# --------------------------------------------------------------------------- shortened signatures


def _truncations(signature: bytes) -> list[bytes]:
    return [signature[:1], signature[:16], signature[:-1]]


def test_a_shortened_standard_signature_is_rejected() -> None:
    """A valid MAC cut short (1, 16 or 31 bytes) never verifies."""
    scheme = StandardWebhooksScheme([SVIX_SECRET])
    mac = base64.b64decode(SVIX_SIGNATURE.removeprefix("v1,"))
    for short in _truncations(mac):
        headers = {
            "webhook-id": SVIX_MSG_ID,
            "webhook-timestamp": str(SVIX_TIMESTAMP),
            "webhook-signature": "v1," + base64.b64encode(short).decode(),
        }

        assert "bad_signature" == _reason(scheme, headers, SVIX_BODY, SVIX_NOW)
    empty = {
        "webhook-id": SVIX_MSG_ID,
        "webhook-timestamp": str(SVIX_TIMESTAMP),
        "webhook-signature": "v1,",
    }
    assert "bad_signature" == _reason(scheme, empty, SVIX_BODY, SVIX_NOW)


@pytest.mark.parametrize("encoding", ["hex", "base64"])
def test_a_shortened_hmac_signature_is_rejected(encoding: str) -> None:
    """A valid HMAC cut short, in either encoding, never verifies."""
    scheme = HmacScheme([FIRST], header="x-sig", encoding=encoding)  # type: ignore[arg-type]
    body = b'{"id": "e1"}'
    mac = hmac.new(FIRST.encode(), body, hashlib.sha256).digest()
    for short in _truncations(mac):
        text = short.hex() if encoding == "hex" else base64.b64encode(short).decode()

        assert "bad_signature" == _reason(scheme, {"x-sig": text}, body, SVIX_NOW)


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("used", [FIRST, SECOND])
def test_hmac_rotation_accepts_every_configured_secret(used: str) -> None:
    """With two HMAC secrets configured, a delivery signed with either one verifies."""
    scheme = HmacScheme([FIRST, SECOND], header="x-sig", id_header="x-id")
    body = b'{"id": "e2"}'
    good = hmac.new(used.encode(), body, hashlib.sha256).hexdigest()

    assert "d-1" == scheme.verify(_request({"x-sig": good, "x-id": "d-1"}, body), SVIX_NOW)


def test_standard_rotation_accepts_the_first_and_the_last_secret() -> None:
    """Standard Webhooks with three secrets verifies each of them, first to last."""
    secrets = [generate_secret() for _ in range(3)]
    scheme = StandardWebhooksScheme(secrets)
    for secret in secrets:
        headers = sign_headers(secret, b"{}", msg_id="m", timestamp=SVIX_NOW)

        assert "m" == scheme.verify(_request(headers, b"{}"), SVIX_NOW)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("secret", ["", "k3y-abc", b"fifteen-bytes!!"])
def test_hmac_keys_shorter_than_16_bytes_are_refused(secret: str | bytes) -> None:
    """An empty or short HMAC key fails at construction, naming the provider, not the key."""
    with pytest.raises(ConfigError) as info:
        HmacScheme([FIRST, secret], label="IDIS_PROVIDER_CRM_WEBHOOK_SECRETS")

    message = str(info.value)
    assert "IDIS_PROVIDER_CRM_WEBHOOK_SECRETS #2 is too short" in message
    assert "k3y-abc" not in message
    assert "fifteen" not in message


def test_a_body_signature_never_trusts_a_timestamp_header() -> None:
    """signed='body' with a timestamp header is refused: the timestamp is not signed."""
    with pytest.raises(ConfigError, match="signed='request'"):
        HmacScheme([FIRST], signed="body", timestamp_header="x-ts")


def test_a_request_signature_covers_its_timestamp() -> None:
    """With signed='request', changing only the timestamp breaks the signature."""
    scheme = HmacScheme([FIRST], header="x-sig", signed="request", timestamp_header="x-ts")
    body = b"{}"
    ts = str(SVIX_TIMESTAMP)
    mac = hmac.new(FIRST.encode(), b"POST/crm{}" + ts.encode(), hashlib.sha256).hexdigest()

    assert scheme.verify(_request({"x-sig": mac, "x-ts": ts}, body), SVIX_NOW) is None
    moved = {"x-sig": mac, "x-ts": str(SVIX_TIMESTAMP + 60)}
    assert "bad_signature" == _reason(scheme, moved, body, SVIX_NOW)
