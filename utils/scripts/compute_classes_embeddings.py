"""PCLens' compute_classes_embeddings: the zero-shot classifier of a dataset's class names.

Runs compute_text_projection.py (each class name under the 80 OpenAI ImageNet templates, embedded, normalised,
averaged, normalised) and writes {dataset}_classifier_{model}.npy [d, C] to --output_dir, PCLens' name.
Datasets with built-in class names: imagenet, CIFAR10, CIFAR100, waterbirds / cub, binary_waterbirds; for
another dataset pass --classnames FILE (one name per line, in label order). The text tower runs in float32
(PCLens: CUDA autocast, float16). --cache_dir is refused with one line: set HF_HUB_CACHE instead.
"""
import argparse

from utils.cli import add_model_args, run

from utils.scripts import load_script, refuse_cache_dir


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Get classifier weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dataset", default="imagenet", help="whose class names (default %(default)s)")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default %(default)s)")
    parser.add_argument("--cache_dir", default=None, type=str, help="refused: set HF_HUB_CACHE instead")
    parser.add_argument("--classnames", default=None, help="file with one class name per line (other datasets)")
    parser.add_argument("--batch_size", default=256, type=int, help="prompts per encode_text batch")
    return parser


def main(args: argparse.Namespace):
    refuse_cache_dir(args.cache_dir)
    return load_script("compute_text_projection").main(args)


if __name__ == "__main__":
    run(main, get_args_parser())
