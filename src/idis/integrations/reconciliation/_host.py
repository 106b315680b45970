"""The host's own records, for ``verify_sync`` (``IDIS_HOST_RECORDS`` or ``--host-records``).

The inbox's version ledger only says which provider versions the library
applied; it cannot see a row changed by hand in the host's table, nor a row
the host created that never reached the provider. A :class:`HostRecordSource`
reads the host's records themselves, so ``verify_sync`` compares what the host
holds with what the provider holds, and can write the provider's state back
into the host (``--repair=host``).

``IDIS_HOST_RECORDS=package.module:factory`` names a callable that
``verify-sync`` calls with keyword arguments ``provider`` (the provider
verified), ``engine`` (the library's SQLAlchemy engine; a host whose tables
live elsewhere ignores it) and ``settings``; it returns the source. A source
that holds resources may have a ``close()`` method, called when the run ends.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine

from ..config import Settings
from ..exceptions import ConfigError
from ._logic import LocalRecord

__all__ = ["HOST_RECORDS_VARIABLE", "HostRecordSource", "load_host_records"]

#: The environment variable (and ``Settings.host_records``) naming the factory.
HOST_RECORDS_VARIABLE = "IDIS_HOST_RECORDS"
_ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@runtime_checkable
class HostRecordSource(Protocol):
    """The host's records of one provider: sample them, read one, write one.

    ``LocalRecord.data`` holds the fields the host keeps of the provider's
    record (compared field by field); ``version`` is the provider version the
    host last saw (0 when it never saw one).
    """

    #: Data fields the host keeps (None: compare every field of both sides).
    fields: Sequence[str] | None

    def sample(self, n: int, seed: int | None) -> list[LocalRecord]:
        """Up to ``n`` host records chosen at random; one seed gives one sample."""

    def get(self, record_id: str) -> LocalRecord | None:
        """The host's record now, or None when the host has none."""

    def write(self, record_id: str, remote: Any | None) -> None:
        """Make the host's record equal to the provider's ``remote`` (None: delete it).

        ``remote`` is a ``ProviderRecord`` (``tenant_id``, ``version``,
        ``data``). Called by ``verify_sync(repair="host")`` when the inbox
        cannot bring the host there (it already applied that version).
        Commits its own transaction.
        """


def load_host_records(
    spec: str, *, provider: str, engine: Engine, settings: Settings
) -> HostRecordSource:
    """Import ``package.module:factory`` and return the source it builds.

    Raises:
        ConfigError: naming ``IDIS_HOST_RECORDS``, the value and what was expected.
    """
    entry = spec.strip()
    if not _ENTRY.fullmatch(entry):
        raise ConfigError(
            f"{HOST_RECORDS_VARIABLE}={entry!r} is invalid: expected package.module:factory",
            variable=HOST_RECORDS_VARIABLE,
        )
    module_name, _, attribute = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{HOST_RECORDS_VARIABLE}={entry!r}: cannot import {module_name!r} ({exc})",
            variable=HOST_RECORDS_VARIABLE,
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(
            f"{HOST_RECORDS_VARIABLE}={entry!r}: {module_name} has no callable {attribute!r}",
            variable=HOST_RECORDS_VARIABLE,
        )
    source = factory(provider=provider, engine=engine, settings=settings)
    missing = [
        name for name in ("sample", "get", "write") if not callable(getattr(source, name, None))
    ]
    if missing:
        raise ConfigError(
            f"{HOST_RECORDS_VARIABLE}={entry!r} returned {type(source).__name__}, which has no "
            f"{', '.join(missing)}: expected a HostRecordSource (sample, get, write)",
            variable=HOST_RECORDS_VARIABLE,
        )
    return source  # type: ignore[no-any-return]  # checked above
