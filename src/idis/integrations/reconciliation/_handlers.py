"""Loading the host's event handlers into a command-line process (``IDIS_HANDLERS``).

RB-09 runs ``reconcile`` and ``verify-sync`` as scripts in the service's
container: a process that never ran the service's start-up code, so its
handler registry is empty. ``IDIS_HANDLERS`` (or ``--handlers``) names what
to import:

* ``package.module``: imported; it registers its handlers on import, e.g.
  with ``@get_registry().on("record.updated")``;
* ``package.module:function``: imported, then ``function(registry)`` is called.

Several entries are separated by commas.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from ..exceptions import ConfigError
from ..sync._inbox import HandlerRegistry, get_registry

__all__ = ["load_handlers"]

_ENTRY = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")


def load_handlers(spec: str, registry: HandlerRegistry | None = None) -> HandlerRegistry:
    """Import the handler modules ``spec`` names and return the registry they filled.

    Args:
        spec: ``module`` or ``module:function`` entries, comma-separated.
        registry: Registry to fill (default: the inbox's process-wide one).

    Raises:
        ConfigError: naming ``IDIS_HANDLERS``, the entry and what went wrong.
    """
    target = registry if registry is not None else get_registry()
    imported_only: dict[str, ModuleType] = {}  # module-only entries: their modules
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        if not _ENTRY.fullmatch(entry):
            raise ConfigError(
                f"IDIS_HANDLERS entry {entry!r} is invalid: expected package.module or "
                "package.module:function",
                variable="IDIS_HANDLERS",
            )
        module_name, _, attribute = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"IDIS_HANDLERS entry {entry!r}: cannot import {module_name!r} ({exc})",
                variable="IDIS_HANDLERS",
            ) from None
        if attribute:
            register = getattr(module, attribute, None)
            if not callable(register):
                raise ConfigError(
                    f"IDIS_HANDLERS entry {entry!r}: {module_name} has no callable {attribute!r}",
                    variable="IDIS_HANDLERS",
                )
            register(target)
        else:
            imported_only[entry] = module
    if imported_only and not target.event_types():
        # Imported fine, registered nothing: the command would only say "no handler is
        # registered" while IDIS_HANDLERS looks set. Name the entry, and the one to write.
        first, first_module = next(iter(imported_only.items()))
        hint = (
            f"write {first}:register (it has a register function)"
            if callable(getattr(first_module, "register", None))
            else "name the function that registers them: package.module:function"
        )
        raise ConfigError(
            f"IDIS_HANDLERS entry {first!r} registered no handler on import: {hint}",
            variable="IDIS_HANDLERS",
        )
    return target
