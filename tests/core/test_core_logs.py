"""Logs are structured JSON with stable event names, and secrets never reach them."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime

import structlog

from idis.integrations._audit import audit_row
from idis.integrations._http import httpx
from idis.integrations._redact import mask_url, url_host
from idis.integrations.config import Secret
from idis.integrations.observability._logs import configure_logging, get_logger, redact_text


def _render(**event: object) -> list[dict[str, object]]:
    buffer = io.StringIO()
    configure_logging("json", "DEBUG", stream=buffer)
    get_logger().warning("idis.test.event", **event)
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_with_stable_event_names() -> None:
    """configure_logging renders one JSON object per event with level and timestamp."""
    (line,) = _render(provider="crm_provider", msg="hello")

    assert "idis.test.event" == line["event"]
    assert ("warning", "crm_provider") == (line["level"], line["provider"])
    assert "timestamp" in line


def test_registered_secret_is_redacted_everywhere() -> None:
    """A Secret's value is scrubbed from messages, nested fields and exception reprs."""
    value = Secret("sk_live_0123456789abcdef").get_secret_value()

    (line,) = _render(
        msg=f"calling with {value}",
        nested={"deep": [f"x{value}x"]},
        error=RuntimeError(f"boom {value}"),
    )

    assert value not in json.dumps(line)
    assert "[REDACTED]" in line["msg"]


def test_secret_shaped_values_and_keys_are_redacted() -> None:
    """Bearer tokens, whsec_ keys, Vault tokens and fields named like secrets are scrubbed."""
    (line,) = _render(
        msg=(
            "Authorization: Bearer abc.def.ghi and whsec_QUJDREVGR0g= and "
            "hvs.AAAAAAAAAAAAAAAAAAAAAAAA"
        ),
        client_secret="plain-value",
        access_token="tok-123456",
        token_state="valid",
    )

    text = json.dumps(line)
    for leaked in ("abc.def.ghi", "whsec_QUJDREVGR0g=", "hvs.AAAA", "plain-value", "tok-123456"):
        assert leaked not in text
    assert "valid" == line["token_state"]


def test_context_bound_per_call_appears_on_every_line() -> None:
    """Values bound with structlog.contextvars appear on each line (provider, tenant, request)."""
    buffer = io.StringIO()
    configure_logging("json", "INFO", stream=buffer)
    with structlog.contextvars.bound_contextvars(tenant_id="t-1", request_id="r-9"):
        get_logger().info("idis.test.bound")
    (line,) = [json.loads(x) for x in buffer.getvalue().splitlines()]

    assert ("t-1", "r-9") == (line["tenant_id"], line["request_id"])


def test_audit_rows_are_redacted() -> None:
    """audit_row scrubs secrets from details and message before they are stored."""
    value = Secret("refresh-token-abcdef123").get_secret_value()

    row = audit_row("token.refreshed", details={"note": value}, message=f"used {value}")

    assert value not in json.dumps(row, default=str)


def test_redact_text_leaves_ordinary_text_alone() -> None:
    """Text without secrets comes back unchanged."""
    assert "breaker opened after 5 failures" == redact_text("breaker opened after 5 failures")


def test_secret_shapes_that_were_never_registered_are_redacted() -> None:
    """JSON and repr pairs, Basic credentials and URL passwords are scrubbed from text."""
    basic = base64.b64encode(b"idis-client:cs-basic-secret-1").decode()
    (line,) = _render(
        msg=(
            '{"access_token": "at-json-123456", "token_type": "Bearer"} '
            "{'refresh_token': 'rt-repr-123456'} "
            '{\\"client_secret\\": \\"cs-escaped-123456\\"} '
            f"Authorization: Basic {basic} "
            "postgresql://svc:db-pass-123456@db.example.com/idis "
            "redis://:redis-pass-123456@cache:6379/0 "
            "X-Vault-Token: vault-header-123456"
        )
    )

    text = json.dumps(line)
    for leaked in (
        "at-json-123456",
        "rt-repr-123456",
        "cs-escaped-123456",
        basic,
        "db-pass-123456",
        "redis-pass-123456",
        "vault-header-123456",
    ):
        assert leaked not in text
    # What helps a reader stays: the key names, the user and host of a URL.
    assert "access_token" in line["msg"]
    assert "postgresql://svc:***@db.example.com/idis" in line["msg"]


def test_values_that_are_not_text_are_redacted_too() -> None:
    """Bytes, an httpx.URL, any object and a sensitive key's non-text value reach no line."""
    url = httpx.URL("https://api.example.com/cb?code=1&access_token=at-url-123456")
    (line,) = _render(
        body=b'{"refresh_token": "rt-bytes-123456"}',
        url=url,
        nested={"items": (url, b"Bearer bt-bytes-123456")},
        password=12345678,
        client_secret=b"cs-bytes-123456",
    )

    text = json.dumps(line)
    for leaked in ("at-url-123456", "rt-bytes-123456", "bt-bytes-123456", "cs-bytes-123456"):
        assert leaked not in text
    assert line["url"].startswith("https://api.example.com/cb?code=1&access_token=")
    # Numbers are not secrets by shape; a sensitive key's number is shown (it is a count).
    assert 12345678 == line["password"]


def test_datetimes_in_json_logs_are_iso_8601() -> None:
    """A datetime field renders as ISO-8601, never as a Python repr."""
    at = datetime(2026, 1, 19, 10, 0, 5, tzinfo=UTC)

    (line,) = _render(at=at, window={"since": at})

    assert "2026-01-19T10:00:05+00:00" == line["at"]
    assert {"since": "2026-01-19T10:00:05+00:00"} == line["window"]


def test_the_word_basic_is_not_a_credential() -> None:
    """Only what decodes to user:password after "Basic" is masked; prose stays."""
    text = "basic authentication failed for basic users"

    assert text == redact_text(text)


def test_mask_url_and_url_host() -> None:
    """URL passwords are masked; a host is shown without any user info."""
    assert "https://user:***@api.example.com/v2" == mask_url(
        "https://user:pw-123456@api.example.com/v2"
    )
    assert "api.example.com:8443" == url_host("https://user:pw-123456@api.example.com:8443/v2")
    assert "postgresql://postgres@127.0.0.1/test" == mask_url(
        "postgresql://postgres@127.0.0.1/test"
    )
