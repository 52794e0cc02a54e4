"""Crash-safe small files: written to ``<final>.partial``, fsynced and renamed, so a killed run never leaves a
half-written file under a final name; and ``load_array``, the reader that names the file at fault.

The big streamed arrays are ``utils.files.rows``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np

from utils.errors import InputError

PARTIAL = ".partial"


# ----------------------------------------------------------------------------- reading
def load_array(path: str | Path, what: str, mmap: bool = True) -> np.ndarray:
    """``np.load`` with a clear error naming the file (and the script that writes it)."""
    path = Path(path)
    if not path.is_file():
        hint = f" (written by {what})" if what else ""
        partial = " A .partial file is there: that run did not finish; rerun it with --resume." \
            if path.with_name(path.name + PARTIAL).exists() else ""
        raise FileNotFoundError(f"{path}: not found{hint}.{partial}")
    if path.suffix == ".npy":
        check_npy(path, what)
    return np.load(path, mmap_mode="r" if mmap else None)


def check_npy(path: str | Path, what: str = "") -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype in the header of the ``.npy`` file ``path``; ``InputError`` naming the file, its size and
    the size its header promises when it is not a readable ``.npy`` file or is cut short (a copy or a run that
    did not finish)."""
    path = Path(path)
    size = path.stat().st_size
    hint = f" (written by {what})" if what else ""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({size} bytes: {e}){hint}") from e
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not dtype.hasobject and size < expected:
        raise InputError(f"{path}: truncated: {size} bytes, but its header promises {dtype} {list(shape)} "
                         f"({expected} bytes){hint}; copy it again or rerun the step that writes it")
    return shape, dtype


def make_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """Create the output folder ``path`` (and its parents); a path that is a file is an ``InputError``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise InputError(f"{flag} {path}: cannot create the folder ({e})") from e
    return path


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
    """Write a text file via a temporary name, fsync, and rename."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj, indent: Optional[int] = 1) -> None:
    """``json.dumps(obj, indent=indent)`` written via ``atomic_write_text``."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure via a temporary name and rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL + path.suffix)  # keep the extension: matplotlib picks the format
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
