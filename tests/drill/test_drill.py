"""The RB-09 drill runs end to end, needs every way back, can fail, and its reports are real."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from tests.conftest import unavailable

from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import ConfigError
from idis.integrations.ops._drill import (
    SCENARIOS,
    DrillOptions,
    DrillResult,
    _drill_logs,
    id_ranges,
    run_drill,
)
from idis.integrations.ops._postmortem import build_postmortem
from idis.integrations.ops._report import MIN_PHASE_WIDTH

#: The phases RB-09 orders, each recorded by the drill's step that plays it.
RB09_PHASES = [
    "healthy traffic",
    "Detection",
    "Triage",
    "Containment 1: polling failover",
    "Containment 2: enrichment deferred",
    "Containment 3: stale defects",
    "Containment 4: retries queued",
    "outage continues",
    "Recovery 1: re-auth",
    "Recovery 2: rotation (not needed)",
    "Recovery 3: reconcile",
    "Recovery 4: stale defects cleared",
    "Recovery 5: normal mode",
    "Verification",
]


def _quiet(_line: str) -> None:
    return None


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDIS_", "CRM_", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "idis.integrations", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=240,
    )


def _failed(result: DrillResult) -> list[str]:
    return [f"{c.name}: {c.actual}" for c in result.report.checks if not c.ok]


@pytest.fixture(scope="module")
def full_outage(tmp_path_factory: pytest.TempPathFactory) -> tuple[DrillResult, Path]:
    """One default drill (full outage) on a SQLite file kept for the postmortem."""
    folder = tmp_path_factory.mktemp("drill")
    url = f"sqlite:///{folder / 'incident.sqlite3'}"
    report_path = folder / "report.html"
    result = run_drill(DrillOptions(database_url=url, report_path=report_path), echo=_quiet)
    return result, report_path


def test_full_outage_drill_passes_and_writes_a_report(
    full_outage: tuple[DrillResult, Path],
) -> None:
    """The default drill passes every check and writes a self-contained HTML timeline."""
    result, report_path = full_outage

    assert [] == _failed(result)
    html = report_path.read_text()
    assert "<svg" in html
    assert "PASSED" in html
    for external in ("<script", "<link", "src=", "@import"):
        assert external not in html


def test_the_outage_outlasts_the_feed_and_reconcile_brings_back_the_rest(
    full_outage: tuple[DrillResult, Path],
) -> None:
    """Replay applies what neither webhooks nor polling could (issue 15); nothing is lost."""
    summary = full_outage[0].summary

    assert summary.reconcile_applied is not None
    assert summary.reconcile_applied > 0
    assert () == summary.lost
    assert () == summary.doubled
    assert summary.emitted == summary.applied_once > 0
    assert 0 == summary.dead_letters


def test_check_token_reads_the_drill_clock(full_outage: tuple[DrillResult, Path]) -> None:
    """Triage 3's check_token reports a last refresh in the drill's past, not the real now."""
    report = full_outage[0].report
    [(t, line)] = [(t, text) for t, text in report.events if "check_token" in text]
    asked_at = report.started_at + timedelta(seconds=t)

    refreshed = datetime.fromisoformat(re.search(r"last refresh: (\S+?Z)", line)[1])  # type: ignore[index]  # the line always names it
    expires = datetime.fromisoformat(re.search(r"expires (\S+?Z)", line)[1])  # type: ignore[index]  # idem
    left = float(re.search(r"(\d+)s left", line)[1])  # type: ignore[index]  # idem

    assert report.started_at <= refreshed <= asked_at
    assert abs((expires - asked_at).total_seconds() - left) <= 1


def test_the_drill_runs_the_example_services_parts(
    full_outage: tuple[DrillResult, Path],
) -> None:
    """Issue 12: the same async workers the example service builds, and no sync twin."""
    from examples.integrations_service import runtime

    facts = dict(full_outage[0].report.facts)
    parts = facts["service parts (one event loop)"].split(", ")

    assert [
        "AsyncGateway",
        "HealthSampler",
        "AsyncSyncService",
        "AsyncWebhookReceiver",
        "AsyncOutboxWorker",
        "AsyncEnricher",
        "AsyncDeferredEnrichmentWorker",
    ] == parts
    for name in parts:
        if name != "AsyncWebhookReceiver":  # the example gets it from AsyncSyncService too
            assert hasattr(runtime, name), name


def test_every_rb09_phase_is_recorded_in_order(full_outage: tuple[DrillResult, Path]) -> None:
    """One phase per RB-09 step, contiguous, each with its own start and end."""
    phases = full_outage[0].report.phases

    assert RB09_PHASES == [p.name for p in phases]
    assert all(a.end == b.start for a, b in itertools.pairwise(phases))
    assert all(p.end >= p.start for p in phases)


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "full-outage"])
def test_every_scenario_passes(scenario: str, tmp_path: Path) -> None:
    """Rate-limit storm, token revocation and webhook-only failure each recover cleanly."""
    result = run_drill(
        DrillOptions(scenario=scenario, report_path=tmp_path / "r.html"), echo=_quiet
    )

    assert [] == _failed(result)
    assert () == result.summary.lost
    if scenario != "webhook-only":  # webhooks only: polling covers the outage by itself
        assert (result.summary.reconcile_applied or 0) > 0


#: What differs between two runs by design: wall-clock times (simulated time ends at the
#: real now) and the loopback ports of the simulator and the receiver.
_RUN_SPECIFIC = re.compile(
    r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?|127\.0\.0\.1:\d+"
)


def _story(result: DrillResult) -> dict[str, object]:
    """Everything a run counted and told, on its own clock: summary, checks, notes, chart."""
    report = result.report

    def scrub(text: str) -> str:
        return _RUN_SPECIFIC.sub("<run>", text)

    return {
        "summary": result.summary.lines(),
        "checks": [(c.name, c.expected, c.actual, c.ok) for c in report.checks],
        "events": [(round(t, 6), scrub(text)) for t, text in report.events],
        "series": {s.name: [tuple(p) for p in s.points] for s in report.series},
    }


@pytest.mark.parametrize(
    ("scenario", "api"), [("token-revocation", "generic"), ("rate-limit-storm", "hubspot")]
)
def test_a_scenario_replays_identically(scenario: str, api: str) -> None:
    """Same scenario, same seed: the same run, count for count and tick for tick.

    token-revocation gave 154 to 159 events and 5 or 6 refresh failures at
    Triage 3 from one run to the next: the token manager drew its backoff jitter
    from the unseeded ``random`` module (and the outbox worker too), so how many
    refreshes a run attempted on the drill's clock changed every time. HubSpot's
    "webhooks since recovery" counted requests, whose batching follows thread timing.
    """
    options = DrillOptions(scenario=scenario, api=api, report_path=None)
    runs = [_story(run_drill(options, echo=_quiet)) for _ in range(2)]

    for key in ("summary", "checks", "events", "series"):
        assert runs[0][key] == runs[1][key], key


def test_triage_2_counts_rate_limit_lines_not_request_ids() -> None:
    """RB-09's grep for "rate limit\\|429" matched a line or two in scenarios with no rate
    limit, differently each run: "429" inside the gateway's random hex request ids (one in
    about 290). The ids are letters now: a run without rate limits counts nothing of theirs,
    and a real 429 still counts."""
    import structlog

    from idis.integrations.resilience._gateway import new_request_id

    counts: Counter[str] = Counter()
    with _drill_logs(counts):
        log = structlog.get_logger("idis.integrations")
        for _ in range(3000):
            log.warning("idis.gateway.call_failed", msg="HTTP 503", request_id=new_request_id())
        quiet = counts["rate limit|429"]
        log.warning("idis.gateway.rate_limited", msg="provider rate limit hit (HTTP 429)")

    assert 0 == quiet
    assert 1 == counts["rate limit|429"]


def test_break_reconcile_loses_events_and_names_them(tmp_path: Path) -> None:
    """Without Recovery 3 the events only replay had are lost: the CLI names them, exits 1.

    The sync timeline says so too: the poller does not claim the time of events
    that aged out of the feed before it read them, so a gap is left.
    """
    result = _cli("drill", "--break", "reconcile", "--report", "r.html", cwd=tmp_path)

    assert 1 == result.returncode, result.stdout + result.stderr
    lost = re.search(r"FAIL\s+[^\n]*events lost[^\n]*?(\d+) lost: (evt_\d+[^\n]*)", result.stdout)
    assert lost is not None, result.stdout
    assert int(lost[1]) > 0
    assert f"lost: {lost[2]}" in result.stdout  # the summary names them too
    assert "reconcile: not run" in result.stdout
    gaps = r"FAIL\s+Verification 2: no gaps in the sync timeline\s+[1-9]\d* gaps"
    assert re.search(gaps, result.stdout), result.stdout
    assert "drill FAILED" in result.stdout
    assert re.search(r"^database: sqlite:///\S+ \(temporary", result.stderr, re.MULTILINE)
    assert (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ("failover", "Containment 1: automatic polling failover"),
        ("enrichment", "Containment 2: enrichment deferred, no exception"),
    ],
)
def test_a_broken_piece_fails_for_its_own_reason(broken: str, reason: str, tmp_path: Path) -> None:
    """--break failover/enrichment fail the check of that piece; nothing is lost meanwhile."""
    result = run_drill(
        DrillOptions(broken=frozenset({broken}), report_path=tmp_path / "r.html"), echo=_quiet
    )

    failed = {c.name for c in result.report.checks if not c.ok}
    assert reason in failed
    assert failed <= {reason, "Verification 2: every step audited"}
    assert () == result.summary.lost


def test_the_summary_counts_and_names() -> None:
    """Event ids read as runs; the summary says checks, events, reconcile and dead letters."""
    from idis.integrations.ops._drill import DrillSummary

    summary = DrillSummary(
        checks_passed=14,
        checks_failed=3,
        emitted=166,
        applied_once=98,
        lost=("evt_21", "evt_22", "evt_23", "evt_40"),
        doubled=(),
        reconcile_applied=None,
        dead_letters=0,
    )

    assert "evt_3-evt_5, evt_9, other" == id_ranges(["evt_9", "evt_4", "other", "evt_3", "evt_5"])
    assert [
        "checks: 14 passed, 3 failed",
        "events: 166 emitted, 98 applied once, 4 lost, 0 applied twice",
        "reconcile: not run",
        "dead letters: 0",
        "lost: evt_21-evt_23, evt_40",
    ] == summary.lines()


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"scenario": "meteor"}, "--scenario"),
        ({"speed": 0.0}, "--speed"),
        ({"broken": frozenset({"everything"})}, "--break"),
    ],
)
def test_bad_options_are_named(options: dict[str, object], flag: str) -> None:
    """A bad drill option raises ConfigError naming the flag."""
    with pytest.raises(ConfigError, match=flag):
        DrillOptions(**options)  # type: ignore[arg-type]


@pytest.mark.postgres
def test_drill_on_postgres(pg_url: str, tmp_path: Path) -> None:
    """--database-url runs the same drill against PostgreSQL."""
    result = run_drill(
        DrillOptions(database_url=pg_url, report_path=tmp_path / "r.html"), echo=_quiet
    )

    assert [] == _failed(result)
    assert (result.summary.reconcile_applied or 0) > 0


def test_postmortem_rebuilds_the_incident_from_the_database(
    full_outage: tuple[DrillResult, Path],
) -> None:
    """postmortem finds the breaker outage, the fallback, the defects and the queue drain."""
    result = full_outage[0]
    engine = create_db_engine(result.database_url)
    try:
        report, facts = build_postmortem(engine, "crm_provider", result.report.started_at)
    finally:
        engine.dispose()

    assert facts.breaker_open_seconds > 0
    assert facts.fallback_seconds > 0
    assert facts.defects_created == facts.defects_resolved > 0
    assert facts.events_reconciled == result.summary.reconcile_applied
    assert facts.queue_peak > 0
    assert facts.queue_drain_seconds is not None
    assert report.ok


def test_postmortem_cli_markdown_and_bad_input(tmp_path: Path) -> None:
    """The CLI prints Markdown for a window, and rejects a bad --since naming it."""
    env = {**os.environ, "IDIS_DATABASE_URL": f"sqlite:///{tmp_path / 'pm.sqlite3'}"}
    command = [sys.executable, "-m", "idis.integrations"]
    subprocess.run([*command, "db", "upgrade"], env=env, check=True, capture_output=True)
    postmortem = [*command, "postmortem", "--provider", "crm_provider", "--since"]
    ok = subprocess.run(
        [*postmortem, "2 hours ago"], env=env, capture_output=True, text=True, check=False
    )
    bad = subprocess.run(
        [*postmortem, "last tuesday"], env=env, capture_output=True, text=True, check=False
    )

    assert 0 == ok.returncode, ok.stderr
    assert ok.stdout.startswith("# RB-09 postmortem: crm_provider")
    assert 2 == bad.returncode
    assert "'last tuesday'" in bad.stderr


# --------------------------------------------------------------------------- the browser


def _seconds_after(start: datetime, label: str) -> float:
    """Seconds from ``start`` to the next wall-clock ``HH:MM:SS`` at or after it (within a day)."""
    hours, minutes, seconds = (int(part) for part in label.split(":"))
    of_day = hours * 3600 + minutes * 60 + seconds
    start_of_day = start.hour * 3600 + start.minute * 60 + start.second
    return float((of_day - start_of_day) % 86_400)


#: Added to a copy of the report only: the browser writes each label's box into the DOM.
_MEASURE = """<script>
const boxes = [...document.querySelectorAll('g.marker text, g.phase text')].map(t => {
  const b = t.getBBox();
  return [t.closest('g').getAttribute('class'), t.textContent, b.x, b.y, b.width, b.height];
});
const phases = [...document.querySelectorAll('g.phase rect')].map(r => r.getBBox().width);
document.body.setAttribute('data-boxes', JSON.stringify(boxes));
document.body.setAttribute('data-phase-widths', JSON.stringify(phases));
</script></body>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("chromium (Debian package chromium)")
    assert browser is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1400",
    ]
    return subprocess.run(
        [browser, *flags, *args], capture_output=True, text=True, check=False, timeout=120
    )


def _overlap(a: list[float], b: list[float]) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah


def test_report_renders_in_headless_chromium(
    full_outage: tuple[DrillResult, Path], tmp_path: Path
) -> None:
    """In a real browser: a screenshot with content; every phase, marker, threshold and axis
    label in the DOM; labels that do not overlap; no Python repr; the header's times are the
    run's."""
    result, report_path = full_outage
    report = result.report
    shot = tmp_path / "shot.png"
    measured = tmp_path / "measured.html"
    measured.write_text(report_path.read_text().replace("</body>", _MEASURE), encoding="utf-8")

    _chromium(tmp_path, f"--screenshot={shot}", report_path.as_uri())
    dom = _chromium(tmp_path, "--dump-dom", measured.as_uri()).stdout

    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 40_000  # a blank page compresses to a few KB
    phases = set(re.findall(r'<g class="phase" data-phase="([^"]+)"', dom))
    assert set(RB09_PHASES) == phases
    widths = json.loads(re.search(r"data-phase-widths=\"([^\"]+)\"", dom)[1].replace("&quot;", '"'))  # type: ignore[index]  # set by _MEASURE
    assert len(RB09_PHASES) == len(widths)
    assert min(widths) >= MIN_PHASE_WIDTH - 0.01  # Recovery 2 is an instant, still visible
    kinds = set(re.findall(r'<g class="marker" data-kind="(\w+)"', dom))
    assert {"outage", "alert", "breaker", "mode", "token", "reconcile"} == kinds
    for label in ("alert fires", "breaker open", "breaker closed", "failover: polling"):
        assert f">{label}</text>" in dom
    assert ">back to webhooks</text>" in dom
    assert re.search(r">reconcile: \d+ applied</text>", dom)
    assert 'class="threshold"' in dom
    assert ">alert threshold 0.05/s</text>" in dom
    axis = re.findall(r">(\d\d:\d\d:\d\d)</text>", dom)
    assert axis
    assert all(label.endswith(("0:00", "5:00")) for label in axis)  # round wall-clock ticks
    boxes = json.loads(re.search(r"data-boxes=\"([^\"]+)\"", dom)[1].replace("&quot;", '"'))  # type: ignore[index]  # set by _MEASURE
    labels = [(kind, text, box) for kind, text, *box in boxes]
    clashes = [
        (a[1], b[1])
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        if _overlap(a[2], b[2]) and not (a[0] == b[0] == "phase" and a[1] == b[1])
    ]
    assert [] == clashes
    text = re.sub(r"<(style|script)>.*?</\1>", "", dom, flags=re.DOTALL)
    for python_repr in ("{", "}", "': ", "['", "Counter(", "datetime("):
        assert python_repr not in text
    start, end = report.started_at, report.ended_at
    assert end is not None
    assert f"simulated incident {start:%H:%M:%S} to {end:%H:%M:%S} UTC" in dom
    assert f"started {start:%Y-%m-%d %H:%M:%S} UTC" in dom
    # Wall-clock labels within the run, also when it crosses midnight (compared as time of day,
    # 23:57 <= 00:10 was false and failed every run started in the last hour of a day).
    span = (end - start).total_seconds()
    assert all(0 <= _seconds_after(start, label) <= span for label in axis), (start, end, axis)
