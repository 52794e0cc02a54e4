"""PCLens' command lines, ``python -m utils.scripts.<name>``, as thin modules over this project's scripts.

  compute_activation_values   -> utils.decomposition (compute_prs.py's body; PCLens' file names, its image subsets)
  compute_classes_embeddings  -> compute_text_projection.py
  compute_text_explanations   -> compute_complete_text_set.py  (PCLens' JSONL output)

Run them from the repository root, as PCLens' README does (they load the top-level scripts from there).
File names, PCLens' conventions and what differs: docs/pclens.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from utils.errors import InputError

from utils import REPO_ROOT as ROOT  # the repository root (holds compute_prs.py, ...)


def load_script(name: str) -> ModuleType:
    """The top-level script ``name`` (e.g. ``"compute_prs"``) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / f"{name}.py"
    if not path.is_file():
        raise InputError(f"{path}: not found; run `python -m utils.scripts.<name>` from a prsclip checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def str2bool(value: str | bool) -> bool:
    """PCLens' boolean flags: yes/true/t/y/1 or no/false/f/n/0, any case."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def int_or_none(value: str) -> int | None:
    """An integer, or None for ``None`` (PCLens' notebooks pass ``--samples_per_class None``)."""
    if value.lower() in ("none", "null"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or None, got {value!r}") from None


def refuse_cache_dir(cache_dir: str | None) -> None:
    """PCLens' ``--cache_dir``: refused with one line (open_clip downloads through the Hugging Face cache)."""
    if cache_dir:
        raise InputError(f"--cache_dir {cache_dir}: not supported; open_clip downloads the weights through the "
                         f"Hugging Face cache, so set HF_HUB_CACHE={cache_dir} instead")
