"""runtime/files.py: a write either lands whole or leaves the old file (and no temporary) behind."""

from __future__ import annotations

import pytest

from runtime.files import atomic_path, atomic_write


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old\n")
    atomic_write(path, b"new\n", fsync=True)
    assert path.read_bytes() == b"new\n" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_writer_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "w.bin"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["w.bin"]
