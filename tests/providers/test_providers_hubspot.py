"""HubSpot pack: signatures (vendor test vectors), batched webhooks, search cursor, limits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from idis.integrations.exceptions import (
    MalformedResponse,
    QuotaExhausted,
    RateLimited,
    WebhookVerificationError,
)
from idis.integrations.providers._hubspot import (
    SEARCH_PAGE_LIMIT,
    SEARCH_RESULT_LIMIT,
    HubSpotSignature,
    SearchCursor,
    map_error,
    next_cursor,
    parse_object,
    read_rate_limit,
    sign_v1,
    sign_v2,
    sign_v3,
    webhook_events,
)
from idis.integrations.webhooks._verify import InboundRequest

# The secret and bodies of HubSpot's own examples
# (https://legacydocs.hubspot.com/docs/faq/v1-request-validation and v2-request-validation).
VENDOR_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"  # published example
V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)
NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SECRET = "app-client-secret-0123456789"  # test value


def test_v1_signature_matches_the_vendor_example() -> None:
    expected = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"

    assert expected == sign_v1(VENDOR_SECRET, V1_BODY)


def test_v2_signatures_match_the_vendor_examples() -> None:
    url = "https://www.example.com/webhook_uri"

    assert "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e" == sign_v2(
        VENDOR_SECRET, "GET", url, b""
    )
    assert "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900" == sign_v2(
        VENDOR_SECRET, "POST", url, b'{"example_field":"example_value"}'
    )


def _v3_request(
    body: bytes = V1_BODY, *, at: datetime = NOW, secret: str = SECRET, uri: str = "/hooks/crm"
) -> InboundRequest:
    stamp = str(int(at.timestamp() * 1000))
    signature = sign_v3(secret, "POST", f"https://hooks.example.com{uri}", body, stamp)
    return InboundRequest(
        method="POST",
        uri=uri,
        headers={
            "host": "hooks.example.com",
            "x-hubspot-signature-v3": signature,
            "x-hubspot-request-timestamp": stamp,
        },
        body=body,
    )


def test_v3_signature_verifies_and_any_change_fails() -> None:
    scheme = HubSpotSignature([SECRET])
    good = _v3_request()
    scheme.verify(good, NOW)

    tampered = InboundRequest(good.method, good.uri, good.headers, good.body + b" ")
    with pytest.raises(WebhookVerificationError) as caught:
        scheme.verify(tampered, NOW)
    assert "bad_signature" == caught.value.reason


def test_v3_signature_decodes_the_uri_as_hubspot_does() -> None:
    """HubSpot signs the URI with %3A, %2F... decoded; a sender encoding them still verifies."""
    encoded = _v3_request(uri="/hooks/crm?next=a%3Ab")
    stamp = encoded.headers["x-hubspot-request-timestamp"]

    assert encoded.headers["x-hubspot-signature-v3"] == sign_v3(
        SECRET, "POST", "https://hooks.example.com/hooks/crm?next=a:b", V1_BODY, stamp
    )
    HubSpotSignature([SECRET]).verify(encoded, NOW)


def test_v3_refuses_a_timestamp_older_than_five_minutes() -> None:
    scheme = HubSpotSignature([SECRET])
    scheme.verify(_v3_request(at=NOW - timedelta(minutes=4, seconds=59)), NOW)

    with pytest.raises(WebhookVerificationError) as caught:
        scheme.verify(_v3_request(at=NOW - timedelta(minutes=5, seconds=1)), NOW)

    assert "stale_timestamp" == caught.value.reason


def test_v3_accepts_any_secret_during_rotation() -> None:
    HubSpotSignature(["old-secret-0123456789", SECRET]).verify(_v3_request(), NOW)


def test_legacy_signatures_only_when_allowed() -> None:
    request = InboundRequest(
        method="POST",
        uri="/hooks/crm",
        headers={
            "host": "hooks.example.com",
            "x-hubspot-signature": sign_v1(SECRET, V1_BODY),
            "x-hubspot-signature-version": "v1",
        },
        body=V1_BODY,
    )
    HubSpotSignature([SECRET]).verify(request, NOW)

    with pytest.raises(WebhookVerificationError, match="legacy"):
        HubSpotSignature([SECRET], legacy=False).verify(request, NOW)


def test_the_secret_never_shows() -> None:
    scheme = HubSpotSignature([SECRET])
    with pytest.raises(WebhookVerificationError) as caught:
        scheme.verify(_v3_request(secret="another-secret-0123456789"), NOW)

    assert SECRET not in repr(scheme)
    assert SECRET not in str(caught.value)


def test_a_batched_body_becomes_one_event_each_with_derived_ids() -> None:
    body = json.dumps(
        [
            {
                "eventId": 7,
                "subscriptionType": "deal.propertyChange",
                "objectId": 42,
                "portalId": 62515,
                "occurredAt": 1764000000000,
                "propertyName": "amount",
                "propertyValue": "1000",
                "attemptNumber": 0,
            },
            {
                "eventId": 7,
                "subscriptionType": "deal.deletion",
                "objectId": 43,
                "portalId": 62515,
                "occurredAt": 1764000000001,
                "attemptNumber": 1,
            },
        ]
    ).encode()

    events = webhook_events(body, "crm")

    assert [
        ("hs:deal.propertyChange:42:1764000000000:amount", "record.updated", {"amount": "1000"}),
        ("hs:deal.deletion:43:1764000000001", "record.deleted", {}),
    ] == [(e.id, e.type, dict(e.data)) for e in events]
    assert events[0].order is not None
    assert events[1].order is not None
    assert events[0].order < events[1].order


def test_a_webhook_body_that_is_not_a_batch_is_malformed() -> None:
    with pytest.raises(MalformedResponse, match="array"):
        webhook_events(b'{"eventId": 1}', "crm")


def _record(ms: int, record_id: str = "1") -> object:
    return parse_object({"id": record_id, "properties": {"hs_lastmodifieddate": str(ms)}}, "crm")


def test_search_cursor_round_trips_as_text() -> None:
    cursor = SearchCursor(1764000000000, "NTI1Cg%3D%3D", 400)

    assert cursor == SearchCursor.decode(cursor.encode())
    with pytest.raises(MalformedResponse, match="HubSpot search cursor"):
        SearchCursor.decode("42")


def test_paging_moves_the_after_token_within_a_query() -> None:
    start = SearchCursor(1000)
    moved, more = next_cursor(start, [_record(1000), _record(1001, "2")], "2")  # type: ignore[list-item]

    assert (SearchCursor(1000, "2", 2), True) == (moved, more)


def test_the_watermark_is_re_anchored_before_ten_thousand_results() -> None:
    """HubSpot ends a query at 10,000 results: a new query starts at the newest time seen."""
    near = SearchCursor(1000, "9800", SEARCH_RESULT_LIMIT - SEARCH_PAGE_LIMIT)
    moved, more = next_cursor(near, [_record(5000)], "9801")  # type: ignore[list-item]

    assert (SearchCursor(5000), True) == (moved, more)


def test_the_last_page_anchors_at_the_newest_time() -> None:
    moved, more = next_cursor(SearchCursor(1000, "2", 2), [_record(1500)], None)  # type: ignore[list-item]

    assert (SearchCursor(1500), False) == (moved, more)


def test_rate_limit_headers_are_read() -> None:
    reading = read_rate_limit(
        200,
        {
            "X-HubSpot-RateLimit-Daily": "500000",
            "X-HubSpot-RateLimit-Daily-Remaining": "499000",
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
            "X-HubSpot-RateLimit-Max": "190",
            "X-HubSpot-RateLimit-Remaining": "12",
        },
        None,
    )

    assert reading is not None
    assert (12, 190, 10.0, False) == (
        reading.remaining,
        reading.limit,
        reading.reset_after,
        reading.exhausted,
    )


def test_a_daily_429_is_not_retried_and_waits_for_the_reset() -> None:
    daily = RateLimited("crm search: rate limit (HTTP 429)", provider="crm", endpoint="search")
    daily.details = {"policyName": "DAILY", "errorType": "RATE_LIMIT"}
    ten_secondly = RateLimited("crm search: rate limit (HTTP 429)", provider="crm")
    ten_secondly.details = {"policyName": "TEN_SECONDLY_ROLLING"}

    mapped = map_error(daily, now=datetime(2026, 12, 6, 23, 0, tzinfo=UTC))

    assert isinstance(mapped, QuotaExhausted)
    assert (False, 3600.0) == (mapped.retryable, mapped.retry_after)
    assert "rate limit" in str(mapped)
    assert "429" in str(mapped)
    assert map_error(ten_secondly) is ten_secondly
    assert ten_secondly.retryable
