"""Atomic file writes: a file is either its old content or its new content, never half of one (a rank killed
mid-write, a full disk). Torch-free, so the CLI's check/plan/fmt use it too; the one implementation in gkdc."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write (by any writer: ``torch.save``, ``save_file``, ...); it replaces
    ``path`` when the block ends without an error, and is removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str, *, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; ``fsync`` also makes it durable before the rename
    (a checkpoint's progress record must survive a power loss, a formatted spec need not)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
