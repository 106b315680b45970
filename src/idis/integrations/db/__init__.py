"""Storage: engines, the declarative base, and the migrations runner."""

from __future__ import annotations

from ._base import Base, UTCDateTime, metadata
from ._engine import create_async_db_engine, create_db_engine, normalize_url, session_scope

__all__ = [
    "Base",
    "UTCDateTime",
    "create_async_db_engine",
    "create_db_engine",
    "metadata",
    "normalize_url",
    "session_scope",
]
