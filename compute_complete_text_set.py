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
from pathlib import Path

import numpy as np
import torch

from utils.errors import InputError
from utils.cli import add_mismatch_arg, run
from utils.files.readers import MODEL_FIELDS, last_layers, load_decomposition
from utils.models import default_device
from utils.files.atomic import atomic_write_json, atomic_write_text, load_array, make_output_dir, save_figure
from utils.files.names import completeness_stem, text_embeddings_path
from utils.files.provenance import check_consistent, derived_record, write_provenance
from utils.text.sets import read_text_set, resolve_text_file
from utils.text.textspan import (HeadStatsAccumulator, pclens_from_stats, replacement_accuracy, scan_decomposition,
                            textspan_from_stats)

SEP = "------------------\n"
ALGORITHMS = {"textspan": "textspan", "pclens": "pclens", "svd_data_approx": "pclens", "text_span": "text_span"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Completeness part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    parser.add_argument("--num_workers", default=10, type=int, help="unused; kept for the original command line")
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
    parser.add_argument("--w_ov_rank", type=int, default=80, help="rank of the span the texts are projected on")
    parser.add_argument("--texts_per_head", type=int, default=20,
                        help="texts per head (default %(default)s, as the paper commands; original default 10). For "
                             "pclens: texts listed per pole of each principal component")
    parser.add_argument("--algorithm", default="textspan", choices=list(ALGORITHMS),
                        help="textspan (paper 1), pclens or its synonym svd_data_approx (PCLens), text_span "
                             "(PCLens' TextSpan variant); see above")
    parser.add_argument("--max_text", type=int, default=80,
                        help="pclens: at most this many principal components per head (PCLens' cap, default "
                             "%(default)s)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda if available)")
    parser.add_argument("--chunk", type=int, default=None, help="images per read from the memmaps (default: ~256 MB)")
    parser.add_argument("--stats_dtype", default="float64", choices=["float64", "float32"],
                        help="precision of the per-head scatter products (float32: faster on GPUs with slow "
                             "float64, but small singular values get ~3e-4 relative noise)")
    add_mismatch_arg(parser)
    return parser


def load_text_set(args: argparse.Namespace, d: int) -> tuple[np.ndarray, list[str], Path]:
    """The text embeddings [T, d], their lines and the embeddings' path, checked against each other and d."""
    txt_path = Path(args.text_dir) / f"{args.text_descriptions}.txt"
    lines = read_text_set(txt_path, "--text_descriptions")
    emb_path = text_embeddings_path(args.input_dir, args.text_descriptions, args.model)
    if not emb_path.is_file():
        raise FileNotFoundError(f"{emb_path}: text embeddings not found; make them with `python "
                                f"compute_text_set_projection.py --model {args.model} --pretrained <tag> --data_path "
                                f"{resolve_text_file(txt_path)} --output_dir {args.input_dir}`")
    features = np.asarray(load_array(emb_path, "compute_text_set_projection.py", mmap=False), np.float32)
    if features.ndim != 2 or features.shape[1] != d:
        raise InputError(f"{emb_path}: text embeddings of shape {list(features.shape)} do not match the model "
                         f"dimension d={d} of the attn file (embedded with another model?)")
    if len(lines) != len(features):
        raise InputError(f"{txt_path} has {len(lines)} lines but {emb_path} has {len(features)} rows; "
                         f"recompute the embeddings with compute_text_set_projection.py")
    return features, lines, emb_path


def run_textspan(stats, features, lines, args, first, H) -> tuple[list[dict], torch.Tensor, torch.Tensor, object]:
    """TextSpan for every head (text_span: centred texts and data); per-head records, means [h, d], bases
    [h, m, d] and the raw ``TextSpanResult``."""
    centred = args.algorithm == "text_span"
    feats = features - features.mean(0, dtype=np.float64).astype(np.float32) if centred else features
    res = textspan_from_stats(stats, feats, args.texts_per_head, args.w_ov_rank, args.device, centred=centred)
    heads = []
    for i in range(len(res.indices)):
        heads.append({"layer": first + i // H, "head": i % H,
                      "texts": [lines[j] for j in res.indices[i]], "text_indices": res.indices[i].tolist(),
                      "variance_explained": res.variance_explained[i].tolist(), "std": res.std[i].tolist(),
                      "w_ov_rank_used": res.rank[i]})
    return heads, res.mean, res.basis(), res


def run_pclens(stats, features, lines, args, first, H) -> tuple[list[dict], torch.Tensor, torch.Tensor, object]:
    """PCLens for every head; the bases are zero-padded to the largest number of components."""
    results = pclens_from_stats(stats, features, args.texts_per_head, args.max_text, device=args.device)
    K = max(r.rank for r in results)
    d = stats.mean.shape[1]
    basis = torch.zeros(len(results), K, d, dtype=torch.float64, device=results[0].basis.device)
    heads = []
    for i, r in enumerate(results):
        basis[i, :r.rank] = r.basis
        comps = [{"component": c, "strength_abs": float(r.strength[c]), "strength_rel": float(r.strength_rel[c]),
                  "singular_value": float(r.singular_values[c]), "variance_explained": float(r.variance_explained[c]),
                  "positive": [lines[j] for j in r.top[c]], "positive_cosines": r.top_values[c].tolist(),
                  "negative": [lines[j] for j in r.bottom[c]], "negative_cosines": r.bottom_values[c].tolist()}
                 for c in range(r.rank)]
        heads.append({"layer": first + i // H, "head": i % H, "rank": r.rank,
                      "texts": [lines[j] for j in r.indices], "text_indices": r.indices.tolist(),
                      "variance_explained": r.variance_explained.tolist(), "components": comps})
    return heads, torch.stack([r.mean for r in results]), basis, results


def completeness(args: argparse.Namespace, arrays: dict, paths: dict[str, Path], final: bool = False) -> dict:
    """Pass 1 (head statistics), the algorithm on every head, pass 2 (accuracies); shared with
    utils/scripts/compute_text_explanations.py.

    ``arrays``: what ``utils.files.readers.load_decomposition`` returns (attn, layers, num_layers, attn_rest, mlp,
    classifier, labels, checked to agree); the last layers must be stored (a file of ``compute_prs.py --layers``
    works when it keeps them: the layers not replaced, kept or in attn_rest, are mean-ablated); ``paths``: the
    files. Returns the per-head records (``heads``) and raw results (``results``), ``means`` [h, d], ``basis``
    [h, K, d], the accuracy ``curve`` (%) for k = 0..K, ``baseline`` (%), ``first`` (first replaced
    layer), the text set (``lines``, ``features``) and, with ``final``, the ``HeadStats`` of the final
    representation [1 head, d] (``final_stats``).
    """
    attn, mlp, classifier, labels = arrays["attn"], arrays["mlp"], arrays["classifier"], arrays["labels"]
    B, _, H, d = attn.shape
    L = arrays["num_layers"]
    start = last_layers(arrays, args.num_of_last_layers)  # where the replaced layers begin in attn's layer axis
    if args.texts_per_head < 1 or args.w_ov_rank < 1 or args.max_text < 1:
        raise InputError("--texts_per_head, --w_ov_rank and --max_text must be >= 1")
    if B < 2:
        raise InputError(f"{paths['attn']}: TextSpan and PCLens need at least 2 images, the attn file has {B}")
    features, lines, emb_path = load_text_set(args, d)
    check_consistent([paths["attn"], emb_path], MODEL_FIELDS,
                     allow_mismatch=args.allow_mismatch)
    first = L - args.num_of_last_layers
    if args.algorithm != "pclens" and args.texts_per_head > min(args.w_ov_rank, B, d):
        print(f"warning: --texts_per_head {args.texts_per_head} > the rank of the text span "
              f"({min(args.w_ov_rank, B, d)}): the texts after that carry nothing (zero directions; the original "
              f"divides by zero there)")
    print(f"Number of layers: {L}; replacing layers {first}..{L - 1} ({args.num_of_last_layers * H} heads) "
          f"with {args.algorithm}, {len(lines)} texts, {B} images")

    scan = scan_decomposition(attn, mlp, classifier, labels, start, args.device, args.chunk,
                              stats_dtype=getattr(torch, args.stats_dtype), rest=arrays["attn_rest"])
    algo = run_pclens if args.algorithm == "pclens" else run_textspan
    heads, means, basis, results = algo(scan["stats"], features, lines, args, first, H)
    acc = HeadStatsAccumulator(1, d, args.device) if final else None
    correct = replacement_accuracy(attn, mlp, classifier, labels, start, scan["early_mean"], means, basis,
                                   args.device, args.chunk, final=acc)
    return {"heads": heads, "results": results, "means": means, "basis": basis,
            "curve": [float(c) / B * 100.0 for c in correct], "baseline": float(scan["baseline_correct"]) / B * 100.0,
            "first": first, "num_images": B, "lines": lines, "features": features, "embeddings": emb_path,
            "final_stats": acc.finalize() if acc is not None else None}


def plot_curve(curve: list[float], baseline: float, title: str, xlabel: str, path: Path) -> None:
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
    save_figure(fig, path)


def main(args: argparse.Namespace) -> dict:
    args.algorithm = ALGORITHMS[args.algorithm]  # svd_data_approx -> pclens
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch)
    res = completeness(args, arrays, arrays["paths"])
    heads, curve, baseline, first = res["heads"], res["curve"], res["baseline"], res["first"]
    current_accuracy = curve[-1]
    all_texts = {t for h in heads for t in h["texts"]}
    print("Current accuracy:", current_accuracy, "\nNumber of texts:", len(all_texts))

    out = make_output_dir(args.output_dir)
    stem = completeness_stem(args.dataset, args.text_descriptions, args.texts_per_head, args.model, args.algorithm)
    blocks = "".join(f"{SEP}Layer {h['layer']}, Head {h['head']}\n{SEP}" + "".join(f"{t}\n" for t in h["texts"])
                     for h in heads)
    atomic_write_text(out / f"{stem}.txt", blocks + f"{SEP}Current accuracy: {current_accuracy}\n"
                                                    f"Number of texts: {len(all_texts)}")
    L = arrays["num_layers"]
    result = {"args": vars(args), "algorithm": args.algorithm, "num_images": res["num_images"],
              "num_texts_in_set": len(res["lines"]), "layers_replaced": list(range(first, L)),
              "accuracy": {"baseline": baseline, "replaced_heads_mean_ablated": curve[0], "final": current_accuracy},
              "accuracy_curve": {"texts_per_head": list(range(len(curve))), "accuracy": curve},
              "number_of_texts": len(all_texts), "heads": heads}
    atomic_write_json(out / f"{stem}.json", result)
    xlabel = "principal components (texts) per head" if args.algorithm == "pclens" else "texts per head"
    plot_curve(curve, baseline, f"{args.model} on {args.dataset}: last {args.num_of_last_layers} layers, "
                                f"{args.text_descriptions}", xlabel, out / f"{stem}.png")
    record = derived_record([arrays["paths"]["attn"], res["embeddings"]], algorithm=args.algorithm,
                            texts_per_head=args.texts_per_head, text_set=args.text_descriptions)
    for suffix in (".txt", ".json", ".png"):
        write_provenance(out / f"{stem}{suffix}", record)
    print(f"wrote {out / stem}.txt, .json and .png")
    return result


if __name__ == "__main__":
    run(main, get_args_parser())
