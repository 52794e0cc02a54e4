"""Component-level interventions on a stored decomposition: remove one principal component of one head.

A head's outputs ``x_i`` [d] over the images have a mean ``mu`` and principal components (PCLens'
``svd_data_approx``: ``utils.text.textspan.pclens_from_stats``, or the ``vh`` rows of its JSONL). Removing the
unit component ``v`` replaces every ``x_i`` by ``x_i - <x_i - mu, v> v``: the head keeps its mean and loses its
variation along ``v`` (``centre=False``: ``x_i - <x_i, v> v``, the whole projection). Since the image embedding is
the sum of the decomposition (``utils.decomposition.summed_embeddings``), the edited embedding is
``e_i - <x_i - mu, v> v``; ``remove_component`` computes it, ``component_intervention`` also the zero-shot
accuracy and the cosine with a text before and after. Neither PCLens nor the original offer this as a function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.decomposition import summed_embeddings
from utils.errors import InputError
from utils.metrics import hits, percent
from utils.neurons.sparse import cosine_rows

__all__ = ["InterventionResult", "remove_component", "component_intervention"]


def _unit(component: np.ndarray, d: int) -> np.ndarray:
    v = np.asarray(component, np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if v.shape != (d,) or not np.isfinite(norm) or norm == 0:
        raise InputError(f"component of shape {list(np.shape(component))} (norm {norm:.3g}): expected a non-zero "
                         f"[{d}] vector")
    return v / norm


def _removed(attn: np.ndarray, layer: int, head: int, component: np.ndarray, centre: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """The unit component ``v`` [d] and each image's coefficient along it [B] (``remove_component``'s)."""
    if np.ndim(attn) != 4:
        raise InputError(f"attn of shape {list(np.shape(attn))}: expected [B, K, H, d]")
    B, K, H, d = attn.shape
    if not (0 <= layer < K and 0 <= head < H):
        raise InputError(f"head ({layer}, {head}): the attn array {list(attn.shape)} has {K} layers of {H} heads")
    v = _unit(component, d)
    x = np.asarray(attn[:, layer, head], np.float64)  # [B, d]
    if centre:
        x = x - x.mean(0)
    return v, x @ v


def remove_component(attn: np.ndarray, mlp: np.ndarray, layer: int, head: int, component: np.ndarray,
                     attn_rest: Optional[np.ndarray] = None, centre: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The image embeddings with ``component`` removed from head (``layer``, ``head``).

    Args:
        attn: [B, K, H, d] (``layer`` indexes this layer axis), mlp: [B, L+1, d], attn_rest: [B, d] or None
            (the arrays of ``compute_prs.py`` / ``utils.scripts.compute_activation_values``; memmaps are fine).
        component: [d], any non-zero length (made unit).
        centre: remove the variation around the head's mean over the images (PCLens' components are those of
            the centred head); ``False``: the whole projection.
    Returns:
        (embeddings [B, d] float64 before any normalisation, coefficients [B]: the ``<x_i - mu, v>`` removed).
    """
    v, coef = _removed(attn, layer, head, component, centre)
    return summed_embeddings(attn, mlp, attn_rest, dtype=np.float64) - coef[:, None] * v, coef


@dataclass(frozen=True)
class InterventionResult:
    """``component_intervention``'s record: ``accuracy_before`` / ``accuracy_after`` (top-1, %),
    ``similarity_before`` / ``similarity_after`` [B] (cosine of each image embedding with the text; ``None``
    without a text), ``coefficients`` [B] (what was removed along the unit component) and ``embeddings``
    [B, d] (after)."""
    accuracy_before: float
    accuracy_after: float
    similarity_before: Optional[np.ndarray]
    similarity_after: Optional[np.ndarray]
    coefficients: np.ndarray
    embeddings: np.ndarray


def component_intervention(attn: np.ndarray, mlp: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
                           layer: int, head: int, component: np.ndarray, text: Optional[np.ndarray] = None,
                           attn_rest: Optional[np.ndarray] = None, centre: bool = True) -> InterventionResult:
    """Remove ``component`` from head (``layer``, ``head``) (``remove_component``) and measure the effect.

    ``classifier`` [d, C] and ``labels`` [B]: the zero-shot accuracy of the embeddings before and after;
    ``text`` [d] (a text embedding): the cosine of each image embedding with it, before and after.
    """
    v, coef = _removed(attn, layer, head, component, centre)
    before = summed_embeddings(attn, mlp, attn_rest, dtype=np.float64)
    after = before - coef[:, None] * v
    W = np.asarray(classifier, np.float64)
    if W.ndim != 2 or W.shape[0] != after.shape[1] or len(labels) != after.shape[0]:
        raise InputError(f"classifier {list(W.shape)} and labels [{len(labels)}] do not match the embeddings "
                         f"{list(after.shape)}")
    y = np.asarray(labels)
    B = len(y)
    sims = (None, None)
    if text is not None:
        t = np.asarray(text, np.float64).reshape(-1)
        if t.shape != (after.shape[1],):
            raise InputError(f"text embedding of shape {list(np.shape(text))}: expected [{after.shape[1]}]")
        texts = np.broadcast_to(t, before.shape)
        sims = (cosine_rows(before, texts), cosine_rows(after, texts))
    return InterventionResult(percent(hits(before @ W, y), B), percent(hits(after @ W, y), B), *sims,
                              coefficients=coef, embeddings=after)
