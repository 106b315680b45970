"""The example service's doors (issue 17 item 12), over real HTTP: who may call, what it reads.

A host copies this service as its template, so each default is checked here:
authentication on every route that is not public, tenant scoping, provider
probes for operators only and rate-limited, a body cap enforced while the body
streams in, 400 on JSON nested too deep, and ids that cannot alter a provider URL.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.requests import Request
from tests.examples.conftest import (
    CRM,
    METRICS_TOKEN,
    OPERATOR_TOKEN,
    TENANT_T1_TOKEN,
    RunningService,
    service_env,
    wait_for,
)

from idis.integrations._http import httpx
from idis.integrations.testing import RunningSimulator


def _as(service: RunningService, token: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=service.url, timeout=30, headers=headers)


@pytest.fixture
def anonymous(service: RunningService) -> Iterator[httpx.Client]:
    """A client with no credentials."""
    with _as(service, None) as client:
        yield client


@pytest.fixture
def tenant_t1(service: RunningService) -> Iterator[httpx.Client]:
    """A client whose token sees tenant t1 only."""
    with _as(service, TENANT_T1_TOKEN) as client:
        yield client


PROTECTED = [
    ("GET", "/deals", None),
    ("GET", "/deals?tenant_id=t1", None),
    ("GET", "/deals/d1", None),
    ("POST", "/deals", {"id": "anon", "tenant_id": "t1", "name": "Anon"}),
    ("POST", "/claims", {"id": "c_anon", "tenant_id": "t1", "text": "x"}),
    ("GET", "/claims/c1", None),
    ("POST", "/claims/c1/enrich", None),
    ("GET", "/status", None),
    ("GET", "/status?probe=false", None),
    ("GET", "/no-such-route", None),
]


@pytest.mark.parametrize("token", [None, "not-a-configured-token-0123456789"])
def test_every_non_public_route_needs_a_valid_token(
    service: RunningService, sim: RunningSimulator, token: str | None
) -> None:
    """Without a token, or with an unknown one: 401 with WWW-Authenticate, and nothing changes."""
    service.post("/deals", {"id": "d1", "tenant_id": "t1", "name": "Acme"})
    service.post("/claims", {"id": "c1", "tenant_id": "t1", "text": "Acme has 10 staff"})
    enrich_before = sim.control.stats("enrichment_provider")["requests"].get("enrich", 0)

    with _as(service, token) as client:
        answers = [client.request(m, path, json=body) for m, path, body in PROTECTED]

    assert [401] * len(PROTECTED) == [a.status_code for a in answers]
    assert all(a.headers["www-authenticate"].startswith("Bearer") for a in answers)
    assert {} == service.deal("anon")
    assert 404 == service.get("/claims/c_anon").status_code
    enrich_after = sim.control.stats("enrichment_provider")["requests"].get("enrich", 0)
    assert enrich_before == enrich_after


def test_health_metrics_and_webhooks_stay_public(
    service: RunningService, anonymous: httpx.Client
) -> None:
    """The orchestrator, Prometheus and providers call these without a bearer token."""
    health = anonymous.get("/healthz")
    metrics = anonymous.get("/metrics")
    webhook = anonymous.post(f"/webhooks/{CRM}", content=b"{}")

    assert 200 == health.status_code
    assert (200, True) == (metrics.status_code, "integration_" in metrics.text)
    # The library's receiver answered (bad signature), not the guard.
    assert webhook.status_code in (400, 401)
    assert "Bearer" not in webhook.headers.get("www-authenticate", "")


def test_a_tenant_sees_and_changes_only_its_own_records(
    service: RunningService, sim: RunningSimulator, tenant_t1: httpx.Client
) -> None:
    """Lists are filtered, other tenants' records are 404, writes for them are refused."""
    service.post("/deals", {"id": "mine", "tenant_id": "t1", "name": "Mine"})
    service.post("/deals", {"id": "theirs", "tenant_id": "t2", "name": "Theirs", "amount": 9})
    service.post("/claims", {"id": "c_theirs", "tenant_id": "t2", "text": "Theirs"})

    listed = tenant_t1.get("/deals").json()["deals"]
    filtered_other = tenant_t1.get("/deals", params={"tenant_id": "t2"})
    read_other = tenant_t1.get("/deals/theirs")
    update_other = tenant_t1.post("/deals", json={"id": "theirs", "amount": 1})
    create_other = tenant_t1.post("/deals", json={"id": "new2", "tenant_id": "t2", "name": "N"})
    claim_other = tenant_t1.get("/claims/c_theirs")
    enrich_other = tenant_t1.post("/claims/c_theirs/enrich")
    new_claim_other = tenant_t1.post(
        "/claims", json={"id": "c_new2", "tenant_id": "t2", "text": "x"}
    )
    own = tenant_t1.post("/deals", json={"id": "mine", "amount": 3})

    assert ["mine"] == [d["id"] for d in listed]
    assert (403, 404, 404) == (
        filtered_other.status_code,
        read_other.status_code,
        update_other.status_code,
    )
    assert (403, 404, 404, 403) == (
        create_other.status_code,
        claim_other.status_code,
        enrich_other.status_code,
        new_claim_other.status_code,
    )
    assert (200, 3) == (own.status_code, own.json()["amount"])
    assert (9, 1) == (service.deal("theirs")["amount"], service.deal("theirs")["revision"])
    assert {} == service.deal("new2")
    assert 404 == service.get("/claims/c_new2").status_code


def _health_probes(sim: RunningSimulator) -> int:
    return sum(
        sim.control.stats(name)["requests"].get("health", 0)
        for name in (CRM, "enrichment_provider")
    )


@pytest.fixture
def slow_probes(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> Iterator[RunningService]:
    """The service with at most one provider probe per hour."""
    env = service_env(sim, sqlite_url, IDIS_SERVICE_PROBE_INTERVAL="1h")
    with start_service(env) as running:
        yield running


def test_probing_providers_is_for_operators_and_rate_limited(
    slow_probes: RunningService, sim: RunningSimulator
) -> None:
    """A tenant cannot make /status probe; an operator probes once per interval, then 429."""
    before = _health_probes(sim)
    with _as(slow_probes, TENANT_T1_TOKEN) as tenant:
        asked = tenant.get("/status", params={"probe": "true"})
        plain = tenant.get("/status")
    after_tenant = _health_probes(sim)
    probed = slow_probes.get("/status")
    again = slow_probes.get("/status", params={"probe": "true"})
    recorded = slow_probes.get("/status", params={"probe": "false"})

    assert (403, 200) == (asked.status_code, plain.status_code)
    assert {"not probed"} == {p["probe"] for p in plain.json()["providers"]}
    assert before == after_tenant
    assert 200 == probed.status_code
    assert {True} == {p["probe_ok"] for p in probed.json()["providers"]}
    assert 429 == again.status_code
    assert int(again.headers["retry-after"]) > 0
    assert 200 == recorded.status_code
    assert before + 2 == _health_probes(sim)  # one probe of each of the two providers


def _raw_request(url: str, head: str, body_parts: list[bytes]) -> bytes:
    """Send a request over a plain socket without finishing its body; return the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            sock.sendall(part)
        # No terminating chunk and no more bytes: a server that buffers the whole
        # body before deciding never answers, and recv times out (the test fails).
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        return answer


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_an_endless_chunked_body_gets_413_before_it_ends(service: RunningService) -> None:
    """The cap is enforced while the body streams in: 413 without waiting for its end."""
    head = (
        "POST /deals HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {OPERATOR_TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b" " * 4096
    chunks = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 20  # 80 KiB, never ended

    answer = _raw_request(service.url, head, chunks)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_declared_oversized_body_gets_413_without_sending_it(service: RunningService) -> None:
    """A Content-Length over the cap is refused before a byte of the body is read."""
    head = (
        "POST /claims HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {OPERATOR_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 314572800\r\n\r\n"
    )

    answer = _raw_request(service.url, head, [b"{"])

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"314572800 bytes" in answer


def test_a_body_under_the_cap_still_works(service: RunningService) -> None:
    """A claim of 10,000 characters (the largest field) fits."""
    created = service.post("/claims", {"id": "c_big", "tenant_id": "t1", "text": "x" * 10_000})

    assert 201 == created.status_code


def test_too_deep_json_is_a_400_naming_the_nesting(service: RunningService) -> None:
    """A body nested 30,000 levels (within the size cap) is refused with 400, not a 500."""
    deep = '{"id": "deep", "name": ' + "[" * 30_000 + "]" * 30_000 + "}"

    answer = service.client.post(
        "/deals", content=deep, headers={"content-type": "application/json"}
    )

    assert 400 == answer.status_code
    assert "nests deeper than 64" in answer.json()["error"]
    assert {} == service.deal("deep")


def test_the_issues_100k_deep_body_is_refused_without_a_500(service: RunningService) -> None:
    """The 100,000-deep body of the report is over the cap: 413, never a 500."""
    deep = "[" * 100_000 + "]" * 100_000

    answer = service.client.post(
        "/deals", content=deep, headers={"content-type": "application/json"}
    )

    assert 413 == answer.status_code


@pytest.mark.parametrize("bad_id", ["", ".", "..", ".hidden", "-x"])
def test_ids_that_could_change_a_provider_url_are_refused(
    service: RunningService, sim: RunningSimulator, bad_id: str
) -> None:
    """Empty, "." and ".." (and other ids not starting alphanumeric) get 400; nothing is pushed."""
    deal = service.post("/deals", {"id": bad_id, "tenant_id": "t1", "name": "Dots"})
    claim = service.post("/claims", {"id": bad_id, "tenant_id": "t1", "text": "Dots"})

    assert (400, 400) == (deal.status_code, claim.status_code)
    assert "starting with a letter or digit" in deal.json()["error"]
    assert [] == service.get("/deals").json()["deals"]
    assert 0 == sim.control.stats(CRM)["requests"].get("record", 0)


def test_metrics_can_require_a_token(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """IDIS_SERVICE_METRICS=token: /metrics needs the metrics (or operator) role."""
    env = service_env(sim, sqlite_url, IDIS_SERVICE_METRICS="token")
    with (
        start_service(env) as svc,
        _as(svc, None) as anonymous,
        _as(svc, TENANT_T1_TOKEN) as tenant,
        _as(svc, METRICS_TOKEN) as scraper,
    ):
        svc.post("/deals", {"id": "d1", "tenant_id": "t1", "name": "Acme"})
        refused = (anonymous.get("/metrics").status_code, tenant.get("/metrics").status_code)
        scraped = scraper.get("/metrics")
        scraper_deals = scraper.get("/deals").json()["deals"]

    assert (401, 403) == refused
    assert (200, True) == (scraped.status_code, "integration_" in scraped.text)
    assert [] == scraper_deals  # a metrics token sees no tenant's data


def test_a_host_plugs_in_its_own_authentication(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """create_app(authenticate=...) replaces the bearer tokens (here: a header a proxy sets)."""
    from examples.integrations_service.security import Principal

    async def from_proxy(request: Request) -> Principal | None:
        tenant = request.headers.get("x-verified-tenant")
        return Principal(f"proxy:{tenant}", frozenset({tenant})) if tenant else None

    with (
        start_service(service_env(sim, sqlite_url), authenticate=from_proxy) as svc,
        _as(svc, None) as client,
        _as(svc, OPERATOR_TOKEN) as bearer,
    ):
        created = client.post(
            "/deals",
            json={"id": "px", "tenant_id": "t9", "name": "Proxy"},
            headers={"x-verified-tenant": "t9"},
        )
        refused = client.get("/deals")
        with_bearer = bearer.get("/deals")

    assert 201 == created.status_code
    assert (401, 401) == (refused.status_code, with_bearer.status_code)


def test_access_log_shows_refusals_without_the_token(service: RunningService) -> None:
    """A refused request is logged (status 401), and no log line carries a token."""
    with _as(service, "wrong-token-that-must-not-be-logged-123") as client:
        client.get("/deals")

    # The access log line is written once the response has gone out: wait for it.
    wait_for(
        lambda: any(
            e.get("path") == "/deals" and e.get("status_code") == 401 for e in service.log_events()
        ),
        "the 401 in the access log",
    )
    lines = service.logs.getvalue()
    assert "wrong-token-that-must-not-be-logged" not in lines
    assert OPERATOR_TOKEN not in lines
