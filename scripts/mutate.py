"""Mutation testing of the decision modules with mutmut, one module at a time (`make mutate`).

For each module of scripts/mutation_modules.toml this script:

1. builds a scratch directory reports/mutmut/<module>/ whose ``src``, ``tests`` and
   ``migrations`` are symlinks to this checkout and whose pyproject.toml is ours with the
   ``[tool.mutmut]`` section completed for that module (``only_mutate``, its tests, a mypy
   filter). mutmut copies the sources into <scratch>/mutants/ and mutates the copy there:
   the working tree is never written to, whatever happens to the run;
2. runs ``mutmut run --max-children N`` there;
3. reads the verdicts (``mutmut results``) and each surviving mutant's diff (``mutmut show``),
   and maps the diff back to a file:line of the real source.

It writes reports/mutation.md and prints a summary table. Survivors do not fail the run (this
reports, it does not gate): the exit code is 0 unless mutmut itself failed (1), a module name
was wrong (2) or the run was interrupted (130).

Usage: .venv/bin/python scripts/mutate.py [--module outbox/_policy[,sync/_mode]] [--max-children 2]
       .venv/bin/python scripts/mutate.py --report-only   (re-read the last run's verdicts)
"""

# A command-line tool: it prints, and it runs the venv's own mutmut.
# ruff: noqa: T201, S603

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "scripts" / "mutation_modules.toml"
PACKAGE = "src/idis/integrations"
WORK = ROOT / "reports" / "mutmut"
REPORT = ROOT / "reports" / "mutation.md"
BIN = Path(sys.executable).parent

#: mutmut's verdicts, grouped. A timeout or a crash is a test run that failed: killed.
KILLED = ("killed", "timeout", "segfault")
#: mypy rejects the mutant, so CI (``make typecheck``) stops it before any test could.
TYPED = ("caught by type check",)
UNDETECTED = ("survived", "no tests", "suspicious")

#: mypy settings for the type filter: the project's strict flags would also flag mutmut's own
#: scaffolding (its trampolines); a mutant only needs to be rejected for a real type error.
MYPY_INI = """\
[mypy]
python_version = 3.11
mypy_path = src
explicit_package_bases = True
namespace_packages = True
follow_imports = silent
ignore_missing_imports = True
"""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: stop mutmut, report what is done, exit 130."""


@dataclass
class Survivor:
    name: str
    status: str
    location: str
    before: str
    after: str

    @property
    def text_only(self) -> bool:
        """Only a string's text changed (mutmut's ``"XX…XX"`` and case mutations)."""
        return self.before != self.after and (
            self.after.replace("XX", "") == self.before or self.after.lower() == self.before.lower()
        )


@dataclass
class ModuleRun:
    module: str
    tests: list[str]
    counts: Counter[str] = field(default_factory=Counter)
    survivors: list[Survivor] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    interrupted: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts[s] for s in KILLED + TYPED + UNDETECTED)

    @property
    def killed(self) -> int:
        return sum(self.counts[s] for s in KILLED)

    @property
    def score(self) -> float | None:
        """Killed by a test, out of the mutants mypy accepts (the ones only a test can catch)."""
        testable = self.killed + sum(self.counts[s] for s in UNDETECTED)
        return 100.0 * self.killed / testable if testable else None


# --------------------------------------------------------------------------- configuration


def load_table() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The module table: {module: tests} and {module: reason it is skipped}."""
    data = tomllib.loads(TABLE.read_text("utf-8"))
    modules = {str(k): [str(t) for t in v] for k, v in data.get("modules", {}).items()}
    skipped = {str(k): str(v) for k, v in data.get("skip", {}).items()}
    return modules, skipped


def source_file(module: str) -> Path:
    return Path(PACKAGE) / f"{module}.py"


def check_module(module: str, tests: list[str]) -> None:
    """Fail early, naming the bad entry, before any mutant runs."""
    if not (ROOT / source_file(module)).is_file():
        raise SystemExit(
            f"mutate: {TABLE.relative_to(ROOT)} lists {module!r}, but {source_file(module)} "
            "does not exist; update the table"
        )
    if not tests:
        raise SystemExit(f"mutate: {module!r} lists no tests in {TABLE.relative_to(ROOT)}")
    for test in tests:
        if not (ROOT / test.split("::")[0]).is_file():
            raise SystemExit(
                f"mutate: {module!r} lists the test {test!r}, which does not exist; "
                f"update {TABLE.relative_to(ROOT)}"
            )


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def scratch_pyproject(module: str, tests: list[str], scratch: Path) -> str:
    """Our pyproject.toml, its [tool.mutmut] section completed for ``module``."""
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    settings: dict[str, object] = dict(tomllib.loads(text)["tool"]["mutmut"])
    settings["only_mutate"] = [str(source_file(module))]
    settings["pytest_add_cli_args_test_selection"] = tests
    # mutmut recognises mypy by an argument equal to "mypy", hence `python -m mypy`.
    settings["type_check_command"] = [
        *(str(BIN / "python"), "-m", "mypy", "--config-file", str(scratch / "mypy.ini")),
        *("--output", "json", str(source_file(module))),
    ]
    section = "[tool.mutmut]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    return re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", lambda _: section + "\n", text)


def previous_run(module: str) -> Path:
    scratch = WORK / module.replace("/", ".")
    if not (scratch / "mutants").is_dir():
        raise RuntimeError(f"no previous run of {module} in {scratch}")
    return scratch


def prepare(module: str, tests: list[str]) -> Path:
    scratch = WORK / module.replace("/", ".")
    if scratch.exists():
        shutil.rmtree(scratch)  # a fresh run: mutmut would keep stale verdicts otherwise
    scratch.mkdir(parents=True)
    for name in ("src", "tests", "migrations"):
        (scratch / name).symlink_to(ROOT / name, target_is_directory=True)
    (scratch / "mypy.ini").write_text(MYPY_INI, "utf-8")
    (scratch / "pyproject.toml").write_text(scratch_pyproject(module, tests, scratch), "utf-8")
    return scratch


# --------------------------------------------------------------------------- running mutmut

_PROGRESS = re.compile(r"(\d+)/(\d+)\s+🎉 (\d+).*?🙁 (\d+)")


def run_mutmut(scratch: Path, max_children: int, label: str) -> int:
    """``mutmut run`` in ``scratch``; its output goes to mutmut.log, progress to our stdout."""
    log_path = scratch / "mutmut.log"
    tty = sys.stdout.isatty()
    last_print = 0.0
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "mutmut"), "run", "--max-children", str(max_children)],
            cwd=scratch,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            buffer = ""
            while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
                log.write(chunk)
                buffer = (buffer + chunk.decode("utf-8", "replace"))[-400:]
                found = _PROGRESS.findall(buffer)
                now = time.monotonic()
                if found and (tty or now - last_print >= 30):
                    done, total, _killed, survived = found[-1]
                    line = f"  {label}: {done}/{total} mutants, {survived} survived so far"
                    print(f"\r{line}" if tty else line, end="" if tty else "\n", flush=True)
                    last_print = now
            return proc.wait()
        except Interrupted:
            # mutmut stops its workers on SIGINT; a terminal's Ctrl-C already sent it one.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if tty:
                print(flush=True)


def mutmut_output(scratch: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "mutmut"), *args], cwd=scratch, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"mutmut {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


#: ``mutmut show`` for many mutants in one process (one `mutmut show` each costs ~1 s of
#: start-up): the same CLI command, called in-process through click.
_SHOW_MANY = """
import contextlib, io, json, sys
from mutmut.__main__ import cli
diffs = {}
for name in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["show", name], standalone_mode=False)
    diffs[name] = out.getvalue()
with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(diffs, f)
"""


def show_many(scratch: Path, names: list[str]) -> dict[str, str]:
    """{mutant name: its diff}, as ``mutmut show`` prints it."""
    target = scratch / "survivor-diffs.json"
    done = subprocess.run(
        [str(BIN / "python"), "-c", _SHOW_MANY, json.dumps(names), str(target)],
        cwd=scratch,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mutmut show failed: {done.stderr.strip()[-500:]}")
    diffs: dict[str, str] = json.loads(target.read_text("utf-8"))
    return diffs


def verdicts(scratch: Path) -> dict[str, str]:
    """{mutant name: status} from ``mutmut results --all true``."""
    out = mutmut_output(scratch, "results", "--all", "true")
    found = re.findall(r"^\s+(\S+): (.+)$", out, flags=re.MULTILINE)
    return {name: status.strip() for name, status in found}


# --------------------------------------------------------------------------- locating survivors


def _function_span(tree: ast.Module, mutant: str) -> tuple[int, int] | None:
    """Lines of the function a mutant name points at (``x_f__mutmut_3``, ``xǁCǁm__mutmut_3``)."""
    local = mutant.rsplit(".", 1)[-1]
    local = re.sub(r"__mutmut_\d+$", "", local)
    parts = [p for p in local.split("ǁ") if p] if "ǁ" in local else [local.removeprefix("x_")]
    if parts and parts[0] == "x":
        parts = parts[1:]
    body: list[ast.stmt] = tree.body
    node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef | None = None
    for part in parts:
        node = next(
            (
                n
                for n in body
                if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.name == part
            ),
            None,
        )
        if node is None:
            return None
        body = node.body
    if node is None:
        return None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return start, node.end_lineno or node.lineno


def locate(
    diff: str, source_lines: list[str], span: tuple[int, int] | None
) -> tuple[int, str, str]:
    """(line, before, after) of the first change in a ``mutmut show`` diff, in the real file.

    The diff is of the function alone, so its line numbers are relative; the changed lines
    are found in the real file by their text, with their unchanged neighbours to tell
    repeated lines apart.
    """
    hunks = re.split(r"^@@[^\n]*@@\n", diff, flags=re.MULTILINE)[1:]
    first, last = span or (1, len(source_lines))
    for hunk in hunks:
        lines = [ln for ln in hunk.split("\n") if ln and ln[0] in " -+"]
        old = [(ln[0], ln[1:]) for ln in lines if ln[0] in " -"]
        removed = [text.strip() for kind, text in old if kind == "-"]
        added = [ln[1:].strip() for ln in lines if ln[0] == "+"]
        if not removed and not added:
            continue
        offset = next((i for i, (kind, _) in enumerate(old) if kind == "-"), len(old) - 1)
        wanted = [text.strip() for _, text in old]
        for start in range(first - 1, last):
            window = [s.strip() for s in source_lines[start : start + len(wanted)]]
            if window == wanted:
                return start + offset + 1, " ⏎ ".join(removed), " ⏎ ".join(added)
        for number in range(first, last + 1):  # the mutant reformatted its neighbours
            if removed and source_lines[number - 1].strip() == removed[0]:
                return number, " ⏎ ".join(removed), " ⏎ ".join(added)
        return first, " ⏎ ".join(removed), " ⏎ ".join(added)
    return first, "", ""


def survivors(scratch: Path, module: str, found: dict[str, str]) -> list[Survivor]:
    path = ROOT / source_file(module)
    text = path.read_text("utf-8")
    tree, lines = ast.parse(text), text.splitlines()
    result = []
    names = [name for name, status in found.items() if status in UNDETECTED]
    for name, diff in show_many(scratch, names).items():
        status = found[name]
        line, before, after = locate(diff, lines, _function_span(tree, name))
        result.append(Survivor(name, status, f"{source_file(module)}:{line}", before, after))
    result.sort(key=lambda s: (int(s.location.rsplit(":", 1)[1]), _natural(s.name)))
    return result


def _natural(name: str) -> tuple[str, int]:
    stem, _, number = name.rpartition("_")
    return (stem, int(number) if number.isdigit() else 0)


# --------------------------------------------------------------------------- reporting


def _score(run: ModuleRun) -> str:
    if run.error:
        return "tool failed"
    return "n/a" if run.score is None else f"{run.score:.1f}%"


def table(runs: list[ModuleRun], skipped: dict[str, str]) -> list[str]:
    head = ["module", "mutants", "killed", "mypy", "survived", "no tests", "score", "time"]
    rows = [
        [
            r.module + (" (interrupted)" if r.interrupted else ""),
            str(r.total),
            str(r.killed),
            str(r.counts["caught by type check"]),
            str(r.counts["survived"] + r.counts["suspicious"]),
            str(r.counts["no tests"]),
            _score(r),
            f"{r.seconds / 60:.1f} min",
        ]
        for r in runs
    ]
    rows += [[m, "-", "-", "-", "-", "-", "skipped", "-"] for m in skipped]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def _code(text: str, limit: int = 100) -> str:
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return "`` " + text.replace("|", "\\|") + " ``"


_CLASSES = ("word", "op", "quote")


def _class(char: str) -> str | None:
    if char.isalnum() or char in "_.":
        return "word"
    if char in "<>=!+-*/%&|^~":
        return "op"
    return "quote" if char in "'\"" else None


def change(before: str, after: str) -> str:
    """The mutation alone: ``<=`` → ``<``, ``"orig"`` → ``"XXorigXX"``, or what was deleted."""
    short = min(len(before), len(after))
    start = 0
    while start < short and before[start] == after[start]:
        start += 1
    end = 0
    while end < short - start and before[-1 - end] == after[-1 - end]:
        end += 1

    def inner(at: int) -> str | None:  # a changed character next to the boundary
        text = before if start < len(before) - end else after
        return _class(text[at]) if 0 <= at < len(text) else None

    # Widen to whole tokens, so 0.0 → 1.0 does not read as 0 → 1, nor <= → < as "deleted =".
    first = inner(start)
    while (
        start > 0 and _class(before[start - 1]) is not None and _class(before[start - 1]) == first
    ):
        start -= 1
    last = inner(len(before if start < len(before) - end else after) - end - 1)
    while end > 0 and _class(before[-end]) is not None and _class(before[-end]) == last:
        end -= 1
    if start > 0 and end > 0 and _class(before[start - 1]) == _class(before[-end]) == "quote":
        start, end = start - 1, end - 1  # a string literal: show its quotes
    old = before[start : len(before) - end].strip()
    new = after[start : len(after) - end].strip()
    if not new:
        return f"deleted {_code(old, 60)}"
    if not old:
        return f"inserted {_code(new, 60)}"
    return f"{_code(old, 60)} → {_code(new, 60)}"


def _survivor_line(s: Survivor) -> str:
    tag = "" if s.status == "survived" else f" ({s.status})"
    return (
        f"- `{s.location}`{tag}: {change(s.before, s.after)} in {_code(s.before)} "
        f"<sub>{s.name.rsplit('.', 1)[-1]}</sub>"
    )


def write_report(runs: list[ModuleRun], skipped: dict[str, str], command: str) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = mutmut_version()
    out = [
        "# Mutation testing report",
        "",
        f"{now}, `{command}`, mutmut {version}, {os.cpu_count()} cores.",
        "Score: mutants a test killed, out of the mutants mypy accepts (the mypy column is",
        'rejected before any test ran). How to read it: docs/testing.md, "Mutation testing".',
        "",
        *table(runs, skipped),
        "",
    ]
    for module, reason in skipped.items():
        out.append(f"- `{module}` skipped: {reason}")
    for run in runs:
        out += ["", f"## {run.module}", ""]
        out.append("Tests: " + ", ".join(f"`{t}`" for t in run.tests) + ".")
        out.append(f"Work directory: `{(WORK / run.module.replace('/', '.')).relative_to(ROOT)}`.")
        out.append("")
        if run.error:
            out += ["mutmut failed:", "", "```", run.error, "```"]
            continue
        if not run.survivors:
            out.append("No surviving mutant.")
        logic = [s for s in run.survivors if not s.text_only]
        text = [s for s in run.survivors if s.text_only]
        if run.survivors:
            out += [f"{len(logic)} survivors change logic, {len(text)} only a string's text.", ""]
        out += [_survivor_line(s) for s in logic]
        if text:
            out += [
                "",
                f"<details><summary>{len(text)} more only change a string's text (messages, "
                "labels): a test pins them only if the text matters</summary>",
                "",
                *(_survivor_line(s) for s in text),
                "",
                "</details>",
            ]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(out) + "\n", "utf-8")


def mutmut_version() -> str:
    try:
        from importlib.metadata import version

        return version("mutmut")
    except Exception:  # noqa: BLE001 (a report without the version is still a report)
        return "?"


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--module",
        default="",
        help="comma-separated modules from scripts/mutation_modules.toml (default: all)",
    )
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutants (default 2)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the last run's verdicts, running nothing",
    )
    args = parser.parse_args(argv)
    if args.max_children < 1:
        parser.error(f"--max-children must be at least 1, got {args.max_children}")

    modules, skipped = load_table()
    wanted = [m.strip().removesuffix(".py") for m in args.module.split(",") if m.strip()]
    for module in wanted:
        if module in skipped:
            parser.error(f"module {module!r} is skipped: {skipped[module]}")
        if module not in modules:
            parser.error(
                f"unknown module {module!r}; expected one of: {', '.join(modules)} "
                f"(the keys of {TABLE.relative_to(ROOT)})"
            )
    selected = wanted or list(modules)
    for module in selected:
        check_module(module, modules[module])
    if not shutil.which("mutmut", path=str(BIN)):
        raise SystemExit(f"mutate: mutmut is not installed in {BIN}; run `make mutate`")

    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    command = "make mutate" + (f" MODULE={args.module}" if args.module else "")
    runs: list[ModuleRun] = []
    failed = interrupted = False
    print(
        f"mutate: {len(selected)} module(s), {args.max_children} at a time; log per module in "
        f"{WORK.relative_to(ROOT)}/<module>/mutmut.log",
        flush=True,
    )
    try:
        for module in selected:
            run = ModuleRun(module, modules[module])
            runs.append(run)
            started = time.monotonic()
            print(f"mutate: {module} ...", flush=True)
            try:
                if args.report_only:
                    scratch, code = previous_run(module), 0
                else:
                    scratch = prepare(module, run.tests)
                    code = run_mutmut(scratch, args.max_children, module)
                found = verdicts(scratch)
                run.counts = Counter(found.values())
                if code != 0 or not found:
                    log = (scratch / "mutmut.log").read_text("utf-8", "replace")
                    tail = "\n".join(re.split(r"[\r\n]+", log)[-25:])
                    run.error = f"mutmut exited with {code}; end of {scratch}/mutmut.log:\n{tail}"
                    failed = True
                else:
                    run.survivors = survivors(scratch, module, found)
            except Interrupted:
                run.interrupted = interrupted = True
                with contextlib.suppress(Exception):
                    run.counts = Counter(verdicts(WORK / module.replace("/", ".")).values())
                raise
            except (RuntimeError, OSError) as exc:
                run.error, failed = str(exc), True
            finally:
                run.seconds = time.monotonic() - started
            print(f"mutate: {module}: {_score(run)}, {len(run.survivors)} not killed", flush=True)
    except Interrupted:
        print("\nmutate: interrupted; the report covers what finished", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        listed_skips = {m: r for m, r in skipped.items() if not wanted}
        write_report(runs, listed_skips, command)
        print()
        print("\n".join(table(runs, listed_skips)))
        print(f"\nSurvivors, each with its file:line and mutation: {REPORT.relative_to(ROOT)}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
