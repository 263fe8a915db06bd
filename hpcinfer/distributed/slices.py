"""Read only this rank's slice of a safetensors tensor.

A tensor-parallel rank needs 1/tp of most weights. Memory-mapping the file and slicing would
still count every touched page in the process's RSS (file-backed mapped pages are resident
too), and a row-parallel slice (every row's middle columns) touches nearly every page. So a
``LazySlice`` stands for a tensor region, the layers' weight loaders ``narrow`` it exactly as
they would a tensor, and ``materialize()`` reads just the region with positioned reads into
the result: whole rows in one read, a column slice row-chunk by row-chunk through a bounded
buffer (``CHUNK_BYTES``). The page cache holds what was read, but that is not this process's
memory.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

CHUNK_BYTES = 4 << 20

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data section)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class LazySlice:
    """A region ``[start, start+length)`` per dim of one tensor in a safetensors file."""

    def __init__(self, path: Path, dtype: torch.dtype, full_shape: tuple[int, ...],
                 offset: int, region: tuple[tuple[int, int], ...] | None = None):
        self.path, self.dtype, self.full_shape, self.offset = path, dtype, full_shape, offset
        self.region = region if region is not None else tuple((0, n) for n in full_shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(length for _, length in self.region)

    def dim(self) -> int:
        return len(self.region)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        dim = dim % self.dim()
        base, available = self.region[dim]
        if start < 0 or length < 0 or start + length > available:
            raise IndexError(f"narrow({dim}, {start}, {length}) outside size {available}")
        region = list(self.region)
        region[dim] = (base + start, length)
        return LazySlice(self.path, self.dtype, self.full_shape, self.offset, tuple(region))

    def __getitem__(self, key) -> LazySlice:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a LazySlice supports only [a:b] on its first dimension")
        start, stop, _ = key.indices(self.region[0][1])
        return self.narrow(0, start, max(stop - start, 0))

    def materialize(self) -> torch.Tensor:
        """Read the region from the file into a new tensor of ``self.shape``."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if out.numel() == 0:
            return out
        elem = out.element_size()
        inner = 1
        for n in self.full_shape[1:]:
            inner *= n
        row_bytes = inner * elem  # one index of dim 0
        (r0, nrows) = self.region[0]
        with open(self.path, "rb", buffering=0) as f:
            if all(region == (0, full) for region, full in zip(self.region[1:], self.full_shape[1:])):
                _read_into(f, self.offset + r0 * row_bytes, out)
                return out
            if len(self.full_shape) != 2:
                raise NotImplementedError("column slices of tensors with more than 2 dims")
            c0, ncols = self.region[1]
            chunk_rows = max(1, CHUNK_BYTES // row_bytes)
            buffer = torch.empty((min(chunk_rows, nrows), self.full_shape[1]), dtype=self.dtype)
            for first in range(0, nrows, chunk_rows):
                n = min(chunk_rows, nrows - first)
                _read_into(f, self.offset + (r0 + first) * row_bytes, buffer[:n])
                out[first:first + n] = buffer[:n, c0:c0 + ncols]
        return out


def _read_into(f, position: int, out: torch.Tensor) -> None:
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    f.seek(position)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError(f"{f.name} ended early: the safetensors file is truncated; download "
                          "the checkpoint again")
        done += n


def iter_checkpoint_lazy(files: dict[str, Path]) -> Iterator[tuple[str, LazySlice, Path]]:
    """(name, LazySlice, file) for every tensor of ``files`` (name -> file), file by file."""
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        header, data_start = read_header(path)
        for name in names:
            entry = header[name]
            begin, _ = entry["data_offsets"]
            yield name, LazySlice(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                  data_start + begin), path
