"""Batched Orthogonal Matching Pursuit in torch (CPU or GPU): many signals at once, ``n_nonzero`` atoms each.

It computes what ``sklearn.linear_model.orthogonal_mp_gram`` computes with ``n_nonzero_coefs=n`` and
``tol=None`` (that is what ``SparseCoder(transform_algorithm='omp')`` runs, the original's decomposition):

* start from the residual ``r = x``; at each step pick the atom ``j = argmax_j |<d_j, r>|`` (atoms are
  *not* normalised first: a longer atom wins ties of cosine, exactly as in scikit-learn);
* refit ``x`` by least squares on all atoms picked so far; the new residual is ``x`` minus its projection on
  their span;
* stop after ``n_nonzero`` atoms, or earlier, as scikit-learn does, when the picked atom is already in the
  set or its squared correlation is below the dtype's eps (the residual is ~0), or when the new atom is
  linearly dependent on the picked ones (squared norm of its orthogonal part <= eps).

How it is fast. scikit-learn loops over signals in Python and works on the full ``[atoms, atoms]`` Gram
matrix, which it copies for every signal (3.6 GB for 30,000 fp32 atoms). Here all signals of a chunk advance
together: one ``[signals, d] x [d, atoms]`` matrix product per step gives every residual's correlations,
and the least-squares refit is an incremental Gram-Schmidt QR of the picked atoms kept per signal
(``Q [signals, n, d]``, ``R [signals, n, n]``, re-orthogonalised once per step: "CGS2"). The only Gram
entries ever needed (new atom against picked atoms) come from ``Q``; no ``[atoms, atoms]`` matrix is built.
The coefficients are one batched triangular solve ``R gamma = Q^T x`` at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

try:  # progress bar is optional for library use
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@dataclass
class SparseCodes:
    """Per-signal sparse codes in selection order.

    ``indices`` [signals, n] (int64, -1 where a signal stopped early), ``coefs`` [signals, n] (0 there),
    ``n_active`` [signals] = atoms actually picked. ``num_atoms`` = dictionary size (for densifying).
    """

    indices: np.ndarray
    coefs: np.ndarray
    n_active: np.ndarray
    num_atoms: int

    def to_dense(self) -> np.ndarray:
        """[signals, num_atoms] dense coefficient matrix (what scikit-learn returns)."""
        out = np.zeros((len(self.indices), self.num_atoms), dtype=self.coefs.dtype)
        rows, cols = np.nonzero(self.indices >= 0)
        out[rows, self.indices[rows, cols]] = self.coefs[rows, cols]
        return out

    def to_scipy(self):
        """The same codes as a ``scipy.sparse.csr_matrix`` [signals, num_atoms] (explicit zeros dropped)."""
        import scipy.sparse as sp

        valid = self.indices >= 0
        rows = np.nonzero(valid)[0]
        m = sp.csr_matrix((self.coefs[valid], (rows, self.indices[valid])),
                          shape=(len(self.indices), self.num_atoms))
        m.eliminate_zeros()
        m.sort_indices()
        return m


def _project(QTn: torch.Tensor, Qn: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Q a`` per signal: QTn [b, d, n] (= Qn [b, n, d] transposed), a [b, d] -> [b, n]."""
    if QTn.device.type == "cpu":
        return torch.bmm(a[:, None, :], QTn)[:, 0]
    return torch.bmm(Qn, a[:, :, None])[:, :, 0]


def _omp_chunk(D: torch.Tensor, norms2: torch.Tensor, X: torch.Tensor, k: int, eps: float):
    """OMP for one chunk. D [T, d], norms2 [T], X [b, d] (same device and dtype). Returns idx, gamma, n_act."""
    b, d = X.shape
    dev, dt = X.device, X.dtype
    Q = torch.zeros(b, k, d, device=dev, dtype=dt)  # orthonormal basis of the picked atoms, per signal
    QT = torch.zeros(b, d, k, device=dev, dtype=dt)  # the same, transposed (faster batched mat-vecs on CPU)
    R = torch.zeros(b, k, k, device=dev, dtype=dt)  # picked atom j = sum_i R[i, j] Q[i]
    z = torch.zeros(b, k, device=dev, dtype=dt)  # Q^T x
    idx = torch.full((b, k), -1, device=dev, dtype=torch.long)
    picked = torch.zeros(b, D.shape[0], device=dev, dtype=torch.bool)
    alive = torch.ones(b, device=dev, dtype=torch.bool)
    rows = torch.arange(b, device=dev)
    resid = X.clone()
    for n in range(k):
        alpha = resid @ D.T  # [b, T] correlations of the residuals with every atom
        val, lam = alpha.abs_().max(1)  # [b]: |correlation| and the atom (first one on ties, as np.argmax)
        del alpha
        # scikit-learn stops when it picks an atom twice or the correlation is ~0 (the residual is ~0)
        stop = (val * val < eps) | picked[rows, lam]
        a = D[lam]  # [b, d]
        if n > 0:
            c = _project(QT[:, :, :n], Q[:, :n], a)
            w = a - torch.bmm(c[:, None, :], Q[:, :n])[:, 0]
            # second Gram-Schmidt pass where cancellation was large (|w| < |a|/sqrt 2), "twice is enough"
            redo = (w * w).sum(1) < 0.5 * norms2[lam]
            if bool(redo.any()):
                r = redo.nonzero()[:, 0]
                c2 = _project(QT[r, :, :n], Q[r, :n], w[r])
                w[r] -= torch.bmm(c2[:, None, :], Q[r, :n])[:, 0]
                c[r] += c2
            # scikit-learn's dependence test: Gram[lam, lam] - |L^-1 Gram[S, lam]|^2 <= eps
            stop |= (norms2[lam] - (c * c).sum(1)) <= eps
        else:
            c = None
            w = a
        nw = w.norm(dim=1)
        upd = alive & ~stop
        if bool(upd.all()):  # the usual case: every signal takes its atom
            q = w / nw[:, None]
            zn = (q * resid).sum(1)
        elif bool(upd.any()):  # some signals have stopped: leave their state untouched
            nw = torch.where(upd, nw, torch.zeros_like(nw))
            q = w / torch.where(upd, nw, torch.ones_like(nw))[:, None]
            q[~upd] = 0
            zn = torch.where(upd, (q * resid).sum(1), torch.zeros_like(nw))
            lam = torch.where(upd, lam, torch.full_like(lam, -1))
            if c is not None:
                c[~upd] = 0
        else:
            break
        Q[:, n] = q
        QT[:, :, n] = q
        if c is not None:
            R[:, :n, n] = c
        R[:, n, n] = nw
        idx[:, n] = lam
        z[:, n] = zn
        picked[rows[upd], lam[upd]] = True
        resid -= zn[:, None] * q
        alive = upd
    n_act = (idx >= 0).sum(1)
    # unused slots (signals that stopped early): identity on the diagonal, z = 0 -> gamma = 0 there
    eye = torch.arange(k, device=dev)
    unused = idx < 0
    R[:, eye, eye] = torch.where(unused, torch.ones_like(R[:, eye, eye]), R[:, eye, eye])
    gamma = torch.linalg.solve_triangular(R, z[:, :, None], upper=True)[:, :, 0]
    gamma = torch.where(unused, torch.zeros_like(gamma), gamma)
    return idx, gamma, n_act


def omp(dictionary, signals, n_nonzero: int, device: Optional[str | torch.device] = None,
        dtype: Optional[torch.dtype] = None, batch_size: int = 1024, progress: bool = False) -> SparseCodes:
    """Orthogonal Matching Pursuit of every signal over the dictionary's rows.

    Args:
        dictionary: [atoms, d] (numpy or torch); atoms are the rows, used as given (not normalised).
        signals: [signals, d].
        n_nonzero: atoms to pick per signal (fewer only where scikit-learn would stop early, see module doc).
        device: where to compute (default: the dictionary's device, i.e. CPU for numpy input).
        dtype: computation dtype (default: the dictionary's floating dtype; float32 for other input).
        batch_size: signals per chunk. Memory per chunk is about
            ``batch_size * (atoms + n_nonzero * (d + n_nonzero)) * itemsize``.
        progress: show a tqdm bar over chunks.

    Returns:
        ``SparseCodes`` with ``indices`` / ``coefs`` [signals, n_nonzero] in selection order.
    """
    D = torch.as_tensor(dictionary)
    X = torch.as_tensor(signals)
    if D.ndim != 2 or X.ndim != 2:
        raise ValueError(f"omp: dictionary must be [atoms, d] and signals [signals, d], got {tuple(D.shape)} "
                         f"and {tuple(X.shape)}")
    if D.shape[1] != X.shape[1]:
        raise ValueError(f"omp: dictionary atoms have dimension {D.shape[1]} but signals {X.shape[1]}")
    T = D.shape[0]
    if not 1 <= n_nonzero <= T:
        raise ValueError(f"omp: n_nonzero={n_nonzero} must be between 1 and the number of atoms ({T})")
    if dtype is None:
        dtype = D.dtype if D.is_floating_point() else torch.float32
    device = torch.device(device) if device is not None else D.device
    D = D.to(device=device, dtype=dtype).contiguous()
    norms2 = (D * D).sum(1)
    eps = float(torch.finfo(dtype).eps)
    n = X.shape[0]
    idx_all = np.full((n, n_nonzero), -1, dtype=np.int64)
    coef_all = np.zeros((n, n_nonzero), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    nact_all = np.zeros(n, dtype=np.int64)
    starts = range(0, n, max(1, batch_size))
    it = tqdm(starts, desc=f"OMP ({n_nonzero} atoms of {T})", unit="chunk") if progress and tqdm else starts
    with torch.no_grad():
        for s in it:
            e = min(n, s + batch_size)
            Xc = X[s:e].to(device=device, dtype=dtype)
            idx, gamma, n_act = _omp_chunk(D, norms2, Xc, n_nonzero, eps)
            idx_all[s:e] = idx.cpu().numpy()
            coef_all[s:e] = gamma.cpu().numpy()
            nact_all[s:e] = n_act.cpu().numpy()
    return SparseCodes(idx_all, coef_all, nact_all, T)
