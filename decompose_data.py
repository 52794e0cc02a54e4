"""SpLiCE decomposition of a dataset, or of one class: the average decomposition, average L0 and average cosine.

  python decompose_data.py -dataset CIFAR10 -out_path cifar10_decomp.txt -l1_penalty 0.35 --verbose [-class_label 4]

Writes -out_path in SpLiCE's format: "Concept Decomposition:", one line per concept of the average weights,
largest first ("\\t{concept}\\t{weight rounded to 4 places}", down to the first that rounds to 0.0), then
"Average Decomposition L0 Norm: \\t{L0}" and "Average CLIP, SpLiCE Cosine Sim: \\t{cosine rounded to 4 places}".
Beyond SpLiCE, the per-image weights go to {out_path stem}_weights.npz (a scipy.sparse CSR [N, T], readable with
scipy.sparse.load_npz, plus cosine, labels, index [N] and concepts [T]), streamed as the batches finish (RAM flat
in the number of images; --resume continues a killed run, with the same bytes): decompose a dataset once, then
query it again for any class with --from_weights FILE.npz -class_label C, without the model. The concept
embeddings are cached beside the outputs. Images are read in dataset order (SpLiCE shuffles; the averages are the
same). See docs/splice.md.
"""
import argparse
from pathlib import Path

from utils.cli import add_dataset_args, add_splice_args, dataset_settings, note, run, splice_settings, splice_weights
from utils.files.atomic import atomic_write_text
from utils.files.names import splice_weights_path
from utils.files.provenance import write_provenance
from utils.splice import dataset_decompositions, decomposition_lines


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SpLiCE: decompose a dataset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-out_path", "--out_path", required=True, help="the text file to write")
    parser.add_argument("--verbose", action="store_true", help="also print the concepts")
    add_splice_args(parser)
    add_dataset_args(parser)
    parser.add_argument("--weights_out", default=None,
                        help="where the per-image weights go (default: {out_path without .txt}_weights.npz)")
    return parser


def main(args: argparse.Namespace) -> dict:
    out = Path(args.out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights_out = Path(args.weights_out) if args.weights_out else splice_weights_path(out)
    if args.verbose:
        print(f"Decomposing {args.dataset}..." if args.class_label is None else
              f"Decomposing class {args.class_label} from {args.dataset}...")
    summary, record = dataset_decompositions(splice_settings(args), dataset_settings(args), out.parent, weights_out,
                                             log=note)
    lines = decomposition_lines(summary.weights, summary.concepts, stop="rounded")
    l0_line = f"Average Decomposition L0 Norm: \t{summary.l0}"
    cos_line = f"Average CLIP, SpLiCE Cosine Sim: \t{round(summary.cosine, 4)}"
    atomic_write_text(out, "".join(f"{line}\n" for line in ["Concept Decomposition:", *lines, l0_line, cos_line]))
    write_provenance(out, {**record, "l0": summary.l0, "cosine": summary.cosine})
    print("Concept Decomposition:")
    if args.verbose:
        print("\n".join(lines))
    print(l0_line)
    print(cos_line)
    return {"weights": summary.weights, "l0": summary.l0, "cosine": summary.cosine, "num_images": summary.num_images,
            "file": str(out), "weights_file": None if args.from_weights else str(weights_out)}


if __name__ == "__main__":
    run(main, get_args_parser(), weights=splice_weights)
