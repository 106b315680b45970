"""Benchmarks: each one measures the library side by side with the bare alternative, in one run."""

from __future__ import annotations

from pathlib import Path

#: Where every benchmark writes its section (``--update-docs``).
DOCS = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def update_docs_section(title: str, section: str, docs: Path = DOCS) -> None:
    """Replace the ``## {title}`` section of docs/performance.md with ``section`` (or append it)."""
    text = (
        docs.read_text()
        if docs.exists()
        else "# Performance\n\nMeasured, never asserted in tests.\n"
    )
    start = text.find(f"\n## {title}\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end != -1 else "")
    docs.write_text(text.rstrip() + "\n")
