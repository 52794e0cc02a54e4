"""reproduce.py --smoke: every pipeline end to end on the tiny test model, in about a minute of CPU.

The model is ``prsclip-tiny`` (``tests/configs``) with the seeded weights of ``tests/golden/``; the "ImageNet"
and "CIFAR-10" images are scikit-image's bundled photos (``--dataset sample``, 8 photos, 8 classes); segmentation
reads the 3-image file ``tests/golden/segmentation/gtsegs_golden.mat``; Waterbirds is a folder made here from the
bundled photos. The sizes (``SMOKE``) are the papers' settings cut down so that each step takes about a second.
The numbers of a random tiny model mean nothing: the smoke test checks the plumbing.
"""
from __future__ import annotations

from pathlib import Path

from utils import REPO_ROOT
from utils.files.atomic import atomic_write_text

__all__ = ["SMOKE_MODEL", "SMOKE_SEGMENTATION", "SMOKE_IMAGE_MEAN", "SMOKE_VOCABULARY", "SMOKE_DATA_NAMES", "smoke_data",
           "make_smoke_waterbirds"]

# the model flags, relative to the repository root (the steps run there)
SMOKE_MODEL = {"model_config": "tests/configs", "model": "prsclip-tiny",
               "pretrained": "tests/golden/prsclip-tiny_seed0.safetensors"}
SMOKE_SEGMENTATION = REPO_ROOT / "tests/golden/segmentation/gtsegs_golden.mat"  # 3 images, 64 x 64
SMOKE_IMAGE_MEAN = "tests/golden/splice/image_mean.npy"  # SpLiCE ships image means for its own models only
SMOKE_VOCABULARY = "tests/golden/splice/vocab.txt"  # SpLiCE's concepts: 40 short texts (the solver's time grows with them)
# what each data flag stands for in a smoke run (the report's headings name the data actually used)
SMOKE_DATA_NAMES = {"imagenet": "the bundled sample photos", "imagenet_seg": "the 3-image test segmentation file",
                    "waterbirds": "a Waterbirds-shaped folder of the sample photos",
                    "cifar10": "the bundled sample photos"}


def smoke_data(output_dir: str | Path) -> dict[str, str]:
    """The data flags of a smoke run: ``sample`` (the bundled photos) for ImageNet and CIFAR-10, the test
    segmentation file, and the Waterbirds folder ``make_smoke_waterbirds`` writes under ``output_dir``."""
    from utils.files.names import reproduce_paths

    return {"imagenet": "sample", "imagenet_seg": str(SMOKE_SEGMENTATION), "cifar10": "sample",
            "waterbirds": str(reproduce_paths(output_dir)["smoke_data"] / "waterbirds")}


def make_smoke_waterbirds(folder: str | Path) -> Path:
    """A Waterbirds-shaped folder from the 8 bundled photos: ``metadata.csv`` and 8 test images of 64 x 64, two
    per (class, place); kept when its ``metadata.csv`` exists. Returns ``folder``."""
    from utils.datasets import SampleImages

    folder = Path(folder)
    if (folder / "metadata.csv").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows, photos = ["img_filename,y,split,place"], SampleImages()
    for i in range(len(photos)):
        photos.load(i).resize((64, 64)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},2,{(i // 2) % 2}")
    atomic_write_text(folder / "metadata.csv", "\n".join(rows) + "\n")
    return folder
