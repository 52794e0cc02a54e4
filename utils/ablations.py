"""Paper 1's mean-ablation study (section 3), streamed over image chunks.

Every mean-ablation replaces a component of the first-order decomposition by its mean over the dataset and
re-classifies the summed representation with the zero-shot classifier. Arrays are read in chunks of images, so
ImageNet-size memmaps never load whole. Paper 2's ablations of neurons are in ``utils.neurons.ablations``.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from utils.metrics import hits, percent


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
        correct += hits(logits, labels[s])
        if return_logits:
            logits_all.append(logits)
    acc = OrderedDict((n, float(a)) for n, a in zip(names, percent(correct, B)))
    out = {"accuracy": acc, "order": names}
    if return_logits:
        out["logits"] = np.concatenate(logits_all, 1)
    return out
