"""An example integrations-service: the library embedded the way the real service embeds it.

A Starlette app (:func:`create_app`) configured from the environment only:
inbound webhooks and failover to polling, a ``deals`` table pushed to the CRM
through the outbox, claims enriched with deferral and stale defects,
``/metrics``, ``/healthz`` and ``/status``. Run it from ``examples/``::

    python -m integrations_service

See ``README.md`` beside this file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the RB-09 scripts importing only the handlers
    # (IDIS_HANDLERS=integrations_service.handlers:register) do not load the app.
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServiceSettings":
        from .config import ServiceSettings

        return ServiceSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
