"""Looking at single neurons (paper 2): what visualize_neurons.ipynb and concept_discovery.ipynb compute.

- ``cached_neuron_means``: the per-neuron mean second-order effect over the training images ``[K, d]``, computed
  once from the merged file (read in chunks of neurons) and cached beside it as ``..._{layer}_mean.npy``.
- ``top_images``: the images with the largest *centred* second-order norm of one neuron. It reads one neuron
  column ``merged[:, k]`` ``[B, d]`` of the memory-mapped file, never the whole file.
- ``concept_scores``: the words of one image. A neuron is active on it when its centred norm exceeds its
  significance threshold (its ``top_k``-th largest training norm, column 0 of ``..._{top_k}_norm.npy``); a word
  scores the sum, over the active neurons whose sparse decomposition contains it, of coefficient × norm.
- ``plot_neuron`` / ``plot_concepts``: the figures, saved with ``utils.files.atomic.save_figure``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from utils.errors import InputError
from utils.files.atomic import load_array, save_figure
from utils.files.provenance import derived_record, save_output
from utils.neurons.pca import neuron_means

__all__ = ["cached_neuron_means", "top_images", "read_decomposition", "image_centred_norms", "active_neurons",
           "concept_scores", "display_image", "plot_neuron", "plot_concepts"]

Decomposition = Mapping[int, Sequence[Sequence]]  # neuron -> [[text index, coefficient, text], ...]


# ----------------------------------------------------------------------------- reading the training files
def cached_neuron_means(merged_path: str | Path, mean_path: str | Path, progress: bool = True) -> np.ndarray:
    """Mean over images of the merged file ``[B, K, d]`` -> ``[K, d]`` float32, cached at ``mean_path``.

    The cache is used when it is newer than the merged file and of shape ``[K, d]``; otherwise the means are
    computed (chunks of neurons, float64 sums) and written atomically, with a provenance record.
    """
    merged_path, mean_path = Path(merged_path), Path(mean_path)
    merged = load_array(merged_path, "compute_second_order_neuron_prs.py")  # memory-mapped
    if merged.ndim != 3:
        raise InputError(f"{merged_path}: expected [images, neurons, d], got shape {merged.shape}")
    if mean_path.is_file() and mean_path.stat().st_mtime >= merged_path.stat().st_mtime:
        mean = np.load(mean_path)
        if mean.shape == merged.shape[1:]:
            return mean
    mean = neuron_means(merged, progress=progress)
    save_output(mean_path, mean, derived_record([merged_path]))
    return mean


def top_images(merged: np.ndarray, mean: np.ndarray, neuron: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` images with the largest centred norm ``||merged[i, neuron] - mean[neuron]||``, largest first.

    Reads only the column ``merged[:, neuron]`` ``[B, d]``. Returns ``(image indices [top_k], norms [top_k])``.
    """
    B, K, _ = merged.shape
    if not 0 <= neuron < K:
        raise InputError(f"neuron {neuron}: out of range (the file has {K} neurons)")
    column = np.asarray(merged[:, neuron], np.float64)  # [B, d]
    norms = np.linalg.norm(column - mean[neuron], axis=-1)
    order = np.argsort(-norms, kind="stable")[:top_k]
    return order, norms[order]


def read_decomposition(path: str | Path) -> dict[int, list]:
    """compute_sparse_decomposition.py's JSON: ``{neuron: [[text index, coefficient, text], ...]}`` (int keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (written by compute_sparse_decomposition.py)")
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


# ----------------------------------------------------------------------------- one image
@torch.no_grad()
def image_centred_norms(effects, image: torch.Tensor, mean: np.ndarray) -> np.ndarray:
    """One forward of ``image`` ``[3, H, W]`` through ``effects`` (a ``SecondOrderEffects``): the centred norm of
    every neuron's second-order effect, ``||e_k - mean_k||`` ``[K]`` float64."""
    e, _ = effects(image[None])
    return np.linalg.norm(e[0].cpu().numpy().astype(np.float64) - mean, axis=-1)


def active_neurons(norms: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Indices of the neurons whose centred norm exceeds their significance threshold (both ``[K]``)."""
    if norms.shape != thresholds.shape:
        raise InputError(f"{len(norms)} neurons but {len(thresholds)} significance thresholds")
    return np.nonzero(norms > thresholds)[0]


def concept_scores(norms: np.ndarray, active: Sequence[int], decomposition: Decomposition) -> list[tuple[str, float]]:
    """Per word, the sum over the active neurons of its coefficient in their decomposition × their centred norm.

    Words are the texts of the decomposition (stripped); returns ``[(word, score), ...]``, highest first.
    """
    scores: dict[str, float] = {}
    for k in active:
        for _, coefficient, text in decomposition[int(k)]:
            word = str(text).strip()
            scores[word] = scores.get(word, 0.0) + float(coefficient) * float(norms[k])
    return sorted(scores.items(), key=lambda kv: -kv[1])


# ----------------------------------------------------------------------------- figures
def display_image(image, size: int = 224) -> np.ndarray:
    """A PIL image as the figures show it: shorter side to ``size`` (bicubic), centre crop, ``[size, size, 3]``."""
    import torchvision.transforms as T

    image = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(image.convert("RGB")))
    return np.asarray(image)


def _bars(ax, words: Sequence[tuple[str, float]], xlabel: str) -> None:
    names = [w for w, _ in words][::-1]
    values = [v for _, v in words][::-1]
    ax.barh(range(len(values)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
    ax.set_yticks(range(len(values)), names, fontsize=8)
    ax.axvline(0, color="k", linewidth=0.5)
    ax.set_xlabel(xlabel)


def plot_neuron(images: Sequence[np.ndarray], words: Sequence[tuple[str, float]], title: str,
                path: Optional[str | Path] = None):
    """A neuron: its top images in a square-ish grid (largest first, row-major) beside its decomposition's words
    and signed coefficients. Returns the figure; with ``path`` it is saved and closed (show it with ``display``)."""
    import matplotlib.pyplot as plt

    cols = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / cols))
    fig = plt.figure(figsize=(1.6 * cols + 5, max(1.6 * rows, 0.25 * len(words)) + 0.8), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.6 * cols, 5])
    axes = np.atleast_1d(left.subplots(rows, cols, squeeze=False)).ravel()
    for ax, img in zip(axes, images):
        ax.imshow(img)
    for ax in axes:
        ax.axis("off")
    if words:
        _bars(right.subplots(), words, "coefficient")
    fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig


def plot_concepts(image: np.ndarray, words: Sequence[tuple[str, float]], title: str,
                  path: Optional[str | Path] = None):
    """The image beside a bar chart of its top words' scores. Returns the figure (saved and closed with ``path``)."""
    import matplotlib.pyplot as plt

    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=[1, 1.3], layout="constrained")
    ax_img.imshow(image)
    ax_img.axis("off")
    _bars(ax_bar, words, "score: sum over active neurons of coefficient × centred norm")
    fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig
