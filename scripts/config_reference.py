"""Rewrite the generated tables of docs/configuration.md from the settings' declarations.

    python scripts/config_reference.py           # rewrite the tables in place
    python scripts/config_reference.py --check   # exit 1 if the doc is out of date

Each table sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``
markers; the prose around them is kept. tests/core/test_core_config.py fails when
the doc and the declarations in ``idis/integrations/config.py`` disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from idis.integrations.config import reference_tables

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current table."""
    for name, table in reference_tables().items():
        block = re.compile(
            rf"(<!-- generated:{name} -->\n).*?(\n<!-- /generated:{name} -->)", re.DOTALL
        )
        if not block.search(text):
            raise SystemExit(f"{DOC}: no <!-- generated:{name} --> block")
        text = block.sub(lambda m, t=table: m.group(1) + t + m.group(2), text)
    return text


def main() -> int:
    current = DOC.read_text()
    wanted = render(current)
    if "--check" in sys.argv[1:]:
        if current != wanted:
            sys.stderr.write(f"{DOC} is out of date: run python scripts/config_reference.py\n")
            return 1
        return 0
    DOC.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
