"""Class names per dataset, for the zero-shot classifier; templates are open_clip's own."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from utils import DATA_DIR
from utils.datasets import SAMPLE_IMAGES
from utils.errors import InputError

__all__ = ["OPENAI_IMAGENET_TEMPLATES", "get_classnames", "cub_classnames"]

CIFAR10_CLASSNAMES = ("airplane automobile bird cat deer dog frog horse ship truck").split()

# torchvision / the dataset's fine-label order (alphabetical)
CIFAR100_CLASSNAMES = [c.replace("_", " ") for c in (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm").split()]

WATERBIRDS_BINARY_CLASSNAMES = ["landbird", "waterbird"]


def cub_classnames() -> list[str]:
    """The 200 CUB-200-2011 classes in label order, e.g. '001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    folders = (DATA_DIR / "cub_200_folders.txt").read_text().split()
    return [f.split(".", 1)[1].replace("_", " ") for f in folders]


def read_classnames(path: str | Path) -> list[str]:
    """One class name per line; blank lines are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--classnames {path}: not found")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(f"--classnames {path}: empty file")
    empty = [i + 1 for i, l in enumerate(lines) if not l.strip()]
    if empty:
        raise InputError(f"--classnames {path}: empty line(s) {empty[:5]}")
    return [l.strip() for l in lines]


def get_classnames(dataset: str, classnames_file: Optional[str] = None) -> list[str]:
    """Class names for ``dataset``; ``classnames_file`` (one per line) wins, and is required for unknown names."""
    if classnames_file:
        return read_classnames(classnames_file)
    table = {
        "imagenet": lambda: list(IMAGENET_CLASSNAMES),
        "waterbirds": cub_classnames,
        "cub": cub_classnames,
        "binary_waterbirds": lambda: list(WATERBIRDS_BINARY_CLASSNAMES),
        "CIFAR10": lambda: list(CIFAR10_CLASSNAMES),
        "CIFAR100": lambda: list(CIFAR100_CLASSNAMES),
        "sample": lambda: [c for _, c in SAMPLE_IMAGES],
    }
    if dataset not in table:
        raise InputError(f"--dataset '{dataset}': no built-in class names (known: {sorted(table)}); "
                         f"pass --classnames FILE with one name per line")
    return table[dataset]()
