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
    "Marker",
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
    #: A level drawn as a dashed line across the row (an alert's threshold).
    threshold: float | None = None
    #: What the threshold line says (default: ``threshold <value>``).
    threshold_label: str = ""


@dataclass(frozen=True, slots=True)
class Phase:
    """A named stretch of the timeline."""

    name: str
    start: float
    end: float
    notes: Sequence[str] = ()
    #: Label on the chart's phase lane when the name is too long (``C1``, ``R3``).
    short: str = ""


@dataclass(frozen=True, slots=True)
class Marker:
    """A moment on the timeline (alert fired, breaker opened...): a labelled vertical line."""

    #: Seconds since the report's start.
    at: float
    label: str
    #: Colour family: outage, alert, breaker, mode, token, reconcile (others grey).
    kind: str = ""


@dataclass(frozen=True, slots=True)
class Check:
    """One verification row."""

    name: str
    expected: str
    actual: str
    ok: bool
    #: False: the check cannot apply here (``actual`` says why); shown as n/a, never a pass.
    applicable: bool = True

    @property
    def result(self) -> str:
        """``pass``, ``FAIL`` or ``n/a``."""
        if not self.applicable:
            return "n/a"
        return "pass" if self.ok else "FAIL"


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
    #: Moments drawn on the chart as labelled lines.
    markers: list[Marker] = field(default_factory=list)
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


#: Marker colours by kind; unknown kinds are grey.
_MARKER_COLOURS = {
    "outage": "#6e7781",
    "alert": "#cf222e",
    "breaker": "#1f77b4",
    "mode": "#9467bd",
    "token": "#17becf",
    "reconcile": "#1a7f37",
}
#: An instant (a phase with no duration) is drawn this wide, pixels, so it stays visible.
MIN_PHASE_WIDTH = 6.0
_LANE_HEIGHT = 18
_LABEL_ROW = 13


def _text_width(text: str, size: float = 11.0) -> float:
    """Rough width of ``text`` in pixels (system-ui at ``size``): enough to keep labels apart."""
    return len(text) * size * 0.58 + 6


def _rows(spans: Sequence[tuple[float, float]], gap: float = 4.0) -> list[int]:
    """A row for each ``(left, right)`` span so that spans in one row never overlap (greedy):
    labels, or phases in time (a postmortem's overlap, and stack in sub-lanes)."""
    ends: list[float] = []
    rows: list[int] = []
    for left, right in spans:
        row = next((i for i, last in enumerate(ends) if left >= last + gap), len(ends))
        if row == len(ends):
            ends.append(right)
        else:
            ends[row] = right
        rows.append(row)
    return rows


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where things go: the plot's horizontal scale and the vertical bands."""

    left: float
    right: float
    end: float
    width: int

    def x(self, t: float) -> float:
        return self.left + (self.right - self.left) * (t / self.end)


def _phase_blocks(
    phases: Sequence[Phase], lanes: Sequence[int], frame: _Frame
) -> list[tuple[Phase, float, float]]:
    """Each phase's ``(phase, x0, x1)``: an instant gets :data:`MIN_PHASE_WIDTH`, next to the
    block before it in its lane, so that two instants at one moment both show."""
    blocks = []
    last: dict[int, float] = {}
    for phase, lane in zip(phases, lanes, strict=True):
        x0, x1 = frame.x(phase.start), frame.x(max(phase.end, phase.start))
        if x1 - x0 < MIN_PHASE_WIDTH:
            x0 = max(x0 - MIN_PHASE_WIDTH / 2, last.get(lane, frame.left))
            x1 = x0 + MIN_PHASE_WIDTH
        else:
            x0 = max(x0, last.get(lane, frame.left))
        last[lane] = x1
        blocks.append((phase, x0, x1))
    return blocks


@dataclass(frozen=True, slots=True)
class _Lane:
    """The phase lane's layout: blocks, their sub-lanes (overlaps), labels and where they go."""

    blocks: list[tuple[Phase, float, float]]
    #: Sub-lane of each block (overlapping phases, as in a postmortem, stack).
    lanes: list[int]
    labels: list[str]
    #: Blocks whose label does not fit inside: (left, right) of the label and its row above.
    outside: dict[int, tuple[float, float, int]]

    @property
    def above(self) -> float:
        """Height of the label rows above the lane."""
        rows = [row for _, _, row in self.outside.values()]
        return (max(rows) + 1) * _LABEL_ROW if rows else 0.0

    @property
    def height(self) -> float:
        """Labels above plus the sub-lanes."""
        return self.above + ((max(self.lanes) + 1) * _LANE_HEIGHT if self.lanes else 0)


def _lane(report: Report, frame: _Frame) -> _Lane:
    lanes = _rows([(p.start, max(p.end, p.start)) for p in report.phases], gap=0)
    blocks = _phase_blocks(report.phases, lanes, frame)
    labels = [(phase.short or phase.name) for phase, _, _ in blocks]
    spans: dict[int, tuple[float, float]] = {}
    for i, (_, x0, x1) in enumerate(blocks):
        w = _text_width(labels[i])
        if w > x1 - x0 - 2:
            middle = min(max((x0 + x1) / 2, frame.left + w / 2), frame.right - w / 2)
            spans[i] = (middle - w / 2, middle + w / 2)
    rows = _rows(list(spans.values()))
    return _Lane(
        blocks=blocks,
        lanes=lanes,
        labels=labels,
        outside={i: (*span, row) for (i, span), row in zip(spans.items(), rows, strict=True)},
    )


def _phase_parts(
    lane: _Lane, top: float, band_top: float, band_bottom: float
) -> tuple[list[str], list[str]]:
    """Background bands behind the rows (first sub-lane); the lane's blocks and labels."""
    bands: list[str] = []
    blocks: list[str] = []
    lane_top = top + lane.above
    for i, (phase, x0, x1) in enumerate(lane.blocks):
        fill = _PHASE_FILL[i % len(_PHASE_FILL)]
        stroke = _PALETTE[i % len(_PALETTE)]
        y = lane_top + lane.lanes[i] * _LANE_HEIGHT
        title = html.escape(phase.name)
        if lane.lanes[i] == 0:
            bands.append(
                f'<rect x="{x0:.1f}" y="{band_top:.1f}" width="{x1 - x0:.1f}" '
                f'height="{band_bottom - band_top:.1f}" fill="{fill}"/>'
            )
        # The label inside its block, or in its row above the lane when it does not fit.
        lx, ly = (x0 + x1) / 2, y + _LANE_HEIGHT - 7
        if i in lane.outside:
            left, right, row = lane.outside[i]
            lx, ly = (left + right) / 2, lane_top - row * _LABEL_ROW - 3
        label = (
            f'<text class="ph" x="{lx:.1f}" y="{ly:.1f}" text-anchor="middle">'
            f"{html.escape(lane.labels[i])}</text>"
        )
        blocks.append(
            f'<g class="phase" data-phase="{title}"><title>{title}</title>'
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" height="{_LANE_HEIGHT - 3}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1"/>{label}</g>'
        )
    return bands, blocks


def _marker_labels(report: Report, frame: _Frame) -> tuple[list[tuple[Marker, float, int]], int]:
    """Each marker with its x and label row (labels never overlap); and the number of rows."""
    placed = []
    spans = []
    for marker in sorted(report.markers, key=lambda m: m.at):
        x = frame.x(min(max(marker.at, 0.0), frame.end))
        w = _text_width(marker.label)
        # Text to the right of the line, or to the left near the right edge.
        left, right = (x - w - 4, x) if x + w + 4 > frame.width - 4 else (x, x + w + 4)
        placed.append((marker, x))
        spans.append((left, right))
    rows = _rows(spans)
    return [(m, x, row) for (m, x), row in zip(placed, rows, strict=True)], (
        max(rows) + 1 if rows else 0
    )


def _markers(report: Report, frame: _Frame, top: float, bottom: float) -> list[str]:
    """Vertical lines from their label (in rows above the lane) down to the axis."""
    placed, rows = _marker_labels(report, frame)
    parts = []
    for marker, x, row in placed:
        colour = _MARKER_COLOURS.get(marker.kind, "#6e7781")
        y = top + (rows - row) * _LABEL_ROW - 2
        anchor = "end" if x + _text_width(marker.label) + 4 > frame.width - 4 else "start"
        dx = -3 if anchor == "end" else 3
        label = html.escape(marker.label)
        parts.append(
            f'<g class="marker" data-kind="{html.escape(marker.kind)}"><title>{label}</title>'
            f'<line x1="{x:.1f}" y1="{y + 2:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" '
            f'stroke="{colour}" stroke-width="1.2" stroke-dasharray="4 3"/>'
            f'<text class="mk" x="{x + dx:.1f}" y="{y:.1f}" text-anchor="{anchor}" '
            f'fill="{colour}">{label}</text></g>'
        )
    return parts


def _series_row(line: Series, index: int, frame: _Frame, y0: float, y1: float) -> list[str]:
    """One series: its name, value labels, grid, threshold and line."""
    values = [p[1] for p in line.points]
    ceiling = [line.threshold] if line.threshold is not None else []
    vmax = max(*values, *ceiling, max(line.labels) if line.labels else 0.0) or 1.0
    vmin = min(0.0, *values)

    def y(v: float) -> float:
        span = (vmax - vmin) or 1.0
        return y1 - (y1 - y0) * ((v - vmin) / span)

    color = _PALETTE[index % len(_PALETTE)]
    unit = f" ({line.unit})" if line.unit else ""
    parts = [
        f'<text x="8" y="{(y0 + y1) / 2 + 4:.1f}">{html.escape(line.name + unit)}</text>'
        f'<line class="ax" x1="{frame.left}" y1="{y1:.1f}" x2="{frame.right}" y2="{y1:.1f}"/>'
        f'<line class="grid" x1="{frame.left}" y1="{y0:.1f}" x2="{frame.right}" y2="{y0:.1f}"/>'
    ]
    ticks = (
        sorted(line.labels.items()) if line.labels else [(vmin, f"{vmin:g}"), (vmax, f"{vmax:g}")]
    )
    for value, label in ticks:
        parts.append(
            f'<text x="{frame.left - 6}" y="{y(float(value)) + 4:.1f}" text-anchor="end" '
            f'class="ph">{html.escape(str(label))}</text>'
        )
    vertices: list[tuple[float, float]] = []
    previous: tuple[float, float] | None = None
    for t, v in line.points:
        if line.step and previous is not None:
            vertices.append((frame.x(t), y(previous[1])))
        vertices.append((frame.x(t), y(v)))
        previous = (t, v)
    if previous is not None:
        vertices.append((frame.x(frame.end), y(previous[1])))
    if line.threshold is not None:
        parts.append(_threshold(line, frame, y(line.threshold), vertices))
    points = " ".join(f"{vx:.1f},{vy:.1f}" for vx, vy in vertices)
    parts.append(
        f'<polyline fill="none" stroke="{color}" stroke-width="2" '
        f'points="{points}"><title>{html.escape(line.name)}</title></polyline>'
    )
    return parts


def _threshold(
    line: Series, frame: _Frame, ty: float, vertices: Sequence[tuple[float, float]]
) -> str:
    """The threshold as a dashed line, its label where the series line does not cross it."""
    label = line.threshold_label or f"threshold {line.threshold:g}"
    w = _text_width(label)

    def clear(left: float, top: float) -> bool:
        # The series between the label's edges, its vertices and the segments between them.
        inside = [vy for vx, vy in vertices if left - 2 <= vx <= left + w + 2]
        before = [vy for vx, vy in vertices if vx < left][-1:]
        after = [vy for vx, vy in vertices if vx > left + w][:1]
        ys = inside + before + after
        return not any(top - 2 <= vy <= top + 13 for vy in ys) and not (
            ys and min(ys) < top and max(ys) > top + 11
        )

    candidates = [
        (frame.right - 4 - w, ty - 14),
        (frame.right - 4 - w, ty + 2),
        (frame.left + 4, ty - 14),
        (frame.left + 4, ty + 2),
    ]
    left, top = next((c for c in candidates if clear(*c)), candidates[0])
    return (
        f'<g class="threshold"><line x1="{frame.left}" y1="{ty:.1f}" x2="{frame.right}" '
        f'y2="{ty:.1f}" stroke="#cf222e" stroke-width="1" stroke-dasharray="6 3"/>'
        f'<text class="ph" x="{left:.1f}" y="{top + 10:.1f}" fill="#cf222e">'
        f"{html.escape(label)}</text></g>"
    )


def _axis(report: Report, frame: _Frame, top: float, axis_y: float) -> list[str]:
    """Wall-clock UTC ticks (the offset from the start under each), with grid lines."""
    parts = [f'<text class="ph" x="8" y="{axis_y + 14}">UTC</text>']
    for t in _ticks(report.started_at, frame.end):
        x = frame.x(t)
        # The outermost labels stay inside the chart.
        anchor = "start" if t < frame.end * 0.05 else "end" if t > frame.end * 0.95 else "middle"
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{top:.1f}" x2="{x:.1f}" y2="{axis_y:.1f}"/>'
            f'<text class="ph" x="{x:.1f}" y="{axis_y + 14}" text-anchor="{anchor}">'
            f"{_clock(report, t)}</text>"
            f'<text class="ph" x="{x:.1f}" y="{axis_y + 27}" text-anchor="{anchor}">'
            f"+{_fmt_t(t)}</text>"
        )
    return parts


def _chart(report: Report, width: int = 1100, row_height: int = 84) -> str:
    """The timeline: marker labels, the phase lane, one row per series, the time axis."""
    series = [s for s in report.series if s.points]
    if not series:
        return "<p>No timeline data.</p>"
    covered = [(report.ended_at - report.started_at).total_seconds()] if report.ended_at else []
    end = max(
        [p[0] for s in series for p in s.points]
        + [ph.end for ph in report.phases]
        + [m.at for m in report.markers]
        + covered
        + [1.0]
    )
    frame = _Frame(left=170, right=width - 20, end=end, width=width)
    _, marker_rows = _marker_labels(report, frame)
    lane = _lane(report, frame)
    lane_top = 8 + marker_rows * _LABEL_ROW + (4 if marker_rows else 0)
    rows_top = lane_top + lane.height + 6
    axis_y = rows_top + row_height * len(series)
    bands, blocks = _phase_parts(lane, lane_top, rows_top - 4, axis_y)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{axis_y + 34}" '
        f'viewBox="0 0 {width} {axis_y + 34}" role="img" aria-label="incident timeline">',
        "<style>text{font:12px system-ui,sans-serif;fill:#333}.ph{font-size:11px;fill:#555}"
        ".mk{font-size:11px;font-weight:600}.ax{stroke:#bbb;stroke-width:1}.grid{stroke:#eee}"
        "</style>",
    ]
    # Bands under everything; then the axis grid, the rows, the lane; markers on top.
    parts += bands
    parts += _axis(report, frame, rows_top - 4, axis_y)
    for index, line in enumerate(series):
        y0 = rows_top + index * row_height + 8
        parts += _series_row(line, index, frame, y0, y0 + row_height - 22)
    parts += blocks
    parts += _markers(report, frame, 8, axis_y)
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
        f"{c.result}</td></tr>"
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
        f"| {c.name} | {c.expected} | {c.actual} | {c.result if c.ok else '**FAIL**'} |"
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
