"""Salesforce pack: errors, limits, the replay window, the keyset cursor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from idis.integrations.exceptions import (
    MalformedResponse,
    ProviderRejected,
    QuotaExhausted,
    ReplayWindowExceeded,
)
from idis.integrations.providers._salesforce import (
    REPLAY_WINDOW,
    ModstampCursor,
    check_window,
    map_error,
    read_limit_info,
    soql_after,
)
from idis.integrations.resilience._errors import rejection_details

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_request_limit_exceeded_403_is_a_rate_limit() -> None:
    """Salesforce answers errors as a JSON array; REQUEST_LIMIT_EXCEEDED is the org's quota."""
    body = b'[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]'
    refused = ProviderRejected("crm query: rejected (HTTP 403)", provider="crm", status_code=403)
    refused.details = rejection_details(body)

    mapped = map_error(refused)

    assert isinstance(mapped, QuotaExhausted)
    assert not mapped.retryable
    assert "rate limit" in str(mapped)
    assert "REQUEST_LIMIT_EXCEEDED" in str(mapped)


def test_other_403s_stay_rejections() -> None:
    body = b'[{"message":"no access","errorCode":"INSUFFICIENT_ACCESS"}]'
    refused = ProviderRejected("crm query: rejected (HTTP 403)", provider="crm", status_code=403)
    refused.details = rejection_details(body)

    assert map_error(refused) is refused


def test_sforce_limit_info_is_read() -> None:
    reading = read_limit_info({"Sforce-Limit-Info": "api-usage=18/5000"})

    assert reading is not None
    assert (4982, 5000, False) == (reading.remaining, reading.limit, reading.exhausted)
    assert read_limit_info({}) is None


def test_replay_beyond_thirty_days_points_at_resync() -> None:
    check_window("crm", NOW - REPLAY_WINDOW + timedelta(minutes=1), NOW)

    with pytest.raises(ReplayWindowExceeded) as caught:
        check_window("crm", NOW - timedelta(days=31), NOW)

    assert "--resync" in str(caught.value)
    assert REPLAY_WINDOW == caught.value.retention


def test_modstamp_cursor_round_trips_and_pages_by_keyset() -> None:
    cursor = ModstampCursor(datetime(2026, 12, 1, 8, 30, 0, 123000, tzinfo=UTC), "0065g00000AbCdE")

    assert cursor == ModstampCursor.decode(cursor.encode())
    query = soql_after(cursor, 100)
    assert "SystemModstamp > 2026-12-01T08:30:00.123Z" in query
    assert "Id > '0065g00000AbCdE'" in query
    assert query.endswith("ORDER BY SystemModstamp ASC, Id ASC LIMIT 100")


def test_a_cursor_that_could_inject_soql_is_refused() -> None:
    with pytest.raises(MalformedResponse):
        ModstampCursor.decode("sf1:2026-12-01T08:30:00.000Z:x' OR Name != '")


def test_only_an_http_origin_is_taken_as_the_instance_url() -> None:
    from idis.integrations.auth._grant import instance_url, parse_token_response

    body = (
        b'{"access_token": "00D!x", "token_type": "Bearer",'
        b' "instance_url": "https://acme.my.salesforce.com/"}'
    )
    issued = parse_token_response(
        "crm", 200, body, now=NOW, grant_type="refresh_token", requested_scopes=()
    )

    assert "https://acme.my.salesforce.com" == issued.instance_url
    assert instance_url("https://acme.my.salesforce.com?x=1") is None
    assert instance_url("https://user:pw@acme.my.salesforce.com") is None
    assert instance_url("javascript:alert(1)") is None
    assert instance_url(42) is None
    assert "acme" not in repr(issued)  # the repr shows neither tokens nor the instance
