"""The first-order decomposition of a whole dataset, streamed to files (compute_prs.py and PCLens'
``python -m utils.scripts.compute_activation_values``).

Per image (docs/design.md section 3): ``attn`` [L, H, d] (or the kept layers only, [len(layers), H, d]),
``mlp`` [L+1, d], ``cls_attn`` [L, d], with ``layers`` also ``attn_rest`` [d]; and the dataset's ``labels``.
The parts sum to the normalised embedding: ``attn.sum((1, 2)) + attn_rest + mlp.sum(1) = r / ||r||``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from prs_hook import Decomposer
from utils.errors import InputError
from utils.files.provenance import save_output
from utils.files.streaming import Output, is_main_process, stream_dataset

__all__ = ["decompose_dataset", "summed_embeddings"]


def decompose_dataset(model: torch.nn.Module | Decomposer, dataset, paths: Mapping[str, str | Path], *,
                      record: Mapping, device: Optional[str] = None, layers: Optional[Sequence[int]] = None,
                      dtype: str = "float32", batch_size: int = 2, num_workers: int = 0, resume: bool = False,
                      model_name: Optional[str] = None, desc: str = "decompose") -> dict[str, Path]:
    """Decompose every image of ``dataset`` and stream the terms to ``paths`` (resumable, torchrun-aware).

    Args:
        model: an open_clip model, or its ``prs_hook.Decomposer``.
        dataset: yields ``(preprocessed image [3, H, W], label)``, with ``labels`` (an array, one row per image).
        paths: name -> file for ``attn``, ``mlp``, ``cls_attn``, ``labels`` and, with ``layers``, ``attn_rest``
            (``utils.files.names.prs_paths`` / ``pclens_paths``).
        record: the outputs' provenance record (``utils.files.provenance.make_record``); ``layers`` is added
            when some layers are left out.
        layers: store the attention terms of these layers only (ascending, distinct), the others summed into
            ``attn_rest``; ``None`` or every layer: all of them, no ``attn_rest``.
        dtype: the storage dtype (``float32`` or ``float16``; the computation is float32).
        batch_size, num_workers, resume, desc: ``utils.files.streaming.stream_dataset``'s.
    Returns:
        name -> path of every file written (``labels``, ``attn``, ``mlp``, ``cls_attn`` and maybe ``attn_rest``).
    """
    engine = model if isinstance(model, Decomposer) else Decomposer(model, device, model_name)
    L, H, d = engine.num_layers, engine.num_heads, engine.out_dim
    if layers is not None:  # checked as the engine checks them; every layer: no attn_rest
        layers = list(engine.request(layers=layers).layers)
        layers = None if len(layers) == L else layers
    needed = ("attn", "mlp", "cls_attn", "labels") + (() if layers is None else ("attn_rest",))
    missing = [k for k in needed if k not in paths]
    if missing:
        raise InputError(f"decompose_dataset: no output path for {', '.join(missing)}")
    # the mlp file's entries (an extra last "pool" entry for towers read out by pooling) and L, for its readers
    record = dict(record, num_layers=L, mlp_terms=list(engine.mlp_labels))
    record = record if layers is None else dict(record, layers=layers)
    if is_main_process():
        save_output(paths["labels"], np.asarray(dataset.labels), dict(record, num_images=len(dataset)))
    outputs = {"attn": Output(paths["attn"], (L if layers is None else len(layers), H, d), dtype),
               "mlp": Output(paths["mlp"], (len(engine.mlp_labels), d), dtype),
               "cls_attn": Output(paths["cls_attn"], (L, d), dtype)}
    if layers is not None:
        outputs["attn_rest"] = Output(paths["attn_rest"], (d,), dtype)

    def compute(images, labels, start):
        return engine(images, layers=layers).numpy(*outputs)

    stream_dataset(dataset, outputs, compute, record=record, resume=resume, batch_size=batch_size,
                   num_workers=num_workers, desc=desc)
    return {"labels": Path(paths["labels"]), **{k: o.path for k, o in outputs.items()}}


def summed_embeddings(attn: np.ndarray, mlp: np.ndarray, attn_rest: Optional[np.ndarray] = None,
                      chunk: int = 1024, dtype: np.dtype = np.float32) -> np.ndarray:
    """The image embeddings the decomposition sums to, ``attn.sum((1, 2)) + attn_rest + mlp.sum(1)``, [B, d]
    ``dtype`` (summed in float64), read ``chunk`` images at a time (memmaps are fine).

    ``attn`` [B, K, H, d], ``mlp`` [B, L+1, d], ``attn_rest`` [B, d] (the layers ``compute_prs.py --layers`` left
    out) or ``None``."""
    B, d = attn.shape[0], attn.shape[-1]
    if attn.ndim != 4 or mlp.ndim != 3 or mlp.shape[0] != B or mlp.shape[-1] != d:
        raise InputError(f"attn {list(attn.shape)} and mlp {list(mlp.shape)}: expected [B, K, H, d] and [B, L+1, d]")
    if attn_rest is not None and attn_rest.shape != (B, d):
        raise InputError(f"attn_rest {list(attn_rest.shape)}: expected [{B}, {d}]")
    out = np.empty((B, d), dtype)
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        total = attn[s:e].sum((1, 2), dtype=np.float64) + mlp[s:e].sum(1, dtype=np.float64)
        if attn_rest is not None:
            total += attn_rest[s:e]
        out[s:e] = total
    return out
