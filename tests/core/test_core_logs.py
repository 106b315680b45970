"""Logs are structured JSON with stable event names, and secrets never reach them."""

from __future__ import annotations

import io
import json

import structlog

from idis.integrations._audit import audit_row
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
