"""Waterbirds (paper 1, section 4.3): group accuracies and the spurious-head mean-ablation.

The original ``compute_use_specific_heads.py`` mean-ablates, besides the listed heads, every attention layer
but the last 4 and all the MLP terms (embedding term included), then classifies. Here the same
representation is built from per-head logits, so that any number of head sets (random trials) costs one pass
over the arrays.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from utils.errors import InputError

# The heads the paper mean-ablates, from the original code (layer, head): "geo" (location) and "setting"
# (image setting / background) heads of the last 4 layers.
SPURIOUS_HEADS: dict[str, dict[str, list[tuple[int, int]]]] = {
    "ViT-H-14": {"geo": [(31, 8), (30, 15), (30, 12), (30, 6), (29, 14), (29, 8)],
                 "setting": [(31, 12), (30, 11), (29, 4)]},
    "ViT-L-14": {"geo": [(21, 1), (22, 12), (22, 13), (21, 11), (21, 14), (23, 6)],
                 "setting": [(21, 3), (21, 6), (21, 8), (21, 13), (22, 2), (22, 12), (22, 15), (23, 1), (23, 3),
                             (23, 5)]},
    "ViT-B-16": {"geo": [(11, 6), (11, 0)],
                 "setting": [(11, 3), (10, 11), (10, 10), (9, 8), (9, 6)]},
}

GROUP_NAMES = ["landbird on land", "landbird on water", "waterbird on land", "waterbird on water"]


def default_heads(model: str) -> list[tuple[int, int]]:
    """The paper's heads for ``model`` (geo then setting, as the original orders them; duplicates once)."""
    if model not in SPURIOUS_HEADS:
        raise InputError(f"--model {model}: no default head list (known: {', '.join(SPURIOUS_HEADS)}); "
                         f"pass --heads LAYER.HEAD,LAYER.HEAD,...")
    lists = SPURIOUS_HEADS[model]
    return list(dict.fromkeys(lists["geo"] + lists["setting"]))


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """``"11.3,10.11"`` -> ``[(11, 3), (10, 11)]`` (duplicates dropped, order kept)."""
    heads = []
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        try:
            layer, head = item.split(".")
            heads.append((int(layer), int(head)))
        except ValueError:
            raise InputError(f"--heads: '{item}' is not LAYER.HEAD (e.g. 11.3)") from None
    if not heads:
        raise InputError(f"--heads '{spec}': no heads given")
    return list(dict.fromkeys(heads))


def check_heads(heads: Sequence[tuple[int, int]], num_layers: int, num_heads: int, what: str = "--heads") -> None:
    """Raise naming the first head outside a [num_layers, num_heads] model."""
    for layer, head in heads:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise InputError(f"{what}: head {layer}.{head} is out of range for a model with {num_layers} layers "
                             f"and {num_heads} heads per layer")


def group_accuracies(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy (%) per (class, background) group and the worst group; ``labels`` [B, 2] = (class, place).

    Groups are indexed ``2 * class + place``; an empty group is reported as ``None`` and skipped by "worst".
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != 2:
        raise InputError(f"group accuracies need labels [B, 2] = (class, background), got {labels.shape}")
    pred = np.asarray(logits).argmax(-1)
    hit = pred == labels[:, 0]
    group = 2 * labels[:, 0] + labels[:, 1]
    per = {}
    for g, name in enumerate(GROUP_NAMES):
        sel = group == g
        per[name] = float(hit[sel].mean() * 100) if sel.any() else None
    present = [v for v in per.values() if v is not None]
    return {"groups": per, "worst_group": min(present) if present else None, "average": float(hit.mean() * 100),
            "group_sizes": {name: int((group == g).sum()) for g, name in enumerate(GROUP_NAMES)}}


def head_logits(attn: np.ndarray, mlp: np.ndarray, classifier: np.ndarray, first_layer: int,
                chunk: int = 1024, rest: Optional[np.ndarray] = None) -> dict:
    """One pass: what the ablation study needs, for the heads of layers ``first_layer..L-1``.

    Returns ``baseline`` [B, C] (everything summed @ classifier), ``ablated`` [B, C] (attention layers
    ``< first_layer`` and all MLP terms mean-ablated, the last layers as they are) and ``centred`` [B, h, C]:
    each last-layer head's ``(x - mean) @ classifier``; mean-ablating a set S of those heads gives
    ``ablated - centred[:, S].sum(1)``. For a file of ``compute_prs.py --layers``, ``first_layer`` indexes
    ``attn``'s (kept) layer axis and ``rest`` [B, d], the layers not kept, joins the mean-ablated part.
    """
    B, L, H, d = attn.shape
    W = np.asarray(classifier, np.float32)
    sum_attn = np.zeros((L, H, d), np.float64)
    sum_mlp = np.zeros(mlp.shape[1:], np.float64)
    sum_rest = np.zeros(d, np.float64)
    for s in range(0, B, chunk):
        sum_attn += np.asarray(attn[s:s + chunk], np.float32).sum(0)
        sum_mlp += np.asarray(mlp[s:s + chunk], np.float32).sum(0)
        if rest is not None:
            sum_rest += np.asarray(rest[s:s + chunk], np.float32).sum(0)
    mean_attn, mean_mlp = (sum_attn / B).astype(np.float32), (sum_mlp / B).astype(np.float32)
    const = mean_attn[:first_layer].sum((0, 1)) + mean_mlp.sum(0)  # [d]
    if rest is not None:
        const = const + (sum_rest / B).astype(np.float32)
    nh = (L - first_layer) * H
    baseline = np.zeros((B, W.shape[1]), np.float32)
    ablated = np.zeros_like(baseline)
    centred = np.zeros((B, nh, W.shape[1]), np.float32)
    last_mean = mean_attn[first_layer:].reshape(nh, d)
    for s in range(0, B, chunk):
        a = np.asarray(attn[s:s + chunk], np.float32)
        m = np.asarray(mlp[s:s + chunk], np.float32)
        last = a[:, first_layer:].reshape(len(a), nh, d)
        total = a.sum((1, 2)) + m.sum(1)
        if rest is not None:
            total = total + np.asarray(rest[s:s + chunk], np.float32)
        baseline[s:s + chunk] = total @ W
        ablated[s:s + chunk] = (const + last.sum(1)) @ W
        centred[s:s + chunk] = (last - last_mean) @ W
    return {"baseline": baseline, "ablated": ablated, "centred": centred}


def ablate(parts: dict, heads: Sequence[tuple[int, int]], first_layer: int, num_heads: int) -> np.ndarray:
    """Logits [B, C] with ``heads`` mean-ablated on top of the base ablation (heads before ``first_layer`` are
    already mean-ablated there)."""
    idx = [(l - first_layer) * num_heads + h for l, h in heads if l >= first_layer]
    return parts["ablated"] - parts["centred"][:, idx].sum(1) if idx else parts["ablated"].copy()


def random_head_sets(n_heads: int, trials: int, first_layer: int, num_layers: int, num_heads: int,
                     seed: int = 0) -> list[list[tuple[int, int]]]:
    """``trials`` random sets of ``n_heads`` distinct heads from layers ``first_layer..`` (seeded)."""
    pool = [(l, h) for l in range(first_layer, num_layers) for h in range(num_heads)]
    if n_heads > len(pool):
        raise InputError(f"cannot draw {n_heads} heads from the {len(pool)} heads of the last layers")
    rng = np.random.default_rng(seed)
    return [[pool[i] for i in sorted(rng.choice(len(pool), n_heads, replace=False))] for _ in range(trials)]


def best_random(parts: dict, labels: np.ndarray, sets: Sequence[Sequence[tuple[int, int]]], first_layer: int,
                num_heads: int) -> Optional[dict]:
    """Every random set mean-ablated in turn: the mean over the sets of each group's accuracy and of the worst
    group's (``mean``, ``mean_worst_group``: what the report compares with the paper), and the set with the best
    worst-group accuracy (``best``, ``best_heads``), with every trial's worst-group accuracy."""
    if not sets:
        return None
    trials = [group_accuracies(ablate(parts, s, first_layer, num_heads), labels) for s in sets]
    worst = [t["worst_group"] for t in trials]
    best = int(np.argmax(worst))
    groups = {g: None if any(t["groups"][g] is None for t in trials) else float(np.mean([t["groups"][g] for t in trials]))
              for g in trials[0]["groups"]}
    mean = {"groups": groups, "worst_group": float(np.mean(worst)),
            "average": float(np.mean([t["average"] for t in trials]))}
    return {"mean": mean, "best": trials[best], "best_heads": [f"{l}.{h}" for l, h in sets[best]],
            "worst_group_per_trial": worst, "mean_worst_group": mean["worst_group"]}
