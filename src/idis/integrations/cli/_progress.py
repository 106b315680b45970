"""Progress of long commands: counts and rate on a terminal, periodic plain lines otherwise.

On a terminal (stderr is a TTY) a rich progress bar shows the count (of the
total when known), the rate and the elapsed time. Through a pipe (``kubectl
exec`` without ``-t``, CI logs, ``| tee``) a bar would be noise or nothing, so
one plain line goes to stderr every ``every_seconds`` or ``every_items``, and a
last one when the work ends::

    reconciling crm_provider: 2,000 events (410/s, 4s)
    reconciling crm_provider: done, 3,512 events in 8s (439/s)

Stdout stays the command's result (tables, JSON) either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from .._clock import Clock, SystemClock
from .._timeparse import format_duration

__all__ = ["ProgressLines", "progress"]


def _rate(count: int, elapsed: float) -> str:
    return f"{count / elapsed:,.0f}/s" if elapsed > 0 else "-/s"


class ProgressLines:
    """The pipe form: a line per ``every_seconds`` or ``every_items``, and one at the end."""

    def __init__(
        self,
        description: str,
        *,
        unit: str,
        total: int | None,
        stream: IO[str],
        clock: Clock,
        every_seconds: float,
        every_items: int,
    ) -> None:
        self.description = description
        self.unit = unit
        self.total = total
        self.count = 0
        self._stream = stream
        self._clock = clock
        self._every_seconds = every_seconds
        self._every_items = every_items
        self._started = clock.monotonic()
        self._last_at = self._started
        self._last_count = 0

    def _amount(self) -> str:
        of = f" of {self.total:,}" if self.total is not None else ""
        return f"{self.count:,}{of} {self.unit}"

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more; print a line when enough time or items have passed."""
        self.count += n
        now = self._clock.monotonic()
        if (
            now - self._last_at >= self._every_seconds
            or self.count - self._last_count >= self._every_items
        ):
            elapsed = now - self._started
            self._line(
                f"{self._amount()} ({_rate(self.count, elapsed)}, {format_duration(elapsed)})"
            )
            self._last_at, self._last_count = now, self.count

    def finish(self, *, failed: bool = False) -> None:
        """The closing line: how many, how long, how fast (or where it stopped)."""
        elapsed = self._clock.monotonic() - self._started
        word = "stopped after" if failed else "done,"
        self._line(
            f"{word} {self._amount()} in {format_duration(elapsed)} ({_rate(self.count, elapsed)})"
        )

    def _line(self, text: str) -> None:
        self._stream.write(f"{self.description}: {text}\n")
        self._stream.flush()


@contextmanager
def progress(
    description: str,
    *,
    unit: str = "items",
    total: int | None = None,
    stream: IO[str] | None = None,
    tty: bool | None = None,
    clock: Clock | None = None,
    every_seconds: float = 10.0,
    every_items: int = 1000,
) -> Iterator[Callable[[int], None]]:
    """Show the progress of a long command; yields ``advance(n)``.

    Args:
        description: what is being done (``reconciling crm_provider``).
        unit: what is counted (``events``, ``records``).
        total: how many there will be, when known.
        stream: where progress goes (default: stderr, keeping stdout for results).
        tty: force the terminal (True) or pipe (False) form; default: ``stream.isatty()``.
        clock: time source of the pipe form's rate and interval.
        every_seconds: pipe form: a line at least this often while items arrive.
        every_items: pipe form: a line after this many items at the latest.
    """
    out = stream if stream is not None else sys.stderr
    on_terminal = out.isatty() if tty is None else tty
    if on_terminal:
        yield from _bar(description, unit=unit, total=total, stream=out)
        return
    lines = ProgressLines(
        description,
        unit=unit,
        total=total,
        stream=out,
        clock=clock or SystemClock(),
        every_seconds=every_seconds,
        every_items=every_items,
    )
    try:
        yield lines.advance
    except BaseException:
        lines.finish(failed=True)
        raise
    lines.finish()


class _Rate(ProgressColumn):
    """Items per second (rich's own speed column shows bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        """The task's current speed in units per second."""
        speed = task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class _Count(ProgressColumn):
    """How many so far, of the total when known."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        """``1,234 of 2,000 events`` or ``1,234 events``."""
        of = f" of {task.total:,.0f}" if task.total is not None else ""
        return Text(f"{task.completed:,.0f}{of} {self.unit}")


def _bar(
    description: str, *, unit: str, total: int | None, stream: IO[str]
) -> Iterator[Callable[[int], None]]:
    columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns.append(BarColumn())
    columns += [_Count(unit), _Rate(unit), TimeElapsedColumn()]
    console = Console(file=stream, highlight=False)
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
