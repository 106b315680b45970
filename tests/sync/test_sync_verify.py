"""Standard Webhooks signing, the pluggable HMAC scheme, and strict JSON."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest

from idis.integrations.config import Secret
from idis.integrations.exceptions import ConfigError, WebhookVerificationError
from idis.integrations.webhooks._signing import (
    decode_secret,
    generate_secret,
    sign,
    sign_headers,
    signatures_match,
)
from idis.integrations.webhooks._verify import (
    REASON_STATUS,
    HmacScheme,
    InboundRequest,
    StandardWebhooksScheme,
    check_body_size,
    normalize_headers,
    parse_json_strict,
)

NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER = "whsec_" + base64.b64encode(b"another-secret-key-32-bytes-long").decode()


def _request(headers: dict[str, str], body: bytes = b'{"a":1}') -> InboundRequest:
    return InboundRequest(method="POST", uri="/crm", headers=normalize_headers(headers), body=body)


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    """sign() reproduces the example published with the Standard Webhooks specification."""
    body = b'{"test": 2432232314}'

    signature = sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)

    assert "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=" == signature


def test_sign_headers_signs_with_every_secret_during_rotation() -> None:
    """Signing with two secrets yields two signatures, each verifiable alone."""
    headers = sign_headers([SECRET, OTHER], b"{}", msg_id="msg_1", timestamp=NOW)

    parts = headers["webhook-signature"].split()
    assert 2 == len(parts)
    for secret in (SECRET, OTHER):
        assert signatures_match(
            [decode_secret(secret)], "msg_1", headers["webhook-timestamp"], b"{}", parts[0]
        ) or signatures_match(
            [decode_secret(secret)], "msg_1", headers["webhook-timestamp"], b"{}", parts[1]
        )


def test_decode_secret_rejects_garbage_without_echoing_it() -> None:
    """A malformed secret fails with ConfigError whose message does not contain the value."""
    with pytest.raises(ConfigError) as info:
        decode_secret("whsec_not base64 at all!!", name="IDIS_PROVIDER_CRM_WEBHOOK_SECRETS")

    assert "IDIS_PROVIDER_CRM_WEBHOOK_SECRETS" in str(info.value)
    assert "not base64" not in str(info.value)


def test_decode_secret_rejects_short_keys() -> None:
    """Keys under 16 bytes are refused: they are guessable."""
    with pytest.raises(ConfigError, match="too short"):
        decode_secret("whsec_" + base64.b64encode(b"short").decode())


def test_generated_secrets_round_trip() -> None:
    """generate_secret() yields a whsec_ secret with a 32-byte key."""
    secret = generate_secret()

    assert secret.startswith("whsec_")
    assert 32 == len(decode_secret(secret))


def test_standard_scheme_accepts_any_configured_secret() -> None:
    """Deliveries signed with either the old or the new secret verify (rotation)."""
    scheme = StandardWebhooksScheme([Secret(SECRET), OTHER])
    for secret in (SECRET, OTHER):
        headers = sign_headers(secret, b'{"a":1}', msg_id="msg_x", timestamp=NOW)

        assert "msg_x" == scheme.verify(_request(headers), NOW)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.pop("webhook-id"), "missing_headers"),
        (lambda h: h.pop("webhook-timestamp"), "missing_headers"),
        (lambda h: h.pop("webhook-signature"), "missing_headers"),
        (lambda h: h.update({"webhook-signature": "   "}), "missing_headers"),
        (lambda h: h.update({"webhook-timestamp": "soon"}), "bad_timestamp"),
        (lambda h: h.update({"webhook-timestamp": "1e9"}), "bad_timestamp"),
        (lambda h: h.update({"webhook-signature": "v1,AAAA"}), "bad_signature"),
        (lambda h: h.update({"webhook-signature": "v2,whatever"}), "bad_signature"),
        (lambda h: h.update({"webhook-id": "msg_other"}), "bad_signature"),
        (lambda h: h.update({"webhook-signature": "v1," + "A" * 9000}), "bad_signature"),
    ],
)
def test_standard_scheme_rejects_tampering(mutate: object, reason: str) -> None:
    """Missing, malformed or wrong headers are rejected with a bounded reason."""
    scheme = StandardWebhooksScheme([SECRET])
    headers = sign_headers(SECRET, b'{"a":1}', msg_id="msg_x", timestamp=NOW)
    mutate(headers)  # type: ignore[operator]

    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(_request(headers), NOW)

    assert reason == info.value.reason
    assert reason in REASON_STATUS


def test_standard_scheme_rejects_a_tampered_body() -> None:
    """A body changed after signing fails verification."""
    scheme = StandardWebhooksScheme([SECRET])
    headers = sign_headers(SECRET, b'{"a":1}', msg_id="msg_x", timestamp=NOW)

    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(_request(headers, b'{"a":2}'), NOW)

    assert "bad_signature" == info.value.reason


@pytest.mark.parametrize(
    ("skew", "ok"),
    [
        (timedelta(minutes=4, seconds=59), True),
        (timedelta(minutes=-4, seconds=-59), True),
        (timedelta(minutes=5, seconds=1), False),
        (timedelta(minutes=-5, seconds=-1), False),
    ],
)
def test_standard_scheme_tolerance_is_five_minutes_each_way(skew: timedelta, ok: bool) -> None:
    """Timestamps within ±5 minutes pass; beyond, they are stale (replay guard)."""
    scheme = StandardWebhooksScheme([SECRET])
    headers = sign_headers(SECRET, b"{}", msg_id="m", timestamp=NOW + skew)

    if ok:
        assert "m" == scheme.verify(_request(headers, b"{}"), NOW)
    else:
        with pytest.raises(WebhookVerificationError) as info:
            scheme.verify(_request(headers, b"{}"), NOW)
        assert "stale_timestamp" == info.value.reason


def test_standard_scheme_needs_a_secret() -> None:
    """No secret at all is a configuration error, raised at construction."""
    with pytest.raises(ConfigError, match="no webhook secret"):
        StandardWebhooksScheme([])


def test_hmac_scheme_over_the_body_hex_with_prefix() -> None:
    """A GitHub-style ``sha256=<hex>`` signature of the body verifies; another key does not."""
    scheme = HmacScheme(["s3cret-value-0123"], header="X-Hub-Signature-256", prefix="sha256=")
    body = b'{"id":"e1"}'
    good = "sha256=" + hmac.new(b"s3cret-value-0123", body, hashlib.sha256).hexdigest()
    bad = "sha256=" + hmac.new(b"other-value-01234", body, hashlib.sha256).hexdigest()

    assert scheme.verify(_request({"x-hub-signature-256": good}, body), NOW) is None
    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(_request({"x-hub-signature-256": bad}, body), NOW)
    assert "bad_signature" == info.value.reason


def test_hmac_scheme_over_method_uri_body_and_timestamp() -> None:
    """A request-signing scheme covers method, URI, body and timestamp; each one matters."""
    scheme = HmacScheme(
        ["k-123456-abcdefgh"],
        header="x-sig",
        signed="request",
        timestamp_header="x-ts",
        encoding="base64",
        separator=b"\n",
        id_header="x-delivery",
    )
    ts = str(int(NOW.timestamp()))
    body = b"{}"
    content = b"POST\n/crm?x=1\n{}\n" + ts.encode()
    sig = base64.b64encode(
        hmac.new(b"k-123456-abcdefgh", content, hashlib.sha256).digest()
    ).decode()
    headers = {"x-sig": sig, "x-ts": ts, "x-delivery": "d-9"}
    request = InboundRequest("POST", "/crm?x=1", normalize_headers(headers), body)

    assert "d-9" == scheme.verify(request, NOW)
    moved = InboundRequest("POST", "/crm?x=2", normalize_headers(headers), body)
    with pytest.raises(WebhookVerificationError):
        scheme.verify(moved, NOW)
    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(request, NOW + timedelta(minutes=6))
    assert "stale_timestamp" == info.value.reason


def test_hmac_request_scheme_requires_a_timestamp_header() -> None:
    """Signing the request without a timestamp header is refused at construction."""
    with pytest.raises(ConfigError, match="timestamp_header"):
        HmacScheme(["k"], signed="request")


def test_body_size_limit() -> None:
    """A body one byte over the limit is rejected as too_large; at the limit it passes."""
    check_body_size(b"x" * 10, 10)

    with pytest.raises(WebhookVerificationError) as info:
        check_body_size(b"x" * 11, 10)

    assert "too_large" == info.value.reason


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1, "a": 2}',
        b'{"a": {"b": 1, "b": 1}}',
        b'{"a": 1',
        b"\xff\xfe{}",
        b'\xef\xbb\xbf{"a": 1}',
        b'{"a": "\\u0000"}',
        b'{"a": "\\ud800"}',
        b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",
        b'{"a": 1' + b"0" * 5000 + b"}",
        b'{"a": 1} {"b": 2}',
    ],
)
def test_strict_json_rejects(body: bytes) -> None:
    """Non-objects, NaN/Infinity, duplicate keys, bad UTF-8, BOMs, unstorable text are refused."""
    with pytest.raises(WebhookVerificationError) as info:
        parse_json_strict(body)

    assert "malformed_json" == info.value.reason


def test_strict_json_accepts_ordinary_objects() -> None:
    """A plain object with nesting, unicode and numbers parses unchanged."""
    doc = {"id": "evt_1", "data": {"name": "Zoë", "n": [1, 2.5, None, True]}, "deep": {"x": {}}}

    assert doc == parse_json_strict(json.dumps(doc).encode())


def test_strict_json_error_never_echoes_the_body() -> None:
    """The error names the problem, not the body's content."""
    with pytest.raises(WebhookVerificationError) as info:
        parse_json_strict(b'{"password": "hunter2-secret", "password": "x"}')

    assert "hunter2" not in str(info.value)
