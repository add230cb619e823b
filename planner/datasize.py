"""A data source -> its example count at plan time (one per non-empty line of text/jsonl/chat files, as the
runtime reads them), when its files exist and are small enough to count quickly; None otherwise."""

from __future__ import annotations

from pathlib import Path

from gkdlang.spec import DataSpec

#: text/jsonl files larger than this are not counted at plan time (planning must stay fast)
MAX_COUNTED_BYTES = 256 * 2**20


def count_rows(data: DataSpec, spec_dir: Path) -> int | None:
    """Examples in a text or jsonl source (one per non-empty line, as the runtime reads them) when its files
    exist and are small enough to count."""
    if data.format not in ("jsonl", "text", "chat"):
        return None
    files = sorted({f for pattern in data.paths for f in _glob(pattern, spec_dir)})
    if not files or sum(f.stat().st_size for f in files) > MAX_COUNTED_BYTES:
        return None
    return sum(sum(1 for line in f.open("rb") if line.strip()) for f in files)


def _glob(pattern: str, base: Path) -> list[Path]:
    path = Path(pattern)
    if path.is_absolute():
        return [p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file()]
    return [p for p in base.glob(pattern) if p.is_file()]
