"""What the docs point at exists: links, modules, dotted names, CLI commands, the mutation table.

The private-module rename (issue 12) left pages naming ``outbox/worker.py`` after it
became ``_worker.py``; a reader following them found nothing. These checks read the
README, every page of docs/ and the example service's README.
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import click
import pytest

from idis.integrations.cli import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "idis" / "integrations"
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "examples" / "integrations_service" / "README.md",
]
#: Where a backticked ``something.py`` may live, besides next to the page.
_BASES = [ROOT, PACKAGE, ROOT / "src", ROOT / "tests", ROOT / "examples"]
_SEARCHED = ["src", "tests", "examples", "scripts", "benchmarks", "migrations"]

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_PY_PATH = re.compile(r"`([\w./-]+\.py)(?::[\w.]+)?`")
_DOTTED = re.compile(r"\bidis\.integrations(?:\.\w+)+")
_CODE = re.compile(r"^```[^\n]*\n(.*?)^```|`([^`\n]+)`", re.M | re.S)
_COMMAND = re.compile(r"\bidis-integrations[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?")


def _page_ids() -> list[str]:
    return [str(page.relative_to(ROOT)) for page in PAGES]


def _code(text: str) -> str:
    """Fenced blocks and inline code spans: where a command is written to be run."""
    return "\n".join(m.group(1) or m.group(2) for m in _CODE.finditer(text))


def _py_exists(name: str, page: Path) -> bool:
    if any((base / name).is_file() for base in [page.parent, *_BASES]):
        return True
    if "/" in name:
        return False
    return any(any((ROOT / top).rglob(name)) for top in _SEARCHED)


def _resolves(dotted: str) -> bool:
    """``idis.integrations.a.b.C.d``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_pages_are_found() -> None:
    """Not vacuous: the pages exist and the architecture page is among them."""
    assert all(page.is_file() for page in PAGES)
    assert ROOT / "docs" / "architecture.md" in PAGES
    assert len(PAGES) >= 15


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_relative_links_lead_to_files(page: Path) -> None:
    """Every link that is not a URL or an anchor names a file or folder that exists."""
    links = _LINK.findall(page.read_text(encoding="utf-8"))
    local = [link for link in links if not link.startswith(("http://", "https://", "#"))]

    assert [] == [link for link in local if not (page.parent / link.split("#")[0]).exists()]


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_python_files_named_exist(page: Path) -> None:
    """Every backticked ``path.py`` is a file of the repository (after the `_name.py` rename)."""
    named = _PY_PATH.findall(page.read_text(encoding="utf-8"))

    assert [] == [name for name in named if not _py_exists(name, page)]


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_dotted_names_import(page: Path) -> None:
    """Every ``idis.integrations.x.y`` is a module or an attribute of one (mutmut's names aside)."""
    names = set(_DOTTED.findall(page.read_text(encoding="utf-8")))

    assert [] == sorted(n for n in names if "__mutmut_" not in n and not _resolves(n))


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_cli_commands_exist(page: Path) -> None:
    """Every ``idis-integrations CMD [SUB]`` in code is a command (and subcommand) of the CLI."""
    wrong = []
    for command, sub in _COMMAND.findall(_code(page.read_text(encoding="utf-8"))):
        found = main.commands.get(command)
        if found is None:
            wrong.append(command)
        elif sub and isinstance(found, click.Group) and sub not in found.commands:
            wrong.append(f"{command} {sub}")

    assert [] == wrong


def test_the_checks_catch_what_they_look_for(tmp_path: Path) -> None:
    """A renamed module, a missing link target, a bad name and command are all reported."""
    page = tmp_path / "page.md"

    assert not _py_exists("outbox/worker.py", page)
    assert _py_exists("outbox/_worker.py", page)
    assert _resolves("idis.integrations.outbox.AsyncOutboxWorker")
    assert not _resolves("idis.integrations.outbox.NoSuchThing")
    assert _COMMAND.findall(_code("run `idis-integrations db upgrade` now")) == [("db", "upgrade")]
    assert _COMMAND.findall(_code("idis-integrations is a library")) == []


def test_the_mutation_table_names_modules_and_tests_that_exist() -> None:
    """scripts/mutation_modules.toml (read by `make mutate`) follows module and test renames."""
    table = tomllib.loads((ROOT / "scripts" / "mutation_modules.toml").read_text("utf-8"))
    modules = [*table["modules"], *table.get("skip", {})]

    assert "outbox/_policy" in modules
    assert [] == [m for m in modules if not (PACKAGE / f"{m}.py").is_file()]
    nodes = [node for tests in table["modules"].values() for node in tests]
    assert [] == [node for node in nodes if not _test_exists(node)]


def _test_exists(node: str) -> bool:
    """``path`` or ``path::test_name``: the file exists and defines the test."""
    path, _, name = node.partition("::")
    if not (ROOT / path).is_file():
        return False
    definition = rf"^(async )?def {re.escape(name)}\("
    return not name or re.search(definition, (ROOT / path).read_text(), re.M) is not None


def test_the_readme_links_every_docs_page() -> None:
    """README's Documentation list is the index: no page of docs/ is unreachable from it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {link.split("#")[0] for link in _LINK.findall(readme)}

    assert [] == [
        page.name
        for page in sorted((ROOT / "docs").glob("*.md"))
        if f"docs/{page.name}" not in linked
    ]
