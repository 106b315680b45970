"""The public surface is curated and stable, and the package imports the way RB-09 needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import idis.integrations as api


def test_all_is_sorted_and_matches_public_names() -> None:
    """__all__ is sorted, and every name in it resolves."""
    assert sorted(api.__all__) == api.__all__
    for name in api.__all__:
        assert getattr(api, name) is not None


def test_idis_is_a_namespace_package() -> None:
    """`idis` has no __init__.py (PEP 420), so other idis.* distributions can coexist."""
    import idis

    assert getattr(idis, "__file__", None) is None


def test_version_comes_from_metadata() -> None:
    """__version__ is served from the installed distribution's metadata."""
    from importlib.metadata import version

    assert version("idis-integrations") == api.__version__


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m idis.integrations --help` lists the same commands as the console script."""
    result = subprocess.run(
        [sys.executable, "-m", "idis.integrations", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert 0 == result.returncode
    assert "status" in result.stdout
    assert "db" in result.stdout


_PACKAGES = (
    "idis.integrations",
    "idis.integrations.auth",
    "idis.integrations.enrichment",
    "idis.integrations.outbox",
    "idis.integrations.reconciliation",
    "idis.integrations.resilience",
    "idis.integrations.sync",
    "idis.integrations.webhooks",
)


def _type_checking_imports(module: object) -> dict[str, str]:
    """{name: relative module} imported under ``if TYPE_CHECKING:`` in a package __init__."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom)
                for alias in stmt.names:
                    found[alias.asname or alias.name] = "." * stmt.level + (stmt.module or "")
    return found


@pytest.mark.parametrize("package", _PACKAGES)
def test_lazy_surface_is_generated_from_one_mapping(package: str) -> None:
    """__all__, the export mapping and the TYPE_CHECKING imports list the same names."""
    import importlib

    module = importlib.import_module(package)
    table: dict[str, str] = module._EXPORT_TABLE
    eager = {name for name in module.__all__ if name not in table and name != "__version__"}

    assert len(set(module.__all__)) == len(module.__all__)
    assert table == {k: v for k, v in _type_checking_imports(module).items() if k in table}
    assert set(module.__all__) - {"__version__"} == set(table) | eager
    for name in module.__all__:
        assert getattr(module, name) is not None


@pytest.mark.parametrize("package", _PACKAGES)
def test_unknown_names_raise_attribute_error(package: str) -> None:
    """A name the package does not export is an AttributeError naming it."""
    import importlib

    module = importlib.import_module(package)

    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018


def test_background_workers_are_async_only() -> None:
    """Issue 12: one outbox worker, on asyncio; the sync twin and its sync strategy are gone."""
    import importlib
    import inspect

    top = importlib.import_module("idis.integrations")
    outbox = importlib.import_module("idis.integrations.outbox")

    for module in (top, outbox):
        for gone in ("OutboxWorker", "GatewayDelivery", "Deliver"):
            assert gone not in module.__all__
            with pytest.raises(AttributeError):
                getattr(module, gone)
    assert top.AsyncOutboxWorker is outbox.AsyncOutboxWorker
    assert inspect.iscoroutinefunction(outbox.AsyncOutboxWorker.run_once)
    # The request path keeps both faces.
    assert not inspect.iscoroutinefunction(outbox.enqueue)
    assert inspect.iscoroutinefunction(outbox.enqueue_async)
