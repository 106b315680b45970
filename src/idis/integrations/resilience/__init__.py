"""The call pipeline: gateways, breakers, retries, rate limits, bulkheads, clocks."""

from __future__ import annotations

from .._clock import Clock, ManualClock, SystemClock, system_clock
from ._breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerTransition
from ._gateway import AsyncGateway, Gateway, HealthReport

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
    "ManualClock",
    "SystemClock",
    "system_clock",
]
