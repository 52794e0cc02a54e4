"""Provenance: a small JSON record beside every output, and the checks that files used together agree.

Every file a script writes gets ``<file>.provenance.json`` (a folder of outputs gets ``<folder>/provenance.json``):

    {"file": ..., "script": "compute_prs.py", "command": "python compute_prs.py --model ...", "created": ...,
     "model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k", "force_quick_gelu": false,
     "dataset": "imagenet", "split": "val", "data_path": "/abs/path", "num_images": 50000, "dtype": "float32",
     "versions": {"python": ..., "torch": ..., "open_clip": ..., "numpy": ..., "prsclip": ...},
     "git_commit": "...", "git_dirty": false, ...script-specific fields}

``pretrained`` is the open_clip tag, or for a local checkpoint ``{"path", "size", "sha256"}``. Scripts that
combine files call ``check_consistent``: a classifier made with other weights or for another dataset, or text
embeddings from another model, is an ``InputError`` naming both files and the field, unless ``--allow_mismatch``
is given (then it is a warning). Files without a record (made before records existed) are not checked.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from utils import LOG, REPO_ROOT
from utils.errors import InputError
from utils.files.names import NO_WEIGHTS

__all__ = ["provenance_path", "make_record", "write_provenance", "read_provenance", "pretrained_identity",
           "run_key", "check_consistent", "save_output", "derived_record", "set_invocation",
           "reusable_output"]

RECORD_SUFFIX = ".provenance.json"
FOLDER_RECORD = "provenance.json"


def provenance_path(path: str | Path) -> Path:
    """Where the record of ``path`` lives: ``<file>.provenance.json``, or ``<folder>/provenance.json``."""
    path = Path(path)
    return path / FOLDER_RECORD if path.is_dir() else path.with_name(path.name + RECORD_SUFFIX)


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pretrained_identity(pretrained: Optional[str]) -> Any:
    """The tag (``"openai"``), ``"none"``, or for a local checkpoint ``{"path", "size", "sha256"}``."""
    if pretrained is None or pretrained in NO_WEIGHTS:
        return "none"
    p = Path(pretrained)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "sha256": _sha256(str(p.resolve()), st.st_size,
                                                                               st.st_mtime)}
    return pretrained


def _comparable(field: str, value: Any) -> Any:
    """What two records must share for ``field`` (a checkpoint is the same when its bytes are)."""
    if field == "pretrained" and isinstance(value, dict):
        return value.get("sha256") or value.get("path")
    if field == "data_path" and value:
        return str(Path(value).resolve()) if not str(value).startswith(("http:", "https:")) else value
    return value


@lru_cache(maxsize=None)
def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the repository this code runs from; (None, None) outside a git checkout."""
    repo = REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "open_clip_torch", "numpy", "prsclip"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# How this process was started, as the scripts report it (``utils.cli.run`` calls ``set_invocation``); library
# callers (a notebook) leave it unset and their records say so.
_INVOCATION: dict[str, Optional[str]] = {"script": None, "command": None}


def set_invocation(argv: Sequence[str]) -> None:
    """Remember the command line of this process (``[script, *flags]``) for the records written from now on."""
    argv = list(argv)
    _INVOCATION["script"] = os.path.basename(argv[0]) if argv and argv[0] else None
    _INVOCATION["command"] = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv])


def make_record(**fields: Any) -> dict:
    """A provenance record for an output of this process: ``fields`` (model, pretrained, dataset, ...,
    ``num_images``, anything script-specific), ``pretrained`` turned into its identity (a checkpoint's hash), and
    this process's details (command line, time, package versions, git commit)."""
    rec: dict[str, Any] = dict(fields)
    if "pretrained" in rec:
        rec["pretrained"] = pretrained_identity(rec["pretrained"]) if not isinstance(rec["pretrained"], dict) \
            else rec["pretrained"]
    if rec.get("data_path"):
        rec["data_path"] = _comparable("data_path", rec["data_path"])
    commit, dirty = git_state()
    rec.update({**_INVOCATION, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(), "git_commit": commit, "git_dirty": dirty})
    return rec


# record fields that describe the process or the file, not what was computed
VOLATILE_FIELDS = ("file", "script", "command", "created", "versions", "git_commit", "git_dirty", "shape",
                   "storage_dtype", "inputs")


def derived_record(inputs: Sequence[str | Path], **fields: Any) -> dict:
    """The record of an output computed from other outputs: what identifies the first input that has a record
    (model, weights, dataset, ...), then ``fields``, the input paths and this process's details."""
    base: dict[str, Any] = {}
    for path in inputs:
        rec = read_provenance(path)
        if rec is not None:
            base = {k: v for k, v in rec.items() if k not in VOLATILE_FIELDS}
            break
    return make_record(**{**base, **fields, "inputs": [str(p) for p in inputs]})


def run_key(record: Mapping[str, Any]) -> dict:
    """What identifies the computation of a record (every field but ``VOLATILE_FIELDS``), JSON-normalised:
    the resume key, and what a finished output must match for ``--resume`` to skip it."""
    return json.loads(json.dumps({k: _comparable(k, v) for k, v in record.items() if k not in VOLATILE_FIELDS}))


def write_provenance(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` (with ``file``) beside ``path``, atomically and fsynced."""
    from utils.files.atomic import atomic_write_json

    path = Path(path)
    target = provenance_path(path)
    atomic_write_json(target, {"file": path.name, **record})
    return target


def save_output(path: str | Path, array, record: Mapping[str, Any]) -> Path:
    """``np.save`` ``array`` to ``path`` atomically, with its provenance record (shape and dtype added)."""
    import numpy as np

    from utils.files.atomic import atomic_save

    array = np.asarray(array)
    atomic_save(path, array)
    write_provenance(path, dict(record, shape=list(array.shape), storage_dtype=array.dtype.name))
    return Path(path)


def reusable_output(path: str | Path, record: Mapping[str, Any]):
    """The array saved at ``path`` (``save_output``) when its provenance record is of the same computation as
    ``record`` (equal ``run_key``), else ``None``: a cache that never serves another model's or data's array."""
    import numpy as np

    path = Path(path)
    rec = read_provenance(path) if path.is_file() else None
    if rec is None or run_key(rec) != run_key(record):
        return None
    return np.load(path)


def read_provenance(path: str | Path) -> Optional[dict]:
    """The record of ``path``, or ``None`` when it has none."""
    target = provenance_path(path)
    if not target.is_file():
        return None
    try:
        return json.loads(target.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{target}: unreadable provenance record ({e})") from e


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("path") or json.dumps(value)
    return repr(value)


def check_consistent(paths: Sequence[str | Path], fields: Sequence[str] = ("model", "pretrained"),
                     expected: Optional[Mapping[str, Any]] = None, allow_mismatch: bool = False,
                     expected_from: str = "this command", log: Callable[[str], None] = LOG.warning) -> None:
    """Check that the records of ``paths`` agree on ``fields`` (and match ``expected`` where given).

    ``expected`` maps field -> value for this run (``pretrained`` as given on the command line is normalised
    with ``pretrained_identity``). A file without a record is skipped; a field a record lacks is skipped.
    Raises ``InputError`` naming both files and the field, unless ``allow_mismatch`` (then it logs a warning).
    """
    expected = dict(expected or {})
    if "pretrained" in expected and not isinstance(expected["pretrained"], dict):
        expected["pretrained"] = pretrained_identity(expected["pretrained"])
    records = [(Path(p), read_provenance(p)) for p in paths]
    for field in fields:
        ref_name, ref_value = None, None
        if field in expected:
            ref_name, ref_value = expected_from, expected[field]
        for path, rec in records:
            if rec is None or field not in rec:
                continue
            if ref_name is None:
                ref_name, ref_value = str(path), rec[field]
                continue
            if _comparable(field, rec[field]) != _comparable(field, ref_value):
                msg = (f"{path} was made with {field}={_show(rec[field])} but {ref_name} has "
                       f"{field}={_show(ref_value)}")
                if allow_mismatch:
                    log(f"{msg} (--allow_mismatch given: using it anyway)")
                else:
                    raise InputError(f"{msg}; pass --allow_mismatch to use them together anyway")
