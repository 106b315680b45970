"""Metrics and structured logs: definitions only; the application decides where they go."""

from __future__ import annotations

from ._logs import configure_logging, get_logger, redact, register_secret
from ._metrics import Metrics, get_metrics, metrics_app, set_default_metrics

__all__ = [
    "Metrics",
    "configure_logging",
    "get_logger",
    "get_metrics",
    "metrics_app",
    "redact",
    "register_secret",
    "set_default_metrics",
]
