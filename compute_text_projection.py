"""Zero-shot classifier: each class name under the 80 OpenAI ImageNet templates, normalised, averaged, normalised.

Writes {dataset}_classifier_{model}.npy [d, C] in --output_dir (one column per class).
Datasets with built-in names: imagenet, waterbirds / cub (200 CUB classes), binary_waterbirds, CIFAR10,
CIFAR100, sample. For anything else (an ImageFolder, say) pass --classnames FILE, one name per line in
label order.
"""
import argparse
from pathlib import Path

from utils.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames
from utils.factory import add_model_args, load_model_from_args
from utils.io import make_output_dir
from utils.names import classifier_path
from utils.text import zero_shot_classifier
from utils.cli import positive_int, run
from utils.provenance import make_record, save_output


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Get classifier weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dataset", default="imagenet", help="which class names (see above)")
    parser.add_argument("--classnames", default=None, help="file with one class name per line")
    parser.add_argument("--batch_size", default=256, type=positive_int, help="prompts per encode_text batch")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    return parser


def main(args: argparse.Namespace) -> Path:
    classnames = get_classnames(args.dataset, args.classnames)
    make_output_dir(args.output_dir)
    model, _, tokenizer = load_model_from_args(args)
    classifier = zero_shot_classifier(model, tokenizer, classnames, OPENAI_IMAGENET_TEMPLATES, args.device,
                                      args.batch_size)
    path = classifier_path(args.output_dir, args.dataset, args.model)
    save_output(path, classifier.cpu().numpy(), make_record(args, num_classes=len(classnames),
                                                          classnames=args.classnames))
    print(f"wrote {path} {list(classifier.shape)} ({len(classnames)} classes x {len(OPENAI_IMAGENET_TEMPLATES)} templates)")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
