"""Row files: a group of pre-allocated ``.npy`` arrays filled batch by batch, resumable after a kill.

Big arrays are streamed into ``.npy`` files named ``<final>.partial``, each row written at its offset
(``StreamingArrays``); a sidecar ``<first final>.progress.json`` (one per process under torchrun:
``.progress.rank{r}.json``) records how many of the rows are complete. Only when every row is written are the
files renamed to their final names (``finish_renames``), so a killed run never leaves a complete-looking file, and
``--resume`` continues from the last completed batch. The loop that fills them is
``utils.files.streaming.stream_dataset``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np

from utils.errors import InputError
from utils.files.atomic import PARTIAL, atomic_write_json

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class StreamingArrays:
    """A group of ``.npy`` arrays with a common first axis, filled in row order, resumable, rows ``[start, stop)``.

    Several writers (torchrun processes) can fill disjoint row ranges of the same pre-allocated files: one
    creates them (``create=True``), the others open them (``create=False``), each keeps its own progress file.

    Args:
        paths: final file name per array.
        shapes: full shape per array (first axis = number of rows, the same for all).
        dtypes: storage dtype (``float32``, ``float16``, ...), one for all or one per array.
        key: what identifies the run (model, weights, dataset, data_path, number of images, ...); stored in
            the progress file, and a resume with another key is refused.
        resume: continue from this writer's progress file (``False``: start at ``start``).
        start, stop: the rows this writer fills (default: all).
        create: allocate the ``.partial`` files (else open the existing ones).
        progress_suffix: ``.progress.json`` (one writer) or ``.progress.rank{r}.json``.
    """

    def __init__(self, paths: Mapping[str, Path], shapes: Mapping[str, tuple], dtypes: str | np.dtype | Mapping,
                 key: Optional[dict] = None, resume: bool = False, start: int = 0, stop: Optional[int] = None,
                 create: bool = True, progress_suffix: str = ".progress.json"):
        self.paths = {k: Path(p) for k, p in paths.items()}
        rows = {s[0] for s in shapes.values()}
        if len(rows) != 1:
            raise ValueError(f"StreamingArrays: arrays differ in their first axis: {dict(shapes)}")
        self.rows = rows.pop()
        self.start, self.stop = start, self.rows if stop is None else stop
        self.dtypes = {k: np.dtype(dtypes[k] if isinstance(dtypes, Mapping) else dtypes) for k in self.paths}
        first = next(iter(self.paths.values()))
        self.progress_file = first.with_name(first.name + progress_suffix)
        self.key = json.loads(json.dumps(dict(key or {}, shapes={k: list(v) for k, v in shapes.items()},
                                              dtypes={k: d.name for k, d in self.dtypes.items()})))
        self.done = 0  # rows of [start, stop) written
        state = self.read_progress(self.progress_file) if resume else None
        if state is not None:
            if state.get("key") != self.key:
                old, new = _flat(state.get("key", {})), _flat(self.key)
                changed = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                           if old.get(k) != new.get(k)]
                raise InputError(f"--resume: {self.progress_file} belongs to a different run ({'; '.join(changed[:3])})"
                                 f"; rerun without --resume to start over")
            if (state.get("start"), state.get("stop")) != (self.start, self.stop):
                raise InputError(f"--resume: {self.progress_file} covers rows {state.get('start')}..{state.get('stop')}, "
                                 f"this process rows {self.start}..{self.stop} (another number of processes or "
                                 f"--batch_size?); rerun with the same settings, or without --resume")
            self.done = int(state["done"])
        self.files: dict[str, _RowFile] = {}
        for k, p in self.paths.items():
            if create and state is None:  # the header and the (sparse) pre-allocated data
                np.lib.format.open_memmap(self.partial(p), mode="w+", dtype=self.dtypes[k], shape=tuple(shapes[k]))
            elif not self.partial(p).is_file():
                raise InputError(f"--resume: {self.partial(p)} is missing; rerun without --resume to start over")
            self.files[k] = _RowFile(self.partial(p), tuple(shapes[k]), self.dtypes[k])
        self._save_progress()

    @staticmethod
    def partial(path: Path) -> Path:
        return path.with_name(path.name + PARTIAL)

    @staticmethod
    def read_progress(path: Path) -> Optional[dict]:
        """The progress record in ``path`` (``None`` when there is none)."""
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def next_row(self) -> int:
        return self.start + self.done

    @property
    def complete(self) -> bool:
        return self.next_row >= self.stop

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append one batch (same number of rows in every array), flush it, and record it as done.

        Values beyond float16's range in a float16 array are an ``InputError`` (suggesting float32), not inf.
        """
        n = {len(v) for v in batch.values()}
        if len(n) != 1:
            raise ValueError(f"StreamingArrays.write: batch arrays differ in length: {[len(v) for v in batch.values()]}")
        n = n.pop()
        if self.next_row + n > self.stop:
            raise ValueError(f"StreamingArrays.write: {self.next_row} + {n} rows exceeds the rows {self.start}.."
                             f"{self.stop} of this writer")
        for k, v in batch.items():
            if self.dtypes[k] == np.float16:
                big = float(np.abs(v).max()) if v.size else 0.0
                if big > FLOAT16_MAX:
                    raise InputError(f"{self.paths[k]}: values up to {big:.4g} exceed float16's range "
                                     f"({FLOAT16_MAX:.0f}); rerun with --dtype float32")
        s = self.next_row
        for k, v in batch.items():
            self.files[k].write(s, v)
        for f in self.files.values():
            f.flush()
        self.done += n
        self._save_progress()

    def _save_progress(self) -> None:
        atomic_write_json(self.progress_file, {"done": self.done, "start": self.start, "stop": self.stop,
                                               "key": self.key}, indent=None)

    def close(self) -> None:
        """Flush and close the files (the progress file stays)."""
        for f in self.files.values():
            f.close()
        self.files.clear()


class _RowFile:
    """Rows of a pre-allocated ``.npy`` file, written with ``pwrite`` at their byte offsets.

    Not through a memory map: a page of a memory map is written back whole, so on a file system shared by
    several machines (NFS) two processes writing neighbouring rows from different nodes could overwrite each
    other's bytes in the page they share; ``pwrite`` sends only the bytes written.
    """

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.path, self.shape, self.dtype = path, shape, dtype
        self.fd = os.open(path, os.O_RDWR)
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                      np.lib.format.read_array_header_2_0)(f)
            self.offset = f.tell()
        if header != (shape, False, dtype):
            os.close(self.fd)
            raise InputError(f"--resume: {path} holds {header[2]} {list(header[0])}, this run writes {dtype} "
                             f"{list(shape)}; rerun without --resume to start over")
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def write(self, row: int, values) -> None:
        """Rows ``row .. row + len(values)`` (cast to the file's dtype, as numpy assignment casts)."""
        values = np.asarray(values)
        data = np.ascontiguousarray(np.broadcast_to(values.astype(self.dtype, copy=False),
                                                    (len(values), *self.shape[1:])))
        view, pos = memoryview(data).cast("B"), self.offset + row * self.row_bytes
        while view:
            written = os.pwrite(self.fd, view, pos)
            view, pos = view[written:], pos + written

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def _flat(d: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for naming what differs between two keys)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finish_renames(paths, progress_files, before_rename: Optional[Callable[[Path], None]] = None) -> None:
    """The last step of a streamed run: each ``<p>.partial`` -> ``p`` (those already renamed are skipped), then the
    progress files are removed. Idempotent, so a run killed in the middle of it is completed by calling it again."""
    for p in map(Path, paths):
        partial = StreamingArrays.partial(p)
        if partial.is_file():
            if before_rename is not None:
                before_rename(p)
            os.replace(partial, p)
        elif not p.is_file():
            raise RuntimeError(f"finish: neither {partial} nor {p} exists")
    for f in progress_files:
        Path(f).unlink(missing_ok=True)
