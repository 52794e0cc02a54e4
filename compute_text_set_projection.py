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

from utils.cli import add_model_args, add_num_workers_arg, args_record, load_model_from_args, positive_int, run

from utils.files.atomic import make_output_dir
from utils.files.names import text_embeddings_path
from utils.files.provenance import save_output
from utils.text.embeddings import encode_texts
from utils.text.sets import read_text_set, resolve_text_file, sha256_of


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
    lines = read_text_set(args.data_path, "--data_path")
    text_file = resolve_text_file(args.data_path)
    name = text_file.name
    name = name[:-len(".txt")] if name.endswith(".txt") else name
    make_output_dir(args.output_dir)
    model, _, tokenizer = load_model_from_args(args)
    features = encode_texts(model, tokenizer, lines, args.device, args.batch_size)  # [T, d], unit rows
    path = text_embeddings_path(args.output_dir, name, args.model)
    save_output(path, features.cpu().numpy(), args_record(args, text_set=name, num_texts=len(lines),
                                                        text_file_sha256=sha256_of(text_file)))
    print(f"wrote {path} {list(features.shape)} ({len(lines)} lines of {args.data_path})")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
