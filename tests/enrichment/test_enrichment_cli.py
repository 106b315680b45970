"""The RB-09 commands through click: create/clear stale defects, impact, run-deferred, defects."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, MetaData, String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idis.integrations._audit import AuditEvent
from idis.integrations._timeparse import utcnow
from idis.integrations.cli import main
from idis.integrations.db._engine import create_db_engine, session_scope
from idis.integrations.enrichment import CrmSyncStatusMixin, _store, mark_sync_failed
from idis.integrations.enrichment._decisions import SubjectKey
from idis.integrations.enrichment._models import Defect, EnrichmentCacheEntry, EnrichmentRequest
from idis.integrations.testing import RunningSimulator, run_simulator

P = "crm_provider"


class _HostBase(DeclarativeBase):
    metadata = MetaData()


class CliDeal(_HostBase, CrmSyncStatusMixin):
    """A host deals table for the impact command."""

    __tablename__ = "deals"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))


@pytest.fixture
def url(request: pytest.FixtureRequest) -> str:
    """The test database: SQLite, or both with ``BOTH`` (indirect parametrization)."""
    backend = getattr(request, "param", "sqlite")
    return str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url"))


BOTH = pytest.mark.parametrize(
    "url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    """An engine on the test database."""
    eng = create_db_engine(url)
    yield eng
    eng.dispose()


def run(url: str, *args: str, **env: str) -> Result:
    """Invoke ``idis-integrations`` with the test database and the embedded providers."""
    return CliRunner().invoke(main, list(args), env={"IDIS_DATABASE_URL": url, **env})


def _stale(engine: Engine, count: int, provider: str = P) -> None:
    with session_scope(engine) as session:
        for i in range(count):
            _store.record_failure(
                session,
                SubjectKey(provider, f"t{i % 2}", "claim", f"c{i}"),
                error=f"{provider}:timeout",
                now=utcnow() - timedelta(minutes=5),
            )


def _state(engine: Engine) -> tuple[Any, ...]:
    with session_scope(engine) as session:
        return (
            [(d.id, d.status, d.subject_id, d.created_at) for d in session.scalars(select(Defect))],
            [(r.id, r.status) for r in session.scalars(select(EnrichmentRequest))],
            [(a.id, a.action) for a in session.scalars(select(AuditEvent))],
            [(c.subject_id, c.stale) for c in session.scalars(select(EnrichmentCacheEntry))],
        )


@BOTH
def test_create_stale_defects_twice_gives_the_same_defects(engine: Engine, url: str) -> None:
    """RB-09 Containment 3, twice: the second run creates nothing and lists the same defects."""
    _stale(engine, 3)

    first = run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago", "--json")
    state = _state(engine)[0]
    second = run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago", "--json")

    assert (0, 0) == (first.exit_code, second.exit_code), first.output + second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert (3, 0, 3) == (one["created"], one["already_open"], one["requests_enqueued"])
    assert (0, 3, 0) == (two["created"], two["already_open"], two["requests_enqueued"])
    assert one["defect_ids"] == two["defect_ids"]
    assert state == _state(engine)[0]


def test_create_stale_defects_prints_a_readable_summary(engine: Engine, url: str) -> None:
    """Without --json the command prints one line with created and already-open counts."""
    _stale(engine, 2)

    result = run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago")

    assert 0 == result.exit_code
    assert "2 defect(s) created, 0 already open" in result.output


@BOTH
def test_a_provider_without_stale_data_names_the_ones_with_open_defects(
    engine: Engine, url: str
) -> None:
    """RB-09 as written names crm_provider; a service enriching through enrichment_provider
    keeps its stale defects there. "0 stale subject(s)" alone read as "nothing is stale"
    while 2 defects were open: a note on stderr names the provider that has them."""
    _stale(engine, 2, provider="enrichment_provider")
    opened = run(url, "create-stale-defects", "--provider", "enrichment_provider", "--since", "1h")
    before = _state(engine)

    created = run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago")
    cleared = run(url, "clear-stale-defects", "--provider", P, "--since", "4 hours ago")
    as_json = run(url, "create-stale-defects", "--provider", P, "--since", "1h", "--json")

    assert (0, 0, 0, 0) == (
        opened.exit_code,
        created.exit_code,
        cleared.exit_code,
        as_json.exit_code,
    )
    assert "0 stale subject(s)" in created.stdout
    assert "0 stale defect(s) resolved" in cleared.stdout
    for result in (created, cleared):
        assert "OPEN STALE_ENRICHMENT defects of other providers" in result.stderr
        assert "enrichment_provider: 2" in result.stderr
        assert "--provider enrichment_provider" in result.stderr
    assert 0 == json.loads(as_json.stdout)["subjects"]
    # Nothing of enrichment_provider's was touched; only the two runs' audit rows were added.
    after = _state(engine)
    assert (before[0], before[1], before[3]) == (after[0], after[1], after[3])


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--provider", P, "--since", "yesterday-ish"], "'yesterday-ish'"),
        (["--provider", P, "--since", "in 2 hours"], "'in 2 hours'"),
        (["--provider", "crm_provder", "--since", "1 hour ago"], "'crm_provder'"),
    ],
)
@pytest.mark.parametrize("command", ["create-stale-defects", "clear-stale-defects", "impact"])
def test_bad_input_fails_naming_the_value_and_changes_nothing(
    engine: Engine, url: str, command: str, args: list[str], named: str
) -> None:
    """A bad --since or an unknown provider exits 2 naming the value; the database is unchanged."""
    _stale(engine, 2)
    before = _state(engine)

    result = run(url, command, *args)

    assert 2 == result.exit_code
    assert named in result.output
    assert before == _state(engine)


@pytest.mark.parametrize(
    "url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_bad_input_changes_nothing_on_postgres(engine: Engine, url: str) -> None:
    """On PostgreSQL too, a bad --since or an unknown provider changes nothing."""
    _stale(engine, 2)
    before = _state(engine)

    bad_since = run(url, "create-stale-defects", "--provider", P, "--since", "soon-ish")
    bad_provider = run(url, "create-stale-defects", "--provider", "nope", "--since", "1h ago")

    assert (2, 2) == (bad_since.exit_code, bad_provider.exit_code)
    assert "'soon-ish'" in bad_since.output
    assert "'nope'" in bad_provider.output
    assert before == _state(engine)


@BOTH
def test_clear_stale_defects_reports_how_many(engine: Engine, url: str) -> None:
    """RB-09 Recovery 4 as a command: resolves the window's defects and says how many."""
    _stale(engine, 3)
    run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago")

    first = run(url, "clear-stale-defects", "--provider", P, "--since", "4 hours ago", "--json")
    again = run(url, "clear-stale-defects", "--provider", P, "--since", "4 hours ago")

    assert 3 == json.loads(first.stdout)["resolved"]
    assert "0 stale defect(s) resolved" in again.output
    assert {"RESOLVED"} == {row[1] for row in _state(engine)[0]}


@BOTH
def test_impact_lists_tenants_from_the_configured_deals_table(engine: Engine, url: str) -> None:
    """impact reads IDIS_IMPACT_DEALS_TABLE, counts failed deals and deferred enrichments."""
    _HostBase.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all([CliDeal(id=i, tenant_id="t0" if i < 3 else "t9") for i in range(4)])
        session.flush()
        mark_sync_failed(session, CliDeal, [0, 1, 3])
    _stale(engine, 2)
    run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago")

    result = run(
        url,
        "impact",
        "--provider",
        P,
        "--since",
        "1 hour ago",
        "--json",
        IDIS_IMPACT_DEALS_TABLE="deals",
    )
    table = run(url, "impact", "--provider", P, "--since", "1 hour ago")

    assert 0 == result.exit_code, result.output
    assert [
        {"tenant_id": "t0", "failed_to_sync": 2, "enrichment_deferred": 1, "open_defects": 1},
        {"tenant_id": "t1", "failed_to_sync": 0, "enrichment_deferred": 1, "open_defects": 1},
        {"tenant_id": "t9", "failed_to_sync": 1, "enrichment_deferred": 0, "open_defects": 0},
    ] == json.loads(result.stdout)
    assert "open defects" in table.output
    assert "t1" in table.output


def test_impact_names_a_missing_deals_table(url: str) -> None:
    """A deals table that does not exist fails with exit 2 naming the variable and the table."""
    result = run(url, "impact", "--provider", P, "--since", "1h", IDIS_IMPACT_DEALS_TABLE="nodeals")

    assert 2 == result.exit_code
    assert "IDIS_IMPACT_DEALS_TABLE='nodeals'" in result.output


@pytest.fixture(scope="module")
def cli_sim() -> Iterator[RunningSimulator]:
    """A simulator the embedded default providers point at."""
    with run_simulator(seed=3) as sim:
        yield sim


def test_run_deferred_once_refreshes_and_resolves(
    engine: Engine, url: str, cli_sim: RunningSimulator
) -> None:
    """``enrichment run-deferred --once`` refreshes deferred subjects and resolves their defects."""
    _stale(engine, 3, provider="enrichment_provider")
    run(url, "create-stale-defects", "--provider", "enrichment_provider", "--since", "1h ago")

    result = run(
        url, "enrichment", "run-deferred", "--once", "--json", IDIS_SIMULATOR_URL=cli_sim.url
    )
    listing = run(url, "enrichment", "defects", "--status", "resolved", "--json")

    assert 0 == result.exit_code, result.output
    assert (3, 3) == (
        json.loads(result.stdout)["refreshed"],
        json.loads(result.stdout)["defects_resolved"],
    )
    assert 3 == len(json.loads(listing.stdout))
    assert {"Data refreshed after provider recovery"} == {
        row["resolution"] for row in json.loads(listing.stdout)
    }


def test_unreachable_database_exits_3_without_leaking_its_password() -> None:
    """A database that cannot be reached exits 3; the password in its URL is never printed."""
    url = "postgresql://svc:Sup3r-S3cret-pw@127.0.0.1:1/idis"

    result = run(url, "create-stale-defects", "--provider", P, "--since", "1 hour ago")

    assert 3 == result.exit_code
    assert "Sup3r-S3cret-pw" not in result.output
    assert "unreachable" in result.output


def test_rb09_script_path_runs_the_command_verbatim(engine: Engine, url: str) -> None:
    """RB-09's exact invocation, as a subprocess of the shipped script, is idempotent."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        Path(__file__).resolve().parents[2] / "examples" / "scripts" / "create_stale_defects.py"
    )
    _stale(engine, 2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "ENRICHMENT_"))},
        "IDIS_DATABASE_URL": url,
        "IDIS_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, str(script), "--provider", "crm_provider", "--since", "1 hour ago"]

    first = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    second = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)

    assert (0, 0) == (first.returncode, second.returncode), first.stderr + second.stderr
    assert "2 defect(s) created, 0 already open" in first.stdout
    assert "0 defect(s) created, 2 already open" in second.stdout


def test_run_deferred_says_what_it_gave_up(
    engine: Engine, url: str, cli_sim: RunningSimulator
) -> None:
    """A request whose workers kept dying is given up by the next lease: the summary says so."""
    _stale(engine, 2, provider="enrichment_provider")
    run(url, "create-stale-defects", "--provider", "enrichment_provider", "--since", "1h ago")
    # c0 as three dead workers leave it: leased, twice taken over, its last lease lapsed.
    with session_scope(engine) as session:
        session.execute(
            update(EnrichmentRequest)
            .where(EnrichmentRequest.subject_id == "c0")
            .values(
                takeovers=2,
                lease_owner="dead-3",
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )

    result = run(url, "enrichment", "run-deferred", "--once", IDIS_SIMULATOR_URL=cli_sim.url)

    assert 0 == result.exit_code, result.output
    assert "refreshed 1, rescheduled 0, failed 0, given up 1, defects resolved 1" in result.stdout
    with session_scope(engine) as session:
        statuses = dict(
            session.execute(select(EnrichmentRequest.subject_id, EnrichmentRequest.status)).all()
        )
    assert {"c0": "failed", "c1": "done"} == statuses
