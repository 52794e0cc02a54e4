"""PCLens' compute_images_embedding: the dataset's image embeddings, summed from its stored decomposition.

Reads from --input_dir (default: --output_dir, where PCLens reads them)
  {dataset}_{attn|mlp}_{model}_seed_{seed}.npy   (python -m utils.scripts.compute_activation_values)
  and, for a run with --layers, {dataset}_attn_rest_{model}_seed_{seed}.npy
and writes --output_dir/{dataset}_embeddings_{model}_seed_{seed}.npy [B, d] float32: per image
attn.sum((1, 2)) + mlp.sum(1) (+ attn_rest), the normalised CLS embedding the decomposition sums to. Summed in
float64, a chunk of images at a time from the memory-mapped files (PCLens sums the whole arrays in memory).
--figures_dir and --num_workers are PCLens' flags; nothing here uses them.
"""
import argparse
from pathlib import Path

from utils.cli import add_num_workers_arg, run, say_wrote
from utils.decomposition import summed_embeddings
from utils.files.atomic import make_output_dir
from utils.files.names import pclens_embeddings_path, pclens_paths
from utils.files.provenance import derived_record, save_output
from utils.files.readers import load_attention_terms

WRITER = "python -m utils.scripts.compute_activation_values"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_images_embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--figures_dir", default="./output_dir", help="PCLens' flag; unused")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default %(default)s)")
    parser.add_argument("--input_dir", default=None, help="where the arrays are (default: --output_dir)")
    parser.add_argument("--seed", default=0, type=int, help="the seed in the file names (default %(default)s)")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in file names")
    return parser


def main(args: argparse.Namespace) -> Path:
    paths = pclens_paths(args.input_dir or args.output_dir, args.dataset, args.model, args.seed)
    terms = load_attention_terms(paths, WRITER)
    rest = terms["attn_rest"]
    embeddings = summed_embeddings(terms["attn"], terms["mlp"], rest)
    path = pclens_embeddings_path(make_output_dir(args.output_dir), args.dataset, args.model, args.seed)
    inputs = [paths["attn"], paths["mlp"], *([paths["attn_rest"]] if rest is not None else [])]
    save_output(path, embeddings, derived_record(inputs, seed=args.seed))
    say_wrote([path], f"{list(embeddings.shape)}")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
