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

**Each value is bound to its row and column.** Fernet has no associated data,
so the binding travels inside the authenticated plaintext: ``idis:v1``, the
provider, the field, then the value, NUL-separated. Fernet's HMAC covers all
of it, so a ciphertext copied into another provider's row (or another column)
decrypts to a binding that does not match and is refused, never handed to the
wrong provider. Values written before the binding existed (no prefix) are
still read (read-time fallback) and become bound the next time they are
written, or all at once with ``idis-integrations reencrypt-tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..config import Secret
from ..exceptions import AuthError, ConfigError

__all__ = ["KEYS_VARIABLE", "TokenCipher", "generate_key"]

#: The environment variable holding the keys, newest first, comma-separated.
KEYS_VARIABLE = "IDIS_ENCRYPTION_KEYS"
#: Marks a bound value (``idis:v1 NUL provider NUL field NUL value``) inside the ciphertext.
_BINDING = b"idis:v1"


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

    def encrypt(self, value: str, *, provider: str, field: str, what: str = "the token") -> str:
        """Encrypt ``value`` for ``provider``'s ``field`` with the newest key; ASCII ciphertext."""
        return self.require(what).encrypt(_bind(value, provider, field)).decode("ascii")

    def encrypt_optional(self, value: str | None, *, provider: str, field: str) -> str | None:
        """Encrypt ``value`` when a key is configured; None otherwise (keep it in memory only)."""
        if value is None or self._fernet is None:
            return None
        return self._fernet.encrypt(_bind(value, provider, field)).decode("ascii")

    def decrypt(self, ciphertext: str, *, provider: str, field: str) -> str:
        """Decrypt ciphertext written for ``provider``'s ``field`` with any configured key.

        Raises:
            ConfigError: when no key is configured.
            AuthError: when no configured key decrypts it (a key was dropped too early),
                or it was written for another provider or field (copied between rows).
        """
        fernet = self.require(f"the stored {field.replace('_', ' ')} of {provider!r}")
        try:
            raw = fernet.decrypt(ciphertext.encode("ascii"))
        except InvalidToken:
            raise AuthError(
                f"a stored secret of provider {provider!r} cannot be decrypted with any key in "
                f"{KEYS_VARIABLE}: restore the key it was written with (keep old keys listed "
                "until `idis-integrations reencrypt-tokens` has run), or re-import the token",
                provider=provider,
            ) from None
        return _unbind(raw, provider, field)

    def reencrypt(self, ciphertext: str, *, provider: str, field: str) -> str:
        """Re-encrypt ``ciphertext`` with the newest key, bound to ``provider`` and ``field``.

        Also binds values written before the binding existed.
        """
        try:
            value = self.decrypt(ciphertext, provider=provider, field=field)
        except AuthError as exc:
            raise AuthError(f"{exc}; it was left as it is", provider=provider) from None
        return self.encrypt(value, provider=provider, field=field)


def _bind(value: str, provider: str, field: str) -> bytes:
    return b"\x00".join(
        (_BINDING, provider.encode("utf-8"), field.encode("utf-8"), value.encode("utf-8"))
    )


def _unbind(raw: bytes, provider: str, field: str) -> str:
    """The value inside ``raw``, after checking it was written for this provider and field."""
    if not raw.startswith(_BINDING + b"\x00"):
        # Written before values were bound (read-time fallback; rebound on the next write).
        return raw.decode("utf-8")
    parts = raw.split(b"\x00", 3)
    if len(parts) != 4:
        raise AuthError(
            f"a stored secret of provider {provider!r} is malformed: re-import the token",
            provider=provider,
        )
    _, bound_provider, bound_field, value = parts
    if bound_provider != provider.encode("utf-8") or bound_field != field.encode("utf-8"):
        # Never say which provider it belonged to: the row was tampered with, and
        # the text reaches logs.
        raise AuthError(
            f"the stored {field.replace('_', ' ')} of provider {provider!r} was encrypted for "
            "another provider or field (copied between rows?) and is refused: re-import the "
            f"token, or rotate the credentials of {provider!r}",
            provider=provider,
        )
    return value.decode("utf-8")
