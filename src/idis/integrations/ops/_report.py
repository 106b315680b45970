"""Self-contained incident reports: an HTML page with a timeline chart, and Markdown.

Used by ``idis-integrations drill`` (a rehearsal) and ``idis-integrations
postmortem`` (a real incident rebuilt from the audit trail and the recorded
health samples). The HTML has no external assets: the chart is inline SVG,
so the file can be attached to a postmortem ticket and opened anywhere.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Check", "Phase", "Report", "Series", "render_html", "render_markdown"]

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

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(check.ok for check in self.checks)


def _fmt_t(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _chart(report: Report, width: int = 1100, row_height: int = 92) -> str:
    series = [s for s in report.series if s.points]
    if not series:
        return "<p>No timeline data.</p>"
    left, right, top = 170, 20, 40
    end = max([p[0] for s in series for p in s.points] + [ph.end for ph in report.phases] + [1.0])
    plot_w = width - left - right
    height = top + row_height * len(series) + 30

    def x(t: float) -> float:
        return left + plot_w * (t / end)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="incident timeline">',
        "<style>text{font:12px system-ui,sans-serif;fill:#333}.ph{font-size:11px;fill:#555}"
        ".ax{stroke:#bbb;stroke-width:1}.grid{stroke:#eee}</style>",
    ]
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
            f'<text class="ph" x="{x0 + 4:.1f}" y="{label_y}">{html.escape(phase.name)}</text>'
        )
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
    for i in range(6):
        t = end * i / 5
        parts.append(
            f'<text class="ph" x="{x(t):.1f}" y="{axis_y + 14}" text-anchor="middle">'
            f"{_fmt_t(t)}</text>"
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
        f"<li><b>{html.escape(p.name)}</b> ({_fmt_t(p.start)} to {_fmt_t(p.end)})"
        + (
            "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in p.notes) + "</ul>"
            if p.notes
            else ""
        )
        + "</li>"
        for p in report.phases
    )
    events = "".join(
        f"<tr><td>{_fmt_t(t)}</td><td>{html.escape(text)}</td></tr>" for t, text in report.events
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
<h2>Events</h2><table><tr><th>t</th><th>event</th></tr>{events}</table>
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
        lines.append(f"- **{phase.name}** ({_fmt_t(phase.start)} to {_fmt_t(phase.end)})")
        lines += [f"  - {note}" for note in phase.notes]
    lines += ["", "## Facts", ""]
    lines += [f"- {k}: {v}" for k, v in report.facts]
    lines += ["", "## Events", ""]
    lines += [f"- `{_fmt_t(t)}` {text}" for t, text in report.events]
    return "\n".join(lines) + "\n"
