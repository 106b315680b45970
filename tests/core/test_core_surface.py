"""The public surface is curated and stable, and the package imports the way RB-09 needs."""

from __future__ import annotations

import subprocess
import sys

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
