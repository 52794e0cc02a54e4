"""Finding and loading the files a script reads (written by other scripts), with shape and provenance checks.

Each loader memory-maps what is large, checks that the files agree with one another (shapes, and the provenance
records of utils/files/provenance.py: same model and weights) and raises ``InputError`` / ``FileNotFoundError`` naming
the file at fault.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from utils.datasets import class_column
from utils.errors import InputError
from utils.files.atomic import load_array
from utils.files.names import (attn_rest_path, classifier_path, find_classifier, format_layers, labels_path,
                               layers_with_pcs, prs_paths, second_order_paths)
from utils.files.provenance import check_consistent, read_provenance

MODEL_FIELDS = ("model", "pretrained", "force_quick_gelu")  # files used together must share these
DATA_FIELDS = ("dataset", "split", "data_path", "num_images")  # ... and per-image files these


def load_decomposition(input_dir: str, dataset: str, model: str, allow_mismatch: bool = False,
                       paths: Optional[dict[str, Path]] = None,
                       written_by: tuple[str, str] = ("compute_prs.py", "compute_text_projection.py"),
                       cls_attn: bool = True) -> dict:
    """Memory-map the arrays of compute_prs.py and compute_text_projection.py and check they agree.

    Returns ``attn`` [B, K, H, d] (K = L, or the K layers kept by ``compute_prs.py --layers``), ``layers`` (the
    model layer of each of the K entries, ascending), ``num_layers`` (L), ``attn_rest`` ([B, d], the attention
    layers not kept summed over heads; ``None`` when every layer is kept), ``mlp`` [B, L+1, d], ``cls_attn``
    [B, L, d], ``classifier`` [d, C], ``labels`` [B] (the class column for Waterbirds' [B, 2]) and ``paths``
    (name -> file); with ``cls_attn=False`` that file is neither read nor required (``cls_attn`` is ``None``).
    Shapes must agree with each other and with the attn file's provenance record (its
    ``layers``), and so must the files' records: the same model and weights everywhere, the same images in the
    per-image files, and a classifier made for ``dataset`` (``InputError`` unless ``allow_mismatch``).
    ``paths`` (attn, mlp, cls_attn, labels, classifier and optionally attn_rest -> file) overrides the file
    names (PCLens' names), and ``written_by`` the scripts named when a file is missing (decomposition,
    classifier). Scripts then ask for the layers they need with ``require_layers`` / ``last_layers``.
    """
    paths = dict(paths or {**prs_paths(input_dir, dataset, model), "labels": labels_path(input_dir, dataset),
                           "classifier": classifier_path(input_dir, dataset, model)})
    paths.setdefault("attn_rest", attn_rest_path(input_dir, dataset, model))
    names = {k: str(p) for k, p in paths.items()}
    kinds = ("attn", "mlp", "cls_attn") if cls_attn else ("attn", "mlp")
    out = load_attention_terms(paths, written_by[0])
    out["cls_attn"] = load_array(paths["cls_attn"], written_by[0]) if cls_attn else None
    out["classifier"] = read_classifier(paths["classifier"], written_by=written_by[1])
    out["labels"] = class_column(load_array(paths["labels"], written_by[0], mmap=False))
    check_decomposition(out, names)
    per_image = [paths[k] for k in (*kinds, "labels")]
    per_image += [paths["attn_rest"]] if out["attn_rest"] is not None else []
    check_consistent([*per_image, paths["classifier"]], MODEL_FIELDS, allow_mismatch=allow_mismatch)
    check_consistent(per_image, DATA_FIELDS, allow_mismatch=allow_mismatch)
    check_consistent([paths["classifier"]], ("dataset",), expected={"dataset": dataset},
                     expected_from=f"--dataset {dataset}", allow_mismatch=allow_mismatch)
    out["paths"] = paths
    return out


def load_attention_terms(paths: Mapping[str, str | Path], written_by: str = "compute_prs.py") -> dict:
    """The parts of a decomposition's files that sum to the embedding: ``attn`` [B, K, H, d], ``mlp`` [B, L+1, d]
    (or [B, L+2, d]), ``layers`` (the model layer of each of the K entries), ``num_layers`` (L) and ``attn_rest``
    ([B, d], the layers not kept; ``None`` when every layer is kept, else checked to be made with the same
    ``--layers``). ``paths``: attn, mlp, attn_rest -> file; ``written_by`` is named when a file is missing."""
    attn, mlp = load_array(paths["attn"], written_by), load_array(paths["mlp"], written_by)
    num_layers = mlp_num_layers(paths["mlp"], mlp, attn)
    layers = stored_layers(paths["attn"], attn, num_layers)
    rest = None
    if len(layers) < num_layers:
        rest = load_array(paths["attn_rest"], f"{written_by} --layers")
        rest_layers = (read_provenance(paths["attn_rest"]) or {}).get("layers", layers)
        if rest_layers != layers:
            raise InputError(f"{paths['attn_rest']} was made with --layers {format_layers(rest_layers)} but "
                             f"{paths['attn']} with --layers {format_layers(layers)}; rerun compute_prs.py")
    return {"attn": attn, "mlp": mlp, "layers": layers, "num_layers": num_layers, "attn_rest": rest}


def mlp_num_layers(mlp_path: str | Path, mlp: np.ndarray, attn: np.ndarray) -> int:
    """L of a decomposition: its provenance record's ``num_layers``; else ``mlp``'s [B, L+1, d] (files written
    before towers read out by pooling, whose mlp is [B, L+2, d], were supported)."""
    L = (read_provenance(mlp_path) or {}).get("num_layers")
    if L is not None:
        return int(L)
    return mlp.shape[1] - 1 if mlp.ndim == 3 else attn.shape[1]


def stored_layers(attn_path: str | Path, attn: np.ndarray, num_layers: int) -> list[int]:
    """The model layer of each entry of the attn file's layer axis: ``range(L)``, or the ``layers`` of its
    provenance record (``compute_prs.py --layers``), checked against its shape."""
    if attn.ndim != 4:
        raise InputError(f"{attn_path}: expected [B, L, H, d], got shape {attn.shape}")
    layers = (read_provenance(attn_path) or {}).get("layers")
    if layers is None:
        if attn.shape[1] != num_layers:
            raise InputError(f"{attn_path}: {attn.shape[1]} layers but the model has {num_layers}, and no provenance "
                             f"record says which layers were kept; rerun compute_prs.py")
        return list(range(num_layers))
    if len(layers) != attn.shape[1] or layers != sorted(set(layers)) or not all(0 <= l < num_layers for l in layers):
        raise InputError(f"{attn_path}: shape {attn.shape} does not match the layers of its provenance record "
                         f"({format_layers(layers)} of {num_layers})")
    return list(layers)


def require_layers(arrays: dict, needed: Iterable[int], what: str) -> None:
    """``InputError`` naming the layers of ``needed`` that the attn file does not store (``compute_prs.py
    --layers``) and ``what`` needs them for."""
    missing = sorted(set(needed) - set(arrays["layers"]))
    if missing:
        which = f"layer {missing[0]} is" if len(missing) == 1 else f"layers {format_layers(missing)} are"
        raise InputError(f"{arrays['paths']['attn']}: {which} not stored (made with "
                         f"compute_prs.py --layers {format_layers(arrays['layers'])}) but {what} needs them; rerun "
                         f"compute_prs.py without --layers (or with --layers covering "
                         f"{format_layers(sorted(set(needed)))})")


def last_layers(arrays: dict, count: int, flag: str = "--num_of_last_layers") -> int:
    """Check that the last ``count`` layers are stored; return the index of the first of them in the attn
    file's layer axis (entries before it are earlier layers kept by ``--layers``, if any)."""
    L = arrays["num_layers"]
    if not 1 <= count <= L:
        raise InputError(f"{flag} {count}: the model has {L} layers")
    require_layers(arrays, range(L - count, L), f"{flag} {count}")
    return len(arrays["layers"]) - count


def check_decomposition(arrays: dict[str, np.ndarray], names: Optional[dict[str, str]] = None) -> None:
    """Raise ``InputError`` naming the file whose shape disagrees with the others.

    ``arrays``: ``attn`` [B, K, H, d] and ``mlp`` [B, L+1, d] (or [B, L+2, d]), optionally ``num_layers`` (L),
    ``layers`` (the K stored layers; K = L
    without it), ``attn_rest`` [B, d] (needed when K < L), ``cls_attn`` [B, L, d], ``classifier`` [d, C], ``labels``.
    """
    names = names or {}
    n = lambda k: names.get(k, k)  # noqa: E731
    attn, mlp = arrays["attn"], arrays["mlp"]
    if attn.ndim != 4:
        raise InputError(f"{n('attn')}: expected [B, L, H, d], got shape {attn.shape}")
    B, K, H, d = attn.shape
    L = arrays.get("num_layers") or (mlp.shape[1] - 1 if arrays.get("layers") is not None and mlp.ndim == 3 else K)
    if mlp.ndim != 3 or mlp.shape[0] != B or mlp.shape[2] != d or mlp.shape[1] not in (L + 1, L + 2):
        raise InputError(f"{n('mlp')}: shape {mlp.shape} does not match attn {attn.shape} (expected {(B, L + 1, d)}, "
                         f"or {(B, L + 2, d)} for a tower read out by pooling)")
    if K < L and (arrays.get("attn_rest") is None or arrays["attn_rest"].shape != (B, d)):
        got = "missing" if arrays.get("attn_rest") is None else f"shape {arrays['attn_rest'].shape}"
        raise InputError(f"{n('attn_rest')}: {got}, expected {(B, d)} beside {n('attn')} of {K} of {L} layers")
    if arrays.get("cls_attn") is not None and arrays["cls_attn"].shape != (B, L, d):
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


def read_classifier(path: str | Path, dim: Optional[int] = None,
                    written_by: str = "compute_text_projection.py") -> np.ndarray:
    """The zero-shot classifier file ``path`` as float32 ``[d, C]``; ``InputError`` unless it is 2-D with
    ``d == dim`` (when given). ``written_by`` is named when the file is missing."""
    classifier = np.asarray(load_array(path, written_by, mmap=False), np.float32)
    if classifier.ndim != 2 or (dim is not None and classifier.shape[0] != dim):
        expected = f"[d={dim}, classes]" if dim is not None else "[d, classes]"
        raise InputError(f"{path}: classifier of shape {list(classifier.shape)}; expected {expected}")
    return classifier


def load_classifier(directory: str | Path | Sequence[str | Path], dataset: str, model: str,
                    pretrained: Optional[str], dim: int, allow_mismatch: bool = False) -> tuple[np.ndarray, Path]:
    """``find_classifier`` then ``read_classifier``: float32 ``[d, C]`` and its path.

    ``InputError`` unless ``d == dim`` and its provenance record says it was made with ``model`` and
    ``pretrained`` for ``dataset`` (a mismatch is a warning with ``allow_mismatch``).
    """
    path = find_classifier(directory, dataset, model, pretrained)
    classifier = read_classifier(path, dim)
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
    check_consistent(files, MODEL_FIELDS + DATA_FIELDS + ("mlp_layer", "coefficient"),
                     expected={"model": model, "pretrained": pretrained}, allow_mismatch=allow_mismatch)
    return {"merged": merged, "pca": pca, "norm": norm, "paths": paths}


class LayerSpan(NamedTuple):
    """Where one MLP layer's neurons sit in PCs stacked over layers: rows ``start:start + size``."""
    layer: int
    start: int
    size: int
    pca_path: Path


def load_layer_pcs(input_dir: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str],
                   layers: Sequence[int], top_k: int) -> tuple[np.ndarray, list[LayerSpan]]:
    """The first PCs of every listed MLP layer, stacked in ``layers`` order: ``[N, d]`` float32, and the spans.

    File per layer: ``{dataset}_{split}_mlps_{model}_{pretrained}_{layer}_{top_k}_pca.npy`` (compute_pcas.py).
    A layer listed twice, a missing file (the layers that have one are listed) or files of different widths
    are ``InputError``s.
    """
    if len(set(layers)) != len(layers):
        raise InputError(f"--mlp_layers {' '.join(map(str, layers))}: a layer is listed twice")
    blocks, spans, start = [], [], 0
    for layer in layers:
        path = second_order_paths(input_dir, dataset, split, model, pretrained, layer, top_k)["pca"]
        if not path.is_file():
            found = layers_with_pcs(input_dir, dataset, split, model, pretrained, top_k)
            raise InputError(f"--mlp_layers {' '.join(map(str, layers))}: no PCA file for layer {layer} ({path}: not "
                             f"found; written by compute_pcas.py); {input_dir} has PCA files for layers "
                             f"{found or 'none'} with --top_k_pca {top_k}")
        pcs = np.asarray(load_array(path, "compute_pcas.py", mmap=False), np.float32)
        if pcs.ndim != 2 or (blocks and pcs.shape[1] != blocks[0].shape[1]):
            expected = f"[neurons, {blocks[0].shape[1]}]" if blocks else "[neurons, d]"
            raise InputError(f"{path}: PCs of shape {list(pcs.shape)}; expected {expected}")
        blocks.append(pcs)
        spans.append(LayerSpan(layer, start, len(pcs), path))
        start += len(pcs)
    return np.concatenate(blocks), spans

