"""PCLens' compute_classes_embeddings: the zero-shot classifier of a dataset's class names.

The same classifier as compute_text_projection.py (each class name under the 80 OpenAI ImageNet templates, embedded, normalised,
averaged, normalised) and writes {dataset}_classifier_{model}.npy [d, C] to --output_dir, PCLens' name.
Datasets with built-in class names: imagenet, CIFAR10, CIFAR100, waterbirds / cub, binary_waterbirds; for
another dataset pass --classnames FILE (one name per line, in label order). The text tower runs in float32
(PCLens: CUDA autocast, float16). --cache_dir: where open_clip puts downloaded weights.
"""
import argparse
from pathlib import Path

from utils.cli import add_classifier_args, run, run_classifier
from utils.files.names import classifier_path
from utils.scripts import add_cache_dir_arg


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_classes_embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_classifier_args(parser)
    add_cache_dir_arg(parser)
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_classifier(args, lambda a: classifier_path(a.output_dir, a.dataset, a.model))


if __name__ == "__main__":
    run(main, get_args_parser())
