"""Times from the outside never crash the receiver (issue 17, item 5).

``webhook-timestamp`` arrives before anything is authenticated and ``occurred_at``
inside a signed body: both used to reach ``datetime`` arithmetic that overflows
(a 500 nobody counted, so the provider kept retrying). Every value is now either
accepted or a counted 4xx with a reason; the properties below try many.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from idis.integrations._clock import ManualClock
from idis.integrations.db._engine import create_db_engine
from idis.integrations.observability._metrics import Metrics
from idis.integrations.webhooks._receiver import WebhookReceiver
from idis.integrations.webhooks._signing import sign

from ..conftest import sample
from .conftest import NOW, SECRET, Face, P, event_body, settings_for, signed


def _headers_at(body: bytes, timestamp: str, msg: str = "msg_t") -> dict[str, str]:
    """Headers whose signature covers ``timestamp`` exactly as sent (any text)."""
    import base64
    import hashlib
    import hmac

    from idis.integrations.webhooks._signing import decode_secret, signed_content

    mac = hmac.new(decode_secret(SECRET), signed_content(msg, timestamp, body), hashlib.sha256)
    return {
        "webhook-id": msg,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
    }


@pytest.mark.parametrize("timestamp", ["999999999999", "253402300800", "000000000000"])
def test_an_absurd_timestamp_is_a_counted_4xx(
    face: Face, sqlite_url: str, metrics: Metrics, timestamp: str
) -> None:
    """A timestamp past year 9999 is 400 bad_timestamp; year 1970 is 401 stale; both counted."""
    receiver = face.build(settings_for(sqlite_url), providers=[P])
    body = event_body(1)

    result = face.send(receiver, _headers_at(body, timestamp), body)

    expected = ("stale_timestamp", 401) if timestamp == "000000000000" else ("bad_timestamp", 400)
    assert expected == (result.outcome, result.status_code)
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome=result.outcome
    )


@pytest.mark.parametrize(
    "occurred_at",
    ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00.000001+01:00"],
)
def test_a_signed_occurred_at_out_of_range_is_a_counted_400(
    face: Face, sqlite_url: str, metrics: Metrics, occurred_at: str
) -> None:
    """occurred_at that overflows in UTC is a 400 invalid_event, counted, nothing applied."""
    receiver = face.build(settings_for(sqlite_url), providers=[P])
    body = event_body(2, occurred_at=occurred_at)

    result = face.send(receiver, signed(body), body)

    assert (400, "invalid_event") == (result.status_code, result.outcome)
    assert "occurred_at" in (result.detail or "")
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="invalid_event"
    )


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookReceiver]:
    """One receiver on a migrated SQLite file for every example of the module."""
    from idis.integrations.db._migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('ts') / 'ts.sqlite3'}"
    upgrade(url)
    engine: Engine = create_db_engine(url)
    yield WebhookReceiver(settings_for(url), engine, providers=[P], clock=ManualClock(NOW))
    engine.dispose()


_numbers = st.integers(min_value=0, max_value=10**40).map(str)
_near_now = st.integers(
    min_value=int(NOW.timestamp()) - 600, max_value=int(NOW.timestamp()) + 600
).map(str)
# Twelve digits is the longest the scheme reads: most of them lie past datetime's range.
_twelve_digits = st.integers(min_value=10**11, max_value=10**12 - 1).map(str)
_timestamps = st.one_of(
    _numbers, _near_now, _twelve_digits, st.text(max_size=30), st.from_regex(r"-?\d{1,30}")
)


@settings(max_examples=300, deadline=None)
@given(timestamp=_timestamps)
def test_any_signed_timestamp_is_accepted_or_a_4xx(
    receiver: WebhookReceiver, timestamp: str
) -> None:
    """Whatever the (signed) webhook-timestamp says, the answer is 200/400/401, never a 5xx."""
    body = event_body(3)
    headers = _headers_at(body, timestamp)

    result = receiver.handle(P, headers, body)

    assert result.status_code in (200, 400, 401), result
    assert result.outcome != "internal_error"


_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"
)
_edges = st.one_of(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(1, 1, 2)),
    st.datetimes(min_value=datetime(9999, 12, 31), max_value=datetime(9999, 12, 31, 23, 59, 59)),
)
_iso = st.builds(
    lambda when, offset: when.isoformat() + offset,
    st.one_of(_edges, st.datetimes(min_value=datetime(1, 1, 1))),
    st.one_of(_offsets, st.just("Z"), st.just("")),
)


@settings(max_examples=300, deadline=None)
@given(occurred_at=st.one_of(_iso, st.text(max_size=40)), seq=st.integers(1, 10**6))
def test_any_signed_occurred_at_is_accepted_or_a_400(
    receiver: WebhookReceiver, occurred_at: str, seq: int
) -> None:
    """Whatever occurred_at a signed event carries, the answer is 200 or 400, never a 5xx."""
    body = event_body(seq, occurred_at=occurred_at)
    headers: dict[str, Any] = signed(body, msg=f"msg_{seq}")

    result = receiver.handle(P, headers, body)

    assert result.status_code in (200, 400), result


def test_a_timestamp_header_never_overflows_the_scheme() -> None:
    """The largest 12-digit timestamp is judged by integer arithmetic (no datetime)."""
    from idis.integrations.exceptions import WebhookVerificationError
    from idis.integrations.webhooks._verify import (
        InboundRequest,
        StandardWebhooksScheme,
        normalize_headers,
    )

    scheme = StandardWebhooksScheme([SECRET])
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": "999999999999",
        "webhook-signature": sign(SECRET, "m", 999999999999, b"{}"),
    }
    request = InboundRequest("POST", "/", normalize_headers(headers), b"{}")

    with pytest.raises(WebhookVerificationError) as info:
        scheme.verify(request, datetime.now(UTC) + timedelta(days=1))

    assert "bad_timestamp" == info.value.reason
