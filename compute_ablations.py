"""Ablation studies of both papers; the flags given choose which.

Paper 1 (clip_text_span, section 3): mean-ablations of the first-order decomposition. Reads (memory-mapped) from
--input_dir the outputs of compute_prs.py and compute_text_projection.py and prints: the baseline; MLPs
mean-ablated; the CLS->CLS term mean-ablated; both; and the accuracy as the attention layers are mean-ablated
cumulatively. Labels come from {dataset}_labels.npy. Also writes {dataset}_ablations_{model}.json and a plot
{dataset}_ablations_{model}.png to --figures_dir. It needs every attention layer: files of compute_prs.py
--layers are refused (their MLP and CLS lines would come from a differently rounded sum, not the same numbers).
    python compute_ablations.py --model ViT-H-14 --dataset imagenet --input_dir DIR --figures_dir DIR

Paper 2 (second_order_lens, section 4): the second-order ablation study, exactly compute_second_order_ablations.py
(see its --help). It runs when any of --mlp_layer, --pretrained, --coefficient, --top_k_pca, --data_path, --split
is given:
    python compute_ablations.py --model ViT-B-32 --pretrained openai --mlp_layer 9 --output_dir DIR \\
        --input_dir DIR --data_path IMAGENET

--model, --input_dir, --dataset and --num_workers belong to both (their defaults are the mode's own). A flag of
one study only (--figures_dir, --chunk: paper 1; the rest: paper 2) together with a flag of the other is an error.
"""
import argparse

from utils.ablations import mean_ablation_study
from utils.cli import (MISMATCH_FLAG, Flag, HelpFormatter, add_flags, num_workers_flag, run, run_second_order_ablations,
                       say_wrote, second_order_ablation_flags)
from utils.errors import InputError
from utils.files.atomic import make_output_dir
from utils.files.names import ablations_stem
from utils.files.provenance import derived_record
from utils.files.readers import load_decomposition, require_layers
from utils.files.results import save_result

# the flags that select paper 2's study (the others of its parser are paper 2's too, but do not select it)
PAPER2_SELECTORS = ("mlp_layer", "pretrained", "coefficient", "top_k_pca", "data_path", "split")


def mean_ablation_flags() -> dict[str, Flag]:
    """Paper 1's flags (the original clip_text_span command line, plus --chunk)."""
    return {
        "model": (("--model",), dict(default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")),
        "num_workers": num_workers_flag(used=False),
        "figures_dir": (("--figures_dir",), dict(default="./output_dir", help="where the JSON and the plot go")),
        "input_dir": (("--input_dir",), dict(default="./output_dir", help="where the arrays are")),
        "dataset": (("--dataset",), dict(type=str, default="imagenet", help="dataset name in file names")),
        "chunk": (("--chunk",), dict(type=int, default=1024, help="images per chunk read from the memmaps")),
        **MISMATCH_FLAG,
    }


STUDIES = {1: mean_ablation_flags, 2: second_order_ablation_flags}


def described(kwargs: dict) -> str:
    """A flag's help with its default written out (the combined parser suppresses defaults)."""
    text = (kwargs.get("help") or "").replace("%(default)s", str(kwargs.get("default")))
    return text if HelpFormatter.STATED.search(text) else f"{text} (default: {kwargs.get('default')})"


def get_args_parser() -> argparse.ArgumentParser:
    """Both studies' flags, grouped for --help; a flag not given is left out of the namespace (mode detection)."""
    parser = argparse.ArgumentParser("compute_ablations.py", description=__doc__, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    flags1, flags2 = mean_ablation_flags(), second_order_ablation_flags()
    groups = {"both": parser.add_argument_group("both studies"),
              1: parser.add_argument_group("paper 1 only (mean-ablations of the first-order decomposition)"),
              2: parser.add_argument_group("paper 2 only (second-order ablations; compute_second_order_ablations.py)")}
    for dest, (options, kwargs) in [*flags1.items(), *((d, f) for d, f in flags2.items() if d not in flags1)]:
        if dest in flags1 and dest in flags2:
            group, text = "both", f"paper 1: {described(flags1[dest][1])}; paper 2: {described(flags2[dest][1])}"
        else:
            group, text = (1 if dest in flags1 else 2), described(kwargs).lstrip()
        groups[group].add_argument(*options, **{**kwargs, "help": text, "default": argparse.SUPPRESS})
    return parser


def choose_study(given: set[str]) -> int:
    """1 or 2 from the flags given (their dests); ``InputError`` naming the flags when they fit neither study."""
    dests1, dests2 = set(mean_ablation_flags()), set(second_order_ablation_flags())
    flags = lambda dests: ", ".join("--" + d for d in sorted(dests))  # noqa: E731
    in1, in2 = given & (dests1 - dests2), given & (dests2 - dests1)
    if in1 and in2:
        raise InputError(f"{flags(in1)} (paper 1's mean-ablation study) and {flags(in2)} (paper 2's second-order "
                         f"study) cannot be combined; see --help")
    if in2 and not in2 & set(PAPER2_SELECTORS):
        raise InputError(f"{flags(in2)}: paper 2's second-order study, which runs only with one of "
                         f"{flags(PAPER2_SELECTORS)}; without them this is paper 1's study (see --help)")
    return 2 if in2 else 1


def main(args: argparse.Namespace) -> dict:
    given = set(vars(args)) - {"allow_tf32"}
    study = choose_study(given)
    own = argparse.ArgumentParser(add_help=False)
    add_flags(own, STUDIES[study]())
    full = own.parse_args([])  # the study's own defaults, then the flags given
    vars(full).update(vars(args))
    return mean_ablations(full) if study == 1 else run_second_order_ablations(full)


def plot_layer_curve(acc: dict, num_layers: int, title: str):
    """Accuracy against the number of early attention layers mean-ablated, with the other ablations as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a count of layers: whole ticks only
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
    return fig


def mean_ablations(args: argparse.Namespace) -> dict:
    """Paper 1's study (the flags of ``mean_ablation_flags``)."""
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch)
    require_layers(arrays, range(arrays["num_layers"]), "the cumulative layer study of compute_ablations.py")
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
    out = make_output_dir(args.figures_dir, "--figures_dir")
    result = {"args": vars(args), "num_images": int(arrays["attn"].shape[0]), "accuracy_percent": acc,
              "printed": printed}
    record = derived_record([arrays["paths"]["attn"], arrays["paths"]["classifier"]])
    say_wrote(save_result(out, ablations_stem(args.dataset, args.model), result, record,
                          figure=plot_layer_curve(acc, L, f"{args.model} on {args.dataset}")))
    return result


if __name__ == "__main__":
    run(main, get_args_parser())
