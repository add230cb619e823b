"""Spec text + used library names -> the spec hash a plan records (no parser: the runtime checks it too)."""

from __future__ import annotations

import hashlib
from pathlib import Path

STDLIB = Path(__file__).with_name("stdlib")


def spec_hash(text: str, uses: list[str], overrides: list[str] | tuple[str, ...] = ()) -> str:
    """sha256 of the spec text, of every ``use``d library (a library edit changes the plan too) and of the
    ``--set`` overrides applied to it, in order (none: the hash of the text and libraries alone).

    ``gkdc run`` recomputes it to refuse a plan whose spec changed since planning.
    """
    h = hashlib.sha256(text.encode())
    for item in overrides:
        h.update(b"\0--set\0" + item.encode())
    for name in sorted(uses):
        h.update(b"\0" + name.encode() + b"\0")
        library = STDLIB / (name.replace(".", "/") + ".gkd")
        h.update(library.read_bytes() if library.exists() else b"")  # a deleted library reads as "changed"
    return h.hexdigest()
