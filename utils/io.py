"""Output naming and crash-safe writing, in one place.

Big arrays are streamed batch by batch into pre-allocated ``.npy`` memmaps named ``<final>.partial``; a
sidecar ``<first final>.progress.json`` records how many rows are complete. Only when every row is written
are the files renamed to their final names, so a killed run never leaves a complete-looking file, and
``--resume`` continues from the last completed batch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional

import numpy as np

from utils.cli import InputError

PARTIAL = ".partial"


# ----------------------------------------------------------------------------- reading
def load_array(path: str | Path, what: str, mmap: bool = True) -> np.ndarray:
    """``np.load`` with a clear error naming the file (and the script that writes it)."""
    path = Path(path)
    if not path.is_file():
        hint = f" (written by {what})" if what else ""
        partial = " A .partial file is there: that run did not finish; rerun it with --resume." \
            if Path(str(path) + PARTIAL).exists() else ""
        raise FileNotFoundError(f"{path}: not found{hint}.{partial}")
    return np.load(path, mmap_mode="r" if mmap else None)


# ----------------------------------------------------------------------------- writing
def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file in the same folder, fsync, then rename: never a half-written ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` via ``atomic_write``."""
    atomic_write(path, lambda f: np.save(f, array))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file via a temporary name and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj, indent: Optional[int] = 1) -> None:
    """``json.dumps(obj, indent=indent)`` written via ``atomic_write_text``."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


class StreamingArrays:
    """A group of ``.npy`` arrays with a common first axis, filled in row order and resumable.

    Args:
        paths: final file name per array.
        shapes: full shape per array (first axis = number of rows, the same for all).
        dtype: storage dtype (``float32`` or ``float16``).
        resume: continue a previous partial run (its ``meta`` must match) instead of starting over.
        meta: whatever identifies the run (model, dataset, ...); checked on resume.
    """

    def __init__(self, paths: Mapping[str, Path], shapes: Mapping[str, tuple], dtype: str | np.dtype,
                 resume: bool = False, meta: Optional[dict] = None):
        self.paths = {k: Path(p) for k, p in paths.items()}
        self.rows = {s[0] for s in shapes.values()}
        if len(self.rows) != 1:
            raise ValueError(f"StreamingArrays: arrays differ in their first axis: {dict(shapes)}")
        self.rows = self.rows.pop()
        self.dtype = np.dtype(dtype)
        first = next(iter(self.paths.values()))
        self.progress_file = first.with_name(first.name + ".progress.json")
        self.meta = dict(meta or {}, shapes={k: list(v) for k, v in shapes.items()}, dtype=self.dtype.name)
        self.done = 0
        self.arrays: dict[str, np.memmap] = {}
        if resume and self.progress_file.exists():
            state = json.loads(self.progress_file.read_text())
            if state.get("meta") != json.loads(json.dumps(self.meta)):
                raise InputError(
                    f"--resume: {self.progress_file} belongs to a different run ({state.get('meta')}); "
                    f"rerun without --resume to start over")
            self.done = int(state["done"])
            for k, p in self.paths.items():
                self.arrays[k] = np.lib.format.open_memmap(self._partial(p), mode="r+")
        else:
            for k, p in self.paths.items():
                self.arrays[k] = np.lib.format.open_memmap(
                    self._partial(p), mode="w+", dtype=self.dtype, shape=tuple(shapes[k]))
            self._save_progress()

    @staticmethod
    def _partial(path: Path) -> Path:
        return path.with_name(path.name + PARTIAL)

    @property
    def complete(self) -> bool:
        return self.done >= self.rows

    def write(self, batch: Mapping[str, np.ndarray]) -> None:
        """Append one batch (same number of rows in every array) and record it as done."""
        n = {len(v) for v in batch.values()}
        if len(n) != 1:
            raise ValueError(f"StreamingArrays.write: batch arrays differ in length: {[len(v) for v in batch.values()]}")
        n = n.pop()
        if self.done + n > self.rows:
            raise ValueError(f"StreamingArrays.write: {self.done} + {n} rows exceeds the {self.rows} allocated")
        for k, v in batch.items():
            self.arrays[k][self.done:self.done + n] = v
        for a in self.arrays.values():
            a.flush()
        self.done += n
        self._save_progress()

    def _save_progress(self) -> None:
        tmp = self.progress_file.with_name(self.progress_file.name + ".tmp")
        tmp.write_text(json.dumps({"done": self.done, "meta": self.meta}))
        os.replace(tmp, self.progress_file)

    def finish(self) -> None:
        """Flush and rename every array to its final name; remove the progress file."""
        if not self.complete:
            raise RuntimeError(f"StreamingArrays.finish: only {self.done} of {self.rows} rows written")
        for k, a in self.arrays.items():
            a.flush()
            del a
        self.arrays.clear()
        for p in self.paths.values():
            os.replace(self._partial(p), p)
        self.progress_file.unlink(missing_ok=True)


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure via a temporary name and rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL + path.suffix)  # keep the extension: matplotlib picks the format
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
