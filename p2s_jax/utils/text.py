"""Words for what a command prints."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 person', '3 people', '2 masks'."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"
