"""PCLens' command lines, ``python -m utils.scripts.<name>``, as thin modules over this project's library.

  compute_activation_values   -> utils.decomposition.decompose_dataset (PCLens' file names, its image subsets)
  compute_images_embedding    -> utils.files.readers.final_embeddings (the summed decomposition)
  compute_classes_embeddings  -> utils.cli.run_classifier (as compute_text_projection.py)
  compute_text_embeddings     -> utils.text.embeddings.encode_texts (as compute_text_set_projection.py)
  compute_text_explanations   -> utils.text.completeness (as compute_complete_text_set.py; PCLens' JSONL output)

Run them from the repository root, as PCLens' README does.
File names, PCLens' conventions and what differs: docs/pclens.md.
"""
from __future__ import annotations

import argparse


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


def add_cache_dir_arg(parser: argparse.ArgumentParser) -> None:
    """PCLens' ``--cache_dir``: where open_clip puts downloaded weights (``utils.models.load_model``'s
    ``cache_dir``)."""
    parser.add_argument("--cache_dir", default=None, type=str,
                        help="where downloaded weights go (open_clip's cache_dir; default: the Hugging Face cache)")
