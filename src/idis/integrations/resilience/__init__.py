"""The call pipeline: gateways, breakers, retries, rate limits, bulkheads, health records.

What a host uses::

    from idis.integrations.resilience import AsyncGateway, Gateway, HealthSampler

``Gateway`` / ``AsyncGateway`` make every provider call (one call flow, see
``_gateway.py``); ``HealthSampler`` records breaker transitions and health
samples for ``status`` and ``postmortem``; ``MemoryBreakerStores`` lets several
gateways of one process share their breakers (``breaker_storage=``; Redis does it
across replicas); ``Breaker`` and the state names are for operators and tests;
the clocks are re-exported from the foundation.
Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .._clock import Clock, ManualClock, SystemClock, system_clock
    from ._breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerTransition
    from ._gateway import AsyncGateway, Gateway, HealthReport
    from ._recorder import HealthSampler
    from ._shared import MemoryBreakerStores

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "AsyncGateway",
    "Breaker",
    "BreakerTransition",
    "Clock",
    "Gateway",
    "HealthReport",
    "HealthSampler",
    "ManualClock",
    "MemoryBreakerStores",
    "SystemClock",
    "system_clock",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._breaker": ("CLOSED", "HALF_OPEN", "OPEN", "Breaker", "BreakerTransition"),
    "._gateway": ("AsyncGateway", "Gateway", "HealthReport"),
    "._recorder": ("HealthSampler",),
    "._shared": ("MemoryBreakerStores",),
    ".._clock": ("Clock", "ManualClock", "SystemClock", "system_clock"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
