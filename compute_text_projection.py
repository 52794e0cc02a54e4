"""Zero-shot classifier: each class name under the 80 OpenAI ImageNet templates, normalised, averaged, normalised.

Writes {dataset}_classifier_{model}.npy [d, C] in --output_dir (one column per class), with a provenance record
beside it. (compute_classifier_projection.py writes the same classifier under paper 2's name.)
Datasets with built-in names: imagenet, waterbirds / cub (200 CUB classes), binary_waterbirds, CIFAR10,
CIFAR100, sample. For anything else (an ImageFolder, say) pass --classnames FILE, one name per line in
label order.
"""
import argparse
from pathlib import Path
from typing import Callable, Optional

from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames

from utils.files.atomic import make_output_dir
from utils.files.names import classifier_path
from utils.text.embeddings import zero_shot_classifier
from utils.cli import add_model_args, args_record, load_model_from_args, positive_int, run
from utils.files.provenance import save_output


def get_args_parser(description: str = __doc__, model: str = "ViT-H-14",
                    pretrained: str = "laion2b_s32b_b79k") -> argparse.ArgumentParser:
    """The flags; compute_classifier_projection.py reuses them with paper 2's description and default model."""
    parser = argparse.ArgumentParser("Get classifier weights", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model=model, pretrained=pretrained)
    parser.add_argument("--dataset", default="imagenet", help="which class names (see above; default imagenet)")
    parser.add_argument("--classnames", default=None, help="file with one class name per line")
    parser.add_argument("--batch_size", default=256, type=positive_int,
                        help="prompts per encode_text batch (default 256)")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default ./output_dir)")
    return parser


def main(args: argparse.Namespace, output_path: Optional[Callable[[argparse.Namespace], Path]] = None) -> Path:
    """Compute the classifier and save it at ``output_path(args)``, by default paper 1's name."""
    classnames = get_classnames(args.dataset, args.classnames)
    make_output_dir(args.output_dir)
    model, _, tokenizer = load_model_from_args(args)
    classifier = zero_shot_classifier(model, tokenizer, classnames, OPENAI_IMAGENET_TEMPLATES, args.device,
                                      args.batch_size)
    path = output_path(args) if output_path else classifier_path(args.output_dir, args.dataset, args.model)
    save_output(path, classifier.cpu().numpy(), args_record(args, num_classes=len(classnames),
                                                          classnames=args.classnames,
                                                          templates=len(OPENAI_IMAGENET_TEMPLATES)))
    print(f"wrote {path} {list(classifier.shape)} ({len(classnames)} classes x {len(OPENAI_IMAGENET_TEMPLATES)} "
          f"templates)")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
