"""TextSpan (paper 1, Algorithm 1) or PCLens' svd_data_approx: label every head of the last layers with texts,
and measure the accuracy left when those heads are replaced by their text reconstructions.

Reads from --input_dir (memory-mapped; the attn file is read in chunks of images, never whole):
  {dataset}_attn_{model}.npy [B, L, H, d], {dataset}_mlp_{model}.npy, {dataset}_labels.npy  (compute_prs.py)
  {dataset}_classifier_{model}.npy [d, C]                       (compute_text_projection.py)
  {text_descriptions}_{model}.npy [T, d]                        (compute_text_set_projection.py)
and the texts from --text_dir/{text_descriptions}.txt (or --text_dir/external/, see text_descriptions/).

Per head of the last --num_of_last_layers layers (all of them at once, on --device), with --algorithm:
  textspan   --texts_per_head texts chosen greedily as in the original (utils/text/textspan.py);
  pclens     (or svd_data_approx) PCLens: the head's principal components up to 99 % of the singular-value
             sum (+1, at most --max_text), each with the --texts_per_head texts of largest and smallest cosine
             (texts centred by their mean, then unit-normalised); the reconstruction is the projection onto
             the span of each component's top text. The sign of a component is arbitrary in an SVD, and
             PCLens reconstructs from whichever pole it lands on; here the stronger pole (largest |cosine|) is
             made positive and used, which removes that dependence. Strengths are s^2 and 100 s^2 / sum s^2;
  text_span  PCLens' variant of TextSpan: centred texts and the SVD of the centred data.
The accuracy: MLP terms as they are, the earlier attention layers mean-ablated, each head of the last layers
replaced by its reconstruction, @ classifier, against the labels file. Files of compute_prs.py --layers work
when they keep the last --num_of_last_layers layers (e.g. --layers 28-31 for ViT-H-14): the earlier layers are
then read from {dataset}_attn_rest_{model}.npy, with the same results. Writes to --output_dir:
  {dataset}_completeness_{text_descriptions}_top_{m}_heads_{model}.txt    the original's text file
  {dataset}_completeness_{text_descriptions}_top_{m}_heads_{model}.json   texts, strengths, accuracies
  {dataset}_completeness_{text_descriptions}_top_{m}_heads_{model}.png    accuracy against texts per head
(with --algorithm pclens the names end in _pclens, with text_span in _text_span). PCLens' own command lines and
file names: python -m utils.scripts.compute_text_explanations (docs/pclens.md).
"""
import argparse

from utils.cli import DEVICE_HELP, add_mismatch_arg, add_num_workers_arg, positive_int, run, say_wrote
from utils.files.atomic import make_output_dir
from utils.files.names import completeness_stem
from utils.files.provenance import derived_record
from utils.files.readers import load_decomposition
from utils.files.results import save_result
from utils.models import default_device
from utils.text.completeness import ALGORITHMS, CompletenessSettings, completeness

SEP = "------------------\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Completeness part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--output_dir", default="./output_dir", help="where the results go")
    parser.add_argument("--input_dir", default="./output_dir", help="where the arrays are")
    parser.add_argument("--text_descriptions", default="image_descriptions_general", type=str,
                        help="name of the text set (default %(default)s, as the paper commands; the original "
                             "default is image_descriptions_per_class)")
    parser.add_argument("--text_dir", default="./text_descriptions", type=str, help="folder of the .txt text sets")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in file names")
    parser.add_argument("--num_of_last_layers", type=int, default=4,
                        help="how many attention layers to replace (default %(default)s, as the paper commands; "
                             "original default 8)")
    parser.add_argument("--w_ov_rank", type=positive_int, default=80,
                        help="rank of the span the texts are projected on")
    parser.add_argument("--texts_per_head", type=positive_int, default=20,
                        help="texts per head (default %(default)s, as the paper commands; original default 10). For "
                             "pclens: texts listed per pole of each principal component")
    parser.add_argument("--algorithm", default="textspan", choices=list(ALGORITHMS),
                        help="textspan (paper 1), pclens or its synonym svd_data_approx (PCLens), text_span "
                             "(PCLens' TextSpan variant); see above")
    parser.add_argument("--max_text", type=positive_int, default=80,
                        help="pclens: at most this many principal components per head (PCLens' cap, default "
                             "%(default)s)")
    parser.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    parser.add_argument("--chunk", type=int, default=None, help="images per read from the memmaps (default: ~256 MB)")
    parser.add_argument("--stats_dtype", default="float64", choices=["float64", "float32"],
                        help="precision of the per-head scatter products (float32: faster on GPUs with slow "
                             "float64, but small singular values get ~3e-4 relative noise)")
    add_mismatch_arg(parser)
    return parser


def plot_curve(curve: list[float], baseline: float, title: str, xlabel: str):
    """Accuracy against the number of texts per head, with the unablated baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(curve)), curve, marker="o", markersize=3, label="last layers replaced by their texts")
    ax.axhline(baseline, color="gray", linestyle="--", label="baseline (nothing ablated)")
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("zero-shot top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> dict:
    args.algorithm = ALGORITHMS[args.algorithm]  # svd_data_approx -> pclens
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch, cls_attn=False)
    settings = CompletenessSettings(
        model=args.model, input_dir=args.input_dir, text_dir=args.text_dir, text_set=args.text_descriptions,
        algorithm=args.algorithm, num_of_last_layers=args.num_of_last_layers, texts_per_head=args.texts_per_head,
        w_ov_rank=args.w_ov_rank, max_text=args.max_text, device=args.device, chunk=args.chunk,
        stats_dtype=args.stats_dtype, allow_mismatch=args.allow_mismatch)
    res = completeness(settings, arrays, arrays["paths"])
    heads, curve, baseline, first = res["heads"], res["curve"], res["baseline"], res["first"]
    current_accuracy = curve[-1]
    all_texts = {t for h in heads for t in h["texts"]}
    print("Current accuracy:", current_accuracy, "\nNumber of texts:", len(all_texts))

    out = make_output_dir(args.output_dir)
    stem = completeness_stem(args.dataset, args.text_descriptions, args.texts_per_head, args.model, args.algorithm)
    blocks = "".join(f"{SEP}Layer {h['layer']}, Head {h['head']}\n{SEP}" + "".join(f"{t}\n" for t in h["texts"])
                     for h in heads)
    text = blocks + f"{SEP}Current accuracy: {current_accuracy}\nNumber of texts: {len(all_texts)}"
    L = arrays["num_layers"]
    result = {"args": vars(args), "algorithm": args.algorithm, "num_images": res["num_images"],
              "num_texts_in_set": len(res["lines"]), "layers_replaced": list(range(first, L)),
              "accuracy": {"baseline": baseline, "replaced_heads_mean_ablated": curve[0], "final": current_accuracy},
              "accuracy_curve": {"texts_per_head": list(range(len(curve))), "accuracy": curve},
              "number_of_texts": len(all_texts), "heads": heads}
    xlabel = "principal components (texts) per head" if args.algorithm == "pclens" else "texts per head"
    figure = plot_curve(curve, baseline, f"{args.model} on {args.dataset}: last {args.num_of_last_layers} layers, "
                                         f"{args.text_descriptions}", xlabel)
    record = derived_record([arrays["paths"]["attn"], res["embeddings"]], algorithm=args.algorithm,
                            texts_per_head=args.texts_per_head, text_set=args.text_descriptions)
    say_wrote(save_result(out, stem, result, record, figure=figure, texts={".txt": text}))
    return result


if __name__ == "__main__":
    run(main, get_args_parser())
