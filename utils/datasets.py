"""Datasets, written once for every script.

``build_dataset(name, data_path, transform, split)`` understands:

- ``imagenet``: torchvision ``ImageNet`` (``data_path`` holds ``train/``/``val/`` and ``meta.bin`` or the devkit);
  splits ``train``, ``val`` (default ``val``).
- ``binary_waterbirds``: ``metadata.csv`` (``img_filename, y, split, place``); splits ``train``, ``val``, ``test``
  (default ``test``); labels are ``[B, 2]`` = (class, background).
- ``CIFAR10`` / ``CIFAR100``: torchvision's files (downloaded into ``data_path`` if missing); splits ``train``,
  ``test`` (default ``test``).
- ``sample``: the photos bundled with scikit-image (no ``data_path``, one split).
- ``MSCOCO`` / ``image_files``: every image directly in the folder ``data_path`` (``ImageFiles``), no labels (-1).
- anything else: an ``ImageFolder`` at ``data_path``, or at ``data_path/{split}/`` when that folder exists.

A split a dataset does not have is an ``InputError``. Every dataset has ``.labels`` (a NumPy array in image
order), so labels are written without decoding images, and pickles (DataLoader workers under ``spawn``). An
image that cannot be decoded stops the run with an ``InputError`` naming the file.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import InputError

# (scikit-image loader, class name). All ship inside the scikit-image wheel; no download.
SAMPLE_IMAGES = [
    ("astronaut", "astronaut"),
    ("chelsea", "cat"),
    ("coffee", "cup of coffee"),
    ("rocket", "rocket"),
    ("stereo_motorcycle", "motorcycle"),
    ("camera", "photographer"),
    ("hubble_deep_field", "galaxies"),
    ("horse", "horse"),
]


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB; an unreadable or corrupt file is an ``InputError`` naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for truncated / non-image files
        raise InputError(f"{path}: not an image PIL can read ({e})") from e


def _check_split(dataset: str, split: Optional[str], splits: tuple[str, ...], default: str) -> str:
    """``split`` (``None`` -> ``default``) if ``dataset`` has it, else an ``InputError`` listing its splits."""
    split = default if split is None else split
    if split not in splits:
        raise InputError(f"--split {split}: dataset '{dataset}' has the splits {', '.join(splits)}")
    return split


def _require_dir(data_path: Optional[str], dataset: str) -> Path:
    if not data_path:
        raise InputError(f"--data_path is required for --dataset {dataset}")
    path = Path(data_path)
    if not path.is_dir():
        raise FileNotFoundError(f"--data_path {path}: no such directory (dataset '{dataset}')")
    if not any(path.iterdir()):
        raise InputError(f"--data_path {path}: directory is empty (dataset '{dataset}')")
    return path


class SampleImages(Dataset):
    """scikit-image's bundled photos; label i = ``SAMPLE_IMAGES[i]``, class names in ``.classes``."""

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform
        self.classes = [c for _, c in SAMPLE_IMAGES]
        self.labels = np.arange(len(SAMPLE_IMAGES), dtype=np.int64)

    def __len__(self) -> int:
        return len(SAMPLE_IMAGES)

    def load(self, i: int) -> Image.Image:
        """The i-th photo as an RGB PIL image."""
        import skimage.data

        img = getattr(skimage.data, SAMPLE_IMAGES[i][0])()
        if isinstance(img, tuple):  # stereo pairs: the left view
            img = img[0]
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        return Image.fromarray(img[..., :3]).convert("RGB")

    def __getitem__(self, i: int):
        img = self.load(i)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class BinaryWaterbirds(Dataset):
    """Waterbirds from its ``metadata.csv``; ``split`` in {train, val, test}; labels [B, 2] = (y, place)."""

    SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, root: str | Path, split: str = "test", transform: Optional[Callable] = None):
        self.root = Path(root)
        self.transform = transform
        meta = self.root / "metadata.csv"
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: not found (binary_waterbirds needs the dataset's metadata.csv)")
        with open(meta, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"img_filename", "y", "split", "place"} - set(rows[0] if rows else {})
        if missing:
            raise InputError(f"{meta}: missing columns {sorted(missing)}")
        rows = [r for r in rows if int(r["split"]) == self.SPLITS[split]]
        if not rows:
            raise InputError(f"{meta}: no rows in split '{split}'")
        self.files = [self.root / r["img_filename"] for r in rows]
        self.labels = np.array([[int(r["y"]), int(r["place"])] for r in rows], dtype=np.int64)
        self.classes = ["landbird", "waterbird"]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = load_rgb(self.files[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i, 0])


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FLAT_FOLDER_DATASETS = ("MSCOCO", "image_files")


class ImageFiles(Dataset):
    """Image files with integer labels (``.labels``, -1 = none), opened as RGB; picklable for worker processes."""

    def __init__(self, files, labels=None, transform: Optional[Callable] = None):
        self.files = [Path(f) for f in files]
        self.labels = np.full(len(self.files), -1, dtype=np.int64) if labels is None \
            else np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.files):
            raise ValueError(f"ImageFiles: {len(self.files)} files but {len(self.labels)} labels")
        self.transform = transform

    @classmethod
    def flat_folder(cls, root: str | Path, transform: Optional[Callable] = None) -> "ImageFiles":
        """Every image directly in ``root`` (by extension, sorted by name), unlabelled."""
        files = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputError(f"--data_path {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return cls(files, transform=transform)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = load_rgb(self.files[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _trust_present_files(base, name: str):
    """A torchvision CIFAR class whose files are trusted when present (md5 None: only existence is checked), so
    fixtures and mirrors work."""
    return type(name, (base,), {
        "train_list": [[f, None] for f, _ in base.train_list],
        "test_list": [[f, None] for f, _ in base.test_list],
        "meta": {**base.meta, "md5": None},
        "__module__": __name__,
    })


def __getattr__(name: str):
    """Module attributes ``_CIFAR10Files`` / ``_CIFAR100Files``, built on first use (torchvision is imported only
    then). Being reachable by name makes them picklable for DataLoader workers started with ``spawn``."""
    if name in ("_CIFAR10Files", "_CIFAR100Files"):
        from torchvision import datasets

        cls = _trust_present_files(getattr(datasets, name[1:-len("Files")]), name)
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cifar(name: str, root: Path, transform, split: str):
    """torchvision's CIFAR ``split`` (train / test); a present copy is trusted without its md5 check."""
    cls = getattr(sys.modules[__name__], f"_{name}Files")
    ds = cls(root=str(root), train=split == "train", download=False, transform=transform)
    ds.labels = np.asarray(ds.targets, dtype=np.int64)
    return ds


def build_dataset(name: str, data_path: Optional[str], transform: Optional[Callable] = None,
                  split: Optional[str] = None) -> Dataset:
    """The dataset ``name`` (see module docstring), its ``split`` (``None``: its evaluation split), with
    ``transform``; ``.labels`` holds its labels."""
    if name == "sample":
        return SampleImages(transform)
    if name in ("CIFAR10", "CIFAR100"):
        split = _check_split(name, split, ("train", "test"), "test")
        root = Path(data_path or ".")
        if root.exists() and not root.is_dir():
            raise InputError(f"--data_path {root}: not a directory (dataset '{name}')")
        cls = getattr(sys.modules[__name__], f"_{name}Files")
        folder = root / cls.base_folder
        if not folder.is_dir():  # torchvision downloads it: say where it goes, and how to do it by hand offline
            how = (f"{name} is not in {folder}; downloading {cls.url} into {root} failed")
            try:
                root.mkdir(parents=True, exist_ok=True)
                cls(root=str(root), train=split == "train", download=True)
            except (OSError, RuntimeError) as e:  # URLError is an OSError
                raise InputError(f"--data_path {root}: {how} ({type(e).__name__}: {e}); download it on a machine "
                                 f"with network and extract it there (tar xzf {Path(cls.url).name} -C {root})") from e
        try:
            return _cifar(name, root, transform, split)
        except RuntimeError as e:  # torchvision: the files are there but unusable
            raise InputError(f"--data_path {root}: no usable {name} files in {folder} ({e})") from e
    root = _require_dir(data_path, name)
    if name in FLAT_FOLDER_DATASETS:
        return ImageFiles.flat_folder(root, transform)
    if name == "imagenet":
        from torchvision.datasets import ImageNet

        split = _check_split(name, split, ("train", "val"), "val")
        if not (root / split).is_dir():
            raise FileNotFoundError(f"--data_path {root}: no '{split}/' folder (torchvision ImageNet layout)")
        try:
            ds = ImageNet(root=str(root), split=split, transform=transform, loader=load_rgb)
        except RuntimeError as e:  # the devkit / meta.bin is missing
            raise InputError(f"--data_path {root}: ImageNet metadata missing: put meta.bin or "
                             f"ILSVRC2012_devkit_t12.tar.gz there ({e})") from e
    elif name == "binary_waterbirds":
        return BinaryWaterbirds(root, split=_check_split(name, split, tuple(BinaryWaterbirds.SPLITS), "test"),
                                transform=transform)
    else:
        from torchvision.datasets import ImageFolder

        if split is not None and (root / split).is_dir():
            root = root / split
        try:
            ds = ImageFolder(root=str(root), transform=transform, loader=load_rgb)
        except (FileNotFoundError, RuntimeError) as e:
            raise InputError(f"--data_path {root}: not a usable ImageFolder for dataset '{name}': {e}") from e
    ds.labels = np.asarray(ds.targets, dtype=np.int64)
    return ds


# The second paper subsamples ImageNet: every 250th training image (5,124) and every 10th validation image
# (5,000), in torchvision ImageNet order.
IMAGENET_SUBSAMPLE_STEP = {"train": 250, "val": 10}


def subsample_imagenet(ds: Dataset, split: str) -> Dataset:
    """Every ``IMAGENET_SUBSAMPLE_STEP[split]``-th image of ``ds`` (len // step images), with ``.labels``."""
    from torch.utils.data import Subset

    if split not in IMAGENET_SUBSAMPLE_STEP:
        raise InputError(f"--split {split}: ImageNet subsampling is defined for {sorted(IMAGENET_SUBSAMPLE_STEP)}")
    step = IMAGENET_SUBSAMPLE_STEP[split]
    index = range(0, (len(ds) // step) * step, step)
    sub = Subset(ds, index)
    sub.labels = np.asarray(ds.labels)[index.start:index.stop:step]
    return sub


def class_column(labels) -> np.ndarray:
    """Labels as [B] class indices: Waterbirds' [B, 2] (class, background) gives its class column."""
    labels = np.asarray(labels)
    return labels[:, 0] if labels.ndim == 2 else labels


def class_labels(ds, num_classes: int, what: str) -> np.ndarray:
    """``ds.labels`` as [B] class indices (``class_column``), checked against the ``num_classes`` of the classifier
    named ``what``."""
    labels = class_column(ds.labels)
    if len(labels) and labels.max() >= num_classes:
        raise InputError(f"{what}: {num_classes} classes, but the dataset has label {labels.max()}")
    return labels


def build_second_order_dataset(name: str, data_path: Optional[str], transform: Optional[Callable],
                               split: str):
    """The second paper's datasets: ``imagenet`` subsampled (train: every 250th, val: every 10th image);
    anything else as ``build_dataset`` builds it (``.labels`` in image order)."""
    ds = build_dataset(name, data_path, transform, split=split)
    return subsample_imagenet(ds, split) if name == "imagenet" else ds
