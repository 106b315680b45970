"""auth: the token response's instance_url (Salesforce's API base for the org)

Revision ID: 0010_auth_instance_url
Revises: 0008_auth_outcome_unknown
Create Date: 2026-12-06

``oauth_tokens.instance_url`` keeps the ``instance_url`` a token response names
(Salesforce: the org's instance, the base of its REST API), so ``BASE_URL`` may be
the login host. Not a secret: stored in clear.

Expand-only: a nullable column; existing rows carry over with none (their calls keep
going to ``BASE_URL`` until the next refresh names the instance). Code of the
previous version neither reads nor writes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_auth_instance_url"
down_revision = "0008_auth_outcome_unknown"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("oauth_tokens", sa.Column("instance_url", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("oauth_tokens") as batch:
        batch.drop_column("instance_url")
