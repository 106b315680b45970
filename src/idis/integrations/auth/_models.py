"""The ``oauth_tokens`` table: one row per provider, the unit of locking for refreshes.

The row holds the provider's current token and, after a rotation, its client
credentials. Secrets are Fernet ciphertext (``*_enc`` columns, see
:mod:`.crypto`) or absent; everything else is metadata that ``check_token``
reads without any key. On PostgreSQL a refresh holds ``SELECT ... FOR UPDATE``
on this row, which is what makes it single-flight across processes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from ..db._base import Base, BigIntPK, JSONType, UTCDateTime

__all__ = ["STORED_STATES", "OAuthTokenRow"]

#: Values of ``oauth_tokens.state``.
STORED_STATES = ("ok", "refresh_failing", "reauthorization_required", "refresh_outcome_unknown")


class OAuthTokenRow(Base):
    """A provider's OAuth token and credential state."""

    __tablename__ = "oauth_tokens"
    __table_args__ = (CheckConstraint(f"state IN {STORED_STATES!r}", name="state"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    #: Provider name as configured (one row each).
    provider: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    #: Grant the token came from: client_credentials, refresh_token, imported.
    grant_type: Mapped[str] = mapped_column(String(32), nullable=False, default="")
    #: ``ok``, ``refresh_failing`` (retryable failures), ``reauthorization_required``, or
    #: ``refresh_outcome_unknown`` (a refresh's answer was lost: re-authorize).
    state: Mapped[str] = mapped_column(String(32), nullable=False, default="ok")
    #: Incremented on every new token; tells "a newer token exists" without decrypting.
    generation: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: ``Bearer`` (as the provider said).
    token_type: Mapped[str | None] = mapped_column(String(32))
    #: Fernet ciphertext of the access token; NULL when no key is configured.
    access_token_enc: Mapped[str | None] = mapped_column(Text)
    #: Fernet ciphertext of the refresh token, if the provider issued one.
    refresh_token_enc: Mapped[str | None] = mapped_column(Text)
    #: Granted scopes.
    scopes: Mapped[list[str]] = mapped_column(JSONType, nullable=False, default=list)
    #: When the current token was issued (UTC).
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: When the current token expires (UTC); NULL if the provider did not say.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Last successful refresh (or import).
    last_refresh_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Last refresh attempt, successful or not (in ``refresh_outcome_unknown``: when the
    #: request whose answer was lost was sent; the reuse grace counts from it).
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Outcome of the last attempt (the ``token_refreshes`` outcome label).
    last_outcome: Mapped[str | None] = mapped_column(String(32))
    #: Redacted description of the last failure; cleared by a success.
    last_error: Mapped[str | None] = mapped_column(Text)
    #: Failed attempts since the last success.
    consecutive_failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: No automatic attempt before this time (backoff after failures, shared by replicas).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Client id of rotated credentials (NULL: use the configured ones).
    client_id: Mapped[str | None] = mapped_column(String(255))
    #: Fernet ciphertext of a rotated client secret kept in the database.
    client_secret_enc: Mapped[str | None] = mapped_column(Text)
    #: Where rotated credentials live: ``vault`` or ``database``.
    credential_source: Mapped[str | None] = mapped_column(String(16))
    #: Vault KV version (or local counter) of the credentials in use.
    credential_version: Mapped[int | None] = mapped_column(Integer)
    #: When the credentials were last rotated.
    credentials_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: Last change to this row.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: The API base the token response named (Salesforce ``instance_url``); not a secret.
    instance_url: Mapped[str | None] = mapped_column(String(255))

    def __repr__(self) -> str:
        # Never show the *_enc columns: ciphertext is not a secret, but it is noise.
        return (
            f"OAuthTokenRow(provider={self.provider!r}, state={self.state!r}, "
            f"generation={self.generation}, expires_at={self.expires_at!r})"
        )
