"""Safetensors files <-> byte ranges: read any flat slice of a stored tensor, write files one tensor at a time.

Takes a folder (``model.safetensors``, sharded ``*.safetensors`` with or without an index) or one file; gives
``WeightFiles`` (which file and byte offset holds each tensor; ``read_flat`` reads elements ``[start, stop)``
of a tensor, flattened, straight into a caller's buffer; ``read_rows_flat`` the same of some rows of it) and ``StreamWriter`` / ``write_sharded`` (a file
whose header is written first and whose tensors are then written one at a time).

This is what lets a ZeRO-3 rank read only its own partition of every weight (its bytes of the file and no
others) and lets rank 0 save a model it never holds whole. Kept here rather than in safetensors' own API:
``safe_open`` has no way to read a byte range into an existing buffer (it maps the file; mapped pages count
in the reader's resident memory) and ``save_file`` needs every tensor in memory at once. The format is the
documented one (8-byte little-endian header size, JSON header, raw little-endian data).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from runtime.errors import RunError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
#: Shard size of saved models (transformers' ``save_pretrained`` default is 5 GB; smaller keeps rank 0's write
#: buffer and a reader's per-file cost small).
SHARD_BYTES = 2 * 2**30
#: Largest read done at once when a slice must be converted to another dtype.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the tensor's first element in ``file``."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _header(path: Path) -> dict[str, Stored]:
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not a readable safetensors file ({err})") from None
    base, out = 8 + size, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in ST_DTYPES:
            raise RunError(f"{path}: tensor {key} has dtype {entry['dtype']}, which gkdc cannot read")
        out[key] = Stored(path, ST_DTYPES[entry["dtype"]], tuple(entry["shape"]), base + entry["data_offsets"][0])
    return out


class WeightFiles:
    """The tensors of a safetensors folder or file, by name (headers read once; data read on demand)."""

    def __init__(self, where: Path) -> None:
        where = Path(where)
        if where.is_file():
            files = [where]
        elif (where / INDEX_FILE).is_file():
            index = json.loads((where / INDEX_FILE).read_text())
            files = sorted({where / f for f in index["weight_map"].values()})
        else:
            files = sorted(where.glob("*.safetensors"))
        if not files:
            raise RunError(f"{where} holds no *.safetensors weights")
        self.tensors: dict[str, Stored] = {}
        for f in files:
            self.tensors.update(_header(f))
        self._handles: dict[Path, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def _fd(self, path: Path) -> int:
        if path not in self._handles:
            self._handles[path] = os.open(path, os.O_RDONLY)
        return self._handles[path]

    def read_flat(self, key: str, start: int, out: torch.Tensor) -> int:
        """Fill the 1-D ``out`` with elements ``start..`` of ``key`` flattened (cast to ``out``'s dtype).

        Elements past the tensor's end (ZeRO's padding of the last partition) are set to zero; returns the
        number of elements read from the file.
        """
        st = self.tensors[key]
        count = max(0, min(out.numel(), st.numel - start))
        if count < out.numel():
            out[count:].zero_()
        if count == 0:
            return 0
        size = st.dtype.itemsize
        if out.dtype == st.dtype and out.is_contiguous() and out.device.type == "cpu":
            self._pread(st, start * size, out[:count].view(torch.uint8))
            return count
        step = max(1, CHUNK_BYTES // size)
        buf = torch.empty(min(step, count), dtype=st.dtype)
        for i in range(0, count, step):
            n = min(step, count - i)
            self._pread(st, (start + i) * size, buf[:n].view(torch.uint8))
            out[i:i + n].copy_(buf[:n])
        return count

    def read_rows_flat(self, key: str, rows: torch.Tensor, start: int, out: torch.Tensor) -> int:
        """Fill the 1-D ``out`` with elements ``start..`` of the rows ``rows`` of ``key`` stacked in that order,
        flattened (a compressed vocabulary's kept rows of a full-vocabulary table): only those rows' bytes are
        read. Elements past the end are zeroed, as ``read_flat``; returns the number read from the file."""
        st = self.tensors[key]
        width = st.numel // st.shape[0] if st.shape and st.shape[0] else 0
        count = max(0, min(out.numel(), rows.numel() * width - start))
        if count < out.numel():
            out[count:].zero_()
        ids, done = rows.tolist(), 0
        while done < count:
            row, col = divmod(start + done, width)
            n = min(width - col, count - done)
            if not 0 <= ids[row] < st.shape[0]:
                raise RunError(f"{st.file}: tensor {key} has {st.shape[0]} rows; row {ids[row]} was asked for")
            self.read_flat(key, ids[row] * width + col, out[done:done + n])
            done += n
        return count

    def read_rows(self, key: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The rows ``rows`` of ``key`` (in that order), in its stored shape otherwise."""
        st = self.tensors[key]
        out = torch.empty(rows.numel() * (st.numel // st.shape[0]), dtype=dtype or st.dtype)
        self.read_rows_flat(key, rows, 0, out)
        return out.view(rows.numel(), *st.shape[1:])

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor ``key`` in its stored shape (and ``dtype`` when given)."""
        st = self.tensors[key]
        out = torch.empty(st.numel, dtype=dtype or st.dtype)
        self.read_flat(key, 0, out)
        return out.view(st.shape)

    def _pread(self, st: Stored, byte_start: int, out: torch.Tensor) -> None:
        view = memoryview(out.numpy()).cast("B")
        fd, pos, done = self._fd(st.file), st.offset + byte_start, 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise RunError(f"{st.file} ends early (truncated while reading byte {pos + done})")
            done += n


class StreamWriter:
    """A safetensors file written header first, then tensor by tensor in the declared order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for key, dtype, shape in entries:
            n = 1
            for s in shape:
                n *= s
            nbytes = n * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((key, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._fh = open(self._tmp, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want, nbytes = self._order[self._next]
        if key != want:
            raise RuntimeError(f"StreamWriter: expected tensor {want}, got {key}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != nbytes:
            raise RuntimeError(f"StreamWriter: tensor {key} has {data.nbytes} bytes, its header says {nbytes}")
        self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> Path:
        """Finish the file (all tensors written) and move it into place atomically."""
        if self._next != len(self._order):
            raise RuntimeError(f"StreamWriter: {len(self._order) - self._next} tensors of {self.path} not written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


def write_sharded(folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` + index, as transformers names
    them, filled from ``tensors`` (yielded in ``entries`` order, one at a time)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].itemsize * max(1, _numel(entry[2]))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    written, weight_map = [], {}
    for name, shard in zip(names, shards):
        writer = StreamWriter(folder / name, shard)
        try:
            for key, _, _ in shard:
                got, tensor = next(tensors)
                writer.write(got, tensor)
                weight_map[key] = name
        except BaseException:
            writer.abort()
            raise
        written.append(writer.close())
    if n > 1:
        total = sum(e[1].itemsize * _numel(e[2]) for e in entries)
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=1))
    return written


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_sums(path: Path) -> float:
    """Sum of every element of every tensor in a file, read one tensor at a time (float64)."""
    files = WeightFiles(path)
    try:
        return float(sum(files.read(k).double().sum() for k in files.keys()))
    finally:
        files.close()

