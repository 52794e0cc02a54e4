"""Consumers of the merged second-order file [images, neurons, d] (paper 2): per-neuron means and first PCs.

The file is memory-mapped and read in chunks of neurons (one read per chunk), so a 32 GB ViT-B-32 file is never
loaded whole.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import tqdm

from utils.errors import InputError


def _neuron_chunks(K: int, size: int) -> Iterable[slice]:
    for s in range(0, K, size):
        yield slice(s, min(K, s + size))


def neurons_per_chunk(merged: np.ndarray, max_bytes: int = 2 ** 30) -> int:
    """How many neurons of ``merged`` [B, K, d] fit in ``max_bytes`` as float32 (at least 1)."""
    B, _, d = merged.shape
    return max(1, int(max_bytes // (B * d * 4)))


def neuron_means(merged: np.ndarray, chunk: Optional[int] = None, progress: bool = False) -> np.ndarray:
    """Mean over images of ``merged`` [B, K, d] -> [K, d] float32, read in neuron chunks (float64 sums)."""
    B, K, d = merged.shape
    out = np.empty((K, d), np.float32)
    chunk = chunk or neurons_per_chunk(merged)
    for s in tqdm.tqdm(list(_neuron_chunks(K, chunk)), desc="neuron means", unit="chunk", disable=not progress):
        out[s] = np.asarray(merged[:, s], np.float64).mean(0)
    return out


def neuron_pcas(merged: np.ndarray, top_k: int, chunk: Optional[int] = None,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, the signed first principal component of its ``top_k`` most-changed images (Q3).

    For neuron k: centre ``merged[:, k]`` [B, d] by its mean over images, keep the ``top_k`` rows with the largest
    norm, take their first right singular vector (no re-centring), and flip it unless more than ``top_k // 2`` of
    those rows project positively on it. ``merged`` is read in neuron chunks (one read per chunk).

    Returns ``(pcas [K, d], norms [K, top_k])``, float32; ``norms`` are the top-k centred norms, ascending.
    """
    B, K, d = merged.shape
    if not 1 <= top_k <= B:
        raise InputError(f"--top_k_pca {top_k}: must be between 1 and the number of images ({B})")
    pcas = np.empty((K, d), np.float32)
    norms = np.empty((K, top_k), np.float32)
    chunk = chunk or neurons_per_chunk(merged)
    for s in tqdm.tqdm(list(_neuron_chunks(K, chunk)), desc="PCA", unit="chunk", disable=not progress):
        x = np.asarray(merged[:, s], np.float64)  # [B, c, d]
        x = (x - x.mean(0)).transpose(1, 0, 2)  # [c, B, d]
        n = np.linalg.norm(x, axis=-1)  # [c, B]
        top = np.argsort(n, axis=-1)[:, -top_k:]  # [c, top_k], ascending norm
        rows = np.take_along_axis(x, top[..., None], axis=1)  # [c, top_k, d]
        _, _, vh = np.linalg.svd(rows, full_matrices=False)
        pc = vh[:, 0]  # [c, d]
        positive = ((rows @ pc[..., None])[..., 0] > 0).sum(-1)  # [c]
        pc = np.where((positive > top_k // 2)[:, None], pc, -pc)
        pcas[s] = pc
        norms[s] = np.take_along_axis(n, top, axis=-1)
    return pcas, norms
