"""Lazy public surfaces, generated from one mapping per package.

Each package ``__init__`` declares which private module defines each public
name, once::

    _EXPORTS = {"._gateway": ("AsyncGateway", "Gateway"), "._breaker": ("Breaker",)}
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

and keeps a literal ``__all__`` and a ``TYPE_CHECKING`` import block for type
checkers and readers. ``tests/core/test_core_surface.py`` fails when the three
disagree, so the mapping stays the single source. Names load on first access
(``import idis.integrations`` stays cheap and table modules can be imported
without the gateway); each resolved name is cached in the package namespace.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["export_table", "lazy_exports"]


def export_table(exports: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """``{public name: module}`` from ``{module: names}``.

    Raises:
        ValueError: when two modules export the same name.
    """
    table: dict[str, str] = {}
    for module, names in exports.items():
        for name in names:
            if name in table:
                raise ValueError(f"{name!r} is exported by both {table[name]} and {module}")
            table[name] = module
    return table


def lazy_exports(
    package: str, exports: Mapping[str, Sequence[str]], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module-level ``__getattr__`` and ``__dir__`` serving ``exports`` lazily."""
    table = export_table(exports)
    namespace["_EXPORT_TABLE"] = table

    def __getattr__(name: str) -> Any:  # module-level __getattr__ (PEP 562)
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # module-level __dir__ (PEP 562)
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
