"""idis.integrations: keep integrations-service alive and its data whole while providers fail.

The public surface is listed in ``__all__``; everything else is internal.
Heavy modules load on first use, so ``from idis.integrations import check_token``
(RB-09 Triage 3) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import Settings
from .exceptions import (
    AuthError,
    CircuitOpen,
    ConfigError,
    IntegrationError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UnknownProviderError,
    UsageError,
)

if TYPE_CHECKING:
    from .audit import list_audit_events, record_audit

__all__ = [
    "AuthError",
    "CircuitOpen",
    "ConfigError",
    "IntegrationError",
    "ProviderError",
    "ProviderRejected",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "Settings",
    "UnknownProviderError",
    "UsageError",
    "__version__",
    "list_audit_events",
    "record_audit",
]

#: Public name -> module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    "list_audit_events": ".audit",
    "record_audit": ".audit",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("idis-integrations")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
