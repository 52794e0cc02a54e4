"""TextSpan or PCLens on every head of the last layers, and the accuracy left when those heads are replaced by their
text reconstructions (paper 1's "completeness" experiment; PCLens's text explanations).

``completeness`` is the body of compute_complete_text_set.py and of PCLens's compute_text_explanations: pass 1
gathers each head's statistics (``utils.text.textspan.scan_decomposition``, memory-mapped files read in chunks),
then the algorithm labels every head, and pass 2 measures the accuracy as the texts are added
(``replacement_accuracy``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from utils import LOG
from utils.errors import InputError
from utils.files.atomic import load_array
from utils.files.names import text_embeddings_path
from utils.files.provenance import check_consistent
from utils.files.readers import MODEL_FIELDS, last_layers
from utils.metrics import percent
from utils.text.sets import read_text_set, resolve_text_file
from utils.text.textspan import (HeadStats, HeadStatsAccumulator, pclens_from_stats, replacement_accuracy,
                                 scan_decomposition, textspan_from_stats)

ALGORITHMS = {"textspan": "textspan", "pclens": "pclens", "svd_data_approx": "pclens", "text_span": "text_span"}


@dataclass(frozen=True)
class CompletenessSettings:
    """What ``completeness`` needs besides the arrays: the text set (``{text_dir}/{text_set}.txt`` and its
    embeddings in ``input_dir`` under ``model``'s name), the algorithm (``textspan``, ``pclens``, ``text_span``),
    the layers replaced, texts per head, the TextSpan rank, PCLens's cap on components, and where it runs."""
    model: str
    input_dir: str | Path
    text_dir: str | Path
    text_set: str
    algorithm: str = "textspan"
    num_of_last_layers: int = 4
    texts_per_head: int = 20
    w_ov_rank: int = 80
    max_text: int = 80
    device: str = "cpu"
    chunk: Optional[int] = None
    stats_dtype: str = "float64"
    allow_mismatch: bool = False


def load_text_set(text_dir: str | Path, text_set: str, input_dir: str | Path, model: str,
                  d: int) -> tuple[np.ndarray, list[str], Path]:
    """The text embeddings ``[T, d]`` of ``{text_dir}/{text_set}.txt`` (compute_text_set_projection.py's file in
    ``input_dir``), its lines and the embeddings' path, checked against each other and ``d``."""
    txt_path = Path(text_dir) / f"{text_set}.txt"
    lines = read_text_set(txt_path, "--text_descriptions")
    emb_path = text_embeddings_path(input_dir, text_set, model)
    if not emb_path.is_file():
        raise FileNotFoundError(f"{emb_path}: text embeddings not found; make them with `python "
                                f"compute_text_set_projection.py --model {model} --pretrained <tag> --data_path "
                                f"{resolve_text_file(txt_path)} --output_dir {input_dir}`")
    features = np.asarray(load_array(emb_path, "compute_text_set_projection.py", mmap=False), np.float32)
    if features.ndim != 2 or features.shape[1] != d:
        raise InputError(f"{emb_path}: text embeddings of shape {list(features.shape)} do not match the model "
                         f"dimension d={d} of the attn file (embedded with another model?)")
    if len(lines) != len(features):
        raise InputError(f"{txt_path} has {len(lines)} lines but {emb_path} has {len(features)} rows; "
                         f"recompute the embeddings with compute_text_set_projection.py")
    return features, lines, emb_path


def run_textspan(stats: HeadStats, features: np.ndarray, lines: Sequence[str], settings: CompletenessSettings,
                 first: int, H: int) -> tuple[list[dict], torch.Tensor, torch.Tensor, object]:
    """TextSpan for every head (text_span: centred texts and data); per-head records, means [h, d], bases
    [h, m, d] and the raw ``TextSpanResult``."""
    centred = settings.algorithm == "text_span"
    feats = features - features.mean(0, dtype=np.float64).astype(np.float32) if centred else features
    res = textspan_from_stats(stats, feats, settings.texts_per_head, settings.w_ov_rank, settings.device,
                              centred=centred)
    heads = []
    for i in range(len(res.indices)):
        heads.append({"layer": first + i // H, "head": i % H,
                      "texts": [lines[j] for j in res.indices[i]], "text_indices": res.indices[i].tolist(),
                      "variance_explained": res.variance_explained[i].tolist(), "std": res.std[i].tolist(),
                      "w_ov_rank_used": res.rank[i]})
    return heads, res.mean, res.basis(), res


def run_pclens(stats: HeadStats, features: np.ndarray, lines: Sequence[str], settings: CompletenessSettings,
               first: int, H: int) -> tuple[list[dict], torch.Tensor, torch.Tensor, object]:
    """PCLens for every head; the bases are zero-padded to the largest number of components."""
    results = pclens_from_stats(stats, features, settings.texts_per_head, settings.max_text, device=settings.device)
    K = max(r.rank for r in results)
    d = stats.mean.shape[1]
    basis = torch.zeros(len(results), K, d, dtype=torch.float64, device=results[0].basis.device)
    heads = []
    for i, r in enumerate(results):
        basis[i, :r.rank] = r.basis
        comps = [{"component": c, "strength_abs": float(r.strength[c]), "strength_rel": float(r.strength_rel[c]),
                  "singular_value": float(r.singular_values[c]), "variance_explained": float(r.variance_explained[c]),
                  "positive": [lines[j] for j in r.top[c]], "positive_cosines": r.top_values[c].tolist(),
                  "negative": [lines[j] for j in r.bottom[c]], "negative_cosines": r.bottom_values[c].tolist()}
                 for c in range(r.rank)]
        heads.append({"layer": first + i // H, "head": i % H, "rank": r.rank,
                      "texts": [lines[j] for j in r.indices], "text_indices": r.indices.tolist(),
                      "variance_explained": r.variance_explained.tolist(), "components": comps})
    return heads, torch.stack([r.mean for r in results]), basis, results


def completeness(settings: CompletenessSettings, arrays: dict, paths: dict[str, Path], final: bool = False) -> dict:
    """Pass 1 (head statistics), the algorithm on every head, pass 2 (accuracies): compute_complete_text_set.py
    and PCLens's compute_text_explanations.

    ``arrays``: what ``utils.files.readers.load_decomposition`` returns (attn, layers, num_layers, attn_rest, mlp,
    classifier, labels, checked to agree); the last layers must be stored (a file of ``compute_prs.py --layers``
    works when it keeps them: the layers not replaced, kept or in attn_rest, are mean-ablated); ``paths``: the
    files. Returns the per-head records (``heads``) and raw results (``results``), ``means`` [h, d], ``basis``
    [h, K, d], the accuracy ``curve`` (%) for k = 0..K, ``baseline`` (%), ``first`` (first replaced
    layer), the text set (``lines``, ``features``) and, with ``final``, the ``HeadStats`` of the final
    representation [1 head, d] (``final_stats``).
    """
    attn, mlp, classifier, labels = arrays["attn"], arrays["mlp"], arrays["classifier"], arrays["labels"]
    B, _, H, d = attn.shape
    L = arrays["num_layers"]
    s = settings
    start = last_layers(arrays, s.num_of_last_layers)  # where the replaced layers begin in attn's layer axis
    if s.texts_per_head < 1 or s.w_ov_rank < 1 or s.max_text < 1:
        raise InputError(f"texts_per_head={s.texts_per_head}, w_ov_rank={s.w_ov_rank}, max_text={s.max_text}: each "
                         f"must be >= 1")
    if B < 2:
        raise InputError(f"{paths['attn']}: TextSpan and PCLens need at least 2 images, the attn file has {B}")
    features, lines, emb_path = load_text_set(s.text_dir, s.text_set, s.input_dir, s.model, d)
    check_consistent([paths["attn"], emb_path], MODEL_FIELDS, allow_mismatch=s.allow_mismatch)
    first = L - s.num_of_last_layers
    if s.algorithm != "pclens" and s.texts_per_head > min(s.w_ov_rank, B, d):
        LOG.warning(f"--texts_per_head {s.texts_per_head} > the rank of the text span ({min(s.w_ov_rank, B, d)}): "
                    f"the texts after that carry nothing (zero directions; the original divides by zero there)")
    LOG.info(f"Number of layers: {L}; replacing layers {first}..{L - 1} ({s.num_of_last_layers * H} heads) "
             f"with {s.algorithm}, {len(lines)} texts, {B} images")

    scan = scan_decomposition(attn, mlp, classifier, labels, start, s.device, s.chunk,
                              stats_dtype=getattr(torch, s.stats_dtype), rest=arrays["attn_rest"])
    algo = run_pclens if s.algorithm == "pclens" else run_textspan
    heads, means, basis, results = algo(scan["stats"], features, lines, s, first, H)
    acc = HeadStatsAccumulator(1, d, s.device) if final else None
    correct = replacement_accuracy(attn, mlp, classifier, labels, start, scan["early_mean"], means, basis,
                                   s.device, s.chunk, final=acc)
    return {"heads": heads, "results": results, "means": means, "basis": basis,
            "curve": percent(correct, B).tolist(), "baseline": percent(scan["baseline_correct"], B),
            "first": first, "num_images": B, "lines": lines, "features": features, "embeddings": emb_path,
            "final_stats": acc.finalize() if acc is not None else None}
