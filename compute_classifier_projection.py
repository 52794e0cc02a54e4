"""Zero-shot classifier under paper 2's name: {dataset}_classifier_{model}_{pretrained}.npy [d, C], float32.

The same classifier as compute_text_projection.py (each class name under the 80 OpenAI ImageNet templates,
normalised, averaged, normalised; one column per class), with a provenance record beside it. {pretrained} is
the tag, or a local checkpoint's file stem. Class names: as compute_text_projection.py (--dataset imagenet,
CIFAR10, CIFAR100, waterbirds, ..., or --classnames FILE).

Deviation from the original: for OpenAI weights (--pretrained openai) the text tower runs with QuickGELU, the
activation those weights were trained with (set automatically by the shared model loader). The original
second_order_lens script loaded them with open_clip's exact GELU here, while forcing QuickGELU for the image
tower, so its classifier differs slightly from this one. It also ran under CUDA autocast (float16); this is
float32.
"""
import argparse
from pathlib import Path

from utils.cli import add_classifier_args, run, run_classifier
from utils.files.names import classifier_path_pretrained


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("compute_classifier_projection.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_classifier_args(parser, model="ViT-B-32", pretrained="openai")
    return parser


def main(args: argparse.Namespace) -> Path:
    return run_classifier(args, lambda a: classifier_path_pretrained(a.output_dir, a.dataset, a.model, a.pretrained))


if __name__ == "__main__":
    run(main, get_args_parser())
