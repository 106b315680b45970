"""Encryption at rest for tokens and client secrets: Fernet keys from ``IDIS_ENCRYPTION_KEYS``.

The keys are listed newest first. New values are always encrypted with the
first key; any listed key decrypts, so rotating keys is: put a new key in
front, restart, run ``idis-integrations reencrypt-tokens`` (every stored value
is re-encrypted with the new key), then drop the old key.

With no key configured nothing secret is written: token *metadata* (expiry,
scopes, refresh history, errors) still reaches the database, so
``check_token`` works, but tokens themselves live in process memory only,
and anything that cannot work that way (refresh tokens, imported tokens,
rotated secrets kept in the database) refuses with a :class:`ConfigError`
naming ``IDIS_ENCRYPTION_KEYS``. Plaintext is never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..config import Secret
from ..exceptions import AuthError, ConfigError

__all__ = ["KEYS_VARIABLE", "TokenCipher", "generate_key"]

#: The environment variable holding the keys, newest first, comma-separated.
KEYS_VARIABLE = "IDIS_ENCRYPTION_KEYS"


def generate_key() -> str:
    """Return a new random Fernet key (url-safe base64, 32 bytes)."""
    return Fernet.generate_key().decode("ascii")


class TokenCipher:
    """Encrypts and decrypts secrets with the configured Fernet keys (thread-safe).

    Args:
        keys: Fernet keys, newest first. Empty means "no encryption available".
    """

    def __init__(self, keys: Sequence[Secret]) -> None:
        self._fernet: MultiFernet | None = (
            MultiFernet([Fernet(k.get_secret_value().encode("ascii")) for k in keys])
            if keys
            else None
        )

    @property
    def available(self) -> bool:
        """Whether at least one key is configured."""
        return self._fernet is not None

    def require(self, what: str) -> MultiFernet:
        """Return the cipher, or raise naming the variable to set.

        Raises:
            ConfigError: when no key is configured.
        """
        if self._fernet is None:
            raise ConfigError(
                f"{KEYS_VARIABLE} is not set: {what} would have to be stored in plaintext, "
                "which this library never does. Generate a key with "
                f"`idis-integrations keygen` and set {KEYS_VARIABLE}",
                variable=KEYS_VARIABLE,
            )
        return self._fernet

    def encrypt(self, value: str, *, what: str = "the token") -> str:
        """Encrypt ``value`` with the newest key; return ASCII ciphertext."""
        return self.require(what).encrypt(value.encode("utf-8")).decode("ascii")

    def encrypt_optional(self, value: str | None) -> str | None:
        """Encrypt ``value`` when a key is configured; None otherwise (keep it in memory only)."""
        if value is None or self._fernet is None:
            return None
        return self._fernet.encrypt(value.encode("utf-8")).decode("ascii")

    def decrypt(self, ciphertext: str, *, provider: str = "") -> str:
        """Decrypt ciphertext written with any configured key.

        Raises:
            ConfigError: when no key is configured.
            AuthError: when no configured key decrypts it (a key was dropped too early).
        """
        fernet = self.require("stored tokens")
        try:
            return fernet.decrypt(ciphertext.encode("ascii")).decode("utf-8")
        except InvalidToken:
            raise AuthError(
                f"a stored secret of provider {provider!r} cannot be decrypted with any key in "
                f"{KEYS_VARIABLE}: restore the key it was written with (keep old keys listed "
                "until `idis-integrations reencrypt-tokens` has run), or re-import the token",
                provider=provider,
            ) from None

    def reencrypt(self, ciphertext: str, *, provider: str = "") -> str:
        """Re-encrypt ``ciphertext`` with the newest key (key rotation)."""
        fernet = self.require("stored tokens")
        try:
            return fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise AuthError(
                f"a stored secret of provider {provider!r} cannot be decrypted with any key in "
                f"{KEYS_VARIABLE}; it was left as it is",
                provider=provider,
            ) from None
