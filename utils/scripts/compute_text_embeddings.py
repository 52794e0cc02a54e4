"""PCLens' compute_text_embeddings: one normalised text embedding per line of a text set.

The same computation as compute_text_set_projection.py: writes --output_dir/{text_set}_{model}.npy [T, d]
(float32, unit rows, row i = line i), where {text_set} is the file name without .txt; that is the name
python -m utils.scripts.compute_text_explanations --text_descriptions {text_set} reads. PCLens keeps its text
sets in utils/text_descriptions/; a --data_path there (or in text_descriptions/) that is not found is looked
for in the other folder and in text_descriptions/external/, where
`python text_descriptions/fetch_original.py NAME.txt` puts PCLens' own sets (SHA-256 pinned); a missing set
is one line naming that command. --cache_dir: where open_clip puts downloaded weights. The text tower runs in
float32 (PCLens: CUDA autocast, float16); an empty line is an error.
"""
import argparse
from pathlib import Path

from utils.cli import add_text_set_args, run, run_text_embeddings
from utils.scripts import add_cache_dir_arg


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_text_embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_text_set_args(parser, "text_descriptions/image_descriptions_general.txt",
                      "the text set, one description per line (default %(default)s: fetch it with "
                      "text_descriptions/fetch_original.py)")
    add_cache_dir_arg(parser)
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_text_embeddings(args)


if __name__ == "__main__":
    run(main, get_args_parser())
