"""Sparse text decomposition of neurons' first principal components (paper 2, section 5).

Each neuron's first PC [d] (``compute_pcas.py``) is written as a sparse combination of text embeddings: the
rows of a centred, rescaled text dictionary [T, d]. Solvers: ``omp`` (``utils.solvers.omp``: exactly ``components``
texts, what the original's scikit-learn ``SparseCoder(transform_algorithm='omp')`` computes) and ``nnlasso``
(``utils.solvers.nnlasso``: SpLiCE's non-negative lasso by ADMM).

The dictionary (``build_text_dictionary``). The text embeddings are centred (their mean over texts removed),
then rescaled, then multiplied by ``coefficient`` (100):

* ``per_dimension`` (the original): every *embedding dimension* (column) is divided by its norm over the
  texts, so each column has norm ``coefficient``. Texts then have unequal norms (roughly
  ``coefficient * sqrt(d / T)`` on average, but larger for texts that are far out along rarely-used
  dimensions) and the geometry is changed: the dictionary is no longer the embedding space's own, it is
  whitened per axis. OMP picks by ``|<text, residual>|``, so long texts are favoured.
* ``per_text``: every centred *text* (row) is scaled to the same norm, ``coefficient * sqrt(d / T)``. Directions
  are the texts' own (cosine geometry, as in SpLiCE), OMP picks by cosine, and the dictionary has the same
  total (Frobenius) norm, ``coefficient * sqrt(d)``, as the ``per_dimension`` one, so ``--l1_penalty`` keeps
  its scale between the two.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from utils.errors import InputError
from utils.files.atomic import atomic_write

NORMS = ("per_dimension", "per_text")
SOLVERS = ("omp", "nnlasso")


# ----------------------------------------------------------------------------- the dictionary
def build_text_dictionary(texts: np.ndarray, coefficient: float = 100.0, norm: str = "per_dimension",
                          name: str = "text embeddings") -> np.ndarray:
    """Centre the text embeddings ``texts`` [T, d] over texts and rescale them (see the module doc).

    Returns float32 [T, d]. Raises ``ValueError`` (naming ``name``) for fewer than two texts, an unknown
    ``norm``, non-finite values, or a dimension / text that is constant (zero norm after centring).
    """
    if norm not in NORMS:
        raise InputError(f"--dictionary_norm {norm}: must be one of {', '.join(NORMS)}")
    x = np.asarray(texts, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"{name}: expected [texts, d], got shape {x.shape}")
    T, d = x.shape
    if T < 2:
        raise InputError(f"{name}: {T} text(s); the dictionary is centred over texts, so it needs at least 2")
    if not np.isfinite(x).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    x = x - x.mean(axis=0, keepdims=True)
    if norm == "per_dimension":
        scale = np.linalg.norm(x, axis=0, keepdims=True)  # [1, d]: each embedding dimension over the texts
        if (scale == 0).any():
            raise InputError(f"{name}: embedding dimension(s) {np.nonzero(scale[0] == 0)[0][:5].tolist()} are "
                             f"constant over the texts; per_dimension scaling would divide by zero")
        x = coefficient * x / scale
    else:
        scale = np.linalg.norm(x, axis=1, keepdims=True)  # [T, 1]: each text
        if (scale == 0).any():
            raise InputError(f"{name}: text(s) {np.nonzero(scale[:, 0] == 0)[0][:5].tolist()} equal the mean "
                             f"text (zero after centring); per_text scaling would divide by zero")
        x = coefficient * np.sqrt(d / T) * x / scale
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- solving
def decompose(dictionary: np.ndarray, targets: np.ndarray, solver: str, components: int,
              l1_penalty: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
              batch_size: int = 1024, max_iter: Optional[int] = None, progress: bool = False) -> sp.csr_matrix:
    """Sparse codes of ``targets`` [K, d] over ``dictionary`` [T, d] -> ``csr_matrix`` [K, T] (float32).

    ``omp``: exactly ``components`` texts per target (fewer only where scikit-learn's OMP stops early).
    ``nnlasso``: SpLiCE's non-negative lasso with ``l1_penalty`` (seeded ADMM; ``components`` is not used by
    the solver, only by ``top_components``).
    """
    from utils.solvers.nnlasso import DEFAULT_MAX_ITER, nnlasso_admm
    from utils.solvers.omp import omp

    D = torch.from_numpy(np.ascontiguousarray(dictionary, dtype=np.float32))
    X = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    if solver == "omp":
        codes = omp(D, X, components, device=device, batch_size=batch_size, progress=progress)
        return codes.to_scipy().astype(np.float32)
    if solver == "nnlasso":
        dense = nnlasso_admm(D, X, l1_penalty, seed=seed, device=device, batch_size=batch_size,
                             max_iter=max_iter or DEFAULT_MAX_ITER, progress=progress)
        m = sp.csr_matrix(dense.astype(np.float32))
        m.eliminate_zeros()
        return m
    raise InputError(f"--solver {solver}: must be one of {', '.join(SOLVERS)}")


def top_components(codes: sp.csr_matrix, components: int) -> tuple[list[list[tuple[int, float]]], sp.csr_matrix]:
    """Per row, the ``components`` non-zero entries of largest ``|coefficient|``, largest first.

    Returns ``(top, truncated)``: ``top[k]`` = [(text index, coefficient), ...] and ``truncated`` [K, T], the
    codes with every other entry set to zero (the original's ``sparse_decomposition``).
    """
    codes = codes.tocsr()
    top, rows, cols, vals = [], [], [], []
    for k in range(codes.shape[0]):
        lo, hi = codes.indptr[k], codes.indptr[k + 1]
        idx, val = codes.indices[lo:hi], codes.data[lo:hi]
        keep = val != 0
        idx, val = idx[keep], val[keep]
        order = np.argsort(-np.abs(val), kind="stable")[:components]
        top.append([(int(idx[j]), float(val[j])) for j in order])
        rows.extend([k] * len(order))
        cols.extend(idx[order].tolist())
        vals.extend(val[order].tolist())
    truncated = sp.csr_matrix((np.asarray(vals, np.float32), (np.asarray(rows, np.int64),
                                                              np.asarray(cols, np.int64))), shape=codes.shape)
    truncated.sort_indices()
    return top, truncated


def decomposition_json(top: Sequence[Sequence[tuple[int, float]]], lines: Sequence[str]) -> dict:
    """The original's ``.json`` content: ``{neuron: [[text index, coefficient, text], ...]}``, by |coefficient|."""
    return {int(k): [(j, c, str(lines[j])) for j, c in row] for k, row in enumerate(top)}


def save_sparse_npz(path: str | Path, matrix: sp.spmatrix) -> None:
    """``scipy.sparse.save_npz`` of ``matrix`` as CSC (the original's format), via ``utils.files.atomic.atomic_write``."""
    atomic_write(path, lambda f: sp.save_npz(f, sp.csc_matrix(matrix)))


# ----------------------------------------------------------------------------- checking the fit
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` [K, d] -> [K] (0 where a row is zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    den = na * nb
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)


EVALUATIONS = {  # JSON key: printed line
    "baseline": "Baseline (from representations)",
    "all_neurons_mean_ablated": "Without all the neurons",
    "reconstructed": "Reconstructed neurons",
    "reconstructed_projection": "Reconstructed neurons (projection on the normalised reconstruction)",
}


@torch.no_grad()
def reconstruction_logits(effects: torch.Tensor, representation: torch.Tensor, neuron_mean: torch.Tensor,
                          reconstruction: torch.Tensor, classifier: torch.Tensor,
                          coefficient: float = 100.0) -> dict[str, torch.Tensor]:
    """Logits ``[b, C]`` for ``EVALUATIONS`` (the original's ``--evaluate``, plus baseline references).

    ``effects`` [b, K, d] (this batch's second-order effects, scaled by ``coefficient``), ``representation``
    [b, d] (unnormalised), ``neuron_mean`` [K, d] (training mean), ``reconstruction`` [K, d] (each neuron's
    sparse text reconstruction of its PC), ``classifier`` [d, C]. Start from ``coefficient * r/||r||`` with every
    effect replaced by its mean, then add back per neuron ``<e - mean, rec> rec`` (``reconstructed``: the
    original's formula, which does not divide by ``|rec|^2``) or the true projection
    ``<e - mean, rec> rec / |rec|^2`` (``reconstructed_projection``).
    """
    rep = coefficient * representation.float() / representation.float().norm(dim=-1, keepdim=True)
    centred = effects - neuron_mean  # [b, K, d]
    ablated = rep - effects.sum(1) + neuron_mean.sum(0)
    coef = torch.einsum("bkd,kd->bk", centred, reconstruction)  # [b, K]
    n2 = (reconstruction * reconstruction).sum(1)  # [K]
    inv = torch.where(n2 > 0, 1 / torch.where(n2 > 0, n2, torch.ones_like(n2)), torch.zeros_like(n2))
    reps = {"baseline": rep, "all_neurons_mean_ablated": ablated,
            "reconstructed": ablated + coef @ reconstruction,
            "reconstructed_projection": ablated + (coef * inv) @ reconstruction}
    return {k: v @ classifier for k, v in reps.items()}


def plot_fit(cosines: np.ndarray, title: str):
    """Histogram of per-neuron cosine(reconstruction, PC): a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(cosines, bins=min(50, max(5, len(cosines) // 4)), range=(min(0.0, float(cosines.min())), 1.0))
    ax.axvline(float(np.mean(cosines)), color="k", linestyle="--", label=f"mean {np.mean(cosines):.3f}")
    ax.set_xlabel("cosine(sparse text reconstruction, neuron's first PC)")
    ax.set_ylabel("neurons")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    return fig
