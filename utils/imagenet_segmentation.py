"""ImageNet-segmentation (Guillaumin et al., IJCV 2014): the ``gtsegs_ijcv.mat`` file, read with h5py.

The file is a MATLAB v7.3 mat-file, i.e. HDF5 (with a 512-byte MATLAB user block, which h5py skips):

- ``/value/img`` ``[n, 1]`` object references, each to a uint8 dataset ``[3, W, H]`` (MATLAB's column-major
  order: transpose ``(2, 1, 0)`` gives the ``[H, W, 3]`` RGB image);
- ``/value/gt`` ``[n, 1]`` object references, each to a ``[1, 1]`` reference dataset (a MATLAB cell) that
  points to the uint8 mask ``[W, H]`` (transpose gives ``[H, W]``; 1 = object, 0 = background).

The referenced datasets live under ``/#refs#``.

Mask resize (quirk S3 of tests/golden/README.md): the original resizes the mask *straight* to
``image_size × image_size`` with nearest neighbour, while the image goes through the model's transform
(shorter side resized, then centre-cropped). On non-square images the two are therefore misaligned. That is
kept as the default (``mask_resize="stretch"``) so the numbers equal the original's; ``mask_resize="crop"``
gives the mask the same geometry as the image (shorter side to ``image_size`` with nearest, then centre crop).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import InputError

MASK_RESIZE = ("stretch", "crop")


class SegmentationFileError(InputError):
    """The ``.mat`` file is missing, not HDF5, or not in the ``gtsegs_ijcv.mat`` layout."""


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise FileNotFoundError(f"--data_path {path}: not found (expected ImageNet-segmentation's gtsegs_ijcv.mat)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise SegmentationFileError(
            f"--data_path {path}: not an HDF5 / MATLAB v7.3 file ({e}); expected ImageNet-segmentation's "
            f"gtsegs_ijcv.mat (a corrupt or truncated download?)") from e


def resize_mask(mask: np.ndarray, image_size: int, mode: str = "stretch") -> np.ndarray:
    """Resize a mask ``[H, W]`` to ``[image_size, image_size]`` with nearest neighbour (PIL), as int64.

    ``stretch``: straight to ``image_size × image_size`` (the original's target transform).
    ``crop``: the shorter side to ``image_size``, then a centre crop (the geometry of the image transform).
    """
    import torchvision.transforms as T

    if mode not in MASK_RESIZE:
        raise InputError(f"mask resize '{mode}': expected one of {MASK_RESIZE}")
    pil = Image.fromarray(np.ascontiguousarray(mask))
    if mode == "stretch":
        out = T.Resize((image_size, image_size), interpolation=T.InterpolationMode.NEAREST)(pil)
    else:
        out = T.CenterCrop(image_size)(T.Resize(image_size, interpolation=T.InterpolationMode.NEAREST)(pil))
    return np.asarray(out).astype(np.int64)


class ImagenetSegmentation(Dataset):
    """The images and masks of ``gtsegs_ijcv.mat``.

    Item ``i`` is ``(transform(image), mask)``: the image as an RGB PIL image through ``transform`` and the
    mask as an int64 tensor ``[image_size, image_size]`` (see ``resize_mask``). Without ``image_size`` the
    mask is returned at its original size. The HDF5 file is opened lazily in each worker process.

    Raises ``FileNotFoundError`` / ``SegmentationFileError`` (a ``ValueError``) naming the file when it is
    missing, not HDF5, or lacks the ``/value/img`` and ``/value/gt`` references.
    """

    CLASSES = 2

    def __init__(self, path: str | Path, transform: Optional[Callable] = None, image_size: Optional[int] = None,
                 mask_resize: str = "stretch"):
        self.path = Path(path)
        self.transform = transform
        self.image_size = image_size
        if mask_resize not in MASK_RESIZE:
            raise InputError(f"--mask_resize {mask_resize}: expected one of {MASK_RESIZE}")
        self.mask_resize = mask_resize
        self._file = None
        with _open(self.path) as f:
            missing = [k for k in ("/value/img", "/value/gt") if k not in f]
            if missing:
                raise SegmentationFileError(
                    f"--data_path {self.path}: HDF5 file without {', '.join(missing)} (top-level keys: "
                    f"{sorted(f.keys())}); expected the layout of ImageNet-segmentation's gtsegs_ijcv.mat")
            n_img, n_gt = len(f["/value/img"]), len(f["/value/gt"])
            if n_img != n_gt:
                raise SegmentationFileError(f"--data_path {self.path}: {n_img} images but {n_gt} masks")
            if f["/value/img"].dtype.kind != "O" or f["/value/gt"].dtype.kind != "O":
                raise SegmentationFileError(
                    f"--data_path {self.path}: /value/img and /value/gt must hold object references")
        self.data_length = n_img

    def __len__(self) -> int:
        return self.data_length

    def __getstate__(self) -> dict:  # h5py handles do not pickle: each DataLoader worker opens its own
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _h5(self):
        if self._file is None:
            self._file = _open(self.path)
        return self._file

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``index``-th image ``[H, W, 3]`` uint8 and mask ``[H, W]`` uint8, as stored (after transposing)."""
        if not -self.data_length <= index < self.data_length:
            raise IndexError(f"{self.path}: index {index} out of range for {self.data_length} images")
        f = self._h5()
        try:
            img = np.asarray(f[f["/value/img"][index, 0]])
            cell = f[f["/value/gt"][index, 0]]
            gt = np.asarray(f[cell[0, 0]])
        except (KeyError, ValueError, TypeError) as e:
            raise SegmentationFileError(f"{self.path}: cannot read image/mask {index}: {e}") from e
        if img.ndim == 2:  # a grey-scale image is stored [W, H]
            img = np.stack([img] * 3, 0)
        if img.ndim != 3 or gt.ndim != 2:
            raise SegmentationFileError(
                f"{self.path}: image {index} has shape {img.shape} (expected [3, W, H]) and mask {gt.shape} "
                f"(expected [W, H])")
        return img.transpose(2, 1, 0), gt.transpose(1, 0)

    def mask(self, index: int) -> np.ndarray:
        """The ``index``-th mask as ``__getitem__`` returns it (resized when ``image_size`` is set), uint8."""
        f = self._h5()
        try:
            gt = np.asarray(f[f[f["/value/gt"][index, 0]][0, 0]]).transpose(1, 0)
        except (KeyError, ValueError, TypeError) as e:
            raise SegmentationFileError(f"{self.path}: cannot read mask {index}: {e}") from e
        if self.image_size is not None:
            gt = resize_mask(gt, self.image_size, self.mask_resize)
        return gt.astype(np.uint8)

    def __getitem__(self, index: int):
        img, gt = self.raw(index)
        image = Image.fromarray(np.ascontiguousarray(img)).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        if self.image_size is not None:
            mask = resize_mask(gt, self.image_size, self.mask_resize)
        else:
            mask = gt.astype(np.int64)
        return image, torch.from_numpy(mask)
