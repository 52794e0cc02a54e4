"""Every output file name, in one place (the original code's names, so its command lines and notebooks work).

Paper 1 names carry the model only (``{dataset}_attn_{model}.npy``); paper 2 names carry the pretrained tag too
(``{dataset}_{split}_mlps_{model}_{pretrained}_{layer}_merged.npy``). ``{pretrained}`` is always
``pretrained_name(...)``: the tag, a local checkpoint's file stem, or ``none``. Two checkpoints of one
architecture share the paper-1 names; their provenance records (utils/files/provenance.py) tell them apart.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional, Sequence

NO_WEIGHTS = ("none", "None", "", "random")


def pretrained_name(pretrained: Optional[str]) -> str:
    """The ``{pretrained}`` part of output names: the tag, a checkpoint's file stem, or ``none``."""
    if pretrained is None or pretrained in NO_WEIGHTS:
        return "none"
    if os.path.sep in pretrained or os.path.isfile(pretrained):
        return Path(pretrained).stem
    return pretrained


# ----------------------------------------------------------------------------- paper 1 (clip_text_span)
PRS_KINDS = ("attn", "mlp", "cls_attn")


def prs_paths(output_dir: str | Path, dataset: str, model: str, suffix: str = "") -> dict[str, Path]:
    """The files compute_prs.py writes: ``{dataset}_{attn|mlp|cls_attn}_{model}{suffix}.npy``.

    ``attn`` [B, L, H, d], ``mlp`` [B, L+1, d], ``cls_attn`` [B, L, d]. ``suffix`` is ``_seed_{seed}`` for
    PCLens's names.
    """
    d = Path(output_dir)
    return {k: d / f"{dataset}_{k}_{model}{suffix}.npy" for k in PRS_KINDS}


def attn_rest_path(output_dir: str | Path, dataset: str, model: str, suffix: str = "") -> Path:
    """``{dataset}_attn_rest_{model}.npy`` [B, d]: the attention layers not kept by ``compute_prs.py --layers``."""
    return Path(output_dir) / f"{dataset}_attn_rest_{model}{suffix}.npy"


def pclens_paths(output_dir: str | Path, dataset: str, model: str, seed: int) -> dict[str, Path]:
    """PCLens' names of the decomposition files: ``{dataset}_{attn|mlp|cls_attn|labels}_{model}_seed_{seed}.npy``,
    and ``attn_rest`` (``compute_prs.py --layers``) with the same ``_seed_{seed}`` suffix."""
    paths = {k: Path(output_dir) / f"{dataset}_{k}_{model}_seed_{seed}.npy" for k in (*PRS_KINDS, "labels")}
    return {**paths, "attn_rest": attn_rest_path(output_dir, dataset, model, f"_seed_{seed}")}


def pclens_embeddings_path(output_dir: str | Path, dataset: str, model: str, seed: int) -> Path:
    """``{dataset}_embeddings_{model}_seed_{seed}.npy``: PCLens' image embeddings [B, d], the summed decomposition."""
    return Path(output_dir) / f"{dataset}_embeddings_{model}_seed_{seed}.npy"


def pclens_explanations_path(output_dir: str | Path, dataset: str, text_set: str, model: str, algorithm: str,
                             seed: int) -> Path:
    """``{dataset}_completeness_{text_set}_{model}_algo_{algorithm}_seed_{seed}.jsonl``: PCLens' explanations."""
    return Path(output_dir) / f"{dataset}_completeness_{text_set}_{model}_algo_{algorithm}_seed_{seed}.jsonl"


def labels_path(output_dir: str | Path, dataset: str, suffix: str = "") -> Path:
    """``{dataset}_labels{suffix}.npy``: [B] (Waterbirds: [B, 2] = class, background)."""
    return Path(output_dir) / f"{dataset}_labels{suffix}.npy"


def classifier_path(output_dir: str | Path, dataset: str, model: str) -> Path:
    """``{dataset}_classifier_{model}.npy``: the zero-shot classifier [d, C] (paper 1's name)."""
    return Path(output_dir) / f"{dataset}_classifier_{model}.npy"


def text_embeddings_path(output_dir: str | Path, text_set: str, model: str, pretrained: Optional[str] = None) -> Path:
    """``{text_set}_{model}.npy`` (paper 1), or ``{text_set}_{model}_{pretrained}.npy`` when ``pretrained`` is given
    (paper 2's name): the normalised embeddings [T, d] of a text set, row i = line i."""
    tail = f"_{pretrained_name(pretrained)}" if pretrained is not None else ""
    return Path(output_dir) / f"{text_set}_{model}{tail}.npy"


def ablations_stem(dataset: str, model: str) -> str:
    """``{dataset}_ablations_{model}``: compute_ablations.py's JSON and PNG (paper 1)."""
    return f"{dataset}_ablations_{model}"


def completeness_stem(dataset: str, text_set: str, texts_per_head: int, model: str, algorithm: str = "textspan") -> str:
    """``{dataset}_completeness_{text_set}_top_{m}_heads_{model}`` (+ ``_{algorithm}`` but for TextSpan):
    compute_complete_text_set.py."""
    stem = f"{dataset}_completeness_{text_set}_top_{texts_per_head}_heads_{model}"
    return stem + ("" if algorithm == "textspan" else f"_{algorithm}")


def specific_heads_stem(dataset: str, model: str) -> str:
    """``{dataset}_specific_heads_{model}``: compute_use_specific_heads.py's JSON and PNG (paper 1, Waterbirds)."""
    return f"{dataset}_specific_heads_{model}"


def segmentation_dir(output_dir: str | Path, train_dataset: str, model: str, pretrained: Optional[str]) -> Path:
    """``{train_dataset}_segmentation_{model}_{pretrained}/``: compute_segmentations.py's output folder."""
    return Path(output_dir) / f"{train_dataset}_segmentation_{model}_{pretrained_name(pretrained)}"


SEGMENTATION_FILES = {  # inside a segmentation folder (both papers): key -> file name
    "heatmaps": "heatmaps.npy",  # [B, S, S] the precision-recall scores
    "metrics": "per_image_metrics.npy",  # [B, 8] per-image counts, AP, chosen class
    "json": "segmentation.json",
    "precision": "precision.npy", "recall": "recall.npy",
    "neuron_maps": "neuron_maps.npy",  # paper 2: [B, g, g]
    "neurons_per_class": "neurons_per_class.npy",  # paper 2: [C, k, 2]
    "images": "images",  # --save_img pictures
}


def segmentation_files(folder: str | Path) -> dict[str, Path]:
    """The files of a segmentation folder (both papers' segmentation scripts; ``SEGMENTATION_FILES``), by key."""
    return {k: Path(folder) / name for k, name in SEGMENTATION_FILES.items()}


SEGMENTATION_RESULT_GLOB = "result_mIoU_*.txt"


def segmentation_result_path(folder: str | Path, miou: float) -> Path:
    """``result_mIoU_{mIoU:.4f}.txt``: the original's three-line result file (``SEGMENTATION_RESULT_GLOB``)."""
    return Path(folder) / ("result_mIoU_%.4f.txt" % miou)


# ----------------------------------------------------------------------------- compute_siglip.py (clip_text_span)
def siglip_model_name(model: str) -> str:
    """The ``{model}`` of compute_siglip.py's names: a Hugging Face id with ``/`` as ``_`` (the original's
    ``google_siglip-so400m-patch14-384``); a local model folder: its folder name."""
    path = Path(model)
    return path.resolve().name if path.is_dir() else model.replace("/", "_")


def siglip_paths(output_dir: str | Path, dataset: str, model: str, text_set: str) -> dict[str, Path]:
    """compute_siglip.py's files (``model`` as given; ``text_set`` the ``--text_descriptions`` file's stem):

    ``prs`` ``siglip_{model}_prs.pt`` (the original's ``--save_everything`` file); ``zeroshot``
    ``{dataset}_zeroshot_weights_{model}.npy`` [C, d] (the original's ``imagenet_zeroshot_weights_...``); the
    streamed terms ``heads`` ``{dataset}_siglip_heads_{model}.npy`` [N, H, d], ``mlp`` ``..._siglip_mlp_...``
    [N, d], ``pooled`` ``..._siglip_pooled_...`` [N, d], ``constant`` ``..._siglip_constant_...`` [d] and ``labels``
    ``{dataset}_labels.npy`` [N]; ``accuracies`` ``{dataset}_siglip_accuracies_{model}.json``; the text
    features ``text_features`` ``{text_set}_{model}.npy`` [T, d]; ``orthogonality`` ``{text_set}_{model}_
    orthogonalities.npy`` [H, H] and ``orthogonality_plot`` (``.pdf``), the original's names; ``text_spans``
    ``{text_set}_{model}_text_spans`` (a stem: ``.txt`` and ``.json``).
    """
    d, m = Path(output_dir), siglip_model_name(model)
    return {"prs": d / f"siglip_{m}_prs.pt", "zeroshot": d / f"{dataset}_zeroshot_weights_{m}.npy",
            **{k: d / f"{dataset}_siglip_{k}_{m}.npy" for k in ("heads", "mlp", "pooled", "constant")},
            "accuracies": d / f"{dataset}_siglip_accuracies_{m}.json",
            "labels": labels_path(d, dataset), "text_features": text_embeddings_path(d, text_set, m),
            "orthogonality": d / f"{text_set}_{m}_orthogonalities.npy",
            "orthogonality_plot": d / f"{text_set}_{m}_orthogonalities.pdf",
            "text_spans": d / f"{text_set}_{m}_text_spans"}


# ----------------------------------------------------------------------------- paper 2 (second_order_lens)
def second_order_paths(output_dir: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str],
                       mlp_layer: int, top_k: Optional[int] = None) -> dict[str, Path]:
    """``merged``: ``{dataset}_{split}_mlps_{model}_{pretrained}_{mlp_layer}_merged.npy`` [images, neurons, d];
    ``mean``: ``..._{mlp_layer}_mean.npy`` [neurons, d], its per-neuron means (a cache of utils/neurons/explore.py);
    with ``top_k``: ``pca`` ``..._{top_k}_pca.npy`` [neurons, d] and ``norm`` ``..._{top_k}_norm.npy``
    [neurons, top_k] (the top-k centred norms per neuron, ascending)."""
    stem = f"{dataset}_{split}_mlps_{model}_{pretrained_name(pretrained)}_{mlp_layer}"
    d = Path(output_dir)
    out = {"merged": d / f"{stem}_merged.npy", "mean": d / f"{stem}_mean.npy"}
    if top_k is not None:
        out["pca"] = d / f"{stem}_{top_k}_pca.npy"
        out["norm"] = d / f"{stem}_{top_k}_norm.npy"
    return out


def layers_with_pcs(folder: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str],
                    top_k: int) -> list[int]:
    """The MLP layers that have a ``second_order_paths(...)["pca"]`` file in ``folder``, ascending."""
    pattern = second_order_paths(folder, dataset, split, model, pretrained, 0, top_k)["pca"].name
    head, tail = pattern.split(f"_0_{top_k}_pca.npy")[0] + "_", f"_{top_k}_pca.npy"
    found = (p.name[len(head):-len(tail)] for p in Path(folder).glob(glob.escape(head) + "*" + tail))
    return sorted(int(layer) for layer in found if layer.isdigit())


def split_labels_path(output_dir: str | Path, dataset: str, split: str) -> Path:
    """``{dataset}_{split}_labels.npy`` [images]: the labels beside a second-order file, in image order."""
    return labels_path(output_dir, f"{dataset}_{split}")


def representations_path(output_dir: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str]) -> Path:
    """``{dataset}_{split}_representations_{model}_{pretrained}.npy`` [images, d]: compute_representations.py."""
    return Path(output_dir) / f"{dataset}_{split}_representations_{model}_{pretrained_name(pretrained)}.npy"


def split_classes_path(output_dir: str | Path, dataset: str, split: str) -> Path:
    """``{dataset}_{split}_classes.npy`` [images] int64: compute_representations.py's labels."""
    return Path(output_dir) / f"{dataset}_{split}_classes.npy"


def classifier_path_pretrained(output_dir: str | Path, dataset: str, model: str, pretrained: Optional[str]) -> Path:
    """``{dataset}_classifier_{model}_{pretrained}.npy``: the zero-shot classifier [d, C] (paper 2's name)."""
    return Path(output_dir) / f"{dataset}_classifier_{model}_{pretrained_name(pretrained)}.npy"


def second_order_ablations_path(output_dir: str | Path, dataset: str, split: str, model: str,
                                pretrained: Optional[str], mlp_layer: int, top_k: int) -> Path:
    """The JSON of compute_second_order_ablations.py (its PNG has the same stem)."""
    return Path(output_dir) / (f"{dataset}_{split}_second_order_ablations_{model}_{pretrained_name(pretrained)}_"
                               f"{mlp_layer}_{top_k}.json")


def neuron_segmentation_dir(output_dir: str | Path, train_dataset: str, model: str, pretrained: Optional[str],
                            mlp_layers: Sequence[int], top_k_pca: int, top_neurons: int,
                            random_seed: Optional[int] = None) -> Path:
    """compute_segmentation.py's output folder (paper 2), one per setting:
    ``{train_dataset}_neuron_segmentation_{model}_{pretrained}_mlp_{l1_l2..}_pca_{top_k_pca}_top_{top_neurons}``,
    plus ``_random_{seed}`` for a random choice of neurons."""
    name = (f"{train_dataset}_neuron_segmentation_{model}_{pretrained_name(pretrained)}_mlp_"
            f"{'_'.join(map(str, mlp_layers))}_pca_{top_k_pca}_top_{top_neurons}")
    return Path(output_dir) / (name + (f"_random_{random_seed}" if random_seed is not None else ""))


def sparse_decomposition_stem(dataset: str, model: str, pretrained: Optional[str], mlp_layer: int, text_set: str,
                              solver: str, penalty: float, components: int, norm: str = "per_dimension") -> str:
    """compute_sparse_decomposition.py's ``.json`` / ``.npz`` name: the original's
    ``{dataset}_mlps_{model}_{pretrained}_{layer}_{text_set}_decomposition_omp_{transform_alpha}_{components}``.

    Other settings get their own names, ``..._decomposition_nnlasso_{l1_penalty}_{components}`` and a
    ``_per_text`` suffix for the per-text dictionary, so no run overwrites another's files.
    """
    stem = (f"{dataset}_mlps_{model}_{pretrained_name(pretrained)}_{mlp_layer}_{text_set}_decomposition_"
            f"{solver}_{penalty}_{components}")
    return stem + ("_per_text" if norm == "per_text" else "")


# ----------------------------------------------------------------------------- SpLiCE
def splice_concepts_path(folder: str | Path, backbone_label: str, vocabulary: str, vocabulary_size: int) -> Path:
    """``splice_concepts_{model}_{weights}_{vocab}_{size|full}.npy``: a cached concept dictionary [T, d]."""
    size = vocabulary_size if vocabulary_size > 0 else "full"
    return Path(folder) / f"splice_concepts_{backbone_label}_{vocabulary}_{size}.npy"


def image_mean_path(backbone_label: str, dataset: str) -> Path:
    """``{model}_{weights}_{dataset}_image_mean.pt``: compute_image_mean.py's default output."""
    return Path(f"{backbone_label}_{dataset}_image_mean.pt")


def image_embeddings_path(mean_path: str | Path) -> Path:
    """``{mean stem}_embeddings.npy`` [N, d]: the embeddings a mean is computed from."""
    mean_path = Path(mean_path)
    return mean_path.with_name(f"{mean_path.stem}_embeddings.npy")


def splice_weights_path(out_path: str | Path) -> Path:
    """``{out_path without .txt}_weights.npz``: decompose_data.py's per-image weights [N, T]."""
    out = Path(out_path)
    return out.with_name((out.name[:-4] if out.name.endswith(".txt") else out.name) + "_weights.npz")


# ----------------------------------------------------------------------------- finding inputs by name
def concept_distribution_title(dataset: str, class_label: Optional[int] = None) -> tuple[str, str]:
    """concept_distribution.py's chart title and file stem: ``{dataset} Class {label} Decomposition`` and
    ``{dataset}_class_{label}_decomposition`` (lower case); without a label, ``{dataset} Decomposition``."""
    title = f"{dataset}{f' Class {class_label}' if class_label is not None else ''} Decomposition"
    return title, "_".join(title.split(" ")).lower()


def find_input(directory: str | Path | Sequence[str | Path], candidates: Sequence[str], what: str) -> Path:
    """The first of the file names ``candidates`` that exists in ``directory`` (or in each of several, in order).

    Raises ``FileNotFoundError`` listing every path tried and ``what`` (the thing and the script writing it).
    """
    dirs = [directory] if isinstance(directory, (str, Path)) else list(directory)
    tried = []
    for d in dirs:
        for name in candidates:
            path = Path(d) / name
            if path.is_file():
                return path
            if path not in tried:
                tried.append(path)
    raise FileNotFoundError(f"{what}: none of {', '.join(map(str, tried))} exists")


def find_classifier(directory: str | Path | Sequence[str | Path], dataset: str, model: str,
                    pretrained: Optional[str]) -> Path:
    """``{dataset}_classifier_{model}_{pretrained}.npy`` (paper 2), else ``{dataset}_classifier_{model}.npy``."""
    names = [classifier_path_pretrained(".", dataset, model, pretrained).name, classifier_path(".", dataset, model).name]
    return find_input(directory, names, f"zero-shot classifier [d, C] of {model} for '{dataset}' "
                                        f"(written by compute_text_projection.py or compute_classifier_projection.py)")


def find_text_set(directory: str | Path | Sequence[str | Path], text_set: str, model: str,
                  pretrained: Optional[str]) -> Path:
    """``{text_set}_{model}_{pretrained}.npy`` (paper 2), else ``{text_set}_{model}.npy`` (paper 1).

    The two differ by a global scale: the original paper-2 script saved ``coefficient`` (100) times the normalised
    embeddings, paper 1 the normalised embeddings. A consumer that centres and rescales the dictionary (as the
    sparse decomposition does) is unaffected.
    """
    names = [text_embeddings_path(".", text_set, model, pretrained).name, text_embeddings_path(".", text_set, model).name]
    return find_input(directory, names, f"text embeddings [T, d] of '{text_set}' for {model} "
                                        f"(written by compute_text_set_projection.py)")


def format_layers(layers) -> str:
    """``[0, 5, 28, 29, 30, 31]`` -> ``"0,5,28-31"`` (the inverse of ``layer_list``)."""
    layers, parts, i = sorted(layers), [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


# ----------------------------------------------------------------------------- results read by reproduce.py
def result_files(output_dir: str | Path, stem: str, suffixes: Sequence[str] = (".json", ".png")) -> dict[str, Path]:
    """``{stem}{suffix}`` in ``output_dir`` for each suffix, keyed by the suffix without its dot (``json``,
    ``png``, ``txt``): the files ``utils.files.results.save_result`` (or a script like it) writes for ``stem``."""
    return {s.lstrip("."): Path(output_dir) / f"{stem}{s}" for s in suffixes}


def sparse_decomposition_files(output_dir: str | Path, stem: str) -> dict[str, Path]:
    """compute_sparse_decomposition.py's files for ``sparse_decomposition_stem``: the texts per neuron (``json``),
    the codes (``npz``), the fit figure (``fit``) and, with --evaluate, the accuracies (``evaluation``)."""
    d = Path(output_dir)
    return {"json": d / f"{stem}.json", "npz": d / f"{stem}.npz", "fit": d / f"{stem}_fit.png",
            "evaluation": d / f"{stem}_evaluation.json"}


def splice_decomposition_path(output_dir: str | Path, dataset: str, class_label: Optional[int] = None) -> Path:
    """``{dataset}_decomp.txt`` (SpLiCE README's ``cifar10_decomp.txt``), or ``{dataset}_class_{label}_decomp.txt``:
    decompose_data.py's -out_path as reproduce.py names it (the dataset lower-cased)."""
    tail = "" if class_label is None else f"_class_{class_label}"
    return Path(output_dir) / f"{dataset.lower()}{tail}_decomp.txt"


def reproduce_paths(output_dir: str | Path) -> dict[str, Path]:
    """reproduce.py's own files in its --output_dir: ``report`` (REPORT.md), ``report_json`` (report.json, the same
    content), ``logs`` (one ``{step}.log`` per step run) and ``smoke_data`` (--smoke's synthetic data sets)."""
    d = Path(output_dir)
    return {"report": d / "REPORT.md", "report_json": d / "report.json", "logs": d / "logs",
            "smoke_data": d / "smoke_data"}
