"""Paper 2's ablations (section 4): the second-order effects of one MLP layer's neurons are mean-ablated, kept only
where a neuron is significant, or replaced by their projection on the neuron's first PC (``ablation_logits``);
``accuracy_over_dataset`` streams a dataset through the effects and scores every variant in one pass;
``second_order_ablation_study`` is the whole study (compute_second_order_ablations.py, compute_ablations.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import tqdm

from utils import LOG
from utils.datasets import build_second_order_dataset, class_labels
from utils.errors import InputError
from utils.files.provenance import derived_record
from utils.files.readers import load_classifier, load_second_order_files
from utils.metrics import hits, percent
from utils.neurons.effects import COEFFICIENT, SecondOrderEffects
from utils.neurons.pca import neuron_means


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
            correct[k] = correct.get(k, 0) + hits(v, target)
    return {k: percent(c, max(1, len(labels))) for k, c in correct.items()}


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


def second_order_ablation_study(model: torch.nn.Module, preprocess: Callable, *, model_name: str,
                                pretrained: Optional[str], mlp_layer: int, input_dir: str | Path,
                                classifier_dirs: Sequence[str | Path], train_dataset: str, train_split: str,
                                top_k_pca: int, dataset: str, data_path: Optional[str], split: str,
                                coefficient: float = COEFFICIENT, batch_size: int = 16, num_workers: int = 0,
                                device: Optional[str] = None, allow_mismatch: bool = False) -> dict:
    """Paper 2's second-order ablation study of MLP layer ``mlp_layer`` on ``dataset``/``split``.

    Reads the training files of compute_second_order_neuron_prs.py and compute_pcas.py from ``input_dir`` (the
    merged effects ``[images, K, d]``, the first PCs ``[K, d]`` and the norms ``[K, top_k]``) and the classifier
    (the first of ``classifier_dirs`` that has it), then streams the evaluated images through the effects.

    Returns ``{"num_images", "classifier" (its path), "accuracy_percent" (ABLATIONS key -> %), "printed" (the
    original's line -> %), "record"}`` (``record``: the provenance record of what a caller writes from it).
    """
    effects = SecondOrderEffects(model, mlp_layer, device, coefficient, model_name=model_name)
    K, d = effects.num_neurons, effects.out_dim
    files = load_second_order_files(input_dir, train_dataset, train_split, model_name, pretrained, mlp_layer,
                                    top_k_pca, allow_mismatch)
    if files["merged"].shape[1:] != (K, d):
        raise InputError(f"{files['paths']['merged']}: shape {files['merged'].shape} does not match {model_name} "
                         f"layer {mlp_layer} ([images, {K}, {d}])")
    classifier, cpath = load_classifier(list(classifier_dirs), train_dataset, model_name, pretrained, d,
                                        allow_mismatch)
    LOG.info(f"classifier: {cpath} {list(classifier.shape)}")
    dev = effects.device
    mean = torch.from_numpy(neuron_means(files["merged"], progress=True)).to(dev)
    pcas = torch.from_numpy(files["pca"]).to(dev)
    thresholds = torch.from_numpy(np.ascontiguousarray(files["norm"][:, 0])).to(dev)  # top_k-th largest norm
    weights = torch.from_numpy(classifier).to(dev)

    ds = build_second_order_dataset(dataset, data_path, preprocess, split)
    labels = class_labels(ds, classifier.shape[1], f"{cpath} (--dataset {dataset})")
    accuracy = accuracy_over_dataset(
        effects, ds, labels, lambda e, r: ablation_logits(e, r, mean, pcas, thresholds, weights, coefficient),
        batch_size, num_workers, desc=f"second-order ablations {dataset} {split}")
    record = derived_record([files["paths"]["merged"], cpath], dataset=dataset, split=split, data_path=data_path,
                            num_images=len(labels), top_k_pca=top_k_pca)
    return {"num_images": len(labels), "classifier": str(cpath), "accuracy_percent": accuracy,
            "printed": {ABLATIONS[k]: v for k, v in accuracy.items()}, "record": record}


def plot_second_order_ablations(accuracy: dict, title: str):
    """One bar per ablation (zero-shot top-1 %): a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [k.replace("_", " ") for k in accuracy]
    bars = ax.barh(names[::-1], list(accuracy.values())[::-1], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.set_xlabel("zero-shot top-1 accuracy (%)")
    ax.set_xlim(0, 110)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
