"""Operations tooling: the RB-09 drill, the postmortem report, HTML/Markdown reports, status."""

from __future__ import annotations
