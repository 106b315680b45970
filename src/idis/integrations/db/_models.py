"""Imports every table module so that ``metadata`` describes the whole schema.

Alembic's env.py and the schema-drift test read ``metadata`` from here; a
capability that adds tables adds its import below.
"""

from __future__ import annotations

from .. import _audit  # noqa: F401  # registers audit_events
from ..auth import _models as _auth_models  # noqa: F401  # oauth_tokens
from ..enrichment import _models as _enrichment_models  # noqa: F401  # defects, enrichment_cache/requests
from ..outbox import _models as _outbox_models  # noqa: F401  # outbox_messages, outbox_webhook_receivers
from ..reconciliation import _models as _reconciliation_models  # noqa: F401  # reconcile_checkpoints
from ..resilience import _recorder  # noqa: F401  # provider_health_samples
from ..sync import _models as _sync_models  # noqa: F401  # sync_inbox, cursors, mode state, coverage
from ._base import Base, metadata

__all__ = ["Base", "metadata"]
