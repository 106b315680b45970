"""auth: token state refresh_outcome_unknown (a refresh whose answer was lost)

Revision ID: 0008_auth_outcome_unknown
Revises: 0005_auth
Create Date: 2026-12-02

Expand-only: the CHECK constraint on ``oauth_tokens.state`` accepts one more
value. Code of the previous version never writes it, and reads it only through
``check_token`` (which shows it as an unknown state, not a crash), so replicas
of both versions can run during a rolling deploy.
"""

from __future__ import annotations

from alembic import op

revision = "0008_auth_outcome_unknown"
down_revision = "0005_auth"
branch_labels = None
depends_on = None

_OLD = "state IN ('ok', 'refresh_failing', 'reauthorization_required')"
_NEW = "state IN ('ok', 'refresh_failing', 'reauthorization_required', 'refresh_outcome_unknown')"


def _replace(condition: str) -> None:
    # Batch mode: SQLite cannot alter a constraint in place, so the table is
    # copied; PostgreSQL gets a plain DROP/ADD CONSTRAINT.
    with op.batch_alter_table("oauth_tokens") as batch:
        batch.drop_constraint(op.f("ck_oauth_tokens_state"), type_="check")
        batch.create_check_constraint("state", condition)


def upgrade() -> None:
    _replace(_NEW)


def downgrade() -> None:
    op.execute(
        "UPDATE oauth_tokens SET state = 'reauthorization_required' "
        "WHERE state = 'refresh_outcome_unknown'"
    )
    _replace(_OLD)
