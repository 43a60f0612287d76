"""The ``ferry`` command line (placeholder, filled in below)."""

from __future__ import annotations


def main() -> int:
    return 0
