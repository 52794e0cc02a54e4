"""Second-order ablation study (paper 2, section 4): do the neurons' first PCs and their few significant
images explain the neurons' second-order effects? (The second paper's compute_ablations.py.)

For each image of --dataset/--split the second-order effects of all neurons of --mlp_layer are computed
(as compute_second_order_neuron_prs.py does) and zero-shot accuracy is reported for:
  baseline                     coefficient * r/||r|| @ classifier
  all_neurons_mean_ablated     every neuron's effect replaced by its training mean
  only_non_significant_kept    the mean-ablated one plus the centred effects of non-significant neurons
  only_significant_kept        the mean-ablated one plus the centred effects of significant neurons
  projected_to_first_pc        each effect replaced by its mean plus its projection on the neuron's first PC
A neuron is significant on an image when its centred norm exceeds its top_k_pca-th largest training norm.

Reads from --input_dir the training files of compute_second_order_neuron_prs.py and compute_pcas.py
({train_dataset}_{train_split}_mlps_{model}_{pretrained}_{mlp_layer}[_{top_k_pca}_pca|_norm].npy) and the
classifier {train_dataset}_classifier_{model}_{pretrained}.npy, else {train_dataset}_classifier_{model}.npy
(--input_dir first, then --output_dir). Default: ImageNet val, 10% (every 10th image), not the original's
ImageNet-R. Prints the accuracies and writes them as JSON, with a bar chart (PNG), to --output_dir.
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch

from utils.errors import InputError
from utils.cli import add_mismatch_arg, add_model_args, load_model_from_args, positive_int, run
from utils.neurons.ablations import ABLATIONS, ablation_logits, accuracy_over_dataset
from utils.datasets import build_second_order_dataset, class_labels

from utils.files.readers import load_classifier, load_second_order_files
from utils.files.atomic import atomic_write_json, make_output_dir, save_figure
from utils.files.names import pretrained_name, second_order_ablations_path
from utils.neurons.pca import neuron_means
from utils.files.provenance import derived_record, write_provenance
from utils.neurons.effects import COEFFICIENT, SecondOrderEffects


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Ablations part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--mlp_layer", default=9, type=int, help="the MLP layer of the neurons (0-based)")
    parser.add_argument("--coefficient", default=COEFFICIENT, type=float,
                        help="scale on the normalised output (the paper's 100)")
    parser.add_argument("--top_k_pca", default=100, type=int, help="which PCA / norm files (their top k)")
    parser.add_argument("--batch_size", default=16, type=positive_int, help="images per batch")
    parser.add_argument("--output_dir", default="./output_dir/", help="where the JSON goes")
    parser.add_argument("--input_dir", default="./output_dir/", help="where the training files are")
    parser.add_argument("--data_path", default=None, type=str, help="dataset root")
    parser.add_argument("--split", default="val", type=str, help="the evaluated split")
    parser.add_argument("--num_workers", default=min(10, os.cpu_count() or 1), type=int, help="DataLoader workers")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="evaluated dataset: imagenet (val: every 10th image), CIFAR10/100, or an ImageFolder")
    parser.add_argument("--train_dataset", default=None, type=str,
                        help="dataset name of the training files and classifier (default: --dataset without a "
                             "trailing '_r', as the original)")
    parser.add_argument("--train_split", default="train", type=str, help="split of the training files")
    add_mismatch_arg(parser)
    return parser


def plot_accuracies(accuracy: dict, title: str, path: Path) -> None:
    """One bar per ablation (zero-shot top-1 %), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [k.replace("_", " ") for k in accuracy]
    bars = ax.barh(names[::-1], list(accuracy.values())[::-1], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.set_xlabel("zero-shot top-1 accuracy (%)")
    ax.set_xlim(0, 110)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(args: argparse.Namespace) -> dict:
    train_dataset = args.train_dataset or (args.dataset[:-2] if args.dataset.endswith("_r") else args.dataset)
    model, preprocess, _ = load_model_from_args(args)
    effects = SecondOrderEffects(model, args.mlp_layer, args.device, args.coefficient, model_name=args.model)
    K, d = effects.num_neurons, effects.out_dim

    files = load_second_order_files(args.input_dir, train_dataset, args.train_split, args.model, args.pretrained,
                                    args.mlp_layer, args.top_k_pca, args.allow_mismatch)
    if files["merged"].shape[1:] != (K, d):
        raise InputError(f"{files['paths']['merged']}: shape {files['merged'].shape} does not match {args.model} "
                         f"layer {args.mlp_layer} ([images, {K}, {d}])")
    classifier, cpath = load_classifier([args.input_dir, args.output_dir], train_dataset, args.model,
                                        args.pretrained, d, args.allow_mismatch)
    print(f"classifier: {cpath} {list(classifier.shape)}")
    dev = effects.device
    mean = torch.from_numpy(neuron_means(files["merged"], progress=True)).to(dev)
    pcas = torch.from_numpy(files["pca"]).to(dev)
    thresholds = torch.from_numpy(np.ascontiguousarray(files["norm"][:, 0])).to(dev)  # top_k-th largest norm
    weights = torch.from_numpy(classifier).to(dev)

    ds = build_second_order_dataset(args.dataset, args.data_path, preprocess, args.split)
    labels = class_labels(ds, classifier.shape[1], f"{cpath} (--dataset {args.dataset})")
    accuracy = accuracy_over_dataset(
        effects, ds, labels, lambda e, r: ablation_logits(e, r, mean, pcas, thresholds, weights, args.coefficient),
        args.batch_size, args.num_workers, desc=f"second-order ablations {args.dataset} {args.split}")
    print("Please note: evaluated on", len(labels), "images of", args.dataset, args.split)
    for k, v in accuracy.items():
        print(f"{ABLATIONS[k]}:", v)

    out = make_output_dir(args.output_dir)
    path = second_order_ablations_path(out, args.dataset, args.split, args.model, args.pretrained, args.mlp_layer,
                                       args.top_k_pca)
    result = {"args": vars(args), "num_images": len(labels), "classifier": str(cpath),
              "accuracy_percent": accuracy, "printed": {ABLATIONS[k]: v for k, v in accuracy.items()}}
    atomic_write_json(path, result)
    plot_accuracies(accuracy, f"{args.model} ({pretrained_name(args.pretrained)}), MLP layer {args.mlp_layer}: "
                              f"{len(labels)} images of {args.dataset} {args.split}", path.with_suffix(".png"))
    record = derived_record([files["paths"]["merged"], cpath], dataset=args.dataset, split=args.split,
                            data_path=args.data_path, num_images=len(labels), top_k_pca=args.top_k_pca)
    for p in (path, path.with_suffix(".png")):
        write_provenance(p, record)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    run(main, get_args_parser())
