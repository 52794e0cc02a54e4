"""Waterbirds (paper 1, section 4.3): remove the spurious location heads and measure group accuracies.

Reads (memory-mapped) from --input_dir the outputs of compute_prs.py (attn, mlp, labels [B, 2] = class,
background) and compute_text_projection.py (classifier). Files of compute_prs.py --layers work when they keep
the last --num_of_last_layers layers (e.g. --layers 28-31 for ViT-H-14). As in the original, the ablated representation
mean-ablates the listed heads, every attention layer but the last --num_of_last_layers, and all MLP terms.
Prints, for the baseline and for the ablation, the accuracy of each (class, background) group and the
worst-group accuracy. The paper's head lists for ViT-B-16, ViT-L-14 and ViT-H-14 are the defaults;
--heads 11.3,10.11,... overrides them. --random_trials N adds the paper's control: N random sets of as many
heads from the same layers (seeded), reporting the best. Writes {dataset}_specific_heads_{model}.json and a
bar chart {dataset}_specific_heads_{model}.png to --figures_dir.
"""
import argparse

import numpy as np

from utils.cli import add_mismatch_arg, add_num_workers_arg, run, say_wrote
from utils.errors import InputError
from utils.files.atomic import load_array, make_output_dir
from utils.files.names import specific_heads_stem
from utils.files.provenance import derived_record
from utils.files.readers import last_layers, load_decomposition
from utils.files.results import save_result
from utils.waterbirds import (GROUP_NAMES, ablate, best_random, check_heads, default_heads, group_accuracies,
                              head_logits, parse_heads, random_head_sets)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Ablations part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--figures_dir", default="./output_dir", help="where the JSON and the chart go")
    parser.add_argument("--input_dir", default="./output_dir", help="where the arrays are")
    parser.add_argument("--dataset", type=str, default="binary_waterbirds",
                        help="dataset name in file names (default: %(default)s; the original default "
                             "'waterbirds_binary' is not what its compute_prs.py writes)")
    parser.add_argument("--heads", default=None, help="heads to mean-ablate, LAYER.HEAD,... "
                        "(default: the paper's list for --model)")
    parser.add_argument("--num_of_last_layers", type=int, default=4,
                        help="attention layers kept; all earlier ones are mean-ablated (the original's 4)")
    parser.add_argument("--random_trials", type=int, default=0, help="random head sets of the same size to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random head sets")
    parser.add_argument("--chunk", type=int, default=1024, help="images per chunk read from the memmaps")
    add_mismatch_arg(parser)
    return parser


def load(args: argparse.Namespace) -> dict:
    """The memmapped arrays (``utils.files.readers.load_decomposition``) with the [B, 2] labels as ``groups``."""
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch, cls_attn=False)
    lpath = arrays["paths"]["labels"]
    labels = np.asarray(load_array(lpath, "compute_prs.py", mmap=False))
    if labels.ndim != 2 or labels.shape[1] != 2:
        raise InputError(f"{lpath}: labels of shape {labels.shape}; group accuracies need [B, 2] = (class, "
                         f"background), as compute_prs.py writes for --dataset binary_waterbirds")
    arrays["groups"] = labels
    return arrays


def plot_groups(results: dict, title: str):
    """Grouped bars: accuracy per (class, background) group, one bar per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = GROUP_NAMES + ["worst group"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results)
    for i, (label, res) in enumerate(results.items()):
        vals = [res["groups"][g] for g in GROUP_NAMES] + [res["worst_group"]]  # None: no image in that group
        bars = ax.bar(np.arange(len(names)) + (i - (len(results) - 1) / 2) * width,
                      [v if v is not None else 0.0 for v in vals], width, label=label)
        # every value written on its bar, so a 0 % bar (and a group without images, "n/a") is seen, not missed
        ax.bar_label(bars, labels=[f"{v:.0f}" if v is not None else "n/a" for v in vals], fontsize=6, padding=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 115)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=len(results))
    fig.tight_layout()
    return fig


def report(name: str, res: dict) -> None:
    groups = ", ".join(f"{g}: {v:.2f}" if v is not None else f"{g}: -" for g, v in res["groups"].items())
    print(f"{name}: {groups}; worst group: {res['worst_group']:.2f}; average: {res['average']:.2f}")


def main(args: argparse.Namespace) -> dict:
    arrays = load(args)
    B, _, H, d = arrays["attn"].shape
    L = arrays["num_layers"]
    heads = parse_heads(args.heads) if args.heads else default_heads(args.model)
    check_heads(heads, L, H, "--heads" if args.heads else f"the default heads of {args.model}")
    start = last_layers(arrays, args.num_of_last_layers)  # where the last layers begin in attn's layer axis
    first = L - args.num_of_last_layers
    early = [f"{l}.{h}" for l, h in heads if l < first]
    if early:
        print(f"note: heads {early} are in layers that are mean-ablated anyway")

    parts = head_logits(arrays["attn"], arrays["mlp"], arrays["classifier"], start, args.chunk, arrays["attn_rest"])
    labels = arrays["groups"]
    results = {"baseline": group_accuracies(parts["baseline"], labels),
               "heads mean-ablated": group_accuracies(ablate(parts, heads, first, H), labels)}
    report("Baseline", results["baseline"])
    report(f"Replaced ({len(heads)} heads)", results["heads mean-ablated"])
    random = None
    if args.random_trials > 0:
        sets = random_head_sets(len(heads), args.random_trials, first, L, H, args.seed)
        random = best_random(parts, labels, sets, first, H)
        results[f"mean of {args.random_trials} random sets"] = random["mean"]
        report(f"Mean of {args.random_trials} random sets of {len(heads)} heads", random["mean"])
        report(f"Best of {args.random_trials} random sets of {len(heads)} heads", random["best"])

    out = make_output_dir(args.figures_dir, "--figures_dir")
    stem = specific_heads_stem(args.dataset, args.model)
    summary = {"args": vars(args), "num_images": B, "heads": [f"{l}.{h}" for l, h in heads],
               "baseline": results["baseline"], "ablated": results["heads mean-ablated"], "random": random}
    record = derived_record([arrays["paths"]["attn"], arrays["paths"]["classifier"]],
                            heads=[f"{l}.{h}" for l, h in heads])
    figure = plot_groups(results, f"{args.model} on {args.dataset}: mean-ablating {len(heads)} heads")
    say_wrote(save_result(out, stem, summary, record, figure=figure))
    return summary


if __name__ == "__main__":
    run(main, get_args_parser())
