"""OAuth tokens, ``check_token``, single-flight refresh, credential rotation and Vault.

See ``docs/auth.md``. Public entry points are re-exported from
:mod:`idis.integrations` lazily; importing this package stays cheap (no
httpx, hvac or database import until a function needs it).
"""

from __future__ import annotations

__all__: list[str] = []
