"""Ablation studies, streamed over image chunks.

Paper 1 (section 3): every mean-ablation replaces a component of the first-order decomposition by its mean over
the dataset and re-classifies the summed representation with the zero-shot classifier. Arrays are read in
chunks of images, so ImageNet-size memmaps never load whole.

Paper 2 (section 4): the second-order effects of one MLP layer's neurons are mean-ablated, kept only where a
neuron is significant, or replaced by their projection on the neuron's first PC (``ablation_logits``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch
import tqdm

from utils.second_order import COEFFICIENT, SecondOrderEffects


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


# ----------------------------------------------------------------------------- paper 2: second-order ablations
@torch.no_grad()
def accuracy_over_dataset(effects: SecondOrderEffects, dataset, labels: np.ndarray,
                          logits_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                          batch_size: int, num_workers: int = 0, desc: str = "evaluate") -> dict[str, float]:
    """Top-1 accuracy (%) of each set of logits ``logits_fn(effects [b, K, d], representation [b, d])`` returns
    (name -> [b, C]), over ``dataset`` in order, against ``labels`` [B]; one forward pass per batch."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct: dict[str, int] = {}
    start = 0
    for images, _ in tqdm.tqdm(loader, desc=desc, unit="batch"):
        batch_effects, representation = effects(images)
        target = torch.from_numpy(np.asarray(labels[start:start + len(images)])).to(effects.device)
        start += len(images)
        for k, v in logits_fn(batch_effects, representation).items():
            correct[k] = correct.get(k, 0) + int((v.argmax(-1) == target).sum())
    return {k: 100.0 * c / max(1, len(labels)) for k, c in correct.items()}


ABLATIONS = {  # JSON key: the original script's printed line
    "baseline": "Baseline (from representations)",
    "all_neurons_mean_ablated": "Without all the neurons",
    "only_non_significant_kept": "Without significant neurons",
    "only_significant_kept": "Without insignificant neurons",
    "projected_to_first_pc": "With neurons reconstructed from PC",
}


@torch.no_grad()
def ablation_logits(effects: torch.Tensor, representation: torch.Tensor, neuron_mean: torch.Tensor,
                    pcas: torch.Tensor, thresholds: torch.Tensor, classifier: torch.Tensor,
                    coefficient: float = COEFFICIENT) -> dict[str, torch.Tensor]:
    """Logits ``[b, C]`` per ablation of ``ABLATIONS`` (second paper, section 4).

    ``effects`` [b, K, d] (this batch's second-order effects, scaled by ``coefficient``), ``representation``
    [b, d] (unnormalised), ``neuron_mean`` [K, d] (training mean per neuron), ``pcas`` [K, d] (unit first PCs),
    ``thresholds`` [K] (a neuron is significant on an image when its centred norm exceeds this: its top_k-th
    largest training norm), ``classifier`` [d, C]. Every ablation starts from ``coefficient * r/||r||`` with all
    effects replaced by their means, then adds back: nothing; the centred effects of the non-significant or of
    the significant neurons; or each centred effect's projection on its neuron's PC.
    """
    rep = coefficient * representation.float() / representation.float().norm(dim=-1, keepdim=True)
    centred = effects - neuron_mean  # [b, K, d]
    ablated = rep - effects.sum(1) + neuron_mean.sum(0)
    significant = (centred.norm(dim=-1) > thresholds).float()  # [b, K]
    sig_sum = torch.einsum("bk,bkd->bd", significant, centred)
    insig_sum = centred.sum(1) - sig_sum
    on_pc = torch.einsum("bkd,kd->bk", centred, pcas)
    reps = {"baseline": rep, "all_neurons_mean_ablated": ablated, "only_non_significant_kept": ablated + insig_sum,
            "only_significant_kept": ablated + sig_sum,
            "projected_to_first_pc": ablated + torch.einsum("bk,kd->bd", on_pc, pcas)}
    return {k: v @ classifier for k, v in reps.items()}
