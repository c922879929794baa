"""Validation of user class lists: the one place that decides what a usable vocabulary is."""
from __future__ import annotations

from collections.abc import Iterable

BACKGROUND = "background"


def parse_class_list(text: str) -> list[str]:
    """Split a comma- or newline-separated string ("cat, dog\\nsofa") into names."""
    return [p.strip() for chunk in text.splitlines() for p in chunk.split(",")]


def validate_classes(classes: Iterable[str] | str, *, allow_empty: bool = False) -> list[str]:
    """Return the class names stripped, in order; refuse blank, duplicate and (unless allowed) empty lists.

    A duplicate would make two output channels compete for the same pixels, and "background" is reserved
    for the background channel the methods add themselves.
    """
    if isinstance(classes, str):
        classes = parse_class_list(classes)
    names = [str(c) for c in classes]
    stripped = [" ".join(c.split()) for c in names]
    blanks = [i for i, c in enumerate(stripped) if not c]
    if blanks:
        raise ValueError(f"blank class name at position(s) {blanks}: {names!r}")
    seen: dict[str, int] = {}
    dups = []
    for c in stripped:
        key = c.lower()
        if key in seen:
            dups.append(c)
        seen[key] = 1
    if dups:
        raise ValueError(f"duplicate class name(s) {sorted(set(dups))!r}: each class must be named once")
    if BACKGROUND in seen:
        raise ValueError(
            '"background" is reserved: it is added by background=True; leave it out of the class list'
        )
    if not stripped and not allow_empty:
        raise ValueError("empty class list: give at least one class name")
    return stripped
