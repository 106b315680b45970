"""Imports every table module so that ``metadata`` describes the whole schema.

Alembic's env.py and the schema-drift test read ``metadata`` from here; a
capability that adds tables adds its import below.
"""

from __future__ import annotations

from .. import audit as _audit  # noqa: F401  # registers audit_events
from ..auth import models as _auth  # noqa: F401  # oauth_tokens
from ..enrichment import models as _enrichment  # noqa: F401  # defects, enrichment_cache/requests
from ..outbox import models as _outbox  # noqa: F401  # outbox_messages, outbox_webhook_receivers
from ..reconciliation import models as _reconcile  # noqa: F401  # reconcile_checkpoints
from ..resilience import recorder as _resilience  # noqa: F401  # provider_health_samples
from ..sync import models as _sync  # noqa: F401  # sync_inbox, cursors, mode state, coverage
from .base import Base, metadata

__all__ = ["Base", "metadata"]
