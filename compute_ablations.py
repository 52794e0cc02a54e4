"""Mean-ablation study (paper 1, section 3): how much of zero-shot accuracy each component carries.

Reads (memory-mapped) from --input_dir the outputs of compute_prs.py and compute_text_projection.py and
prints: the baseline; MLPs mean-ablated; the CLS->CLS term mean-ablated; both; and the accuracy as the
attention layers are mean-ablated cumulatively. Labels come from {dataset}_labels.npy. Also writes
{dataset}_ablations_{model}.json and a plot {dataset}_ablations_{model}.png to --figures_dir.
"""
import argparse
from pathlib import Path

from utils.ablations import mean_ablation_study
from utils.inputs import load_decomposition
from utils.io import atomic_write_json, save_figure
from utils.provenance import add_mismatch_arg, derived_record, write_provenance
from utils.cli import run


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Ablations part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    parser.add_argument("--num_workers", default=10, type=int, help="unused; kept for the original command line")
    parser.add_argument("--figures_dir", default="./output_dir", help="where the JSON and the plot go")
    parser.add_argument("--input_dir", default="./output_dir", help="where the arrays are")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in file names")
    parser.add_argument("--chunk", type=int, default=1024, help="images per chunk read from the memmaps")
    add_mismatch_arg(parser)
    return parser


def plot_layer_curve(acc: dict, num_layers: int, title: str, path: Path) -> None:
    """Accuracy against the number of early attention layers mean-ablated, with the other ablations as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = [acc["baseline"]] + [acc[f"attn_layers_0_to_{i}_mean_ablated"] for i in range(num_layers)]
    ax.plot(range(num_layers + 1), curve, marker="o", label="attention layers 0..k-1 mean-ablated")
    for key, style in [("mlps_mean_ablated", "--"), ("cls_to_cls_mean_ablated", ":"),
                       ("mlps_and_cls_to_cls_mean_ablated", "-.")]:
        ax.axhline(acc[key], linestyle=style, color="gray", label=key.replace("_", " "))
    ax.set_xlabel("number of early attention layers mean-ablated (k)")
    ax.set_ylabel("zero-shot top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(args: argparse.Namespace) -> dict:
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch)
    res = mean_ablation_study(arrays["attn"], arrays["mlp"], arrays["cls_attn"], arrays["classifier"],
                              arrays["labels"], chunk=args.chunk)
    acc, L = res["accuracy"], arrays["attn"].shape[1]
    printed = {
        "Baseline": acc["baseline"],
        "+ MLPs ablation": acc["mlps_mean_ablated"],
        "+ CLS ablation": acc["cls_to_cls_mean_ablated"],
        "+ MLPs + CLS ablation": acc["mlps_and_cls_to_cls_mean_ablated"],
        "Attention ablations": [acc["baseline"]] + [acc[f"attn_layers_0_to_{i}_mean_ablated"] for i in range(L)],
    }
    for k, v in printed.items():
        print(f"{k}:", v)
    out = Path(args.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}_ablations_{args.model}"
    result = {"args": vars(args), "num_images": int(arrays["attn"].shape[0]), "accuracy_percent": acc,
              "printed": printed}
    atomic_write_json(out / f"{stem}.json", result)
    plot_layer_curve(acc, L, f"{args.model} on {args.dataset}", out / f"{stem}.png")
    record = derived_record([arrays["paths"]["attn"], arrays["paths"]["classifier"]])
    for suffix in (".json", ".png"):
        write_provenance(out / f"{stem}{suffix}", record)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return result


if __name__ == "__main__":
    run(main, get_args_parser())
