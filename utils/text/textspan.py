"""TextSpan (paper 1, Algorithm 1) and PCLens' ``svd_data_approx``, batched over heads in torch.

Both algorithms only need, per head, the mean ``mu`` [d] and the centred scatter matrix
``S = Xc^T Xc`` [d, d] of its outputs ``X`` [B, d] (``Xc = X - mu``). Those are accumulated in one streamed
pass over the images (``HeadStats``), so an ImageNet-size ``[B, L, H, d]`` file is never loaded whole, and
every head of the last layers is processed at once on the device.

TextSpan, with the original code's conventions (golden README, quirks T1-T2):

1. SVD of the *uncentred* head data, keep the top ``w_ov_rank`` right singular vectors ``V`` [d, k]
   (at most ``min(B, d)``); they are the top eigenvectors of ``X^T X = S + B mu mu^T``.
2. Project the texts onto their span, ``t -> V V^T t`` (= ``vh^T (vh vh^T)^-1 vh t``), not renormalised.
3. Greedy loop on the centred data: pick ``argmax_t std_images(Xc_i t)`` (unbiased std), add
   ``(Xc_i t / t.t) t`` to the reconstruction (which starts from the mean), and remove the direction ``t``
   from the data *and from every text*.

Why nothing of size [B, ...] is needed inside the loop: after step i every text is orthogonal to the
chosen directions t_1..t_i (Gram-Schmidt), so for the deflated data ``Xc_i = Xc P_1 ... P_i`` and any
deflated text t, ``var(Xc_i t) = t^T S t / (B - 1)``. Everything lives in the k-dimensional span of V:
with texts written as coordinates ``A`` [T, k] (t = V a) and ``S_V = V^T S V`` [k, k], one step costs
O(T k). The chosen directions are orthogonal, so the reconstruction is ``mu + Xc Q Q^T`` with ``Q`` the
normalised chosen directions: each row is that image's own reconstruction (the CUDA behaviour of the
original, not its CPU aliasing artefact, quirk T3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from utils.errors import InputError
from utils.metrics import hits

__all__ = ["HeadStats", "HeadStatsAccumulator", "TextSpanResult", "PCLensResult", "head_stats",
           "textspan_from_stats", "pclens_from_stats", "pclens_record", "reconstruct", "text_span", "svd_data_approx",
           "textspan_reference_numpy"]


# ----------------------------------------------------------------------------- statistics
@dataclass
class HeadStats:
    """Per-head first and second moments of ``h`` heads' outputs over ``count`` images.

    ``mean`` [h, d] and ``scatter`` [h, d, d] = ``Xc^T Xc`` (centred, not divided), float64.
    """
    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @property
    def gram(self) -> torch.Tensor:
        """The uncentred ``X^T X`` [h, d, d] (its eigenvectors are the SVD's right singular vectors)."""
        return self.scatter + self.count * self.mean[:, :, None] * self.mean[:, None, :]

    def select(self, index: Sequence[int] | slice) -> "HeadStats":
        """The statistics of a subset of the heads."""
        return HeadStats(self.count, self.mean[index], self.scatter[index])


class HeadStatsAccumulator:
    """Streamed ``HeadStats`` of ``num_heads`` heads, fed one chunk of images at a time.

    Chunks are shifted by the first chunk's mean before their scatter is taken, which keeps the centred
    scatter accurate when a head's mean is large. ``chunk_dtype`` is the precision of each chunk's product:
    float64 (default) keeps the small singular values of a head at their float32-data level, as an SVD of
    the data would; with float32 products they are lifted to ~3e-4 of the largest (sqrt of float32 eps),
    which moves PCLens' 99 %-of-singular-values cut and the float-noise directions beyond a head's rank.
    """

    def __init__(self, num_heads: int, dim: int, device: str | torch.device = "cpu",
                 chunk_dtype: torch.dtype = torch.float64):
        self.num_heads, self.dim, self.device, self.chunk_dtype = num_heads, dim, torch.device(device), chunk_dtype
        self.count = 0
        self.shift: Optional[torch.Tensor] = None
        self.s1 = torch.zeros(num_heads, dim, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(num_heads, dim, dim, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add a chunk ``x`` [h, c, d] (heads first)."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if x.ndim != 3 or x.shape[0] != self.num_heads or x.shape[2] != self.dim:
            raise ValueError(f"HeadStatsAccumulator.update: expected [{self.num_heads}, c, {self.dim}], "
                             f"got {list(x.shape)}")
        x = x.to(self.device, self.chunk_dtype)
        if self.shift is None:
            self.shift = x.mean(1, keepdim=True)
        y = x - self.shift
        self.s1 += y.sum(1).double()
        self.s2 += torch.bmm(y.transpose(1, 2), y).double()
        self.count += x.shape[1]

    def finalize(self) -> HeadStats:
        if self.count == 0:
            raise ValueError("HeadStatsAccumulator: no images were added")
        m = self.s1 / self.count  # mean of the shifted data
        scatter = self.s2 - self.count * m[:, :, None] * m[:, None, :]
        return HeadStats(self.count, self.shift[:, 0].double() + m, scatter)


def head_stats(data: torch.Tensor | np.ndarray, device: str | torch.device = "cpu", chunk: int = 8192,
               chunk_dtype: torch.dtype = torch.float64) -> HeadStats:
    """``HeadStats`` of in-memory data ``[B, d]`` (one head) or ``[h, B, d]``."""
    data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
    if data.ndim == 2:
        data = data[None]
    acc = HeadStatsAccumulator(data.shape[0], data.shape[2], device, chunk_dtype)
    for s in range(0, data.shape[1], chunk):
        acc.update(data[:, s:s + chunk])
    return acc.finalize()


def _top_eigh(sym: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvalues [h, k] (descending) and eigenvectors [h, d, k] of symmetric [h, d, d]."""
    evals, evecs = torch.linalg.eigh(sym)
    return evals.flip(-1)[:, :k], evecs.flip(-1)[:, :, :k]


# ----------------------------------------------------------------------------- TextSpan
@dataclass
class TextSpanResult:
    """TextSpan's output for ``h`` heads and ``m`` iterations.

    ``indices`` [h, m]: chosen text rows, in order. ``directions`` [h, m, d]: the chosen (projected,
    deflated) texts, orthogonal, not normalised. ``std`` [h, m]: the unbiased std over images of
    ``data_i @ t`` that won each pick (the original's criterion). ``variance_explained`` [h, m]: the variance
    of the head along each unit direction, as a fraction of its total variance (they add up, since the
    directions are orthogonal). ``mean`` [h, d]: the head's mean (the reconstruction's start).
    """
    indices: np.ndarray
    directions: torch.Tensor
    std: np.ndarray
    variance_explained: np.ndarray
    mean: torch.Tensor
    rank: list[int] = field(default_factory=list)
    deflated_texts: Optional[torch.Tensor] = None  # [h, T, d] after the last step (return_deflated=True)
    span: Optional[torch.Tensor] = None  # [h, k, d]: the kept right singular vectors (rows), float64

    def basis(self) -> torch.Tensor:
        """The normalised directions ``Q`` [h, m, d] (zero rows stay zero)."""
        norm = self.directions.norm(dim=-1, keepdim=True)
        return torch.where(norm > 0, self.directions / norm.clamp_min(1e-300), torch.zeros_like(self.directions))


@torch.no_grad()
def textspan_from_stats(stats: HeadStats, text_features: torch.Tensor | np.ndarray, iters: int, rank: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64,
                        return_deflated: bool = False, max_bytes: int = 1 << 30,
                        centred: bool = False) -> TextSpanResult:
    """TextSpan for every head in ``stats`` at once (in groups of heads whose text coordinates fit ``max_bytes``).

    Args:
        stats: per-head mean [h, d] and centred scatter [h, d, d] over B >= 2 images.
        text_features: [T, d] text embeddings (rows, normalised as compute_text_set_projection writes them).
        iters: texts per head (m).
        rank: ``w_ov_rank``, the number of top right singular vectors of the uncentred data kept.
        device, dtype: where and in which precision the [h, T, k] text coordinates live.
        return_deflated: also return every text after the last deflation, [h, T, d] (tests).
        centred: take the span from the SVD of the *centred* data (PCLens' ``text_span`` variant, which
            also centres the texts before calling this) instead of the uncentred one (paper 1).
    """
    device = torch.device(device)
    h, d = stats.mean.shape
    B = stats.count
    n_texts = text_features.shape[0]
    per_head = 3 * n_texts * min(rank, B, d) * torch.finfo(dtype).bits // 8  # A, M and a temporary
    group = max(1, max_bytes // max(1, per_head))
    if h > group:
        parts = [textspan_from_stats(stats.select(slice(s, s + group)), text_features, iters, rank, device, dtype,
                                     return_deflated, max_bytes, centred) for s in range(0, h, group)]
        return TextSpanResult(
            indices=np.concatenate([p.indices for p in parts]), directions=torch.cat([p.directions for p in parts]),
            std=np.concatenate([p.std for p in parts]),
            variance_explained=np.concatenate([p.variance_explained for p in parts]),
            mean=torch.cat([p.mean for p in parts]), rank=sum((p.rank for p in parts), []),
            deflated_texts=torch.cat([p.deflated_texts for p in parts]) if return_deflated else None,
            span=torch.cat([p.span for p in parts]))
    if B < 2:
        raise InputError(f"TextSpan needs at least 2 images (an unbiased std), got {B}")
    texts = torch.as_tensor(np.asarray(text_features) if not isinstance(text_features, torch.Tensor)
                            else text_features)
    if texts.ndim != 2 or texts.shape[1] != d:
        raise InputError(f"text features of shape {list(texts.shape)} do not match the heads' dimension d={d}")
    if iters < 1 or rank < 1:
        raise InputError(f"texts per head ({iters}) and w_ov_rank ({rank}) must be >= 1")
    k = min(rank, B, d)
    scatter = stats.scatter.to(device, torch.float64)
    gram = stats.gram.to(device, torch.float64)
    _, V = _top_eigh(scatter if centred else gram, k)  # [h, d, k]
    V = V.to(dtype)
    S_V = V.transpose(1, 2) @ scatter.to(dtype) @ V  # [h, k, k]
    A = texts.to(device, dtype) @ V  # [h, T, k]: projected texts in the V basis (t = V a)
    M = A @ S_V  # [h, T, k]; variance of text i ~ <M_i, A_i>
    var = (M * A).sum(-1)  # [h, T], times (B - 1)
    total = torch.diagonal(scatter, dim1=1, dim2=2).sum(-1)  # [h]
    ar = torch.arange(h, device=device)
    idx, dirs, stds, fracs = [], [], [], []
    for _ in range(iters):
        j = var.argmax(-1)  # [h]; first maximum on ties, like np.argmax
        a = A[ar, j]  # [h, k]
        aa = (a * a).sum(-1)  # [h]
        v = var[ar, j].clamp_min(0)
        idx.append(j)
        dirs.append(a)
        stds.append(torch.sqrt(v / (B - 1)))
        fracs.append(torch.where(aa > 0, v / aa.clamp_min(1e-300), torch.zeros_like(v)) / total.to(dtype).clamp_min(1e-300))
        coef = torch.where(aa[:, None] > 0, (A @ a[:, :, None])[..., 0] / aa.clamp_min(1e-300)[:, None],
                           torch.zeros_like(var))  # [h, T]
        Ma = M[ar, j]  # [h, k] = a^T S_V
        A = A - coef[:, :, None] * a[:, None, :]
        M = M - coef[:, :, None] * Ma[:, None, :]
        var = (M * A).sum(-1)
    directions = torch.stack(dirs, 1) @ V.transpose(1, 2)  # [h, m, d]
    return TextSpanResult(
        indices=torch.stack(idx, 1).cpu().numpy(),
        directions=directions.to(torch.float64),
        std=torch.stack(stds, 1).cpu().numpy(),
        variance_explained=torch.stack(fracs, 1).cpu().numpy(),
        mean=stats.mean.to(device, torch.float64),
        rank=[k] * h,
        deflated_texts=(A @ V.transpose(1, 2)).to(torch.float64) if return_deflated else None,
        span=V.transpose(1, 2).to(torch.float64),
    )


@torch.no_grad()
def reconstruct(data: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, upto: Optional[int] = None) -> torch.Tensor:
    """``mean + (data - mean) Q^T Q`` per head: data [h, c, d], mean [h, d], basis Q [h, m, d] orthonormal rows.

    ``upto`` keeps only the first directions (the reconstruction after that many TextSpan steps).
    """
    q = basis[:, :upto] if upto is not None else basis
    q = q.to(data.dtype)
    xc = data - mean.to(data.dtype)[:, None]
    return mean.to(data.dtype)[:, None] + (xc @ q.transpose(1, 2)) @ q


def text_span(data: np.ndarray, text_features: np.ndarray, texts: Sequence[str], iters: int, rank: int,
              device: str | torch.device = "cpu") -> tuple[np.ndarray, list[str]]:
    """TextSpan of one head ``data`` [B, d]: (reconstruction [B, d], chosen texts in order).

    The drop-in for the original ``replace_with_iterative_removal(data, text_features, texts, iters, rank,
    device)``, with the per-row (CUDA) reconstruction.
    """
    data = np.asarray(data, np.float32)
    x = torch.from_numpy(data)[None].to(device)
    res = textspan_from_stats(head_stats(x, device), text_features, iters, rank, device)
    rec = reconstruct(x.double(), res.mean, res.basis())[0]
    return rec.float().cpu().numpy(), [texts[i] for i in res.indices[0]]


def textspan_reference_numpy(data: np.ndarray, text_features: np.ndarray, iters: int, rank: int,
                             dtype=np.float32) -> tuple[np.ndarray, list[int]]:
    """The straightforward port: the T1-T2 loop in data space, one head, NumPy (tests and benchmark only).

    Returns (reconstruction [B, d], chosen text indices). Every step multiplies the full [B, d] data by
    all [T, d] texts, which is what the batched version avoids.
    """
    data = np.asarray(data, dtype)
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    span = vh.T @ np.linalg.inv(vh @ vh.T) @ vh  # [d, d] projector onto the top right singular vectors
    tf = np.asarray(text_features, dtype) @ span  # span is symmetric
    mean = data.mean(0, keepdims=True)
    x = data - mean
    recon = np.repeat(mean, len(data), 0)
    chosen = []
    for _ in range(iters):
        proj = x @ tf.T  # [B, T]
        j = int(np.argmax(proj.std(0, ddof=1)))
        chosen.append(j)
        t = tf[j].copy()
        tt = t @ t
        c = (x @ t) / tt
        recon += c[:, None] * t[None]
        x = x - c[:, None] * t[None]
        tf = tf - ((tf @ t) / tt)[:, None] * t[None]
    return recon, chosen


# ----------------------------------------------------------------------------- PCLens
@dataclass
class PCLensResult:
    """PCLens' ``svd_data_approx`` for one head: ``r`` kept principal components, ``n`` texts per pole.

    The components are those of the centred head data. Each is signed so that its stronger pole (the text with
    the largest |cosine|) is the positive one. Texts are compared with a component by their cosine: the text
    set is centred by its mean, each centred text unit-normalised, and dotted with the unit component.

    ``top`` / ``bottom`` [r, n]: text indices of the largest / smallest cosines per component (most extreme
    first), ``top_values`` / ``bottom_values`` [r, n] those cosines. ``singular_values`` [r]: s.
    ``strength`` [r]: s^2 (PCLens' ``strength_abs`` and its JSON ``s``). ``strength_rel`` [r]:
    100 s^2 / sum of s^2 over the kept components. ``variance_explained`` [r]: s^2 / sum of s^2 over all of them.
    ``components`` [r, d]: unit rows, signed as above. ``basis`` [r, d]: orthonormal rows; rows 0..j span the
    top texts of components 0..j projected onto the kept components (zero rows for a text already used or
    adding no direction). ``mean`` [d]: the head's mean; ``text_mean`` [d]: the text set's mean.
    """
    rank: int
    top: np.ndarray
    bottom: np.ndarray
    top_values: np.ndarray
    bottom_values: np.ndarray
    singular_values: np.ndarray
    strength: np.ndarray
    strength_rel: np.ndarray
    variance_explained: np.ndarray
    components: torch.Tensor
    basis: torch.Tensor
    mean: torch.Tensor
    text_mean: torch.Tensor

    @property
    def indices(self) -> np.ndarray:
        """The text each component's reconstruction uses (its top text), [r]."""
        return self.top[:, 0]

    def projector(self) -> torch.Tensor:
        """PCLens' ``project_matrix`` [r, r]: the projector onto the top texts' span, in component coordinates."""
        c = self.basis @ self.components.T  # [r, r]: the basis in component coordinates
        return c.T @ c


def _kept_rank(s: torch.Tensor, threshold: float, cap: Optional[int]) -> int:
    """Components kept: those whose cumulative singular-value sum is below ``threshold`` of the total, plus one,
    at most ``cap``. ``s`` [K] descending."""
    total = s.sum()
    r = int((torch.cumsum(s, 0) / total < threshold).sum()) + 1 if total > 0 else 1
    r = min(r, len(s))
    return min(r, cap) if cap is not None else r


def _distinct_basis(rows: torch.Tensor, index: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt, in order, of the rows [r, k] whose text (``index`` [r]) is new and adds a direction.

    Row j of the result is the unit part of ``rows[j]`` orthogonal to the rows before it, or zero when its text
    was already used or that part is below ``rtol`` of its norm: rows 0..j always span exactly the distinct
    texts among 0..j. Float64, orthogonalised twice so the rows stay orthonormal.
    """
    rows = rows.to(torch.float64)
    out = torch.zeros_like(rows)
    seen: set[int] = set()
    for j, t in enumerate(index.tolist()):
        if t in seen:
            continue
        seen.add(t)
        q = out[:j]  # the rows so far (zero rows take nothing away)
        v = rows[j] - (q @ rows[j]) @ q
        v = v - (q @ v) @ q
        norm = v.norm()
        if norm > rtol * rows[j].norm() and norm > 0:
            out[j] = v / norm
    return out


@torch.no_grad()
def pclens_from_stats(stats: HeadStats, text_features: torch.Tensor | np.ndarray, texts_per_component: int,
                      max_components: Optional[int] = None, threshold: float = 0.99,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> list[PCLensResult]:
    """PCLens' ``svd_data_approx`` for every head of ``stats``.

    Args:
        stats: per-head mean [h, d] and centred scatter [h, d, d].
        text_features: [T, d] text embeddings.
        texts_per_component: texts listed per pole of each component (``--text_per_princ_comp``).
        max_components: at most this many components per head (``--max_text``; None: no cap, as PCLens does
            for the whole embedding).
        threshold: components are kept while the cumulative sum of singular values is below this fraction
            of their total, plus one.

    The reconstruction is the mean plus the centred data projected onto the span of the components' top
    texts, each projected onto the kept components (least squares; ``basis`` spans it). The sign of each
    component is fixed (stronger pole positive) where PCLens keeps the SVD's arbitrary one.
    """
    device = torch.device(device)
    h, d = stats.mean.shape
    tf = torch.as_tensor(np.asarray(text_features) if not isinstance(text_features, torch.Tensor) else text_features)
    if tf.ndim != 2 or tf.shape[1] != d:
        raise InputError(f"text features of shape {list(tf.shape)} do not match the heads' dimension d={d}")
    if texts_per_component < 1 or (max_components is not None and max_components < 1):
        raise InputError(f"texts per component ({texts_per_component}) and the component cap ({max_components}) "
                         f"must be >= 1")
    n = min(texts_per_component, tf.shape[0])
    K = min(stats.count, d)
    evals, V = _top_eigh(stats.scatter.to(device, torch.float64), K)  # [h, K], [h, d, K]
    s = evals.clamp_min(0).sqrt()  # singular values of the centred data
    tf = tf.to(device, torch.float64)
    text_mean = tf.mean(0)
    centred = tf - text_mean
    unit = (centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-300)).to(dtype)  # [T, d]
    out = []
    for i in range(h):
        si = s[i]
        r = _kept_rank(si, threshold, max_components)
        Vi = V[i, :, :r].to(dtype)  # [d, r]
        cos = unit @ Vi  # [T, r]
        top_v, top_i = cos.topk(n, dim=0)  # [n, r], largest first
        bot_v, bot_i = (-cos).topk(n, dim=0)
        bot_v = -bot_v
        flip = bot_v[0].abs() > top_v[0].abs()  # the stronger pole becomes the positive one
        sign = 1.0 - 2.0 * flip.to(dtype)
        Vi, cos = Vi * sign, cos * sign
        top_i, bot_i = torch.where(flip, bot_i, top_i), torch.where(flip, top_i, bot_i)
        top_v, bot_v = torch.where(flip, -bot_v, top_v), torch.where(flip, -top_v, bot_v)
        rows = cos[top_i[0]]  # [r, r]: each component's top text, in the kept components' coordinates
        basis = _distinct_basis(rows, top_i[0]) @ Vi.T.to(torch.float64)  # [r, d]
        s2 = si[:r] ** 2
        out.append(PCLensResult(
            rank=r, top=top_i.T.cpu().numpy(), bottom=bot_i.T.cpu().numpy(),
            top_values=top_v.T.double().cpu().numpy(), bottom_values=bot_v.T.double().cpu().numpy(),
            singular_values=si[:r].cpu().numpy(), strength=s2.cpu().numpy(),
            strength_rel=(100 * s2 / s2.sum().clamp_min(1e-300)).cpu().numpy(),
            variance_explained=(s2 / (si ** 2).sum().clamp_min(1e-300)).cpu().numpy(),
            components=Vi.T.to(torch.float64), basis=basis, mean=stats.mean[i].to(device, torch.float64),
            text_mean=text_mean))
    return out


def pclens_record(res: PCLensResult, texts: Sequence[str]) -> dict:
    """The JSON object PCLens' ``svd_data_approx`` returns for one head (its field names and order).

    ``s`` and ``strength_abs`` hold s^2. Per component, ``text`` lists the positive pole's texts
    (``text_max_k`` / ``corr_max_k``: text and cosine) then the negative pole's (``text_min_k`` / ``corr_min_k``),
    the pole with the larger |cosine| first; ``cosine_similarity`` and ``correlation`` are both the cosine of
    the text the reconstruction uses.
    """
    comps = []
    for c in range(res.rank):
        pos = [{f"text_max_{k}": texts[j], f"corr_max_{k}": float(v)}
               for k, (j, v) in enumerate(zip(res.top[c], res.top_values[c]))]
        neg = [{f"text_min_{k}": texts[j], f"corr_min_{k}": float(v)}
               for k, (j, v) in enumerate(zip(res.bottom[c], res.bottom_values[c]))]
        pos_first = abs(res.top_values[c, 0]) > abs(res.bottom_values[c, 0])  # PCLens' rule (ties: negative first)
        comps.append({"text": pos + neg if pos_first else neg + pos,
                      "eigen_v_emb": res.components[c].tolist(), "strength_abs": float(res.strength[c]),
                      "strength_rel": float(res.strength_rel[c]), "cosine_similarity": float(res.top_values[c, 0]),
                      "correlation": float(res.top_values[c, 0])})
    return {"mean_values_att": res.mean.tolist(), "mean_values_text": res.text_mean.tolist(),
            "project_matrix": res.projector().tolist(), "vh": res.components.tolist(), "s": res.strength.tolist(),
            "embeddings_sort": comps}


def svd_data_approx(data: np.ndarray, text_features: np.ndarray, texts: Sequence[str], layer: Optional[int] = None,
                    head: Optional[int] = None, text_per_princ_comp: int = 5, device: str | torch.device = "cpu",
                    iters: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """PCLens' ``svd_data_approx`` for one head ``data`` [B, d], with its call signature.

    Returns (reconstruction [B, d] float32, the JSON object of ``pclens_record``). ``iters`` caps the number
    of components (PCLens' ``--max_text``); ``layer`` and ``head`` are only PCLens' progress labels.
    """
    x = torch.from_numpy(np.asarray(data, np.float32))[None].to(device)
    res = pclens_from_stats(head_stats(x, device), text_features, text_per_princ_comp, iters, device=device)[0]
    rec = reconstruct(x.double(), res.mean[None], res.basis[None])[0]
    return rec.float().cpu().numpy(), pclens_record(res, texts)


# ----------------------------------------------------------------------------- streaming over a [B, L, H, d] file
def _rows_per_chunk(row_bytes: int, budget: int = 256 << 20) -> int:
    return max(1, budget // max(1, row_bytes))


def _tensor(block: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (memmap) slice as a float32 tensor on ``device`` (read into a fresh, writable array first)."""
    return torch.from_numpy(np.array(block, dtype=np.float32)).to(device)


def _to_heads(block: np.ndarray, device: torch.device) -> torch.Tensor:
    """[c, l, H, d] (any float dtype, maybe a memmap slice) -> [l*H, c, d] float32 on ``device``."""
    x = _tensor(block, device)
    c = x.shape[0]
    return x.reshape(c, -1, x.shape[-1]).transpose(0, 1)


@torch.no_grad()
def scan_decomposition(attn: np.ndarray, mlp: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
                       first_layer: int, device: str | torch.device = "cpu", chunk: Optional[int] = None,
                       progress: bool = True, stats_dtype: torch.dtype = torch.float64,
                       rest: Optional[np.ndarray] = None) -> dict:
    """Pass 1 over the images: statistics of the heads of layers ``first_layer..L-1`` and the baseline.

    Reads ``attn`` [B, L, H, d] and ``mlp`` [B, L+1, d] (memmaps are fine) in chunks of images. Returns
    ``stats`` (``HeadStats`` of the (L - first_layer) * H heads, layer-major), ``early_mean`` [d] (float64: the
    mean over images of the attention of layers ``0..first_layer-1``, summed over layers and heads, i.e. what
    mean-ablating them leaves) and ``baseline_correct`` (top-1 hits of the unablated sum @ classifier).

    For a file of ``compute_prs.py --layers``, ``attn``'s layer axis holds the kept layers only, ``first_layer``
    indexes that axis, and ``rest`` [B, d] (the layers not kept, summed) joins the early, mean-ablated part.
    """
    import tqdm

    device = torch.device(device)
    B, L, H, d = attn.shape
    chunk = chunk or _rows_per_chunk(L * H * d * 4)
    acc = HeadStatsAccumulator((L - first_layer) * H, d, device, stats_dtype)
    early = torch.zeros(d, dtype=torch.float64, device=device)
    W = torch.from_numpy(np.asarray(classifier, np.float32)).to(device)
    lab = torch.from_numpy(np.asarray(labels)).to(device)
    correct = 0
    for s in tqdm.trange(0, B, chunk, desc="pass 1/2: head statistics", unit="chunk", disable=not progress):
        e = min(B, s + chunk)
        block = _tensor(attn[s:e], device)  # [c, L, H, d]
        m = _tensor(mlp[s:e], device)
        early_part = block[:, :first_layer].sum((1, 2))  # [c, d]
        total = block.sum((1, 2)) + m.sum(1)
        if rest is not None:
            r = _tensor(rest[s:e], device)
            early_part, total = early_part + r, total + r
        early += early_part.double().sum(0)
        acc.update(block[:, first_layer:].reshape(e - s, -1, d).transpose(0, 1))
        logits = total @ W
        correct += hits(logits, lab[s:e])
    return {"stats": acc.finalize(), "early_mean": early / B, "baseline_correct": correct}


@torch.no_grad()
def replacement_accuracy(attn: np.ndarray, mlp: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
                         first_layer: int, early_mean: torch.Tensor, means: torch.Tensor, basis: torch.Tensor,
                         device: str | torch.device = "cpu", chunk: Optional[int] = None,
                         progress: bool = True, final: Optional[HeadStatsAccumulator] = None) -> np.ndarray:
    """Pass 2: top-1 hits when every head of layers ``first_layer..`` is replaced by its reconstruction
    (``first_layer`` indexes ``attn``'s layer axis, as in ``scan_decomposition``).

    The representation is the MLP terms (as they are) + the early attention layers mean-ablated
    (``early_mean``) + per replaced head ``mean_h + sum_{j<k} <x_h - mean_h, q_hj> q_hj``. ``means`` [h, d] and
    ``basis`` [h, K, d] (orthonormal rows, zero rows allowed) per head, layer-major. Returns the hits for
    every prefix k = 0..K, [K + 1] (k = 0: the replaced heads mean-ablated as well). ``final``, when given
    (one head of dimension d), receives every image's representation with all K directions, [1, c, d].
    """
    import tqdm

    device = torch.device(device)
    B, L, H, d = attn.shape
    nh, K, _ = basis.shape
    chunk = chunk or _rows_per_chunk((L - first_layer) * H * d * 4)
    W = torch.from_numpy(np.asarray(classifier, np.float32)).to(device)  # [d, C]
    lab = torch.from_numpy(np.asarray(labels)).to(device)
    q = basis.to(device, torch.float32)  # [h, K, d]
    mu = means.to(device, torch.float32)  # [h, d]
    qw = q @ W  # [h, K, C]
    const = (early_mean.to(device, torch.float64) + means.to(device, torch.float64).sum(0)).float()  # [d]
    correct = np.zeros(K + 1, np.int64)
    for s in tqdm.trange(0, B, chunk, desc="pass 2/2: accuracy", unit="chunk", disable=not progress):
        e = min(B, s + chunk)
        x = _to_heads(attn[s:e, first_layer:], device)  # [h, c, d]
        m = _tensor(mlp[s:e], device)
        coefs = (x - mu[:, None]) @ q.transpose(1, 2)  # [h, c, K]
        base = m.sum(1) + const  # [c, d]: the MLPs, the early layers' and every replaced head's mean
        logits = base @ W  # [c, C]
        y = lab[s:e]
        correct[0] += hits(logits, y)
        for k in range(K):
            logits = logits + coefs[:, :, k].T @ qw[:, k]
            correct[k + 1] += hits(logits, y)
        if final is not None:
            final.update((base + torch.einsum("hck,hkd->cd", coefs, q))[None])
    return correct
