"""PCLens' compute_classes_embeddings: the zero-shot classifier of a dataset's class names.

The same classifier as compute_text_projection.py (each class name under the 80 OpenAI ImageNet templates, embedded, normalised,
averaged, normalised) and writes {dataset}_classifier_{model}.npy [d, C] to --output_dir, PCLens' name.
Datasets with built-in class names: imagenet, CIFAR10, CIFAR100, waterbirds / cub, binary_waterbirds; for
another dataset pass --classnames FILE (one name per line, in label order). The text tower runs in float32
(PCLens: CUDA autocast, float16). --cache_dir is refused with one line: set HF_HUB_CACHE instead.
"""
import argparse
from pathlib import Path

from utils.cli import add_classifier_args, run, run_classifier
from utils.files.names import classifier_path
from utils.scripts import refuse_cache_dir


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_classes_embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_classifier_args(parser)
    parser.add_argument("--cache_dir", default=None, type=str, help="refused: set HF_HUB_CACHE instead")
    return parser


def main(args: argparse.Namespace) -> Path:
    refuse_cache_dir(args.cache_dir)
    return run_classifier(args, lambda a: classifier_path(a.output_dir, a.dataset, a.model))


if __name__ == "__main__":
    run(main, get_args_parser())
