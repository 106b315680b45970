"""A provider you can break on purpose: the simulator every part of the library is tested against.

One ASGI app serves any number of providers under ``/p/{provider}`` (records,
changes feed, replay with retention, enrichment, OAuth, webhook receiver) and
a control API under ``/_control`` that injects faults, emits changes, steers
outbound webhooks and reports what happened. Serve it with
``idis-integrations simulate`` or, in tests, :func:`idis.integrations.testing.run_simulator`;
use :class:`SimulatorState` directly for in-process drills. See docs/simulator.md.
"""

from __future__ import annotations

from ._app import build_app
from ._control import SimulatorControl
from ._oauth import token_fingerprint
from ._state import RetentionExceeded, SimulatorInputError, SimulatorState

__all__ = [
    "RetentionExceeded",
    "SimulatorControl",
    "SimulatorInputError",
    "SimulatorState",
    "build_app",
    "token_fingerprint",
]
