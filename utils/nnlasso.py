"""SpLiCE's non-negative lasso, solved by ADMM, in torch (CPU or GPU), many signals at once.

For every signal ``v`` [d] and a dictionary ``C`` [atoms, d] (atoms = rows) it solves

    min_w  || v - w C ||^2  +  l1_penalty * sum(w)      subject to  w >= 0        (w [atoms])

with the iterations of SpLiCE (Bhalla et al. 2024, "Interpreting CLIP with Sparse Linear Concept
Embeddings"), which the second paper's code adopted (``decompose.ADMM``): split ``w = x = z``,

    x <- (2 C C^T + rho I)^-1 (2 C v + rho (z - u))
    z <- max(x + u - l1_penalty / rho, 0)
    u <- u + x - z

from a seeded standard-normal start of x, z and u, until the primal residual ``|x - z|`` and the dual
residual ``rho |z - z_old|`` of every signal are below ``tol`` (or ``max_iter``). The result is ``z``
(exactly sparse and non-negative).

Units. SpLiCE's concepts are unit vectors, and its ``rho = 5`` is tuned for that; the second paper's
dictionary is scaled by 100 (atoms of norm ~10-100), where the same rho makes ADMM crawl. So the problem is
solved in units where the atoms have unit mean squared norm: with ``s = |C|_F / sqrt(atoms)``, ADMM runs on
``C / s`` with penalty ``l1_penalty / s`` and returns ``z / s``. That is the same minimiser (for unit-norm
atoms, ``s = 1`` and these are exactly SpLiCE's iterates); ``tol`` is in those units.

SpLiCE factors the ``[atoms, atoms]`` matrix ``2 C C^T + rho I`` by Cholesky (30,000 atoms: 3.6 GB and a
30,000^3 factorisation). Here the x-update uses the Woodbury identity instead,

    (rho I + 2 C C^T)^-1 = (I - C (rho/2 I_d + C^T C)^-1 C^T) / rho,

which only needs the ``[d, d]`` matrix ``rho/2 I + C^T C`` (factored once, in float64): two
``[signals, atoms] x [atoms, d]``-sized products per iteration and no ``[atoms, atoms]`` matrix. The iterates
are the same (up to float rounding).

Note on scales: scikit-learn's ``Lasso`` minimises ``|v - X w|^2 / (2 n_samples) + alpha |w|_1`` with
``X = C^T`` and ``n_samples = d``; it has the same minimiser as this objective with
``l1_penalty = 2 * d * alpha``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from utils.cli import InputError

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

# decompose.Decompose's ADMM settings in the second paper's code
DEFAULT_RHO = 5.0
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 2000


def nnlasso_admm(dictionary, signals, l1_penalty: float, rho: float = DEFAULT_RHO, tol: float = DEFAULT_TOL,
                 max_iter: int = DEFAULT_MAX_ITER, seed: int = 0, device: Optional[str | torch.device] = None,
                 dtype: Optional[torch.dtype] = None, batch_size: int = 1024, progress: bool = False,
                 return_iters: bool = False):
    """Non-negative lasso codes of ``signals`` [n, d] over ``dictionary`` [atoms, d] by ADMM.

    Args:
        dictionary: [atoms, d] (numpy or torch), the atoms as rows.
        signals: [n, d].
        l1_penalty: weight of ``sum(w)`` in the objective above (SpLiCE's ``l1_penalty``).
        rho, tol, max_iter: ADMM step, stopping tolerance (on every signal's primal and dual residual norms)
            and iteration cap; defaults are those of the second paper's ``decompose.py``.
        seed: seeds the standard-normal start of x, z, u (drawn on the CPU, so the start does not depend on
            the device). Chunks draw from one generator in order, so results depend on (seed, batch_size).
        device, dtype: where and in what precision to compute (default: the dictionary's; float32 for numpy
            float32 input).
        batch_size: signals solved together; each chunk stops when all its signals have converged.
        return_iters: also return the number of iterations each chunk ran.

    Returns:
        codes [n, atoms] as a numpy array (non-negative, mostly zeros); with ``return_iters`` also a list of
        iteration counts per chunk.
    """
    C = torch.as_tensor(dictionary)
    V = torch.as_tensor(signals)
    if C.ndim != 2 or V.ndim != 2 or C.shape[1] != V.shape[1]:
        raise ValueError(f"nnlasso_admm: need dictionary [atoms, d] and signals [n, d], got {tuple(C.shape)} "
                         f"and {tuple(V.shape)}")
    if l1_penalty < 0 or rho <= 0:
        raise ValueError(f"nnlasso_admm: l1_penalty must be >= 0 and rho > 0 (got {l1_penalty}, {rho})")
    if dtype is None:
        dtype = C.dtype if C.is_floating_point() else torch.float32
    device = torch.device(device) if device is not None else C.device
    C = C.to(device=device, dtype=dtype).contiguous()
    T, d = C.shape
    # Solve in units where the atoms have unit mean squared norm (SpLiCE's setting: unit-norm concepts), so
    # that rho keeps its meaning for any dictionary scale: C' = C / s, w' = s w, l1' = l1 / s (same minimiser).
    s = float(torch.linalg.vector_norm(C.double()) / T ** 0.5)
    if not s > 0:
        raise InputError("nnlasso_admm: the dictionary is all zeros")
    C = C / s
    thr = l1_penalty / s / rho
    # Woodbury: x = (r - (r C) M^-1 C^T) / rho with r = 2 v C^T + rho (z - u), M = rho/2 I + C^T C [d, d].
    # With B = M^-1 C^T / rho: x = x0 + (z - u) - rho ((z - u) C) B, x0 = 2 (v C^T / rho - (v C^T C) B).
    C64 = C.double()
    M = C64.T @ C64 + (rho / 2) * torch.eye(d, device=device, dtype=torch.float64)
    B64 = torch.cholesky_solve(C64.T, torch.linalg.cholesky(M)) / rho  # [d, T]
    B = B64.to(dtype)
    rhoB = (rho * B64).to(dtype)
    G = (C64.T @ C64).to(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    n = V.shape[0]
    out = np.zeros((n, T), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    iters = []
    starts = range(0, n, max(1, batch_size))
    bar = tqdm(starts, desc=f"non-negative lasso (ADMM, {T} atoms)", unit="chunk") if progress and tqdm \
        else starts
    with torch.no_grad():
        for st in bar:
            e = min(n, st + batch_size)
            v = V[st:e].to(device=device, dtype=dtype)
            b = e - st
            # SpLiCE's random start (x is overwritten by the first update, but drawn to keep its stream)
            x, z, u = (torch.randn(b, T, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
            x0 = 2 * ((v @ C.T) / rho - (v @ G) @ B)  # [b, T], the constant part of the x-update
            ix = 0
            for ix in range(max_iter):
                zu = z - u
                x = x0 + zu - (zu @ C) @ rhoB
                z_old = z
                z = torch.clamp_min(x + u - thr, 0)
                u = u + x - z
                res_prim = torch.linalg.vector_norm(x - z, dim=1)
                res_dual = rho * torch.linalg.vector_norm(z - z_old, dim=1)
                if bool((res_prim.max() < tol) & (res_dual.max() < tol)):
                    break
            iters.append(ix + 1)
            out[st:e] = (z / s).cpu().numpy()
    return (out, iters) if return_iters else out


# ----------------------------------------------------------------------------- zero start, per-signal stop
class ScreenedADMM:
    """SpLiCE's ADMM iterates from a zero start, many signals at once, each stopping on its own residuals.

    The iterates are exactly those of the loop in the module docstring started from ``x = z = u = 0`` (not
    SpLiCE's random start; the minimiser is the same), and each signal stops at the first iteration where its
    own primal and dual residuals are both below ``tol`` (SpLiCE stops a batch when all of them are). The
    result is that iteration's ``z``. What changes is the cost of an iteration.

    Write ``w_k = x_{k+1} + u_k`` (the input of the shrinkage, ``z_{k+1} = max(w_k - l1/rho, 0)``). With
    ``M = rho/2 I + C^T C`` [d, d], the iteration is, exactly,

        w_{k+1} = z_{k+1} + C beta_k,   beta_k = M^-1 (v - 2 C^T z_{k+1} + r_k),   r_{k+1} = C^T z_{k+1} + C^T C beta_k

    so the state is the sparse ``z`` and two d-vectors. In the eigenbasis of ``C^T C`` (``C~ = C Q``) ``M`` is
    diagonal, and an iteration costs O(d) plus two products with the rows of ``C~`` that are *tracked*:
    those that are (or were just) non-zero and the next ``tracked`` largest ``w``. Every other concept ``j``
    provably stays at zero: its ``w`` is ``C~_j beta``, at most ``|C_j| |beta - beta_R|`` above its value when
    the tracked set was chosen (at ``beta_R``), so the set is re-chosen (one [d] x [d, T] product) only when
    that drift could bring one of them to the threshold. The primal residual ``|x - z|`` needs all T entries;
    the untracked ones are ``C~_j (beta_{k-1} - beta_{k-2})``, whose squared norm is
    ``db^T diag(eig) db`` minus the tracked part. Cost per iteration: O(tracked x d) instead of O(T x d).

    Args:
        dictionary: [atoms, d] (numpy or torch), atoms as rows (SpLiCE: unit-norm concepts).
        rho, tol, max_iter: SpLiCE's ADMM step (5), residual tolerance (1e-6) and iteration cap (2000).
        device, dtype: where and in what precision the iterations run (float32 by default; the setup is
            float64).
        tracked: concepts tracked per signal beyond the non-zero ones, at least (more when needed).

    As ``nnlasso_admm``, the problem is solved in units where the atoms have unit mean squared norm.
    """

    def __init__(self, dictionary, rho: float = DEFAULT_RHO, tol: float = DEFAULT_TOL,
                 max_iter: int = DEFAULT_MAX_ITER, device: Optional[str | torch.device] = None,
                 dtype: torch.dtype = torch.float32, tracked: int = 48):
        C = torch.as_tensor(dictionary)
        if C.ndim != 2 or C.shape[0] < 1:
            raise ValueError(f"ScreenedADMM: need a dictionary [atoms, d], got {tuple(C.shape)}")
        if rho <= 0 or max_iter < 1:
            raise ValueError(f"ScreenedADMM: rho must be > 0 and max_iter >= 1 (got {rho}, {max_iter})")
        self.device = torch.device(device) if device is not None else C.device
        self.dtype, self.rho, self.tol, self.max_iter, self.tracked = dtype, float(rho), float(tol), int(max_iter), \
            int(tracked)
        C64 = C.to(device=self.device, dtype=torch.float64)
        self.T, self.d = C64.shape
        self.scale = float(torch.linalg.vector_norm(C64) / self.T ** 0.5)
        if not self.scale > 0:
            raise InputError("ScreenedADMM: the dictionary is all zeros")
        C64 = C64 / self.scale
        eig, Q = torch.linalg.eigh(C64.T @ C64)  # C^T C = Q diag(eig) Q^T
        eig = eig.clamp_min(0)
        Ct = C64 @ Q  # [T, d] the rotated atoms (same norms, same inner products)
        self.cmax = float(torch.linalg.vector_norm(Ct, dim=1).max())
        pad = torch.zeros(1, self.d, dtype=torch.float64, device=self.device)
        self.Ct = torch.cat([Ct, pad]).to(dtype)  # [T + 1, d]; row T is the padding of the tracked sets
        self.Q = Q.to(dtype)
        self.eig = eig.to(dtype)
        self.den = (rho / 2 + eig).to(dtype)  # diag(M) in the eigenbasis

    @torch.no_grad()
    def fit(self, signals, l1_penalty: float, batch_size: int = 256, progress: bool = False,
            return_iters: bool = False):
        """Codes [n, atoms] (numpy, float32 or the chosen dtype) of ``signals`` [n, d] for penalty ``l1_penalty``.

        With ``return_iters`` also the number of iterations of each signal ([n] numpy int64; ``max_iter`` where
        it did not converge).
        """
        V = torch.as_tensor(signals)
        if V.ndim != 2 or V.shape[1] != self.d:
            raise ValueError(f"ScreenedADMM.fit: need signals [n, {self.d}], got {tuple(V.shape)}")
        if l1_penalty < 0:
            raise ValueError(f"ScreenedADMM.fit: l1_penalty must be >= 0 (got {l1_penalty})")
        thr = l1_penalty / self.scale / self.rho
        n = V.shape[0]
        out = np.zeros((n, self.T), dtype=torch.empty(0, dtype=self.dtype).numpy().dtype)
        iters = np.zeros(n, dtype=np.int64)
        starts = range(0, n, max(1, batch_size))
        bar = tqdm(starts, desc=f"non-negative lasso (ADMM, {self.T} atoms)", unit="chunk") if progress and tqdm \
            else starts
        for st in bar:
            e = min(n, st + batch_size)
            z, it = self._solve(V[st:e].to(device=self.device, dtype=self.dtype), thr)
            out[st:e] = (z / self.scale).cpu().numpy()
            iters[st:e] = it.cpu().numpy()
        return (out, iters) if return_iters else out

    def _solve(self, v: torch.Tensor, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk: signals [a, d] -> (z [a, T], iterations [a])."""
        T, d, dev, dt = self.T, self.d, self.device, self.dtype
        a = v.shape[0]
        eig, den, Ct = self.eig, self.den, self.Ct
        m = min(max(1, self.tracked), T)
        out = torch.zeros(a, T, device=dev, dtype=dt)
        iters = torch.full((a,), self.max_iter, device=dev, dtype=torch.long)
        S = {  # per live signal; beta = beta_{k-1}, beta_prev = beta_{k-2}, r = r_k, w = w_k, z = z_k (tracked)
            "rows": torch.arange(a, device=dev),
            "vt": v @ self.Q,
            "idx": torch.full((a, m), T, device=dev, dtype=torch.long),
            "CS": torch.zeros(a, m, d, device=dev, dtype=dt),
            "margin": torch.zeros(a, device=dev, dtype=dt),
            "done": torch.zeros(a, device=dev, dtype=torch.bool),
        }
        S["beta"] = S["vt"] / den  # beta_{-1}: w_0 = C M^-1 v
        S["beta_prev"] = torch.zeros_like(S["beta"])  # beta_{-2}: w_{-1} = 0
        S["r"] = eig * S["beta"]
        S["beta_R"] = torch.full_like(S["beta"], float("inf"))  # forces the first choice of the tracked sets
        for key in ("w", "w_old", "z", "z_old"):
            S[key] = torch.zeros(a, m, device=dev, dtype=dt)
        for k in range(self.max_iter):
            drift = self.cmax * torch.linalg.vector_norm(S["beta"] - S["beta_R"], dim=1)
            need = ~(drift < S["margin"]) & ~S["done"]
            if bool(need.any()):
                m = self._choose_tracked(S, need.nonzero()[:, 0], thr, m)
            w, z, CS = S["w"], S["z"], S["CS"]
            z_new = torch.clamp_min(w - thr, 0)  # z_{k+1}
            s = torch.bmm(z_new.unsqueeze(1), CS).squeeze(1)  # C~^T z_{k+1}  [a, d]
            beta_new = (S["vt"] + S["r"] - 2 * s) / den
            S["r"] = s + eig * beta_new
            # residuals of iteration k: x_{k+1} - z_{k+1} = (w_k - w_{k-1}) + (z_k - z_{k+1})
            dw = w - S["w_old"]
            e = dw + z - z_new
            cd = dw - z + S["z_old"]  # C~_j (beta_{k-1} - beta_{k-2}) on the tracked concepts
            db = S["beta"] - S["beta_prev"]
            hidden = ((db * db * eig).sum(1) - (cd * cd).sum(1)).clamp_min(0)  # the same, untracked
            prim2 = (e * e).sum(1) + hidden
            dual = self.rho * torch.linalg.vector_norm(z_new - z, dim=1)
            S["w_old"], S["w"] = w, z_new + torch.bmm(CS, beta_new.unsqueeze(2)).squeeze(2)
            S["z_old"], S["z"] = z, z_new
            S["beta_prev"], S["beta"] = S["beta"], beta_new
            conv = (prim2 < self.tol ** 2) & (dual < self.tol) & ~S["done"]
            if k == self.max_iter - 1:
                conv = ~S["done"]
            if bool(conv.any()):
                c = conv.nonzero()[:, 0]
                rows = S["rows"][c]
                full = torch.zeros(len(c), T + 1, device=dev, dtype=dt).scatter_(1, S["idx"][c], z_new[c])
                out[rows] = full[:, :T]
                iters[rows] = k + 1
                S["done"] = S["done"] | conv
                n_done = int(S["done"].sum())
                if n_done == len(S["done"]):
                    break
                if 4 * n_done >= len(S["done"]):  # drop the finished signals
                    keep = (~S["done"]).nonzero()[:, 0]
                    for key in S:
                        S[key] = S[key][keep]
        return out, iters

    def _choose_tracked(self, S: dict, sel: torch.Tensor, thr: float, m: int) -> int:
        """Re-choose the tracked concepts of the signals ``sel`` at their current ``beta``; returns the width."""
        T, dev, dt, Ct = self.T, self.device, self.dtype, self.Ct
        n = len(sel)

        def dense(key):  # [n, T] from the tracked values
            return torch.zeros(n, T + 1, device=dev, dtype=dt).scatter_(1, S["idx"][sel], S[key][sel])[:, :T]

        z, z_old = dense("z"), dense("z_old")
        w = z + S["beta"][sel] @ Ct[:T].T  # w_k = z_k + C~ beta_{k-1}, every concept
        forced = (z > 0) | (z_old > 0) | (w > thr)  # non-zero at k-1, k or k+1: always tracked
        need = int(forced.sum(1).max())
        if need + 8 > m and m < T:  # widen every tracked set (padding: index T, a zero atom)
            grow = min(T, max(2 * m, need + 16)) - m
            for key in ("w", "w_old", "z", "z_old"):
                S[key] = torch.cat([S[key], S[key].new_zeros(len(S[key]), grow)], 1)
            S["idx"] = torch.cat([S["idx"], S["idx"].new_full((len(S["idx"]), grow), T)], 1)
            S["CS"] = torch.cat([S["CS"], S["CS"].new_zeros(len(S["CS"]), grow, self.d)], 1)
            m += grow
        score = w.masked_fill(forced, float("inf"))
        if m < T:
            top = torch.topk(score, m + 1, dim=1).indices
            idx = top[:, :m]
            S["margin"][sel] = thr - w.gather(1, top[:, m:]).squeeze(1)  # the largest untracked w is this far
        else:
            idx = torch.arange(T, device=dev).expand(n, T)
            S["margin"][sel] = float("inf")
        CS = Ct[idx]
        S["idx"][sel], S["CS"][sel] = idx, CS
        S["w"][sel], S["z"][sel], S["z_old"][sel] = w.gather(1, idx), z.gather(1, idx), z_old.gather(1, idx)
        S["w_old"][sel] = S["z_old"][sel] + torch.bmm(CS, S["beta_prev"][sel].unsqueeze(2)).squeeze(2)
        S["beta_R"][sel] = S["beta"][sel]
        return m
