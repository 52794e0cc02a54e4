"""Zero-shot segmentation from the spatial decomposition (paper 1, section 5), one image at a time.

The heatmap (quirk S1 of tests/golden/README.md), per image:

1. the spatial attention terms, image tokens only, summed over layers and heads: ``[n, d]`` (n = grid²);
2. times the zero-shot classifier ``[d, C]`` → ``[n, C]``;
3. the class is the argmax of ``r @ classifier`` (r = the unnormalised embedding);
4. that class's column minus the mean over classes, reshaped to the patch grid (row-major);
5. bilinear upsampling by the patch size (``align_corners=False``), clipped below at 0, min–max normalised;
6. foreground = heatmap > its mean.

Metrics (quirk S2), per image: ``correct`` / ``labeled`` pixels, ``inter`` / ``union`` for the two classes
(background, object), and the average precision of the scores ``[1 − heatmap, heatmap]`` against the one-hot
mask (sklearn's definition, computed here batched in torch and checked against sklearn in the tests).
Dataset level: pixAcc = Σcorrect / Σlabeled, mIoU = mean over the 2 classes of Σinter / Σunion, mAP = mean AP.

The original computes steps 5–6 over the whole batch and scores only the first image of each batch; here every
step is per image, so any batch size gives the numbers of batch size 1, which are the original's.

Paper 2 (second-order effects of neurons) segments from neurons instead (golden README section 3g, quirks N1–N5),
per image: the class is the argmax of ``r @ classifier``; each class has the ``top_neurons`` (neuron, layer) pairs
whose first PC is most aligned, in absolute value, with its classifier column (``select_neurons``); the map is the
mean of those neurons' post-activation values at the image tokens, upsampled by the patch size and min–max
normalised without clipping; foreground = map > 0.5 (``evaluate_neuron_batch``). Metrics as above.

Both scripts (compute_segmentations.py, compute_segmentation.py) share the streaming loop (``stream_segmentation``:
per-image heatmaps and metric rows, ``--save_img`` pictures, resume) and its ending (``finish_segmentation``: PR
curve, result text, ``segmentation.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import InputError
from utils.files.names import SEGMENTATION_RESULT_GLOB, segmentation_files, segmentation_result_path

EPS = np.spacing(1)  # the original's guard in pixAcc and IoU


# ----------------------------------------------------------------------------- heatmaps
def grid_and_patch(model: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(grid_h, grid_w), (patch_h, patch_w)`` of a ViT image tower (open_clip's, or a timm trunk's)."""
    v = model.visual
    v = v.trunk.patch_embed if hasattr(v, "trunk") else v
    grid = tuple(int(g) for g in v.grid_size)
    # the pixels per token: a conv stem before the patches (timm's HybridEmbed, MobileCLIP) reports patch_size 1
    patch = tuple(int(i) // g for i, g in zip(v.image_size if hasattr(v, "image_size") else v.img_size, grid))
    return grid, patch


def upsample_patch_scores(scores: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """Patch scores ``[b, n, K]`` (n = grid_h·grid_w, row-major) → bilinear maps ``[b, K, grid_h·ph, grid_w·pw]``."""
    b, n, k = scores.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"upsample_patch_scores: {n} patch scores do not fill a {gh}x{gw} grid")
    maps = scores.transpose(1, 2).reshape(b, k, gh, gw)
    return F.interpolate(maps, scale_factor=(float(patch[0]), float(patch[1])), mode="bilinear",
                         align_corners=False)


def spatial_image_terms(engine, images: torch.Tensor, spatial: bool | str = "sum"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial decomposition of ``images`` ``[b, 3, H, W]`` by ``engine`` (a ``prs_hook.Decomposer``):
    ``(r [b, d], image-token terms [b, n, d])``.

    The terms are summed over layers and heads (inside the forward with ``spatial="sum"``, the memory-light
    mode; ``spatial=True`` builds ``[b, L, N, H, d]`` and sums here) and normalised by ``||r||``; the tokens
    before the patch grid (CLS, registers: ``Decomposition.num_prefix_tokens``, none for SigLIP) are dropped.
    """
    if spatial not in (True, "sum"):
        raise InputError(f"spatial_image_terms: spatial={spatial!r}; expected True or 'sum'")
    d = engine(images, spatial=spatial)
    p = d.num_prefix_tokens
    terms = d.attn[:, p:] if spatial == "sum" else d.attn[:, :, p:].sum((1, 3))
    return d.representation, terms


def class_heatmaps(terms: torch.Tensor, representation: torch.Tensor, classifier: torch.Tensor,
                   grid: Sequence[int], patch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2–5 of the module docstring, per image.

    Args:
        terms: ``[b, n, d]`` image-token terms; representation: ``[b, d]``; classifier: ``[d, C]``.
    Returns:
        ``(heatmaps [b, H, W] in [0, 1], chosen class [b], degenerate [b] bool)``. A degenerate map (nothing
        above 0 after clipping, so min = max) is all zeros, as the original's NaN → 0 replacement gives.
    """
    chosen = (representation.to(classifier.dtype) @ classifier).argmax(-1)  # [b]
    logits = terms @ classifier  # [b, n, C]
    score = logits.gather(2, chosen.view(-1, 1, 1).expand(-1, logits.shape[1], 1)) \
        - logits.mean(2, keepdim=True)  # [b, n, 1]
    res, degenerate = _minmax(upsample_patch_scores(score, grid, patch)[:, 0].clamp(min=0))  # [b, H, W]
    return res, chosen, degenerate


def _minmax(res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map of ``res`` [b, H, W] min–max normalised to [0, 1], and which are constant ([b] bool; all zeros)."""
    lo = res.amin((1, 2), keepdim=True)
    hi = res.amax((1, 2), keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return torch.where(hi > lo, (res - lo) / span, torch.zeros_like(res)), (hi == lo).view(-1)


def curve_scores(heatmaps: torch.Tensor, thr: float) -> torch.Tensor:
    """The scores behind the precision–recall curve: ``heatmap.clamp(min=thr) / heatmap.max()`` per image.

    (``thr`` only enters here, as in the original.) A degenerate all-zero map is not divided (the original
    would produce NaN there and stop in sklearn).
    """
    hi = heatmaps.amax((1, 2), keepdim=True)
    clamped = heatmaps.clamp(min=thr)
    return torch.where(hi > 0, clamped / torch.where(hi > 0, hi, torch.ones_like(hi)), clamped)


# ----------------------------------------------------------------------------- metrics
def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sklearn's ``average_precision_score`` for each row: ``scores`` ``[b, M]``, binary ``labels`` ``[b, M]``.

    AP = Σ_k (R_k − R_{k−1}) P_k over the distinct score thresholds k in decreasing order (tied scores form
    one threshold, counted at the last element of their run after sorting). Returns float64 ``[b]``; a row
    without positives gives 0 (sklearn warns and returns NaN, which the original turns into 0).
    """
    s, order = scores.sort(dim=1, descending=True)
    y = labels.gather(1, order)
    tps = y.cumsum(1, dtype=torch.int64)  # true positives among the first i+1
    is_last = torch.ones_like(y, dtype=torch.bool)
    is_last[:, :-1] = s[:, :-1] != s[:, 1:]
    at_end = torch.where(is_last, tps, torch.zeros_like(tps))
    prev = torch.zeros_like(tps)
    prev[:, 1:] = at_end.cummax(1).values[:, :-1]  # tps at the previous threshold
    rank = torch.arange(1, y.shape[1] + 1, device=y.device, dtype=torch.float64)
    gain = (at_end - prev).clamp(min=0).double()  # new true positives at each threshold (0 elsewhere)
    n_pos = tps[:, -1]
    ap = (gain * tps.double() / rank).sum(1) / n_pos.clamp(min=1).double()
    return torch.where(n_pos > 0, ap, torch.zeros_like(ap))


def foreground(heatmaps: torch.Tensor, threshold: Optional[float] = None) -> torch.Tensor:
    """``heatmaps [b, H, W] > threshold``, per image; ``None``: each map's own mean (paper 1), else fixed (paper 2)."""
    if threshold is None:
        return heatmaps > heatmaps.mean((1, 2), keepdim=True)
    return heatmaps > threshold


def segmentation_metrics(heatmaps: torch.Tensor, targets: torch.Tensor, degenerate: Optional[torch.Tensor] = None,
                         threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """Per-image metrics of normalised heatmaps ``[b, H, W]`` against integer masks ``[b, H, W]`` (1 = object),
    foreground = heatmap > ``threshold`` (``None``: its mean).

    Returns NumPy arrays: ``correct`` [b], ``labeled`` [b], ``inter`` [b, 2], ``union`` [b, 2] (int64; class 0 =
    background, 1 = object) and ``ap`` [b] (float64), exactly as the original's ``batch_pix_accuracy``,
    ``batch_intersection_union`` and ``get_ap_scores`` compute them for one image (pixels with a negative
    label are unlabeled; labels above 1 count as labeled but belong to neither class).
    """
    if heatmaps.shape != targets.shape:
        raise ValueError(f"segmentation_metrics: heatmaps {tuple(heatmaps.shape)} vs masks {tuple(targets.shape)}")
    b = heatmaps.shape[0]
    t = targets.to(heatmaps.device).long().reshape(b, -1)
    fg = foreground(heatmaps, threshold).reshape(b, -1)  # the original's Res_1 (Res_0 = rest)
    # one joint histogram per image: bins 0..3 = (pred, label) in {0,1}², 4/5 = pred 0/1 on a label > 1
    code = torch.where(t <= 1, fg * 2 + t, 4 + fg.long())
    code = torch.where(t < 0, torch.full_like(code, 6), code)  # unlabeled: bin 6, ignored
    offsets = 7 * torch.arange(b, device=t.device)[:, None]
    n = torch.bincount((code + offsets).reshape(-1), minlength=7 * b).view(b, 7)
    inter = torch.stack([n[:, 0], n[:, 3]], 1)
    area_pred = torch.stack([n[:, 0] + n[:, 1] + n[:, 4], n[:, 2] + n[:, 3] + n[:, 5]], 1)
    area_lab = torch.stack([n[:, 0] + n[:, 2], n[:, 1] + n[:, 3]], 1)
    out = {"correct": n[:, 0] + n[:, 3], "labeled": n[:, :6].sum(1), "inter": inter,
           "union": area_pred + area_lab - inter}
    out = {k: v.cpu().numpy().astype(np.int64) for k, v in out.items()}
    # AP of [1 - Res, Res] against the one-hot mask, both channels flattened together
    flat = heatmaps.reshape(b, -1)
    scores = torch.cat([1 - flat, flat], 1)
    if degenerate is not None and bool(degenerate.any()):
        scores[degenerate.to(scores.device)] = 0  # the original's NaN -> 0 on both channels
    onehot = torch.cat([t == 0, t == 1], 1)
    out["ap"] = np.nan_to_num(average_precision(scores, onehot).cpu().numpy().astype(np.float64))
    return out


def aggregate_metrics(correct: np.ndarray, labeled: np.ndarray, inter: np.ndarray, union: np.ndarray,
                      ap: np.ndarray) -> dict[str, float]:
    """Dataset metrics from per-image counts: ``pixAcc``, ``mIoU``, ``mAP`` (fractions) and ``IoU`` per class."""
    total_correct = np.int64(np.asarray(correct, dtype=np.int64).sum())
    total_label = np.int64(np.asarray(labeled, dtype=np.int64).sum())
    total_inter = np.asarray(inter, dtype=np.int64).reshape(-1, 2).sum(0)
    total_union = np.asarray(union, dtype=np.int64).reshape(-1, 2).sum(0)
    pix_acc = np.float64(1.0) * total_correct / (EPS + total_label)
    iou = np.float64(1.0) * total_inter / (EPS + total_union)
    return {"pixAcc": float(pix_acc), "mIoU": float(iou.mean()), "mAP": float(np.mean(ap)) if len(ap) else 0.0,
            "IoU": [float(x) for x in iou]}


def result_text(metrics: dict) -> str:
    """The original's ``result_mIoU_*.txt`` content (three lines, same format)."""
    return ("Mean IoU over %d classes: %.4f\n" % (2, metrics["mIoU"])
            + "Pixel-wise Accuracy: %2.2f%%\n" % (metrics["pixAcc"] * 100)
            + "Mean AP over %d classes: %.4f\n" % (2, metrics["mAP"]))


# ----------------------------------------------------------------------------- one batch
def score_heatmaps(res: torch.Tensor, chosen: torch.Tensor, degenerate: torch.Tensor, targets: torch.Tensor,
                   thr: float = 0.0, threshold: Optional[float] = None) -> dict[str, np.ndarray]:
    """Metrics and outputs of normalised heatmaps ``res`` ``[b, H, W]`` (``chosen`` class, ``degenerate`` flags
    ``[b]``) against ``targets`` ``[b, H, W]``, foreground above ``threshold`` (``None``: the map's mean).

    Returns the ``segmentation_metrics`` arrays plus ``chosen_class`` [b], ``heatmap`` [b, H, W] (float32),
    ``pred`` [b, H, W] (the precision–recall scores) and ``foreground`` [b, H, W] (bool).
    """
    if res.shape[-2:] != targets.shape[-2:]:
        raise InputError(f"heatmaps are {tuple(res.shape[-2:])} but masks {tuple(targets.shape[-2:])}: "
                         f"--image_size must be the model's input size")
    out = segmentation_metrics(res, targets, degenerate, threshold)
    out["chosen_class"] = chosen.cpu().numpy().astype(np.int64)
    out["heatmap"] = res.cpu().numpy().astype(np.float32)
    out["pred"] = curve_scores(res, thr).cpu().numpy().astype(np.float32)
    out["foreground"] = foreground(res, threshold).cpu().numpy()
    return out


@torch.no_grad()
def evaluate_batch(engine, images: torch.Tensor, targets: torch.Tensor, classifier: torch.Tensor,
                   grid: Sequence[int], patch: Sequence[int], thr: float = 0.0, spatial: bool | str = "sum"
                   ) -> dict[str, np.ndarray]:
    """Heatmaps and metrics of one batch (paper 1), every image on its own.

    Args:
        engine: a ``prs_hook.Decomposer``; spatial: its spatial mode (``"sum"``, the memory-light one, or
        ``True``: the same numbers through the full ``[b, L, N, H, d]`` tensor).
        images: ``[b, 3, H, W]`` preprocessed; targets: ``[b, H, W]`` integer masks; classifier: ``[d, C]``
        on ``engine.device``.
    Returns:
        ``score_heatmaps``'s arrays.
    """
    r, terms = spatial_image_terms(engine, images, spatial)
    res, chosen, degenerate = class_heatmaps(terms, r, classifier, grid, patch)
    return score_heatmaps(res, chosen, degenerate, targets, thr)


# ----------------------------------------------------------------------------- the scripts' loop and ending
METRIC_COLUMNS = ["correct", "labeled", "inter_bg", "inter_fg", "union_bg", "union_fg", "ap", "chosen_class"]


def check_image_size(model: torch.nn.Module, image_size: int, model_name: str):
    """``(grid, patch)`` of the model; ``InputError`` unless it takes ``image_size`` × ``image_size`` inputs."""
    grid, patch = grid_and_patch(model)
    size = (grid[0] * patch[0], grid[1] * patch[1])
    if size != (image_size, image_size):
        raise InputError(f"--image_size {image_size}: {model_name} takes {size[0]}x{size[1]} inputs")
    return grid, patch


def metric_rows(res: Mapping[str, np.ndarray]) -> np.ndarray:
    """The per-image table ``[b, 8]`` (``METRIC_COLUMNS``) of ``score_heatmaps``'s arrays, float64."""
    return np.concatenate([res["correct"][:, None], res["labeled"][:, None], res["inter"], res["union"],
                           res["ap"][:, None], res["chosen_class"][:, None]], 1).astype(np.float64)


def stream_segmentation(ds, out: Path, evaluate: Callable[[torch.Tensor, torch.Tensor], dict], preprocess, *,
                        image_size: int, record: dict, resume: bool = False, batch_size: int = 1, num_workers: int = 0,
                        save_images: bool = False, extra: Optional[Mapping] = None, desc: str = "segmentation") -> bool:
    """Run ``evaluate(images, targets)`` over ``ds`` with ``utils.files.streaming.stream_dataset``.

    Streams ``heatmaps.npy`` [B, S, S] (S = ``image_size``; the precision–recall scores) and
    ``per_image_metrics.npy`` [B, 8] into ``out``, plus ``extra`` (name -> ``Output``, filled from ``evaluate``'s
    array of that name); with ``save_images``, the pictures of each image (``save_segmentation_images``); shows the
    running pixAcc / mIoU / mAP on the progress bar. Returns ``stream_dataset``'s flag (``False``: already done).
    """
    from utils.files.streaming import Output, stream_dataset

    S = image_size
    files = segmentation_files(out)
    outputs = {"heatmaps": Output(files["heatmaps"], (S, S), "float32"),
               "metrics": Output(files["metrics"], (len(METRIC_COLUMNS),), "float64"), **(extra or {})}
    running = {"sums": np.zeros(len(METRIC_COLUMNS)), "images": 0}  # over the images of this invocation

    def compute(images, targets, start):
        res = evaluate(images, targets)
        rows = metric_rows(res)
        if save_images:
            for i in range(len(images)):
                save_segmentation_images(files["images"], start + i, unnormalize(images[i], preprocess),
                                         targets[i].numpy(), res["foreground"][i], res["heatmap"][i])
        running["sums"] += rows.sum(0)
        running["images"] += len(rows)
        return {"heatmaps": res["pred"], "metrics": rows, **{k: res[k] for k in (extra or {})}}

    def describe(batch) -> str:  # running metrics over the images of this invocation
        s = running["sums"]  # counts, then the AP sum: mAP is its mean
        m = aggregate_metrics(s[0], s[1], s[2:4], s[4:6], [s[6] / running["images"]])
        return "pixAcc: %.4f, mIoU: %.4f, mAP: %.4f" % (m["pixAcc"], m["mIoU"], m["mAP"])

    return stream_dataset(ds, outputs, compute, record=record, resume=resume, batch_size=batch_size,
                          num_workers=num_workers, desc=desc, describe=describe)


def finish_segmentation(ds, out: Path, record: dict, summary: dict) -> dict:
    """After ``stream_segmentation``: the dataset metrics, the precision–recall curve over every pixel of every
    image (``precision.npy``, ``recall.npy``), ``result_mIoU_{mIoU:.4f}.txt`` (the original's three lines) and
    ``segmentation.json`` (``summary`` — the script's settings, say — + metrics, per-image counts), and the folder's
    provenance record. Returns what ``segmentation.json`` holds; its ``result_txt`` is the original's printout."""
    import tqdm
    from sklearn.metrics import precision_recall_curve

    from utils.files.atomic import atomic_save, atomic_write_json, atomic_write_text
    from utils.files.provenance import write_provenance

    files = segmentation_files(out)
    per_image = np.load(files["metrics"])
    counts = per_image[:, :6].astype(np.int64)
    metrics = aggregate_metrics(counts[:, 0], counts[:, 1], counts[:, 2:4], counts[:, 4:6], per_image[:, 6])
    B = len(per_image)
    heatmaps = np.load(files["heatmaps"], mmap_mode="r")
    masks = np.stack([ds.mask(i) for i in tqdm.trange(B, desc="masks for the PR curve")])  # uint8
    precision, recall, _ = precision_recall_curve(masks.reshape(-1), np.asarray(heatmaps).reshape(-1))
    atomic_save(files["precision"], precision)
    atomic_save(files["recall"], recall)

    text = result_text(metrics)
    for old in out.glob(SEGMENTATION_RESULT_GLOB):
        old.unlink()
    result_file = segmentation_result_path(out, metrics["mIoU"])
    atomic_write_text(result_file, text)
    summary = {
        **summary, "num_images": B, "metrics": metrics, "result_txt": text, "result_file": result_file.name,
        "per_image_columns": METRIC_COLUMNS,
        "per_image": [{"correct": int(c[0]), "labeled": int(c[1]), "inter": [int(c[2]), int(c[3])],
                       "union": [int(c[4]), int(c[5])], "ap": float(r[6]), "chosen_class": int(r[7])}
                      for c, r in zip(counts, per_image)],
    }
    atomic_write_json(files["json"], summary)
    write_provenance(out, dict(record, num_images=B))
    return summary


# ----------------------------------------------------------------------------- pictures
def unnormalize(image: torch.Tensor, transform=None) -> np.ndarray:
    """A preprocessed image ``[3, H, W]`` back to RGB ``[H, W, 3]`` in [0, 1].

    Inverts the ``Normalize`` step of ``transform`` (open_clip's eval transform) when there is one, else
    min–max scales.
    """
    x = image.detach().float().cpu()
    norm = None
    for t in getattr(transform, "transforms", []) or []:
        if type(t).__name__ == "Normalize":
            norm = t
    if norm is not None:
        mean = torch.tensor(norm.mean).view(-1, 1, 1)
        std = torch.tensor(norm.std).view(-1, 1, 1)
        x = x * std + mean
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp(min=1e-12)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
            vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Blend a colour-mapped heatmap ``[H, W]`` onto an RGB image ``[H, W, 3]`` in [0, 1] → ``[H, W, 3]``."""
    from matplotlib import colormaps

    span = vmax - vmin if vmax > vmin else 1.0
    colored = colormaps[cmap](np.clip((heatmap - vmin) / span, 0, 1))[..., :3]
    return (1 - alpha) * image + alpha * colored


def save_segmentation_images(folder, index: int, image: np.ndarray, target: np.ndarray, foreground: np.ndarray,
                             heatmap: np.ndarray) -> list:
    """Write ``{index}_input.png``, ``{index}_gt.png``, ``{index}_mask.png`` (predicted) and
    ``{index}_heatmap.png`` (overlay) into ``folder`` with matplotlib; returns the paths."""
    import os
    from pathlib import Path

    import matplotlib.image as mpimg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {
        "input": (np.clip(image, 0, 1), {}),
        "gt": ((np.asarray(target) == 1).astype(np.uint8) * 255, {"cmap": "gray", "vmin": 0, "vmax": 255}),
        "mask": (np.asarray(foreground).astype(np.uint8) * 255, {"cmap": "gray", "vmin": 0, "vmax": 255}),
        "heatmap": (np.clip(overlay(image, heatmap), 0, 1), {}),
    }
    paths = []
    for name, (array, kw) in pictures.items():
        path = folder / f"{index:05d}_{name}.png"
        tmp = path.with_name(path.name + ".partial")  # never a half-written PNG under the final name
        mpimg.imsave(tmp, array, format="png", **kw)
        os.replace(tmp, path)
        paths.append(path)
    return paths
