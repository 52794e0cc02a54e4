"""SpLiCE concept distribution of a dataset or one class: a bar chart of its top concepts, and the numbers.

  python concept_distribution.py -dataset ImageNetVal -out_folder imagenet_jackolantern_decomp --verbose \\
      -l1_penalty 0.3 -class_label 607 -device "cuda"

Writes to -out_folder (created if missing):
  weights.txt                 SpLiCE's format: "Concept Decomposition: ", the concepts with a non-zero average
                              weight, largest first, and the average L0 and cosine lines (SpLiCE writes those two
                              only with --verbose)
  {title}.png                 bar chart of the -plot_topk largest average weights (SpLiCE: seaborn, a .pdf)
  {title}.json                the same numbers: top concepts, every non-zero concept, L0, cosine, images
  {title}_weights.npz         the per-image weights, as decompose_data.py's (streamed; --resume continues a
                              killed run)
where {title} is {dataset}_class_{label}_decomposition (lower case) or {dataset}_decomposition. Fixed here:
SpLiCE leaves "Class 0" out of the title of class 0. --from_weights reads a decompose_data.py .npz instead of
running the model. See docs/splice.md.
"""
import argparse

import matplotlib

from utils.cli import (add_dataset_args, add_splice_args, dataset_settings, note, run, say_wrote, splice_settings,
                       splice_weights)
from utils.files.atomic import atomic_write_json, atomic_write_text, make_output_dir
from utils.files.names import concept_distribution_title
from utils.files.provenance import write_provenance
from utils.splice import dataset_decompositions, decomposition_lines, plot_concepts


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SpLiCE: concept distribution", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-out_folder", "--out_folder", required=True, help="output folder (created)")
    parser.add_argument("--verbose", action="store_true", help="also print the concepts, L0 and cosine")
    parser.add_argument("-plot_topk", "--plot_topk", type=int, default=10, help="concepts in the bar chart "
                        "(default: %(default)s)")
    add_splice_args(parser, l1_penalty=0.2)
    add_dataset_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    matplotlib.use("Agg")
    folder = make_output_dir(args.out_folder, "-out_folder")
    if args.verbose:
        print(f"Decomposing {args.dataset}..." if args.class_label is None else
              f"Decomposing class {args.class_label}...")
    title, stem = concept_distribution_title(args.dataset, args.class_label)
    summary, record = dataset_decompositions(splice_settings(args), dataset_settings(args), folder,
                                             folder / f"{stem}_weights.npz", log=note)
    weights, l0, cosine = summary.weights, summary.l0, summary.cosine
    lines = decomposition_lines(weights, summary.concepts, stop="zero")
    l0_line = f"Average Decomposition L0 Norm: \t{l0}"
    cos_line = f"Average CLIP, SpLiCE Cosine Sim: \t{round(cosine, 4)}"
    atomic_write_text(folder / "weights.txt",
                      "".join(f"{line}\n" for line in ["Concept Decomposition: ", *lines, l0_line, cos_line]))
    print("Concept Decomposition:")
    if args.verbose:
        print("\n".join([*lines, l0_line, cos_line]))

    order = [j for j in weights.argsort(kind="stable")[::-1] if weights[j] > 0]
    nonzero = [[summary.concepts[j], float(weights[j])] for j in order]
    top = nonzero[:max(args.plot_topk, 0)]
    plot_concepts([c for c, _ in top], [w for _, w in top], title, folder / f"{stem}.png")
    out = {"dataset": args.dataset, "class_label": args.class_label, "num_images": summary.num_images,
           "l0": l0, "cosine": cosine, "top": top, "concepts": nonzero}
    atomic_write_json(folder / f"{stem}.json", out)
    for name in ("weights.txt", f"{stem}.png", f"{stem}.json"):
        write_provenance(folder / name, {**record, "l0": l0, "cosine": cosine})
    say_wrote([folder / "weights.txt", folder / f"{stem}.png", folder / f"{stem}.json"])
    return {**out, "folder": str(folder), "stem": stem}


if __name__ == "__main__":
    run(main, get_args_parser(), weights=splice_weights)
