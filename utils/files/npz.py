"""``.npz`` files written and read piece by piece: flat RAM for arrays that live on disk, and the same bytes for the
same arrays (fixed timestamps, unlike ``np.savez``), so a resumed run can be compared byte for byte with a clean one.

Also ``AppendFile``, a raw array file that grows batch by batch and is cut back to a known length on resume (the
variable-length part of a streamed output; see ``utils.splice.stream_decompositions``).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Union

import numpy as np

from utils.errors import InputError
from utils.files.atomic import atomic_write

__all__ = ["Chunked", "write_npz", "npz_chunks", "AppendFile"]

CHUNK = 1 << 20  # elements per piece
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the zip entries' timestamp: the same bytes on every run


@dataclass(frozen=True)
class Chunked:
    """An array given as its dtype, shape and a function returning its pieces in C order (one pass)."""
    dtype: np.dtype
    shape: tuple
    pieces: Callable[[], Iterable[np.ndarray]]


def write_npz(path: str | Path, entries: Mapping[str, Union[np.ndarray, Chunked]], compress: bool = True) -> None:
    """Write ``entries`` (name -> array or ``Chunked``) as an ``.npz`` that ``np.load`` (and, for a sparse matrix's
    entries, ``scipy.sparse.load_npz``) reads, atomically, one piece at a time; the bytes depend only on the
    arrays. A ``Chunked`` entry whose pieces do not add up to its shape is a ``ValueError``."""

    def write(f) -> None:
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(f, "w", compression=method, allowZip64=True) as zf:
            for name, entry in entries.items():
                if not isinstance(entry, Chunked):
                    arr = np.ascontiguousarray(entry)
                    entry = Chunked(arr.dtype, arr.shape, lambda arr=arr: [arr.reshape(-1)])
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
                info.compress_type = method
                info.external_attr = 0o644 << 16
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(entry.dtype)), "fortran_order": False,
                          "shape": tuple(int(s) for s in entry.shape)}
                with zf.open(info, "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_2_0(out, header) if _needs_v2(header) else \
                        np.lib.format.write_array_header_1_0(out, header)
                    written = 0
                    for piece in entry.pieces():
                        piece = np.ascontiguousarray(piece, dtype=entry.dtype)
                        out.write(piece.tobytes())
                        written += piece.size
                    if written != int(np.prod(entry.shape, dtype=np.int64)):
                        raise ValueError(f"write_npz {path}: {name} has {written} elements, expected shape "
                                         f"{tuple(entry.shape)}")

    atomic_write(path, write)


def _needs_v2(header: dict) -> bool:
    """Headers over 65,535 bytes need .npy format 2.0 (as ``np.save`` decides)."""
    return len(repr(header)) > 65000


def npz_chunks(path: str | Path, name: str, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The entry ``name`` of an ``.npz`` (C order, flattened) in pieces of at most ``chunk`` elements."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                                 np.lib.format.read_array_header_2_0)(f)
        if fortran:
            raise ValueError(f"{path}: {name} is stored in Fortran order")
        left = int(np.prod(shape, dtype=np.int64))
        while left > 0:
            n = min(chunk, left)
            yield np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)
            left -= n


class AppendFile:
    """A raw ``dtype`` array in ``path`` that grows by appends; ``truncate(n)`` cuts it back to ``n`` elements
    (a resumed run drops what a killed one wrote past its last recorded batch)."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.path.touch(exist_ok=True)

    def __len__(self) -> int:
        return self.path.stat().st_size // self.dtype.itemsize

    def truncate(self, n: int) -> None:
        if n > len(self):
            raise InputError(f"--resume: {self.path} holds {len(self)} values, fewer than the {n} its progress record "
                             f"counts (a damaged run folder); rerun without --resume")
        os.truncate(self.path, n * self.dtype.itemsize)

    def append(self, values: np.ndarray) -> None:
        """Append and fsync (the progress record that follows may then count on it)."""
        with open(self.path, "ab") as f:
            f.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def pieces(self, n: int, chunk: int = CHUNK) -> Iterator[np.ndarray]:
        """Its first ``n`` elements, in pieces of at most ``chunk``."""
        if n > len(self):
            raise ValueError(f"{self.path}: holds {len(self)} elements, {n} expected")
        with open(self.path, "rb") as f:
            for st in range(0, n, chunk):
                k = min(chunk, n - st)
                yield np.frombuffer(f.read(k * self.dtype.itemsize), dtype=self.dtype, count=k)
