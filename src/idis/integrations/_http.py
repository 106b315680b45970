"""The one place the HTTP client library is imported.

httpx 0.28 is the last release of httpx; its maintained successor httpx2 has
the same API. Every module imports ``httpx`` from here, so moving is a
one-line change (and respx, which patches httpx only, keeps working until then).
"""

from __future__ import annotations

import httpx

__all__ = ["httpx"]
