"""The postmortem report (issue 15): fitted to the incident, dead letters apart from pending,
repeated lines grouped, no Python dicts, header times that match the data, a wall-clock axis.

The incident is written into a real database the way the library records one
(audit rows, health samples, outbox rows), then rendered and opened in a real
headless browser.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from tests.conftest import unavailable

from idis.integrations._audit import record_audit
from idis.integrations.ops._postmortem import build_postmortem, incident_window
from idis.integrations.ops._report import Report, group_events, render_html, render_markdown
from idis.integrations.outbox import OutboxMessageRow
from idis.integrations.resilience._recorder import HealthSample

P = "crm_provider"
SEARCH_FROM = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # "6 hours ago"
SEARCH_TO = SEARCH_FROM + timedelta(hours=6)
FAIL = datetime(2026, 3, 2, 13, 0, 7, tzinfo=UTC)  # first failed call
CLOSED = FAIL + timedelta(minutes=12)  # breaker closed again
BACK = CLOSED + timedelta(minutes=3)  # back on webhooks


def _audit(session: Session, at: datetime, action: str, **fields: object) -> None:
    record_audit(session, action, provider=P, occurred_at=at, **fields)  # type: ignore[arg-type]


def _message(
    session: Session, n: int, created: datetime, status: str, settled: datetime | None
) -> None:
    session.add(
        OutboxMessageRow(
            provider=P,
            kind="request",
            idempotency_key=f"k{n}",
            payload={"n": n},
            status=status,
            attempts=1,
            next_attempt_at=created,
            created_at=created,
            updated_at=settled or created,
            delivered_at=settled if status == "delivered" else None,
        )
    )


@pytest.fixture
def incident(engine: Engine) -> Engine:
    """A 15-minute CRM outage in a 6-hour search window, as the library records it."""
    with Session(engine) as session, session.begin():
        _audit(
            session,
            SEARCH_FROM + timedelta(minutes=10),
            "token.refreshed",
            details={"grant": "client_credentials", "generation": 3},
        )
        for i in range(20):  # error-rate samples every 30 s during the outage
            at = FAIL + timedelta(seconds=30 * i)
            session.add(
                HealthSample(
                    provider=P,
                    sampled_at=at,
                    replica="r1",
                    breaker_state="open" if i else "closed",
                    calls=10,
                    failures=6 if at < CLOSED else 0,
                    error_rate=0.6 if at < CLOSED else 0.0,
                    in_flight=0,
                    paused_for=0.0,
                )
            )
        _audit(
            session,
            FAIL + timedelta(seconds=20),
            "breaker.open",
            message="circuit breaker closed -> open: 3 consecutive failures",
        )
        _audit(
            session,
            FAIL + timedelta(seconds=35),
            "sync.mode_changed",
            details={"from": "webhook", "to": "polling"},
            message=f"{P}: webhook -> polling (breaker_open)",
        )
        for i in range(37):  # the same line, 37 times
            _audit(
                session,
                FAIL + timedelta(seconds=40 + 15 * i),
                "breaker.open",
                message="circuit breaker half_open -> open: trial call failed (server_error)",
            )
        _audit(
            session,
            CLOSED,
            "breaker.closed",
            message="circuit breaker half_open -> closed: trial calls succeeded",
        )
        _audit(
            session,
            FAIL + timedelta(minutes=2),
            "outbox.dead_lettered",
            details={
                "attempts": 4,
                "last_error": {"type": "server_error", "status": 503},
                "message_ids": [3, 4],
            },
        )
        _audit(
            session,
            BACK,
            "sync.mode_changed",
            details={"from": "polling", "to": "webhook"},
            message=f"{P}: polling -> webhook (recovered)",
        )
        for n in range(5):  # pushes during the outage: 3 delivered after it, 2 dead letters
            created = FAIL + timedelta(minutes=1 + n)
            if n < 3:
                _message(session, n, created, "delivered", CLOSED + timedelta(seconds=30 + n))
            else:
                _message(session, n, created, "dead", FAIL + timedelta(minutes=6))
        _message(session, 9, CLOSED + timedelta(minutes=1), "pending", None)  # still waiting
    return engine


def test_the_window_fits_the_incident_with_margins(incident: Engine) -> None:
    """A 6-hour search shows the outage from first failure to recovery, plus a margin."""
    report, _ = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)

    assert FAIL - timedelta(minutes=2) == report.started_at
    assert report.ended_at is not None
    assert BACK < report.ended_at <= BACK + timedelta(minutes=5)
    assert "incident window 2026-03-02 12:58:07 to" in report.subtitle
    assert "searched 2026-03-02 08:00:00 to 2026-03-02 14:00:00 UTC" in report.subtitle
    assert all(0 <= t for t, _ in report.events)  # the early token refresh is outside


def test_no_incident_keeps_the_search_window_and_says_so(engine: Engine) -> None:
    """Nothing failed: the report covers the search window and says no incident was found."""
    report, _ = build_postmortem(engine, P, SEARCH_FROM, SEARCH_TO)

    assert (SEARCH_FROM, SEARCH_TO) == (report.started_at, report.ended_at)
    assert report.subtitle.startswith("no incident found")


def test_incident_window_is_clipped_to_the_search() -> None:
    """Margins never reach outside what the operator asked for."""
    start = SEARCH_FROM + timedelta(seconds=30)

    assert (SEARCH_FROM, SEARCH_TO) == incident_window(
        [start, SEARCH_TO - timedelta(seconds=1)], None, SEARCH_FROM, SEARCH_TO
    )
    assert incident_window([SEARCH_TO + timedelta(hours=1)], None, SEARCH_FROM, SEARCH_TO) is None


def test_dead_letters_are_told_from_pending(incident: Engine) -> None:
    """Two dead letters and one message still waiting are counted, charted and checked apart."""
    report, facts = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)

    assert (2, 1) == (facts.dead_letters, facts.pending_at_end)
    series = {s.name: s for s in report.series}
    assert 2.0 == series["dead letters"].points[-1][1]
    assert 1.0 == series["outbox pending"].points[-1][1]
    assert min(v for _, v in series["outbox pending"].points) >= 0
    checks = {c.name: c for c in report.checks}
    assert (False, "2 dead") == (
        checks["No dead letters left"].ok,
        checks["No dead letters left"].actual,
    )
    assert "1 pending" == checks["Retry queue drained"].actual


def test_repeated_lines_are_grouped_with_a_count(incident: Engine) -> None:
    """37 identical breaker lines become one, with x37 and the span they cover."""
    report, _ = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)
    markdown = render_markdown(report)

    trial = [g for g in group_events(report.events) if "trial call failed" in g.text]
    assert [37] == [g.count for g in trial]
    assert 1 == markdown.count("trial call failed")
    assert "(x37)" in markdown
    assert "13:00:47 (+2:40) to 13:09:47" in markdown


def test_no_python_dict_or_list_in_the_rendered_report(incident: Engine) -> None:
    """A row with nested details and no message reads as key=value, in Markdown and HTML."""
    report, _ = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)
    markdown = render_markdown(report)
    page = render_html(report)

    assert "outbox.dead_lettered: attempts=4, last_error=type=server_error, status=503" in markdown
    for text in (markdown, re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL)):
        assert "{" not in text
        assert "[" not in text.replace("[enrichment_provider]", "")
        assert "': " not in text


def test_header_and_axis_times_match_the_data(incident: Engine) -> None:
    """The header's times, the event times and the wall-clock axis all read the same clock."""
    report, _ = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)
    page = render_html(report)
    markdown = render_markdown(report)

    assert "started 2026-03-02 12:58:07 UTC" in markdown
    assert "`13:00:27 (+2:20)` breaker.open: circuit breaker closed -> open" in markdown
    axis = re.findall(r">(\d\d:\d\d:\d\d)</text>", page)
    assert axis
    assert all("12:58:07" <= label <= "13:20:00" for label in axis)
    assert all(label.endswith(("0:00", "5:00")) for label in axis[1:])  # round wall-clock ticks


def test_the_html_report_renders_in_headless_chromium(incident: Engine, tmp_path: Path) -> None:
    """The page renders in a real browser: a screenshot with content, a DOM with the data."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        unavailable("chromium (Debian package chromium)")
    assert browser is not None
    report, _ = build_postmortem(incident, P, SEARCH_FROM, SEARCH_TO)
    page = tmp_path / "postmortem.html"
    page.write_text(render_html(report), encoding="utf-8")
    shot = tmp_path / "shot.png"
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

    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        check=False,
        timeout=120,
    )
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    ).stdout

    assert shot.read_bytes().startswith(b"\x89PNG")
    assert len(shot.read_bytes()) > 40_000  # a blank page compresses to a few KB
    assert "dead letters" in dom
    assert "x37" in dom
    assert "13:00:00" in dom  # a round wall-clock tick of the axis


def test_the_drill_report_keeps_rendering(tmp_path: Path) -> None:
    """The drill's Report (no ended_at) still renders with the shared renderer."""
    report = Report(
        title="t", subtitle="s", started_at=SEARCH_FROM, events=[(1.0, "a"), (2.0, "a"), (3.0, "b")]
    )

    assert "a (x2)" in render_markdown(report)
    assert "<svg" not in render_html(report)  # no series: no chart, no error


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["postmortem", "--provider", "crm_provider", "--since", "6 hours ago"], "--output"),
        (["drill"], "--report"),
    ],
)
def test_a_report_path_that_cannot_be_written_exits_2_before_any_work(
    sqlite_url: str, tmp_path: Path, command: list[str], flag: str
) -> None:
    """A report into a folder that does not exist: exit 2 naming the flag and the path.

    postmortem ended in a FileNotFoundError traceback (exit 1) after reading the audit
    trail; the drill would have run its whole incident before failing the same way.
    """
    from click.testing import CliRunner

    from idis.integrations.cli import main

    target = tmp_path / "no-such-folder" / "report.html"

    result = CliRunner().invoke(
        main,
        [*command, flag, str(target)],
        env={"IDIS_DATABASE_URL": sqlite_url, "IDIS_ALLOW_EMBEDDED_DEFAULTS": "true"},
    )

    assert 2 == result.exit_code, result.output
    assert flag in result.output
    assert str(target.parent) in result.output
    assert "Traceback" not in result.output
    assert "RB-09 drill" not in result.output  # refused before the drill began
    assert not target.parent.exists()
