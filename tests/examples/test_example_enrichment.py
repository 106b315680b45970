"""Claim enrichment in the example service: deferral and stale defects during an outage."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import select
from tests.examples.conftest import (
    ENRICH,
    RunningService,
    run_script,
    script_env,
    service_env,
    wait_for,
)

from idis.integrations.db._engine import create_db_engine
from idis.integrations.enrichment import RECOVERY_RESOLUTION, Defect
from idis.integrations.simulator._app import enrichment_for
from idis.integrations.testing import RunningSimulator


@pytest.fixture
def deferring_service(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> Iterator[RunningService]:
    """The service with RB-09 Containment 2 in force: ENRICHMENT_DEFER_ON_ERROR=true."""
    with start_service(service_env(sim, sqlite_url, ENRICHMENT_DEFER_ON_ERROR="true")) as svc:
        yield svc


def _defects(url: str) -> list[tuple[str, str, str, str | None]]:
    engine = create_db_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            select(Defect.subject_id, Defect.provider, Defect.status, Defect.resolution)
        ).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_an_outage_defers_enrichment_opens_a_defect_and_recovery_resolves_both(
    deferring_service: RunningService, sim: RunningSimulator
) -> None:
    """An outage defers the claim, stale, with an OPEN defect; recovery brings fresh data."""
    svc = deferring_service
    svc.post("/claims", {"id": "c0", "tenant_id": "t1", "text": "Before the outage"})
    svc.post("/claims", {"id": "c1", "tenant_id": "t1", "text": "Acme raised 10M"})
    # Holds a token from before the outage, as a running service does: a token endpoint
    # that failed too would put refreshes on the token manager's 5 s failure backoff.
    assert "enriched" == svc.post("/claims/c0/enrich").json()["status"]
    sim.control.outage(ENRICH)

    deferred = svc.post("/claims/c1/enrich")
    during = svc.get("/claims/c1").json()
    defects_during = _defects(svc.database_url)
    exposition = svc.get("/metrics").text
    # The health sampler records what the gateway saw, for `status` in other processes.
    recorded = wait_for(
        lambda: next(
            (
                p
                for p in svc.get("/status", params={"probe": "false"}).json()["providers"]
                if p["provider"] == ENRICH and p["failures"] > 0
            ),
            None,
        ),
        "a recorded health sample with the outage's failures",
    )

    sim.control.clear_faults(ENRICH)
    # GET reads the claim row only: it turns fresh through the worker's on_refreshed callback.
    after = wait_for(
        lambda: (claim := svc.get("/claims/c1").json())["enrichment_stale"] is False and claim,
        "claim c1 refreshed after recovery",
    )
    copied = [e for e in svc.log_events() if e["event"] == "idis.example.claim_refreshed"]

    assert 200 == deferred.status_code, deferred.text
    body = deferred.json()
    assert ("deferred", True, True) == (body["status"], body["stale"], body["deferred"])
    assert body["defect_id"] is not None
    assert (None, True, ENRICH) == (
        during["enrichment"],
        during["enrichment_stale"],
        during["enrichment_provider"],
    )
    assert [("c1", ENRICH, "OPEN", None)] == defects_during
    errors = [
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("integration_errors_total{")
        and f'provider="{ENRICH}"' in line
        and 'endpoint="enrich"' in line
    ]
    assert sum(errors) > 0, exposition
    assert "recorded by 1 replica(s)" == recorded["breaker_source"]
    assert enrichment_for("c1") == after["enrichment"]
    assert after["enriched_at"] is not None
    assert [("c1", ENRICH, "RESOLVED", RECOVERY_RESOLUTION)] == _defects(svc.database_url)
    assert ["c1"] == [e["claim_id"] for e in copied]


def test_a_refresh_made_while_the_service_was_down_reaches_the_claim_at_start(
    sim: RunningSimulator, sqlite_url: str, start_service: Callable[..., Any]
) -> None:
    """A refresh no callback saw (run-deferred while the service was down) is caught up at start."""
    env = service_env(sim, sqlite_url, ENRICHMENT_DEFER_ON_ERROR="true")
    with start_service(env) as svc:
        svc.post("/claims", {"id": "c5", "tenant_id": "t1", "text": "Hooli spins off"})
        svc.post("/claims", {"id": "c6", "tenant_id": "t1", "text": "Before the outage"})
        # Holds a token from before the outage (see the test above).
        assert "enriched" == svc.post("/claims/c6/enrich").json()["status"]
        sim.control.outage(ENRICH)
        deferred = svc.post("/claims/c5/enrich").json()
    sim.control.clear_faults(ENRICH)
    ran = run_script(
        "python -m idis.integrations enrichment run-deferred --once --json",
        script_env(sim, sqlite_url),
    )

    with start_service(env) as svc:
        claim = svc.get("/claims/c5").json()

    assert ("deferred", True) == (deferred["status"], deferred["stale"])
    assert 0 == ran.returncode, ran.stderr
    assert 1 == json.loads(ran.stdout)["refreshed"], ran.stdout + ran.stderr
    assert (enrichment_for("c5"), False) == (claim["enrichment"], claim["enrichment_stale"])


def test_without_deferral_an_outage_serves_the_cached_copy_or_answers_503(
    service: RunningService, sim: RunningSimulator
) -> None:
    """Deferral off: a cached claim is served marked stale, an uncached one gets 503; no defect."""
    service.post("/claims", {"id": "c2", "tenant_id": "t1", "text": "Globex hires"})
    service.post("/claims", {"id": "c4", "tenant_id": "t1", "text": "Umbrella merges"})
    first = service.post("/claims/c2/enrich")
    sim.control.outage(ENRICH)

    cached = service.post("/claims/c2/enrich")
    failed = service.post("/claims/c4/enrich")
    claims = {c: service.get(f"/claims/{c}").json() for c in ("c2", "c4")}

    assert ("enriched", False) == (first.json()["status"], first.json()["stale"])
    assert (200, "cached_stale", True, False) == (
        cached.status_code,
        cached.json()["status"],
        cached.json()["stale"],
        cached.json()["deferred"],
    )
    assert 503 == failed.status_code
    assert ("failed", True) == (failed.json()["status"], failed.json()["stale"])
    # The first failures may have opened the breaker: then c4 was not even attempted.
    assert failed.json()["error_type"] in ("server_error", "circuit_open")
    assert "ENRICHMENT_DEFER_ON_ERROR=false" in failed.json()["error"]
    assert {"c2": (enrichment_for("c2"), True), "c4": (None, True)} == {
        c: (claim["enrichment"], claim["enrichment_stale"]) for c, claim in claims.items()
    }
    assert [] == _defects(service.database_url)


def test_bad_claim_requests_are_refused_naming_the_value(service: RunningService) -> None:
    """Unknown claims are 404; a bad body or an unknown provider is 400 naming it."""
    service.post("/claims", {"id": "c3", "tenant_id": "t1", "text": "Initech"})
    cases = {
        "no claim 'nope'": (404, lambda: service.post("/claims/nope/enrich")),
        "'nobody'": (400, lambda: service.post("/claims/c3/enrich", {"provider": "nobody"})),
        "unknown field(s) x": (
            400,
            lambda: service.post("/claims/c3/enrich", {"provider": ENRICH, "x": 1}),
        ),
        "text is required": (400, lambda: service.post("/claims", {"tenant_id": "t1"})),
        "claim 'c3' already exists": (
            409,
            lambda: service.post("/claims", {"id": "c3", "tenant_id": "t1", "text": "again"}),
        ),
    }

    answers = {words: call() for words, (_, call) in cases.items()}

    assert {words: (status, True) for words, (status, _) in cases.items()} == {
        words: (r.status_code, words in r.json()["error"]) for words, r in answers.items()
    }, {words: r.text for words, r in answers.items()}
    assert "Initech" == service.get("/claims/c3").json()["text"]
