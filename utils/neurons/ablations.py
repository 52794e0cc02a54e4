"""Paper 2's ablations (section 4): the second-order effects of one MLP layer's neurons are mean-ablated, kept only
where a neuron is significant, or replaced by their projection on the neuron's first PC (``ablation_logits``);
``accuracy_over_dataset`` streams a dataset through the effects and scores every variant in one pass.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import tqdm

from utils.neurons.effects import COEFFICIENT, SecondOrderEffects


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
