"""SpLiCE decomposition of one image (or several): its largest concepts, L0 and cosine, in SpLiCE's text format.

  python decompose_image.py -path 000000308175.jpg -out_path image308175_decomp.txt -l1_penalty 0.25 --verbose

For each image writes {out_path}{stem}_weights.txt, stem = the file name up to its first dot (SpLiCE's
convention: -out_path is a prefix, so give a folder with a trailing '/'). Fixed here: an -out_path that is an
existing folder gets {stem}_weights.txt inside it, and an -out_path ending in .txt (one image) is the file itself
(SpLiCE would write image308175_decomp.txt000000308175_weights.txt for the command above).
The file: "Concept Decomposition of {path}: ", then one line per non-zero weight, largest first
("\\t{concept}\\t{weight rounded to 4 places}"), then "Decomposition L0 Norm: \\t{L0}" and
"CLIP, SpLiCE Cosine Sim: \\t{cosine rounded to 4 places}". The same is printed (the concepts with --verbose).
The concept embeddings are cached beside the outputs (splice_concepts_*.npy). See docs/splice.md.
"""
import argparse
import os
from pathlib import Path

from utils.cli import add_splice_args, note, run, splice_settings, splice_weights
from utils.errors import InputError
from utils.files.atomic import atomic_write_text, make_output_dir
from utils.files.provenance import write_provenance
from utils.splice import (decompose_image, decomposition_lines, load_inputs, read_image, splice_from_loaded,
                          splice_record)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SpLiCE: decompose an image", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-path", "--path", nargs="+", required=True, help="image file(s)")
    parser.add_argument("-out_path", "--out_path", default="",
                        help="output prefix: {out_path}{stem}_weights.txt (a folder: end it with '/'); "
                             "default: the current folder")
    parser.add_argument("--verbose", action="store_true", help="also print the concepts")
    add_splice_args(parser)
    return parser


def output_file(out_path: str, image: str, n_images: int) -> Path:
    """Where an image's text file goes (see the module docstring)."""
    stem = os.path.split(image)[-1].split(".")[0]
    if out_path.endswith(".txt") and n_images == 1:
        return Path(out_path)
    if out_path and (out_path.endswith(("/", os.sep)) or os.path.isdir(out_path)):
        return Path(out_path) / f"{stem}_weights.txt"
    return Path(out_path + stem + "_weights.txt")


def main(args: argparse.Namespace) -> list:
    images = [read_image(p) for p in args.path]  # a bad file fails before the model is loaded
    outputs = [output_file(args.out_path, p, len(args.path)) for p in args.path]
    if len(set(outputs)) != len(outputs):
        raise InputError("-path: two images have the same stem, so the same output file; rename one")
    folder = make_output_dir(outputs[0].parent, "-out_path")
    settings = splice_settings(args)
    loaded = load_inputs(settings, log=note)
    splicemodel = splice_from_loaded(settings, loaded, folder, log=note)
    preprocess, concepts = loaded.preprocess, loaded.concepts
    results = []
    for path, img, out in zip(args.path, images, outputs):
        weights, l0, cosine = decompose_image(preprocess(img).unsqueeze(0), splicemodel)
        lines = decomposition_lines(weights[0].cpu().numpy(), concepts, stop="zero")
        l0_line = f"Decomposition L0 Norm: \t{l0}"
        cos_line = f"CLIP, SpLiCE Cosine Sim: \t{round(cosine, 4)}"
        atomic_write_text(out, "".join(f"{line}\n" for line in [f"Concept Decomposition of {path}: ", *lines,
                                                                 l0_line, cos_line]))
        write_provenance(out, splice_record(settings, loaded.backbone, concepts, image=str(path), num_images=1, l0=l0,
                                            cosine=cosine))
        print(f"Concept Decomposition of {path}:")
        if args.verbose:
            print("\n".join(lines))
        print(l0_line)
        print(cos_line)
        results.append({"file": str(out), "weights": weights[0].cpu(), "l0": l0, "cosine": cosine})
    return results


if __name__ == "__main__":
    run(main, get_args_parser(), weights=splice_weights)
