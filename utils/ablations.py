"""Mean-ablation of decomposed components (paper 1, section 3), streamed over image chunks.

Every ablation replaces a component by its mean over the dataset and re-classifies the summed representation
with the zero-shot classifier. Arrays are read in chunks of images, so ImageNet-size memmaps never load whole.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np

from utils.io import load_array
from utils.cli import InputError


def load_decomposition(input_dir: str, dataset: str, model: str) -> dict[str, np.ndarray]:
    """Memory-map the arrays of compute_prs.py and compute_text_projection.py and check they agree.

    Returns ``attn`` [B, L, H, d], ``mlp`` [B, L+1, d], ``cls_attn`` [B, L, d], ``classifier`` [d, C] and
    ``labels`` [B] (the class column for Waterbirds' [B, 2]).
    """
    from utils.io import classifier_path, labels_path, prs_paths

    paths = prs_paths(input_dir, dataset, model)
    out = {k: load_array(p, "compute_prs.py") for k, p in paths.items()}
    cpath = classifier_path(input_dir, dataset, model)
    out["classifier"] = np.asarray(load_array(cpath, "compute_text_projection.py", mmap=False), np.float32)
    lpath = labels_path(input_dir, dataset)
    labels = np.asarray(load_array(lpath, "compute_prs.py", mmap=False))
    out["labels"] = labels[:, 0] if labels.ndim == 2 else labels
    check_decomposition(out, {**{k: str(p) for k, p in paths.items()}, "classifier": str(cpath), "labels": str(lpath)})
    return out


def check_decomposition(arrays: dict[str, np.ndarray], names: Optional[dict[str, str]] = None) -> None:
    """Raise ``ValueError`` naming the file whose shape disagrees with the others."""
    names = names or {}
    n = lambda k: names.get(k, k)  # noqa: E731
    attn, mlp = arrays["attn"], arrays["mlp"]
    if attn.ndim != 4:
        raise InputError(f"{n('attn')}: expected [B, L, H, d], got shape {attn.shape}")
    B, L, H, d = attn.shape
    if mlp.shape != (B, L + 1, d):
        raise InputError(f"{n('mlp')}: shape {mlp.shape} does not match attn {attn.shape} (expected {(B, L + 1, d)})")
    if "cls_attn" in arrays and arrays["cls_attn"].shape != (B, L, d):
        raise InputError(f"{n('cls_attn')}: shape {arrays['cls_attn'].shape}, expected {(B, L, d)}")
    if "classifier" in arrays:
        c = arrays["classifier"]
        if c.ndim != 2 or c.shape[0] != d:
            raise InputError(f"{n('classifier')}: shape {c.shape} does not match the embedding dim d={d} of "
                             f"{n('attn')} (wrong model?)")
    if "labels" in arrays:
        lab = arrays["labels"]
        if len(lab) != B:
            raise InputError(f"{n('labels')}: {len(lab)} labels but {B} images in {n('attn')}")
        if "classifier" in arrays and len(lab) and lab.max() >= arrays["classifier"].shape[1]:
            raise InputError(f"{n('labels')}: label {lab.max()} but the classifier has "
                             f"{arrays['classifier'].shape[1]} classes")


def _chunks(B: int, size: int):
    for s in range(0, B, size):
        yield slice(s, min(B, s + size))


def mean_ablation_study(attn: np.ndarray, mlp: np.ndarray, cls_attn: np.ndarray, classifier: np.ndarray,
                        labels: np.ndarray, chunk: int = 1024, return_logits: bool = False) -> dict:
    """The original ablation study. Returns ``accuracy`` (ordered dict, %) and optionally ``logits`` [K, B, C].

    Order: baseline; MLPs (all L+1 entries, the embedding term included) mean-ablated; CLS->CLS mean-ablated;
    both; then attention layers 0..i mean-ablated (summed over heads), cumulatively, for i = 0..L-1.
    """
    B, L = attn.shape[:2]
    # pass 1: means over images, accumulated in float64
    attn_mean = np.zeros(attn.shape[1:2] + attn.shape[3:], np.float64)  # [L, d]
    mlp_mean = np.zeros(mlp.shape[1:], np.float64)  # [L+1, d]
    cls_mean = np.zeros(cls_attn.shape[1:], np.float64)  # [L, d]
    for s in _chunks(B, chunk):
        attn_mean += np.asarray(attn[s], np.float32).sum((0, 2))
        mlp_mean += np.asarray(mlp[s], np.float32).sum(0)
        cls_mean += np.asarray(cls_attn[s], np.float32).sum(0)
    attn_mean, mlp_mean, cls_mean = (np.float32(m / B) for m in (attn_mean, mlp_mean, cls_mean))

    names = ["baseline", "mlps_mean_ablated", "cls_to_cls_mean_ablated", "mlps_and_cls_to_cls_mean_ablated"]
    names += [f"attn_layers_0_to_{i}_mean_ablated" for i in range(L)]
    correct = np.zeros(len(names), np.int64)
    logits_all = [] if return_logits else None
    for s in _chunks(B, chunk):
        layers = np.asarray(attn[s], np.float32).sum(2)  # [c, L, d]
        m = np.asarray(mlp[s], np.float32)
        cls = np.asarray(cls_attn[s], np.float32)
        mlp_sum, mlp_ablated = m.sum(1), mlp_mean.sum(0)[None]
        no_cls = (layers - cls + cls_mean[None]).sum(1)
        reps = [layers.sum(1) + mlp_sum, layers.sum(1) + mlp_ablated, no_cls + mlp_sum, no_cls + mlp_ablated]
        cum = np.cumsum(attn_mean, 0)  # [L, d]: mean of layers 0..i
        rest = np.cumsum(layers[:, ::-1], 1)[:, ::-1]  # [c, L, d]: sum of layers i..L-1
        for i in range(L):
            tail = rest[:, i + 1] if i + 1 < L else 0.0
            reps.append(mlp_sum + cum[i][None] + tail)
        logits = np.stack(reps) @ classifier  # [K, c, C]
        correct += (logits.argmax(-1) == labels[s][None]).sum(1)
        if return_logits:
            logits_all.append(logits)
    acc = OrderedDict((n, float(c) / B * 100) for n, c in zip(names, correct))
    out = {"accuracy": acc, "order": names}
    if return_logits:
        out["logits"] = np.concatenate(logits_all, 1)
    return out
