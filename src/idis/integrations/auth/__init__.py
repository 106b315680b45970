"""OAuth tokens, ``check_token``, single-flight refresh, credential rotation and Vault.

See ``docs/auth.md``. The public names are below; everything else in the
package is internal. Importing this package stays cheap (no httpx, hvac or
database import until a name is used). The exceptions live in
:mod:`idis.integrations.exceptions` (``AuthError`` and its subclasses,
``SecretStoreError``/``SecretStoreRefused``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._grant import AccessToken
    from ._httpx_auth import OAuth2Auth, oauth_auth_factory
    from ._rotation import RotationResult, rotate_credentials
    from ._status import TokenStatus, check_token
    from ._tokens import (
        AsyncTokenManager,
        RefreshResult,
        TokenHold,
        TokenManager,
        import_token,
        reencrypt_tokens,
        refresh_tokens,
    )
    from ._vault import VaultStore

__all__ = [
    "AccessToken",
    "AsyncTokenManager",
    "OAuth2Auth",
    "RefreshResult",
    "RotationResult",
    "TokenHold",
    "TokenManager",
    "TokenStatus",
    "VaultStore",
    "check_token",
    "import_token",
    "oauth_auth_factory",
    "reencrypt_tokens",
    "refresh_tokens",
    "rotate_credentials",
]

_EXPORTS: dict[str, tuple[str, ...]] = {
    "._grant": ("AccessToken",),
    "._httpx_auth": ("OAuth2Auth", "oauth_auth_factory"),
    "._rotation": ("RotationResult", "rotate_credentials"),
    "._status": ("TokenStatus", "check_token"),
    "._tokens": (
        "AsyncTokenManager",
        "RefreshResult",
        "TokenHold",
        "TokenManager",
        "import_token",
        "reencrypt_tokens",
        "refresh_tokens",
    ),
    "._vault": ("VaultStore",),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
