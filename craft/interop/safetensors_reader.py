"""Read safetensors files tensor by tensor straight into preallocated memory.

`safetensors.safe_open` hands out views of a memory map whose pages stay resident until the file
is closed, so copying a whole single-file checkpoint into a model briefly holds the weights twice
(the mapped file and the copy). The format is simple (an 8-byte little-endian header length, a
JSON header of name -> dtype, shape, byte range, then the raw little-endian data), so this reader
parses the header, checks every entry against the file, and `readinto`s each tensor's bytes into
the destination: peak memory is the model plus at most one tensor that needs converting.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from craft.errors import CheckpointError

MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and the absolute byte range of its data."""

    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of a safetensors file (validated against its size) and its metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed or unsupported header entry "
                f"({str(info)[:80]})"
            ) from None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (
            any(d < 0 for d in shape)
            or not 0 <= begin <= end
            or base + end > size
            or end - begin != math.prod(shape) * itemsize
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has a byte range "
                f"[{begin}, {end}) that does not match its shape or the file size ({size} bytes); "
                "the file is damaged"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, base + begin, base + end)
    return entries, {str(k): str(v) for k, v in meta.items()}


def _read_exact(f: BinaryIO, view: memoryview, what: str) -> None:
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{what}: the file ended early (truncated)")
        done += got


class Reader:
    """Open files once and copy tensors out of them; use as a context manager."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, path: Path) -> BinaryIO:
        f = self._files.get(path)
        if f is None:
            try:
                f = open(path, "rb")  # noqa: SIM115 (closed in __exit__)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
            self._files[path] = f
        return f

    def read_into(self, entry: TensorEntry, out: torch.Tensor, rows: int | None = None) -> None:
        """Copy the tensor (or its first `rows` rows) into `out`: same dtype, contiguous, CPU."""
        count = entry.numel if rows is None else rows * math.prod(entry.shape[1:])
        if out.dtype != entry.dtype or not out.is_contiguous() or out.numel() != count:
            raise ValueError(f"read_into {entry.name}: destination does not match")
        if count == 0:
            return
        nbytes = count * out.element_size()
        f = self._file(entry.path)
        f.seek(entry.start)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        _read_exact(f, view[:nbytes], f"{entry.path} ({entry.name})")

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """A new tensor holding the entry's data."""
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(entry, out)
        return out


@contextmanager
def reader() -> Iterator[Reader]:
    with Reader() as r:
        yield r
