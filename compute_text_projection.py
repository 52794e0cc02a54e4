"""Zero-shot classifier: each class name under the 80 OpenAI ImageNet templates, normalised, averaged, normalised.

Writes {dataset}_classifier_{model}.npy [d, C] in --output_dir (one column per class), with a provenance record
beside it. (compute_classifier_projection.py writes the same classifier under paper 2's name.)
Datasets with built-in names: imagenet, waterbirds / cub (200 CUB classes), binary_waterbirds, CIFAR10,
CIFAR100, sample. For anything else (an ImageFolder, say) pass --classnames FILE, one name per line in
label order.
"""
import argparse
from pathlib import Path

from utils.cli import add_classifier_args, run, run_classifier
from utils.files.names import classifier_path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_text_projection.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_classifier_args(parser)
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_classifier(args, lambda a: classifier_path(a.output_dir, a.dataset, a.model))


if __name__ == "__main__":
    run(main, get_args_parser())
