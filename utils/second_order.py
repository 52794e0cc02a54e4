"""Second-order effects of MLP neurons through later attention heads (paper 2), batched; its files and inputs.

Definitions (DESIGN.md section 4, tests/golden/README.md quirk Q1). For MLP layer ``m`` (M neurons), neuron
``k``, a later layer ``l > m`` (0-based, so ``1 + 2l`` terms make up the residual entering block ``l``), head
``h`` and every token ``n`` of one image::

    o[n, k] = post_act[n, k] * W_cproj[:, k] + b_cproj / M                          neuron output         [W]
    z[n, k] = gamma1_l * (o[n, k] - mu_l[n] / T1) / sigma_l[n] + beta1_l / T1        ln_1 of l, frozen     [W]
    v[n, k] = W_V,h z[n, k] + b_V,h / T1                                             value of head h       [dh]
    y[k]    = W_O[:, h-block] sum_n A_l[h, 0, n] v[n, k] + b_O / (T1 H)              CLS row of the head   [W]
    e[k]   += (gamma * (y[k] - mu / T2) / sigma + beta / T2) @ proj * coefficient / ||r||                [d]

    T1 = (1 + 2l) M,   T2 = (1 + 2l)(1 + 2L) H M,   mu/sigma: ln_post statistics of the CLS token,
    r: the unnormalised image embedding; summed over all l > m and all heads h.

Layer scale, where a model has one, multiplies the neuron output (``ls_2`` of layer m) and the head output
(``ls_1`` of layer l). The original evaluates this literally, building a ``[batch, tokens, neurons, width]``
tensor per (layer, head). Everything but ``post_act`` is linear and fixed, so here the sum over source tokens
comes first::

    c[l, h, k] = sum_n A_l[h, 0, n] post_act[n, k] / sigma_l[n]                     [L', H, K] per image
    U[l, h, k] = (gamma1_l * ls2 * W_cproj[:, k]) W_V,h^T W_O,h^T diag(ls1 * gamma) proj   [K, d], fixed
    e[k]       = coefficient / ||r|| * (sum_{l,h} c[l, h, k] U[l, h, k] / sigma + const)

and the bias and mean parts collapse to per-(image, l, h) scalars (sum_n A, sum_n A/sigma_l, sum_n A mu_l/sigma_l)
times fixed [d] vectors. One image then costs a forward pass plus ``L' H K (N + d)`` multiply-adds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import tqdm

from prs_hook import _layer_scale, autocast_off, hook_prs_logger
from utils.factory import pretrained_name
from utils.io import classifier_path, labels_path, load_array
from utils.cli import InputError

COEFFICIENT = 100.0  # the papers' scale factor on the normalised output


# ----------------------------------------------------------------------------- names and inputs
def second_order_paths(output_dir: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str],
                       mlp_layer: int, top_k: Optional[int] = None) -> dict[str, Path]:
    """The second paper's files (``{pretrained}`` = ``utils.factory.pretrained_name``: tag or checkpoint stem).

    ``merged``: ``{dataset}_{split}_mlps_{model}_{pretrained}_{mlp_layer}_merged.npy`` [images, neurons, d];
    with ``top_k``: ``pca`` ``..._{top_k}_pca.npy`` [neurons, d] and ``norm`` ``..._{top_k}_norm.npy``
    [neurons, top_k] (the top-k centred norms per neuron, ascending).
    """
    stem = f"{dataset}_{split}_mlps_{model}_{pretrained_name(pretrained)}_{mlp_layer}"
    d = Path(output_dir)
    out = {"merged": d / f"{stem}_merged.npy"}
    if top_k is not None:
        out["pca"] = d / f"{stem}_{top_k}_pca.npy"
        out["norm"] = d / f"{stem}_{top_k}_norm.npy"
    return out


def split_labels_path(output_dir: str | Path, dataset: str, split: str) -> Path:
    """``{dataset}_{split}_labels.npy`` [images]: the labels beside a second-order file, in image order."""
    return labels_path(output_dir, f"{dataset}_{split}")


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
    names = [f"{dataset}_classifier_{model}_{pretrained_name(pretrained)}.npy",
             classifier_path(".", dataset, model).name]
    return find_input(directory, names, f"zero-shot classifier [d, C] of {model} for '{dataset}' "
                                        f"(written by compute_text_projection.py)")


def find_text_set(directory: str | Path | Sequence[str | Path], text_set: str, model: str,
                  pretrained: Optional[str]) -> Path:
    """``{text_set}_{model}_{pretrained}.npy`` (paper 2), else ``{text_set}_{model}.npy`` (paper 1).

    The two differ by a global scale: the original paper-2 script saved ``coefficient`` (100) times the normalised
    embeddings, paper 1 the normalised embeddings. A consumer that centres and rescales the dictionary (as the
    sparse decomposition does) is unaffected.
    """
    names = [f"{text_set}_{model}_{pretrained_name(pretrained)}.npy", f"{text_set}_{model}.npy"]
    return find_input(directory, names, f"text embeddings [T, d] of '{text_set}' for {model} "
                                        f"(written by compute_text_set_projection.py)")


def load_classifier(directory: str | Path | Sequence[str | Path], dataset: str, model: str,
                    pretrained: Optional[str], dim: int) -> tuple[np.ndarray, Path]:
    """``find_classifier`` then load it as float32 ``[d, C]``; ``ValueError`` unless ``d == dim``."""
    path = find_classifier(directory, dataset, model, pretrained)
    classifier = np.asarray(load_array(path, "compute_text_projection.py", mmap=False), np.float32)
    if classifier.ndim != 2 or classifier.shape[0] != dim:
        raise InputError(f"{path}: shape {classifier.shape}, expected [d={dim}, classes]")
    return classifier, path


def class_labels(ds, num_classes: int, what: str) -> np.ndarray:
    """``ds.labels`` as [B] class indices (Waterbirds' [B, 2]: the class column), checked against the
    ``num_classes`` of the classifier named ``what``."""
    labels = np.asarray(ds.labels)
    labels = labels[:, 0] if labels.ndim == 2 else labels
    if len(labels) and labels.max() >= num_classes:
        raise InputError(f"{what}: {num_classes} classes, but the dataset has label {labels.max()}")
    return labels


def build_second_order_dataset(name: str, data_path: Optional[str], transform: Optional[Callable],
                               split: str):
    """The second paper's datasets: ``imagenet`` subsampled (train: every 250th, val: every 10th image);
    anything else as ``utils.datasets.build_dataset`` builds it (``.labels`` in image order)."""
    from utils.datasets import build_dataset, subsample_imagenet

    ds = build_dataset(name, data_path, transform, split=split)
    return subsample_imagenet(ds, split) if name == "imagenet" else ds


def check_mlp_layer(mlp_layer: int, num_layers: int) -> None:
    """Raise ``ValueError`` unless ``0 <= mlp_layer < num_layers - 1`` (the last layer has no later heads)."""
    if not 0 <= mlp_layer < num_layers:
        raise InputError(f"--mlp_layer {mlp_layer}: out of range for a {num_layers}-layer image tower "
                         f"(valid: 0..{num_layers - 2})")
    if mlp_layer == num_layers - 1:
        raise InputError(f"--mlp_layer {mlp_layer}: the last layer has no later attention layers, so no "
                         f"second-order effect (valid: 0..{num_layers - 2})")


def load_second_order_files(input_dir: str | Path, dataset: str, split: str, model: str,
                            pretrained: Optional[str], mlp_layer: int, top_k: int) -> dict[str, np.ndarray]:
    """Memory-map ``merged`` [B, K, d] and load ``pca`` [K, d] and ``norm`` [K, top_k]; check they agree.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file at fault.
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
    return {"merged": merged, "pca": pca, "norm": norm, "paths": paths}


# ----------------------------------------------------------------------------- the computation
class SecondOrderEffects:
    """Batched second-order effects of every neuron of one MLP layer: ``[b, K, d]`` per image batch.

    Args:
        model: an open_clip CLIP model with a supported ViT image tower (see ``prs_hook``).
        mlp_layer: the MLP layer ``m``; its neurons' effects through the attention heads of layers ``m+1..L-1``.
        device: where the forward pass and the contraction run.
        coefficient: the scale on the normalised output (100 in the paper).
        model_name: used in error messages.
        cache_bytes: keep the precomputed ``U`` maps ``[K, H, d]`` of as many later layers as fit in this many
            bytes; the rest are rebuilt for every batch (slower, same numbers).
    """

    def __init__(self, model: torch.nn.Module, mlp_layer: int, device: str | torch.device | None = None,
                 coefficient: float = COEFFICIENT, model_name: Optional[str] = None, cache_bytes: int = 2 ** 31):
        self.prs = hook_prs_logger(model, device, attention_maps=True, ln_stats=True, post_gelu_layers=(),
                                   model_name=model_name)
        self.visual = self.prs.visual
        self.device = self.prs.device
        L, H = self.prs.num_layers, self.prs.num_heads
        check_mlp_layer(mlp_layer, L)
        self.prs.post_gelu_layers = [mlp_layer]
        self.mlp_layer = mlp_layer
        self.coefficient = float(coefficient)
        self.later_layers = list(range(mlp_layer + 1, L))
        blocks = self.visual.transformer.resblocks
        self.num_neurons = blocks[mlp_layer].mlp.c_proj.weight.shape[1]
        self.out_dim = self.prs.out_dim
        per_layer = self.num_neurons * H * self.out_dim * 4
        n_cached = min(len(self.later_layers), max(0, int(cache_bytes // per_layer)))
        with autocast_off(self.device):
            self._cache = {l: self._layer_maps(l) for l in self.later_layers[:n_cached]}

    @property
    def num_terms(self) -> int:
        """Number of (later layer, head) pairs, ``J = (L - m - 1) H``."""
        return len(self.later_layers) * self.prs.num_heads

    @torch.no_grad()
    def _layer_maps(self, l: int) -> dict[str, torch.Tensor]:
        """Fixed maps of later layer ``l`` into the ``G``-space (before ``ln_post``'s 1/sigma), float32.

        ``U`` [K, H, d]: neuron k's direction through head h. ``bias`` / ``gamma`` / ``beta`` / ``vbias`` [H, d]:
        the neuron-bias, ln_1 mean, ln_1 bias and value-bias parts; ``obias`` [d]: the out_proj bias.
        """
        W, H, dh = self.prs.width, self.prs.num_heads, self.prs.head_dim
        dev, f64 = self.device, torch.float64
        src = self.visual.transformer.resblocks[self.mlp_layer]
        blk = self.visual.transformer.resblocks[l]
        ls2 = _layer_scale(src.ls_2, W, src.mlp.c_proj.weight).to(dev, f64)
        w_c = src.mlp.c_proj.weight.detach().to(dev, f64) * ls2[:, None]  # [W, K]
        b_c = src.mlp.c_proj.bias
        b_c = b_c.detach().to(dev, f64) * ls2 if b_c is not None else torch.zeros(W, dtype=f64, device=dev)
        K = w_c.shape[1]
        ln = blk.ln_1
        g1 = ln.weight.detach().to(dev, f64) if ln.weight is not None else torch.ones(W, dtype=f64, device=dev)
        b1 = ln.bias.detach().to(dev, f64) if ln.bias is not None else torch.zeros(W, dtype=f64, device=dev)
        w_v = blk.attn.in_proj_weight[2 * W:].detach().to(dev, f64)  # [H*dh, W]
        b_v = blk.attn.in_proj_bias[2 * W:].detach().to(dev, f64)  # [H*dh]
        head_out = self.prs.head_out[l].to(f64)  # [H, dh, d]: out_proj block, ls_1 and G folded in

        def through(vec: torch.Tensor) -> torch.Tensor:  # [W] entering ln_1's affine part -> [H, d]
            return torch.einsum("he,hed->hd", (vec @ w_v.t()).view(H, dh), head_out)

        values = (w_c.t() * g1) @ w_v.t()  # [K, H*dh]
        U = torch.einsum("khe,hed->khd", values.view(K, H, dh), head_out)  # [K, H, d]
        maps = {"U": U, "bias": through(g1 * b_c / K), "gamma": through(g1), "beta": through(b1),
                "vbias": torch.einsum("he,hed->hd", b_v.view(H, dh), head_out),
                "obias": self.prs.head_bias[l].to(f64)}
        return {k: v.float().contiguous() for k, v in maps.items()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Second-order effects of ``images`` [b, 3, H, W].

        Returns ``(effects, representation)``: effects ``[b, K, d]`` summed over later layers and heads (with
        ``per_head=True``: ``[b, J, K, d]``, J = (later layer, head) pairs in order ``(l - m - 1) * H + h``;
        meant for small models), and the unnormalised embedding ``[b, d]``; float32 on ``self.device``, with
        autocast off (like ``PRSLogger``).
        """
        with autocast_off(self.device):
            return self._effects(images, per_head)

    def _effects(self, images: torch.Tensor, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        prs = self.prs
        representation = prs.encode_image(images)
        post = prs.post_gelu[self.mlp_layer].float()  # [b, N, K]
        b, N, K = post.shape
        L, H, d = prs.num_layers, prs.num_heads, self.out_dim
        mu_post, sd_post = prs.post_ln_mean, prs.post_ln_std  # [b], [b]
        scale = self.coefficient / representation.float().norm(dim=-1)  # [b]
        total = None if per_head else torch.zeros(K, b, d, device=self.device)
        const = torch.zeros(b, d, device=self.device)
        terms = []
        for l in self.later_layers:
            maps = self._cache.get(l) or self._layer_maps(l)
            T1 = (1 + 2 * l) * K
            T2 = (1 + 2 * l) * (1 + 2 * L) * H * K
            attn = prs.attention_maps[:, l]  # [b, H, N]
            w = attn / prs.ln_1_std[:, l, None, :]  # A / sigma_l          [b, H, N]
            c = torch.einsum("bhn,bnk->bhk", w, post)  # [b, H, K]
            alpha = w.sum(-1)  # [b, H]
            nu = (w * prs.ln_1_mean[:, l, None, :]).sum(-1)  # [b, H]
            s_a = attn.sum(-1)  # [b, H]
            head_const = (alpha[..., None] * maps["bias"] - nu[..., None] / T1 * maps["gamma"]
                          + s_a[..., None] / T1 * (maps["beta"] + maps["vbias"]) + maps["obias"] / (T1 * H))
            post_ln = (-mu_post[:, None] / T2) * prs.g / sd_post[:, None] + prs.beta_proj / T2  # [b, d]
            if per_head:
                x = c[..., None] * maps["U"].permute(1, 0, 2)[None] + head_const[:, :, None]  # [b, H, K, d]
                terms.append(x / sd_post[:, None, None, None] + post_ln[:, None, None])
            else:
                # sum_h c[b, h, k] U[k, h, :] as a batched matmul over neurons: [K, b, H] @ [K, H, d]
                total.baddbmm_(c.permute(2, 0, 1).contiguous(), maps["U"])  # (contiguous: ~20x faster on CPU)
                const += head_const.sum(1) / sd_post[:, None] + H * post_ln
        if per_head:
            return torch.cat(terms, 1) * scale[:, None, None, None], representation
        # effects[b, k] = scale[b] * (total[k, b] / sigma[b] + const[b]), in one pass
        effects = torch.addcmul((const * scale[:, None])[:, None], total.permute(1, 0, 2),
                                (scale / sd_post)[:, None, None])
        return effects.contiguous(), representation


# ----------------------------------------------------------------------------- consumers of the merged file
def _neuron_chunks(K: int, size: int) -> Iterable[slice]:
    for s in range(0, K, size):
        yield slice(s, min(K, s + size))


def neurons_per_chunk(merged: np.ndarray, max_bytes: int = 2 ** 30) -> int:
    """How many neurons of ``merged`` [B, K, d] fit in ``max_bytes`` as float32 (at least 1)."""
    B, _, d = merged.shape
    return max(1, int(max_bytes // (B * d * 4)))


def neuron_means(merged: np.ndarray, chunk: Optional[int] = None, progress: bool = False) -> np.ndarray:
    """Mean over images of ``merged`` [B, K, d] -> [K, d] float32, read in neuron chunks (float64 sums)."""
    B, K, d = merged.shape
    out = np.empty((K, d), np.float32)
    chunk = chunk or neurons_per_chunk(merged)
    for s in tqdm.tqdm(list(_neuron_chunks(K, chunk)), desc="neuron means", unit="chunk", disable=not progress):
        out[s] = np.asarray(merged[:, s], np.float64).mean(0)
    return out


def neuron_pcas(merged: np.ndarray, top_k: int, chunk: Optional[int] = None,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron, the signed first principal component of its ``top_k`` most-changed images (Q3).

    For neuron k: centre ``merged[:, k]`` [B, d] by its mean over images, keep the ``top_k`` rows with the largest
    norm, take their first right singular vector (no re-centring), and flip it unless more than ``top_k // 2`` of
    those rows project positively on it. ``merged`` is read in neuron chunks (one read per chunk).

    Returns ``(pcas [K, d], norms [K, top_k])``, float32; ``norms`` are the top-k centred norms, ascending.
    """
    B, K, d = merged.shape
    if not 1 <= top_k <= B:
        raise InputError(f"--top_k_pca {top_k}: must be between 1 and the number of images ({B})")
    pcas = np.empty((K, d), np.float32)
    norms = np.empty((K, top_k), np.float32)
    chunk = chunk or neurons_per_chunk(merged)
    for s in tqdm.tqdm(list(_neuron_chunks(K, chunk)), desc="PCA", unit="chunk", disable=not progress):
        x = np.asarray(merged[:, s], np.float64)  # [B, c, d]
        x = (x - x.mean(0)).transpose(1, 0, 2)  # [c, B, d]
        n = np.linalg.norm(x, axis=-1)  # [c, B]
        top = np.argsort(n, axis=-1)[:, -top_k:]  # [c, top_k], ascending norm
        rows = np.take_along_axis(x, top[..., None], axis=1)  # [c, top_k, d]
        _, _, vh = np.linalg.svd(rows, full_matrices=False)
        pc = vh[:, 0]  # [c, d]
        positive = ((rows @ pc[..., None])[..., 0] > 0).sum(-1)  # [c]
        pc = np.where((positive > top_k // 2)[:, None], pc, -pc)
        pcas[s] = pc
        norms[s] = np.take_along_axis(n, top, axis=-1)
    return pcas, norms


@torch.no_grad()
def accuracy_over_dataset(effects: SecondOrderEffects, dataset, labels: np.ndarray,
                          logits_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
                          batch_size: int, num_workers: int = 0, desc: str = "evaluate") -> dict[str, float]:
    """Top-1 accuracy (%) of each set of logits ``logits_fn(effects [b, K, d], representation [b, d])`` returns
    (name -> [b, C]), over ``dataset`` in order, against ``labels`` [B]; one forward pass per batch."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    correct: dict[str, int] = {}
    start = 0
    for images, _ in tqdm.tqdm(loader, desc=desc, unit="batch"):
        batch_effects, representation = effects(images)
        target = torch.from_numpy(np.asarray(labels[start:start + len(images)])).to(effects.device)
        start += len(images)
        for k, v in logits_fn(batch_effects, representation).items():
            correct[k] = correct.get(k, 0) + int((v.argmax(-1) == target).sum())
    return {k: 100.0 * c / max(1, len(labels)) for k, c in correct.items()}


ABLATIONS = {  # JSON key: the original script's printed line
    "baseline": "Baseline (from representations)",
    "all_neurons_mean_ablated": "Without all the neurons",
    "only_non_significant_kept": "Without significant neurons",
    "only_significant_kept": "Without insignificant neurons",
    "projected_to_first_pc": "With neurons reconstructed from PC",
}


@torch.no_grad()
def ablation_logits(effects: torch.Tensor, representation: torch.Tensor, neuron_mean: torch.Tensor,
                    pcas: torch.Tensor, thresholds: torch.Tensor, classifier: torch.Tensor,
                    coefficient: float = COEFFICIENT) -> dict[str, torch.Tensor]:
    """Logits ``[b, C]`` per ablation of ``ABLATIONS`` (second paper, section 4).

    ``effects`` [b, K, d] (this batch's second-order effects, scaled by ``coefficient``), ``representation``
    [b, d] (unnormalised), ``neuron_mean`` [K, d] (training mean per neuron), ``pcas`` [K, d] (unit first PCs),
    ``thresholds`` [K] (a neuron is significant on an image when its centred norm exceeds this: its top_k-th
    largest training norm), ``classifier`` [d, C]. Every ablation starts from ``coefficient * r/||r||`` with all
    effects replaced by their means, then adds back: nothing; the centred effects of the non-significant or of
    the significant neurons; or each centred effect's projection on its neuron's PC.
    """
    rep = coefficient * representation.float() / representation.float().norm(dim=-1, keepdim=True)
    centred = effects - neuron_mean  # [b, K, d]
    ablated = rep - effects.sum(1) + neuron_mean.sum(0)
    significant = (centred.norm(dim=-1) > thresholds).float()  # [b, K]
    sig_sum = torch.einsum("bk,bkd->bd", significant, centred)
    insig_sum = centred.sum(1) - sig_sum
    on_pc = torch.einsum("bkd,kd->bk", centred, pcas)
    reps = {"baseline": rep, "all_neurons_mean_ablated": ablated, "only_non_significant_kept": ablated + insig_sum,
            "only_significant_kept": ablated + sig_sum,
            "projected_to_first_pc": ablated + torch.einsum("bk,kd->bd", on_pc, pcas)}
    return {k: v @ classifier for k, v in reps.items()}
