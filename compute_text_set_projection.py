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

from utils.cli import add_model_args, add_num_workers_arg, positive_int, run, run_text_embeddings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Get text list weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=2048, type=positive_int, help="texts per encode_text batch")
    add_model_args(parser)
    parser.add_argument("--data_path", default="text_descriptions/image_descriptions_3500.txt", type=str,
                        help="the text set, one description per line (the original default, "
                             "text_descriptions/image_descriptions_general.txt, is the authors' set: fetch it)")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_text_embeddings(args)


if __name__ == "__main__":
    run(main, get_args_parser())
