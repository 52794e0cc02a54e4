"""Helpers of the notebooks (demo.ipynb, nns.ipynb): text and head heatmaps, TextSpan files, nearest neighbours.

All plotting is matplotlib; nothing here needs a GPU or the network.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from utils.errors import InputError
from utils.files.atomic import save_figure
from utils.segmentation import overlay, unnormalize, upsample_patch_scores

__all__ = ["parse_textspan_heads", "find_textspan_file", "text_maps", "centered", "plot_map_grid",
           "embed_heads", "topk_similar", "show_neighbours", "overlay", "unnormalize"]

_HEAD_LINE = re.compile(r"^Layer (\d+), Head (\d+)\s*$")


# ----------------------------------------------------------------------------- TextSpan files
def parse_textspan_heads(path: str | Path) -> dict[tuple[int, int], list[str]]:
    """Read a ``{dataset}_completeness_{text_set}_top_{m}_heads_{model}.txt`` file (compute_complete_text_set.py).

    The format is the original's: for each head a ``----`` line, ``Layer {l}, Head {h}``, a ``----`` line, then
    one text per line; at the end a ``----`` line and the ``Current accuracy`` / ``Number of texts`` lines.
    Returns ``{(layer, head): [texts...]}`` in file order. Raises ``ValueError`` naming the file when it has
    no head section.
    """
    path = Path(path)
    heads: dict[tuple[int, int], list[str]] = {}
    current: Optional[list[str]] = None
    for line in path.read_text().splitlines():
        m = _HEAD_LINE.match(line.strip())
        if m:
            current = heads.setdefault((int(m.group(1)), int(m.group(2))), [])
        elif line.startswith("---"):
            continue
        elif line.startswith(("Current accuracy", "Number of texts")):
            current = None
        elif current is not None and line.strip():
            current.append(line.rstrip("\n"))
    if not heads:
        raise InputError(f"{path}: no 'Layer L, Head H' sections; not a TextSpan heads file")
    return heads


def find_textspan_file(folder: str | Path, model: str, dataset: Optional[str] = None) -> Optional[Path]:
    """The newest ``*_completeness_*_heads_{model}.txt`` in ``folder`` (of ``dataset`` if given), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    prefix = f"{dataset}_completeness_" if dataset else "*_completeness_"
    files = sorted(folder.glob(f"{prefix}*_heads_{model}.txt"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


# ----------------------------------------------------------------------------- heatmaps
def text_maps(patch_terms: torch.Tensor, text_features: torch.Tensor, grid: Sequence[int],
              patch: Sequence[int]) -> np.ndarray:
    """Per-text heatmaps of one image: patch terms ``[n, d]`` @ texts ``[T, d]``ᵀ, upsampled → ``[T, H, W]``."""
    scores = patch_terms.float() @ text_features.float().t()  # [n, T]
    return upsample_patch_scores(scores[None], grid, patch)[0].cpu().numpy()


def centered(maps: np.ndarray) -> np.ndarray:
    """Each map minus the mean map over the first axis (what one text adds over the others): ``[T, H, W]``."""
    return maps - maps.mean(0, keepdims=True)


def plot_map_grid(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], row_titles: Sequence[str],
                  col_titles: Sequence[Sequence[str]], path: Optional[str | Path] = None, alpha: float = 0.6,
                  cmap: str = "seismic", symmetric: bool = True, title: str = ""):
    """One row per image: the photo, then its maps overlaid with ONE colour scale for the whole figure.

    ``maps[i]`` is ``[T_i, H, W]``. With ``symmetric`` the scale is ``[-m, m]`` with m the largest |value| over
    every map, so the same colour means the same score in every panel (the original set each panel's range
    from a typo'd pair of maps). Returns the figure; with ``path`` it is saved (atomically) and closed, so
    show it with ``IPython.display.display(fig)``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    allv = np.concatenate([np.asarray(m).ravel() for m in maps])
    if symmetric:
        m = float(np.abs(allv).max()) or 1.0
        vmin, vmax = -m, m
    else:
        vmin, vmax = float(allv.min()), float(allv.max())
        vmax = vmax if vmax > vmin else vmin + 1.0
    ncols = 1 + max(len(m) for m in maps)
    fig, axes = plt.subplots(len(images), ncols, figsize=(2.4 * ncols, 2.5 * len(images) + 0.4), squeeze=False,
                             layout="constrained")
    for i, (img, mm) in enumerate(zip(images, maps)):
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(row_titles[i], fontsize=8)
        for j in range(ncols - 1):
            ax = axes[i, j + 1]
            if j < len(mm):
                ax.imshow(overlay(img, mm[j], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax))
                ax.set_title(col_titles[i][j], fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes.ravel().tolist(), shrink=0.6,
                 label="score minus the mean over texts" if symmetric else "score")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig


# ----------------------------------------------------------------------------- nearest neighbours
@torch.no_grad()
def embed_heads(engine, loader: Iterable, layer_heads: Sequence[tuple[int, int]], progress: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-spatial decomposition (``engine``, a ``prs_hook.Decomposer``) of a whole loader.

    Returns ``(heads [B, K, d], clip [B, d])``: the projected terms of the K (layer, head) pairs and the
    normalised CLIP embedding (``encode_image`` / its norm, from the same forward), float32 on the CPU.
    """
    layers = torch.tensor([l for l, _ in layer_heads])
    heads = torch.tensor([h for _, h in layer_heads])
    out_heads, out_clip = [], []
    for images, *_ in tqdm.tqdm(loader, desc="embed", unit="batch", disable=not progress):
        d = engine(images)  # attn [b, L, H, d]
        out_heads.append(d.attn[:, layers, heads].cpu())
        out_clip.append(F.normalize(d.representation, dim=-1).cpu())
    return torch.cat(out_heads), torch.cat(out_clip)


def topk_similar(query: torch.Tensor, bank: torch.Tensor, k: int, exclude: Optional[int] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of ``query`` ``[d]`` (or ``[Q, d]``) to every row of ``bank`` ``[B, d]``; top ``k``.

    One matrix product and one ``topk``: returns ``(scores [.., k], indices [.., k])``. ``exclude`` drops one
    bank index (the query itself).
    """
    q = F.normalize(query.float(), dim=-1)
    sims = q @ F.normalize(bank.float(), dim=-1).t()
    if exclude is not None:
        sims[..., exclude] = -float("inf")
    k = min(k, bank.shape[0] - (exclude is not None))
    return sims.topk(k, dim=-1)


def show_neighbours(query_image: np.ndarray, rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[float]]],
                    path: Optional[str | Path] = None, title: str = ""):
    """The query, then one row of top-k images per ranking (``(name, images, scores)``). Returns the figure
    (saved and closed when ``path`` is given)."""
    import matplotlib.pyplot as plt

    k = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(2.0 * (k + 1), 2.6 * len(rows)), squeeze=False,
                             layout="constrained")
    for i, (name, images, scores) in enumerate(rows):
        axes[i, 0].imshow(query_image)
        axes[i, 0].set_title("query", fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=8)
        for j in range(k):
            if j < len(images):
                axes[i, j + 1].imshow(images[j])
                axes[i, j + 1].set_title(f"{name}\n#{j + 1}: {scores[j]:.3f}", fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        save_figure(fig, path, dpi=110)
    return fig
