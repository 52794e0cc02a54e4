"""Finding and loading the files a script reads (written by other scripts), with shape and provenance checks.

Each loader memory-maps what is large, checks that the files agree with one another (shapes, and the provenance
records of utils/provenance.py: same model and weights) and raises ``InputError`` / ``FileNotFoundError`` naming
the file at fault.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from utils.cli import InputError
from utils.io import load_array
from utils.names import classifier_path, find_classifier, labels_path, prs_paths, second_order_paths
from utils.provenance import check_consistent


MODEL_FIELDS = ("model", "pretrained", "force_quick_gelu")  # files used together must share these
DATA_FIELDS = ("dataset", "split", "data_path", "num_images")  # ... and per-image files these


def load_decomposition(input_dir: str, dataset: str, model: str, allow_mismatch: bool = False,
                       paths: Optional[dict[str, Path]] = None,
                       written_by: tuple[str, str] = ("compute_prs.py", "compute_text_projection.py")) -> dict:
    """Memory-map the arrays of compute_prs.py and compute_text_projection.py and check they agree.

    Returns ``attn`` [B, L, H, d], ``mlp`` [B, L+1, d], ``cls_attn`` [B, L, d], ``classifier`` [d, C],
    ``labels`` [B] (the class column for Waterbirds' [B, 2]) and ``paths`` (name -> file). Shapes must agree,
    and so must the files' provenance records: the same model and weights everywhere, the same images in the
    per-image files, and a classifier made for ``dataset`` (``InputError`` unless ``allow_mismatch``).
    ``paths`` (attn, mlp, cls_attn, labels, classifier -> file) overrides the file names (PCLens' names), and
    ``written_by`` the scripts named when a file is missing (decomposition, classifier).
    """
    paths = dict(paths or {**prs_paths(input_dir, dataset, model), "labels": labels_path(input_dir, dataset),
                           "classifier": classifier_path(input_dir, dataset, model)})
    out = {k: load_array(paths[k], written_by[0]) for k in ("attn", "mlp", "cls_attn")}
    out["classifier"] = np.asarray(load_array(paths["classifier"], written_by[1], mmap=False), np.float32)
    labels = np.asarray(load_array(paths["labels"], written_by[0], mmap=False))
    out["labels"] = labels[:, 0] if labels.ndim == 2 else labels
    check_decomposition(out, {k: str(p) for k, p in paths.items()})
    per_image = [paths[k] for k in ("attn", "mlp", "cls_attn", "labels")]
    check_consistent([*per_image, paths["classifier"]], MODEL_FIELDS, allow_mismatch=allow_mismatch)
    check_consistent(per_image, DATA_FIELDS, allow_mismatch=allow_mismatch)
    check_consistent([paths["classifier"]], ("dataset",), expected={"dataset": dataset},
                     expected_from=f"--dataset {dataset}", allow_mismatch=allow_mismatch)
    out["paths"] = paths
    return out


def check_decomposition(arrays: dict[str, np.ndarray], names: Optional[dict[str, str]] = None) -> None:
    """Raise ``ValueError`` naming the file whose shape disagrees with the others."""
    names = names or {}
    n = lambda k: names.get(k, k)  # noqa: E731
    attn, mlp = arrays["attn"], arrays["mlp"]
    if attn.ndim != 4:
        raise InputError(f"{n('attn')}: expected [B, L, H, d], got shape {attn.shape}")
    B, L, H, d = attn.shape
    if mlp.shape != (B, L + 1, d):
        raise InputError(f"{n('mlp')}: shape {mlp.shape} does not match attn {attn.shape} (expected {(B, L + 1, d)})")
    if "cls_attn" in arrays and arrays["cls_attn"].shape != (B, L, d):
        raise InputError(f"{n('cls_attn')}: shape {arrays['cls_attn'].shape}, expected {(B, L, d)}")
    if "classifier" in arrays:
        c = arrays["classifier"]
        if c.ndim != 2 or c.shape[0] != d:
            raise InputError(f"{n('classifier')}: shape {c.shape} does not match the embedding dim d={d} of "
                             f"{n('attn')} (wrong model?)")
    if "labels" in arrays:
        lab = arrays["labels"]
        if len(lab) != B:
            raise InputError(f"{n('labels')}: {len(lab)} labels but {B} images in {n('attn')}")
        if "classifier" in arrays and len(lab) and lab.max() >= arrays["classifier"].shape[1]:
            raise InputError(f"{n('labels')}: label {lab.max()} but the classifier has "
                             f"{arrays['classifier'].shape[1]} classes")


def load_classifier(directory: str | Path | Sequence[str | Path], dataset: str, model: str,
                    pretrained: Optional[str], dim: int, allow_mismatch: bool = False) -> tuple[np.ndarray, Path]:
    """``find_classifier`` then load it as float32 ``[d, C]``.

    ``InputError`` unless ``d == dim`` and its provenance record says it was made with ``model`` and
    ``pretrained`` for ``dataset`` (a mismatch is a warning with ``allow_mismatch``).
    """
    path = find_classifier(directory, dataset, model, pretrained)
    classifier = np.asarray(load_array(path, "compute_text_projection.py", mmap=False), np.float32)
    if classifier.ndim != 2 or classifier.shape[0] != dim:
        raise InputError(f"{path}: shape {classifier.shape}, expected [d={dim}, classes]")
    check_consistent([path], ("model", "pretrained", "dataset"),
                     expected={"model": model, "pretrained": pretrained, "dataset": dataset},
                     expected_from="this command", allow_mismatch=allow_mismatch)
    return classifier, path


def load_second_order_files(input_dir: str | Path, dataset: str, split: str, model: str,
                            pretrained: Optional[str], mlp_layer: int, top_k: int,
                            allow_mismatch: bool = False) -> dict[str, np.ndarray]:
    """Memory-map ``merged`` [B, K, d] and load ``pca`` [K, d] and ``norm`` [K, top_k]; check they agree in shape
    and provenance (made with ``model`` and ``pretrained``, from the same images).

    Raises ``FileNotFoundError`` / ``InputError`` naming the file at fault.
    """
    paths = second_order_paths(input_dir, dataset, split, model, pretrained, mlp_layer, top_k)
    merged = load_array(paths["merged"], "compute_second_order_neuron_prs.py")
    if merged.ndim != 3:
        raise InputError(f"{paths['merged']}: expected [images, neurons, d], got shape {merged.shape}")
    _, K, d = merged.shape
    pca = np.asarray(load_array(paths["pca"], "compute_pcas.py", mmap=False), np.float32)
    norm = np.asarray(load_array(paths["norm"], "compute_pcas.py", mmap=False), np.float32)
    if pca.shape != (K, d):
        raise InputError(f"{paths['pca']}: shape {pca.shape} does not match {paths['merged']} {merged.shape} "
                         f"(expected [neurons, d] = {(K, d)}; rerun compute_pcas.py)")
    if norm.ndim != 2 or norm.shape[0] != K:
        raise InputError(f"{paths['norm']}: shape {norm.shape} does not match {paths['merged']} {merged.shape} "
                         f"(expected [neurons, top_k] = {(K, top_k)}; rerun compute_pcas.py)")
    files = [paths["merged"], paths["pca"], paths["norm"]]
    check_consistent(files, ("model", "pretrained"), expected={"model": model, "pretrained": pretrained},
                     allow_mismatch=allow_mismatch)
    check_consistent(files, MODEL_FIELDS + DATA_FIELDS + ("mlp_layer", "coefficient"), allow_mismatch=allow_mismatch)
    return {"merged": merged, "pca": pca, "norm": norm, "paths": paths}
