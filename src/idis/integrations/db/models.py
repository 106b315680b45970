"""Imports every table module so that ``metadata`` describes the whole schema.

Alembic's env.py and the schema-drift test read ``metadata`` from here; a
capability that adds tables adds its import below.
"""

from __future__ import annotations

from .. import audit as _audit  # noqa: F401  # registers audit_events
from .base import Base, metadata

__all__ = ["Base", "metadata"]
