"""auth: OAuth tokens and rotated credentials (secrets encrypted at rest)

Revision ID: 0005_auth
Revises: 0001_core
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import idis.integrations.db._base as idb

revision = "0005_auth"
down_revision = "0001_core"
branch_labels = ("auth",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oauth_tokens",
        sa.Column("id", idb.BigIntPK, primary_key=True, autoincrement=True),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("grant_type", sa.String(32), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("token_type", sa.String(32)),
        sa.Column("access_token_enc", sa.Text()),
        sa.Column("refresh_token_enc", sa.Text()),
        sa.Column("scopes", idb.JSONType, nullable=False),
        sa.Column("issued_at", idb.UTCDateTime()),
        sa.Column("expires_at", idb.UTCDateTime()),
        sa.Column("last_refresh_at", idb.UTCDateTime()),
        sa.Column("last_attempt_at", idb.UTCDateTime()),
        sa.Column("last_outcome", sa.String(32)),
        sa.Column("last_error", sa.Text()),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", idb.UTCDateTime()),
        sa.Column("client_id", sa.String(255)),
        sa.Column("client_secret_enc", sa.Text()),
        sa.Column("credential_source", sa.String(16)),
        sa.Column("credential_version", sa.Integer()),
        sa.Column("credentials_rotated_at", idb.UTCDateTime()),
        sa.Column("updated_at", idb.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_oauth_tokens")),
        sa.UniqueConstraint("provider", name=op.f("uq_oauth_tokens_provider")),
        sa.CheckConstraint(
            "state IN ('ok', 'refresh_failing', 'reauthorization_required')",
            name=op.f("ck_oauth_tokens_state"),
        ),
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
