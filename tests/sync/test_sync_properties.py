"""Property tests: arbitrary headers and bodies never raise out of the verifier or the receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from idis.integrations._clock import ManualClock
from idis.integrations.config import Secret, Settings
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import WebhookVerificationError
from idis.integrations.sync._events import event_from_payload
from idis.integrations.webhooks._receiver import WebhookReceiver
from idis.integrations.webhooks._signing import sign_headers
from idis.integrations.webhooks._verify import (
    REASON_STATUS,
    HmacScheme,
    InboundRequest,
    StandardWebhooksScheme,
    normalize_headers,
    parse_json_strict,
)

from .conftest import HostTable

P = "crm_provider"
SECRET = "whsec_cHJvcGVydHktdGVzdC1zZWNyZXQta2V5LTAxMjM="
NOW = datetime(2026, 1, 19, 10, 0, tzinfo=UTC)

_header_names = st.sampled_from(
    ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-signature", "x-ts"]
) | st.text(min_size=1, max_size=20)
_header_values = st.text(max_size=200) | st.sampled_from(
    ["", " ", "v1,", "v1,AAAA", "v2,x", "1768816800", "-1", "99999999999999999999", "msg_1"]
)
_headers = st.dictionaries(_header_names, _header_values, max_size=6)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_event_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=300) | st.integers(),
        "seq": st.integers(min_value=-5, max_value=2**64) | st.text(max_size=5),
        "type": st.text(max_size=150) | st.none(),
        "record_id": st.text(max_size=300) | st.integers(),
        "tenant_id": st.text(max_size=200) | st.none(),
        "version": st.integers(min_value=-5, max_value=2**64) | st.booleans(),
        "occurred_at": st.text(max_size=40)
        | st.sampled_from(["2026-01-19T10:00:00Z", "2026-01-19"]),
        "data": _json,
    },
)
_printable = st.characters(whitelist_categories=("L", "N", "P", "S"))
_valid_event = st.fixed_dictionaries(
    {
        "id": st.text(_printable, min_size=1, max_size=255),
        "seq": st.integers(min_value=0, max_value=2**63 - 1),
        "type": st.sampled_from(["record.updated", "record.created", "other"]),
        "record_id": st.text(_printable, min_size=1, max_size=255),
        "occurred_at": st.just("2026-01-19T09:59:00Z"),
        "version": st.integers(min_value=0, max_value=2**63 - 1),
        "data": st.dictionaries(st.text(max_size=10), _json, max_size=4),
    }
)
_bodies = (
    _valid_event.map(lambda e: json.dumps({"type": e["type"], "data": e}).encode())
    | st.binary(max_size=600)
    | _json.map(lambda v: json.dumps(v).encode())
    | _event_like.map(lambda e: json.dumps(e).encode())
    | _event_like.map(lambda e: json.dumps({"type": "record.updated", "data": e}).encode())
)


@settings(max_examples=200, deadline=None)
@given(
    headers=_headers,
    body=_bodies,
    method=st.sampled_from(["POST", "GET", "pUt"]),
    uri=st.text(max_size=50),
)
def test_verifiers_raise_only_verification_errors(
    headers: dict[str, str], body: bytes, method: str, uri: str
) -> None:
    """Schemes, strict JSON and event parsing either succeed or raise WebhookVerificationError."""
    request = InboundRequest(method, uri, normalize_headers(headers), body)
    schemes = [
        StandardWebhooksScheme([SECRET]),
        HmacScheme(["k" * 16], header="x-signature", signed="request", timestamp_header="x-ts"),
        HmacScheme(["k" * 16], header="x-signature", encoding="base64", prefix="sha256="),
    ]
    reasons = []
    for scheme in schemes:
        try:
            scheme.verify(request, NOW)
        except WebhookVerificationError as exc:
            reasons.append(exc.reason)
    try:
        event_from_payload(parse_json_strict(body))
    except WebhookVerificationError as exc:
        reasons.append(exc.reason)

    assert set(reasons) <= set(REASON_STATUS)


@pytest.fixture(scope="module")
def receiver_and_engine(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[WebhookReceiver, Engine]]:
    """One receiver on a migrated SQLite file for every example of the module."""
    from idis.integrations.db._migrate import upgrade

    path = tmp_path_factory.mktemp("props") / "props.sqlite3"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = create_db_engine(url)
    base = Settings.from_env({"IDIS_DATABASE_URL": url})
    settings = base.with_providers(replace(base.provider(P), webhook_secrets=(Secret(SECRET),)))
    host = HostTable(engine)
    receiver = WebhookReceiver(
        settings, engine, registry=host.registry(), providers=[P], clock=ManualClock(NOW)
    )
    yield receiver, engine
    engine.dispose()


_ALLOWED = {200, 400, 401, 404, 413}


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    headers=_headers,
    body=_bodies,
    sign=st.sampled_from([True, True, True, False]),
    provider=st.sampled_from([P, P, P, "nope", ""]),
)
def test_receiver_answers_every_request(
    receiver_and_engine: tuple[WebhookReceiver, Engine],
    headers: dict[str, Any],
    body: bytes,
    sign: bool,
    provider: str,
) -> None:
    """Any headers and body, signed or not: a 2xx/4xx answer, never an exception or a 5xx."""
    receiver, _engine = receiver_and_engine
    if sign:
        headers = {**headers, **sign_headers(SECRET, body, msg_id="msg_p", timestamp=NOW)}

    result = receiver.handle(provider, headers, body)
    event(result.outcome)

    assert result.status_code in _ALLOWED, result
    assert result.outcome != "internal_error"
    json.loads(result.body())
