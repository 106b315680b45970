"""Benchmarks: each one measures the library side by side with the bare alternative, in one run."""

from __future__ import annotations
