"""Paper 2's zero-shot segmentation by neurons (section 5): per class, the neurons whose first PCs are most aligned
with its classifier column; the heatmap of an image is the mean activation of its predicted class's neurons at
each image token, scored with the same metrics as paper 1's heatmaps (``utils.segmentation``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from utils.errors import InputError
from utils.segmentation import _minmax, score_heatmaps, upsample_patch_scores

NEURON_THRESHOLD = 0.5  # the original's fixed foreground threshold (quirk N3)


def select_neurons(pcs: np.ndarray, classifier: np.ndarray, top_neurons: int, random: bool = False,
                   seed: int = 0) -> np.ndarray:
    """Per class, the ``top_neurons`` rows of the stacked PCs ``[P, d]`` most aligned with its classifier column.

    The score of row i for class c is ``|pcs[i] · classifier[:, c]|`` (the PC's sign plays no part, quirk N2).
    ``random``: a seeded random choice of ``top_neurons`` distinct rows per class instead. Returns ``[C, k]``
    row indices, ascending score (random: in drawn order).
    """
    P = pcs.shape[0]
    if not 1 <= top_neurons <= P:
        raise InputError(f"--top_neurons {top_neurons}: must be between 1 and the {P} neurons of the listed layers")
    C = classifier.shape[1]
    if random:
        rng = np.random.default_rng(seed)
        return np.stack([rng.choice(P, top_neurons, replace=False) for _ in range(C)])
    scores = np.abs(np.asarray(pcs, np.float32) @ np.asarray(classifier, np.float32))  # [P, C]
    return np.argsort(scores, axis=0, kind="stable")[-top_neurons:].T.copy()  # [C, k]


def neuron_layer_pairs(rows: np.ndarray, layers: Sequence[int], num_neurons: int) -> np.ndarray:
    """Stacked-PC rows ``[...]`` -> ``[..., 2]`` (neuron, layer): row i is neuron ``i % M`` of ``layers[i // M]``.

    (The original adds ``i // M`` to the first layer, which is only right for consecutive ascending layers: N1.)
    """
    rows = np.asarray(rows)
    return np.stack([rows % num_neurons, np.asarray(layers)[rows // num_neurons]], -1)


@torch.no_grad()
def neuron_heatmaps(engine, images: torch.Tensor, classifier: torch.Tensor, selection: torch.Tensor,
                    layers: Sequence[int], grid: Sequence[int], patch: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of ``engine`` (a ``prs_hook.Decomposer``) keeping the post-activation values of ``layers``;
    per image its class's map.

    Args:
        classifier: ``[d, C]``; selection: ``[C, k]`` stacked-PC rows (``select_neurons``) on ``engine.device``.
    Returns:
        ``(heatmaps [b, H, W], chosen [b], degenerate [b], neuron maps [b, grid_h, grid_w])``: the mean
        activation of the chosen class's neurons at each image token (CLS dropped, row-major grid), and that
        map upsampled and min–max normalised per image (a constant map is all zeros, ``degenerate``).
    """
    d = engine(images, post_activations=layers)
    chosen = (d.representation.to(classifier.dtype) @ classifier).argmax(-1)  # [b]
    act = torch.cat([d.post_activations[l][:, 1:].float() for l in layers], -1)  # [b, n, P]: row i = stacked PC i
    index = selection[chosen]  # [b, k]
    maps = act.gather(2, index[:, None, :].expand(-1, act.shape[1], -1)).mean(-1)  # [b, n]
    res, degenerate = _minmax(upsample_patch_scores(maps[..., None], grid, patch)[:, 0])  # [b, H, W]
    return res, chosen, degenerate, maps.view(-1, *grid)


def evaluate_neuron_batch(engine, images: torch.Tensor, targets: torch.Tensor, classifier: torch.Tensor,
                          selection: torch.Tensor, layers: Sequence[int], grid: Sequence[int],
                          patch: Sequence[int], thr: float = 0.0) -> dict[str, np.ndarray]:
    """Heatmaps and metrics of one batch (paper 2), every image on its own: ``score_heatmaps``'s arrays plus
    ``neuron_map`` ``[b, grid_h, grid_w]``."""
    res, chosen, degenerate, maps = neuron_heatmaps(engine, images, classifier, selection, layers, grid, patch)
    out = score_heatmaps(res, chosen, degenerate, targets, thr, threshold=NEURON_THRESHOLD)
    out["neuron_map"] = maps.cpu().numpy().astype(np.float32)
    return out
