"""Self-contained incident reports: an HTML page with a timeline chart, and Markdown.

Used by ``idis-integrations drill`` (a rehearsal) and ``idis-integrations
postmortem`` (a real incident rebuilt from the audit trail and the recorded
health samples). The HTML has no external assets: the chart is inline SVG,
so the file can be attached to a postmortem ticket and opened anywhere.

Times read as wall-clock UTC (``14:03:10``) with the offset from the start
(``+3:10``) beside them; repeated event lines are shown once with a count
(``x37``) and the span they occurred in.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

__all__ = [
    "Check",
    "EventGroup",
    "Phase",
    "Report",
    "Series",
    "group_events",
    "render_html",
    "render_markdown",
]

_PALETTE = ("#d62728", "#1f77b4", "#9467bd", "#ff7f0e", "#2ca02c", "#8c564b", "#17becf")
_PHASE_FILL = ("#f4f6fb", "#fdf1f1", "#fff7e6", "#eef8ee", "#eef3fb", "#f7f0fa")


@dataclass(frozen=True, slots=True)
class Series:
    """One line of the timeline chart."""

    name: str
    #: (seconds since the start, value) points, in time order.
    points: Sequence[tuple[float, float]]
    unit: str = ""
    #: Step line (states, counts) rather than a straight line between points.
    step: bool = True
    #: Labels for integer values (breaker state 0/1/2, mode 0/1).
    labels: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Phase:
    """A named stretch of the timeline."""

    name: str
    start: float
    end: float
    notes: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Check:
    """One verification row."""

    name: str
    expected: str
    actual: str
    ok: bool


@dataclass(slots=True)
class Report:
    """Everything a report shows."""

    title: str
    subtitle: str
    started_at: datetime
    phases: list[Phase] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    #: End of the period the report covers (the chart reaches it even if data stops earlier).
    ended_at: datetime | None = None

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(check.ok for check in self.checks)


def _fmt_t(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _clock(report: Report, seconds: float) -> str:
    """Wall-clock UTC time of an offset from the report's start (``14:03:10``)."""
    return f"{report.started_at + timedelta(seconds=seconds):%H:%M:%S}"


def _when(report: Report, seconds: float) -> str:
    """``14:03:10 (+3:10)``: wall clock, and the offset from the start."""
    return f"{_clock(report, seconds)} (+{_fmt_t(seconds)})"


@dataclass(frozen=True, slots=True)
class EventGroup:
    """Event lines with the same text, shown once."""

    text: str
    first: float
    last: float
    count: int


def group_events(events: Sequence[tuple[float, str]]) -> list[EventGroup]:
    """Identical lines merged into one with a count, in the order they first occurred."""
    groups: dict[str, EventGroup] = {}
    for t, text in events:
        seen = groups.get(text)
        groups[text] = (
            EventGroup(text, t, t, 1)
            if seen is None
            else EventGroup(text, seen.first, t, seen.count + 1)
        )
    return sorted(groups.values(), key=lambda g: g.first)


def _span(report: Report, group: EventGroup) -> str:
    if group.count == 1:
        return _when(report, group.first)
    return f"{_when(report, group.first)} to {_clock(report, group.last)}"


#: Tick spacings of the time axis, seconds: round wall-clock times at any zoom.
_TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)


def _ticks(started: datetime, end: float, wanted: int = 6) -> list[float]:
    """Offsets of round wall-clock times (``14:05:00``, ``14:10:00``...) across ``[0, end]``."""
    step = next((s for s in _TICK_STEPS if end / s <= wanted), 86400)
    epoch = started.timestamp()
    first = -(-epoch // step) * step - epoch  # the first multiple of step at or after start
    ticks = []
    t = first
    while t <= end + 1e-9:
        ticks.append(t)
        t += step
    return ticks


def _chart(report: Report, width: int = 1100, row_height: int = 92) -> str:
    series = [s for s in report.series if s.points]
    if not series:
        return "<p>No timeline data.</p>"
    left, right, top = 170, 20, 40
    covered = [(report.ended_at - report.started_at).total_seconds()] if report.ended_at else []
    end = max(
        [p[0] for s in series for p in s.points]
        + [ph.end for ph in report.phases]
        + covered
        + [1.0]
    )
    plot_w = width - left - right
    height = top + row_height * len(series) + 44

    def x(t: float) -> float:
        return left + plot_w * (t / end)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="incident timeline">',
        "<style>text{font:12px system-ui,sans-serif;fill:#333}.ph{font-size:11px;fill:#555}"
        ".ax{stroke:#bbb;stroke-width:1}.grid{stroke:#eee}</style>",
    ]
    labels: list[str] = []
    for index, phase in enumerate(report.phases):
        if phase.end <= phase.start:
            continue  # an instant (verification) has no band to draw
        x0, x1 = x(phase.start), x(phase.end)
        fill = _PHASE_FILL[index % len(_PHASE_FILL)]
        # Alternate label heights so that short neighbouring phases stay readable.
        label_y = top - 6 - (11 if index % 2 else 0)
        parts.append(
            f'<rect x="{x0:.1f}" y="{top - 18}" width="{max(1.0, x1 - x0):.1f}" '
            f'height="{height - top - 12}" fill="{fill}"/>'
        )
        labels.append(
            f'<text class="ph" x="{x0 + 4:.1f}" y="{label_y}">{html.escape(phase.name)}</text>'
        )
    # Labels after every band, so that no later band paints over an earlier label.
    parts.extend(labels)
    for row, line in enumerate(series):
        y0 = top + row * row_height + 10
        y1 = y0 + row_height - 24
        values = [p[1] for p in line.points]
        vmax = max(*values, max(line.labels) if line.labels else 0.0) or 1.0
        vmin = min(0.0, *values)

        def y(
            v: float, y0: float = y0, y1: float = y1, vmin: float = vmin, vmax: float = vmax
        ) -> float:
            span = (vmax - vmin) or 1.0
            return y1 - (y1 - y0) * ((v - vmin) / span)

        color = _PALETTE[row % len(_PALETTE)]
        unit = f" ({line.unit})" if line.unit else ""
        parts.append(
            f'<text x="8" y="{(y0 + y1) / 2 + 4:.1f}">{html.escape(line.name + unit)}</text>'
            f'<line class="ax" x1="{left}" y1="{y1:.1f}" x2="{width - right}" y2="{y1:.1f}"/>'
            f'<line class="grid" x1="{left}" y1="{y0:.1f}" x2="{width - right}" y2="{y0:.1f}"/>'
        )
        ticks = (
            sorted(line.labels.items())
            if line.labels
            else [(vmin, f"{vmin:g}"), (vmax, f"{vmax:g}")]
        )
        for value, label in ticks:
            parts.append(
                f'<text x="{left - 6}" y="{y(float(value)) + 4:.1f}" text-anchor="end" '
                f'class="ph">{html.escape(str(label))}</text>'
            )
        points: list[str] = []
        previous: tuple[float, float] | None = None
        for t, v in line.points:
            if line.step and previous is not None:
                points.append(f"{x(t):.1f},{y(previous[1]):.1f}")
            points.append(f"{x(t):.1f},{y(v):.1f}")
            previous = (t, v)
        if previous is not None:
            points.append(f"{x(end):.1f},{y(previous[1]):.1f}")
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" '
            f'points="{" ".join(points)}"><title>{html.escape(line.name)}</title></polyline>'
        )
    axis_y = top + row_height * len(series) + 4
    axis_ticks = _ticks(report.started_at, end)
    for t in axis_ticks:
        # The outermost labels stay inside the chart.
        anchor = "start" if t < end * 0.05 else "end" if t > end * 0.95 else "middle"
        # Wall-clock UTC first (what alerts and logs show), the offset under it.
        parts.append(
            f'<text class="ph" x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="{anchor}">'
            f"{_clock(report, t)}</text>"
            f'<text class="ph" x="{x(t):.1f}" y="{axis_y + 27}" text-anchor="{anchor}">'
            f"+{_fmt_t(t)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    verdict = "PASSED" if report.ok else "FAILED"
    started = f"{report.started_at:%Y-%m-%d %H:%M:%S}"
    colour = "#1a7f37" if report.ok else "#cf222e"
    rows = "".join(
        f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(c.expected)}</td>"
        f"<td>{html.escape(c.actual)}</td><td class='{'ok' if c.ok else 'bad'}'>"
        f"{'pass' if c.ok else 'FAIL'}</td></tr>"
        for c in report.checks
    )
    facts = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in report.facts
    )
    phases = "".join(
        f"<li><b>{html.escape(p.name)}</b> ({_when(report, p.start)} to "
        f"{_when(report, p.end)})"
        + (
            "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in p.notes) + "</ul>"
            if p.notes
            else ""
        )
        + "</li>"
        for p in report.phases
    )
    events = "".join(
        f"<tr><td>{html.escape(_span(report, g))}</td><td>{html.escape(g.text)}</td>"
        f"<td>{'x' + str(g.count) if g.count > 1 else ''}</td></tr>"
        for g in group_events(report.events)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(report.title)}</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1160px;color:#222}}
h1{{margin-bottom:0}} .sub{{color:#666;margin-top:4px}}
.verdict{{display:inline-block;padding:4px 12px;border-radius:4px;color:#fff;background:{colour};
font-weight:600}}
table{{border-collapse:collapse;margin:12px 0}} td,th{{border:1px solid #ddd;padding:4px 8px;
text-align:left;vertical-align:top}} th{{background:#f6f8fa}}
.ok{{color:#1a7f37;font-weight:600}} .bad{{color:#cf222e;font-weight:700}}
.chart{{border:1px solid #ddd;padding:8px;overflow-x:auto}}
</style></head><body>
<h1>{html.escape(report.title)}</h1>
<p class="sub">{html.escape(report.subtitle)} · started {started} UTC</p>
<p><span class="verdict">{verdict}</span></p>
<h2>Timeline</h2>
<div class="chart">{_chart(report)}</div>
<h2>Verification</h2>
<table><tr><th>check</th><th>expected</th><th>actual</th><th>result</th></tr>{rows}</table>
<h2>Phases</h2><ol>{phases}</ol>
<h2>Facts</h2><table>{facts}</table>
<h2>Events</h2><table><tr><th>time (UTC)</th><th>event</th><th>times</th></tr>{events}</table>
</body></html>
"""


def render_markdown(report: Report) -> str:
    """The report as Markdown (for a postmortem document)."""
    lines = [
        f"# {report.title}",
        "",
        f"{report.subtitle}, started {report.started_at:%Y-%m-%d %H:%M:%S} UTC.",
        f"Verdict: **{'PASSED' if report.ok else 'FAILED'}**",
        "",
        "## Verification",
        "",
        "| check | expected | actual | result |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c.name} | {c.expected} | {c.actual} | {'pass' if c.ok else '**FAIL**'} |"
        for c in report.checks
    ]
    lines += ["", "## Phases", ""]
    for phase in report.phases:
        lines.append(
            f"- **{phase.name}** ({_when(report, phase.start)} to {_when(report, phase.end)})"
        )
        lines += [f"  - {note}" for note in phase.notes]
    lines += ["", "## Facts", ""]
    lines += [f"- {k}: {v}" for k, v in report.facts]
    lines += ["", "## Events", ""]
    lines += [
        f"- `{_span(report, g)}` {g.text}" + (f" (x{g.count})" if g.count > 1 else "")
        for g in group_events(report.events)
    ]
    return "\n".join(lines) + "\n"
