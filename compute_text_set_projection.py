"""Embed a text set: one normalised text embedding per line of --data_path.

Writes {text_set}_{model}.npy [T, d] (float32, unit rows) in --output_dir, where {text_set} is the file name
without .txt: row i is line i. Empty lines and a missing file are errors. A --data_path under
text_descriptions/ that is not there is also looked for in text_descriptions/external/ (where
text_descriptions/fetch_original.py puts the authors' sets).

The model is loaded by the shared loader, so `--pretrained openai` runs with QuickGELU (the second paper's
own script embedded its texts with plain GELU for those weights). The original ran the text tower under CUDA
autocast (float16); this runs it in float32 (differences ~1e-3 on GPU).
"""
import argparse
from pathlib import Path

from utils.cli import add_text_set_args, run, run_text_embeddings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Get text list weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_set_args(parser, "text_descriptions/image_descriptions_3500.txt",
                      "the text set, one description per line (the original default, "
                      "text_descriptions/image_descriptions_general.txt, is the authors' set: fetch it)")
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_text_embeddings(args)


if __name__ == "__main__":
    run(main, get_args_parser())
