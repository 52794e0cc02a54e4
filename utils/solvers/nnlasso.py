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

from utils.errors import InputError

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

# decompose.Decompose's ADMM settings in the second paper's code
DEFAULT_RHO = 5.0
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 2000


def _unit_scale(C: torch.Tensor, who: str) -> float:
    """The scale s that gives the atoms (rows of ``C`` [T, d]) unit mean squared norm: the units the solvers
    work in, where SpLiCE's rho keeps its meaning (``C / s``, ``w * s``, ``l1 / s``: the same minimiser)."""
    s = float(torch.linalg.vector_norm(C.double()) / C.shape[0] ** 0.5)
    if not s > 0:
        raise InputError(f"{who}: the dictionary is all zeros")
    return s


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
    s = _unit_scale(C, "nnlasso_admm")
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
    ``M = rho/2 I + C^T C`` [d, d] and ``y_k = v + C^T w_k``, the iteration is, exactly,

        beta_k = M^-1 (y_k - 2 C^T z_{k+1}),   w_{k+1} = z_{k+1} + C beta_k,   y_{k+1} = v + C^T z_{k+1} + C^T C beta_k

    so the state is the sparse ``z`` and two d-vectors. In the eigenbasis of ``C^T C`` (``C~ = C Q``) ``M`` is
    diagonal, and an iteration costs O(d) plus two products with the rows of ``C~`` that are *tracked*: those
    that are (or were just) non-zero and the next largest ``w``. Every other concept ``j`` provably stays at
    zero: its ``w`` is ``C~_j beta``, at most ``|C_j| |beta - beta_0|`` above its value at the ``beta_0`` where
    the tracked set was chosen. The set is re-chosen when that drift could bring one of them to the threshold,
    among ``candidates`` concepts kept from the last full evaluation of ``C~ beta`` (one [d] x [d, T] product),
    which is redone only when the drift since then could bring a non-candidate to the threshold. The primal
    residual ``|x - z|`` needs all T entries; the untracked ones are ``C~_j (beta_{k-1} - beta_{k-2})``, whose
    squared norm is ``db^T diag(eig) db`` minus the tracked part. An iteration costs O(tracked x d), not O(T x d).

    Args:
        dictionary: [atoms, d] (numpy or torch), atoms as rows (SpLiCE: unit-norm concepts).
        rho, tol, max_iter: SpLiCE's ADMM step (5), residual tolerance (1e-6) and iteration cap (2000).
        device, dtype: where and in what precision the iterations run (float32 by default; the setup is
            float64).
        tracked: concepts tracked per signal, at least (more when more are non-zero).
        candidates: concepts kept per signal from a full evaluation, at least.
        group: when a signal needs a refresh, those whose drift reached this fraction of their radius are
            refreshed with it (fewer, larger refreshes).

    As ``nnlasso_admm``, the problem is solved in units where the atoms have unit mean squared norm.
    """

    def __init__(self, dictionary, rho: float = DEFAULT_RHO, tol: float = DEFAULT_TOL,
                 max_iter: int = DEFAULT_MAX_ITER, device: Optional[str | torch.device] = None,
                 dtype: torch.dtype = torch.float32, tracked: int = 48, candidates: int = 256, group: float = 0.5):
        C = torch.as_tensor(dictionary)
        if C.ndim != 2 or C.shape[0] < 1:
            raise ValueError(f"ScreenedADMM: need a dictionary [atoms, d], got {tuple(C.shape)}")
        if rho <= 0 or max_iter < 1:
            raise ValueError(f"ScreenedADMM: rho must be > 0 and max_iter >= 1 (got {rho}, {max_iter})")
        self.device = torch.device(device) if device is not None else C.device
        self.dtype, self.rho, self.tol, self.max_iter = dtype, float(rho), float(tol), int(max_iter)
        C64 = C.to(device=self.device, dtype=torch.float64)
        self.T, self.d = C64.shape
        self.tracked = min(max(1, int(tracked)), self.T)
        self.group = float(group)
        self.candidates = min(max(2 * self.tracked, int(candidates)), self.T)
        self.scale = _unit_scale(C64, "ScreenedADMM")
        C64 = C64 / self.scale
        eig, Q = torch.linalg.eigh(C64.T @ C64)  # C^T C = Q diag(eig) Q^T
        eig = eig.clamp_min(0)
        Ct = C64 @ Q  # [T, d] the rotated atoms (same norms, same inner products)
        self.cmax = float(torch.linalg.vector_norm(Ct, dim=1).max()) * (1 + 1e-4)  # a little slack for rounding
        pad = torch.zeros(1, self.d, dtype=torch.float64, device=self.device)
        self.Ct = torch.cat([Ct, pad]).to(dtype)  # [T + 1, d]; row T pads the index sets (a zero atom)
        self.Q = Q.to(dtype)
        self.eig = eig.to(dtype)
        self.inv_den = (1 / (rho / 2 + eig)).to(dtype)  # diag(M)^-1 in the eigenbasis

    @torch.no_grad()
    def fit(self, signals, l1_penalty: float, batch_size: int = 64, progress: bool = False,
            return_iters: bool = False, as_numpy: bool = True):
        """Codes [n, atoms] (numpy; with ``as_numpy=False`` a float tensor on ``self.device``) of ``signals``
        [n, d] for penalty ``l1_penalty``.

        ``batch_size`` signals are iterated together; a finished signal's place is taken by the next one. With
        ``return_iters`` also the iterations of each signal ([n] int64; ``max_iter`` where it did not converge).
        """
        V = torch.as_tensor(signals)
        if V.ndim != 2 or V.shape[1] != self.d:
            raise ValueError(f"ScreenedADMM.fit: need signals [n, {self.d}], got {tuple(V.shape)}")
        if l1_penalty < 0:
            raise ValueError(f"ScreenedADMM.fit: l1_penalty must be >= 0 (got {l1_penalty})")
        V = V.to(device=self.device, dtype=self.dtype)
        n, T = V.shape[0], self.T
        out = torch.zeros(n, T, device=self.device, dtype=self.dtype)
        iters = torch.full((n,), self.max_iter, device=self.device, dtype=torch.long)
        bar = tqdm(total=n, desc=f"non-negative lasso (ADMM, {T} atoms)", unit="signal") \
            if progress and tqdm and n else None
        st = _BlockState(self, l1_penalty / self.scale / self.rho)
        queue = 0
        tol2, dual_tol = self.tol ** 2, self.tol / self.rho
        eig, inv_den, thr = self.eig, self.inv_den, st.thr
        k = 0
        while True:
            if st.size == 0 or 4 * st.n_done >= st.size:  # drop the finished signals, take in the next ones
                st.drop_done()
                if queue < n and st.size < batch_size:
                    take = min(n - queue, batch_size - st.size)
                    st.add(V[queue:queue + take], torch.arange(queue, queue + take, device=self.device), k)
                    queue += take
                if st.size == 0:
                    break
            st.screen()
            w, z = st.w, st.z
            z_new = torch.clamp_min(w - thr, 0)  # z_{k+1}
            s = torch.bmm(z_new.unsqueeze(1), st.CS).squeeze(1)  # C~^T z_{k+1}  [a, d]
            beta_new = torch.add(st.y, s, alpha=-2).mul_(inv_den)  # beta_k
            st.y = torch.addcmul(s, eig, beta_new).add_(st.vt)  # y_{k+1}
            w_new = torch.baddbmm(z_new.unsqueeze(1), beta_new.unsqueeze(1), st.CS.transpose(1, 2)).squeeze(1)
            # SpLiCE's stopping test for iteration k: rho |z_{k+1} - z_k| and |x_{k+1} - z_{k+1}| below tol
            dz = z_new - z
            maybe = (torch.linalg.vector_norm(dz, dim=1) < dual_tol).logical_and_(st.live)
            last = k - st.k0_min >= self.max_iter - 1
            if last or bool(maybe.any()):
                # x_{k+1} - z_{k+1} is e on the tracked concepts and C~_j (beta_{k-1} - beta_{k-2}) on the
                # others; with cd that on the tracked ones, |x - z|^2 = db^T diag(eig) db + |e|^2 - |cd|^2
                dw = w - st.w_old
                e = dw - dz
                cd = dw - z + st.z_old
                db = st.beta - st.beta_prev
                conv = maybe & ((db * db) @ eig + ((e - cd) * (e + cd)).sum(1) < tol2)
                if last:
                    conv |= (k - st.k0 >= self.max_iter - 1) & st.live
                if bool(conv.any()):
                    c = conv.nonzero()[:, 0]
                    rows = st.rows[c]
                    out[rows] = torch.zeros(len(c), T + 1, device=self.device, dtype=self.dtype).scatter_(
                        1, st.idx[c], z_new[c])[:, :T]
                    iters[rows] = k - st.k0[c] + 1
                    st.finish(c)
                    if bar is not None:
                        bar.update(len(c))
            st.w_old, st.w, st.z_old, st.z = w, w_new, z, z_new
            st.beta_prev, st.beta = st.beta, beta_new
            k += 1
        if bar is not None:
            bar.close()
        out = out / self.scale
        if as_numpy:
            out, iters = out.cpu().numpy(), iters.cpu().numpy()
        return (out, iters) if return_iters else out


class _BlockState:
    """The signals ``ScreenedADMM.fit`` is iterating (finished ones are dropped in bulk, new ones added).

    Per signal: beta = beta_{k-1}, beta_prev = beta_{k-2}, y = y_k (d-vectors, eigenbasis); w, w_old, z, z_old
    = w_k, w_{k-1}, z_k, z_{k-1} on the tracked concepts ``idx`` [a, m], whose rows of C~ are ``CS`` [a, m, d];
    ``cand`` [a, M] the candidates; ``k0`` the loop step the signal started at. Screening radii are divided by
    ``cmax``: the candidates are re-evaluated when |beta - beta_F| reaches ``far``, the tracked set re-chosen
    when |beta - beta_P| reaches ``near`` (kept <= far - |beta_P - beta_F|, so one test covers both).
    """

    REFRESH_ROWS = 256  # signals refreshed at once (bounds the [rows, T] and [rows, M, d] temporaries)
    ROW_KEYS = ("rows", "k0", "vt", "y", "beta", "beta_prev", "beta_F", "beta_P", "far", "near", "live", "cand",
                "idx", "CS", "w", "w_old", "z", "z_old")

    def __init__(self, solver: ScreenedADMM, thr: float):
        self.sol, self.thr = solver, thr
        d, dev, dt = solver.d, solver.device, solver.dtype
        self.m, self.M = solver.tracked, solver.candidates
        self.n_done = 0
        self.k0_min = 0
        self.rows = torch.zeros(0, device=dev, dtype=torch.long)
        self.k0 = torch.zeros(0, device=dev, dtype=torch.long)
        for key in ("vt", "y", "beta", "beta_prev", "beta_F", "beta_P"):
            setattr(self, key, torch.zeros(0, d, device=dev, dtype=dt))
        self.far, self.near = (torch.zeros(0, device=dev, dtype=dt) for _ in range(2))
        self.live = torch.zeros(0, device=dev, dtype=torch.bool)
        self.cand = torch.zeros(0, self.M, device=dev, dtype=torch.long)
        self.idx = torch.zeros(0, self.m, device=dev, dtype=torch.long)
        self.CS = torch.zeros(0, self.m, d, device=dev, dtype=dt)
        for key in ("w", "w_old", "z", "z_old"):
            setattr(self, key, torch.zeros(0, self.m, device=dev, dtype=dt))

    @property
    def size(self) -> int:
        return len(self.rows)

    def add(self, v: torch.Tensor, rows: torch.Tensor, k: int) -> None:
        """Start signals ``v`` [b, d] (output rows ``rows``) at loop step ``k``: z_0 = u_0 = 0."""
        sol, T, b = self.sol, self.sol.T, v.shape[0]
        vt = v @ sol.Q
        beta = vt * sol.inv_den  # beta_{-1}: w_0 = C M^-1 v
        new = {"rows": rows, "k0": torch.full((b,), k, device=sol.device, dtype=torch.long), "vt": vt,
               "y": vt + sol.eig * beta, "beta": beta, "beta_prev": torch.zeros_like(beta),  # beta_{-2}: w_{-1} = 0
               "beta_F": torch.full_like(beta, float("inf")), "beta_P": torch.full_like(beta, float("inf")),
               "far": vt.new_zeros(b), "near": vt.new_zeros(b),
               "live": torch.ones(b, device=sol.device, dtype=torch.bool),
               "cand": torch.full((b, self.M), T, device=sol.device, dtype=torch.long),
               "idx": torch.full((b, self.m), T, device=sol.device, dtype=torch.long),
               "CS": vt.new_zeros(b, self.m, sol.d)}
        for key in ("w", "w_old", "z", "z_old"):
            new[key] = vt.new_zeros(b, self.m)
        for key in self.ROW_KEYS:
            setattr(self, key, torch.cat([getattr(self, key), new[key]]))
        self.k0_min = int(self.k0.min())

    def finish(self, c: torch.Tensor) -> None:
        """Mark signals ``c`` done (they stay until dropped, never re-screened)."""
        self.live[c] = False
        self.near[c] = float("inf")
        self.n_done += len(c)

    def drop_done(self) -> None:
        keep = self.live.nonzero()[:, 0]
        for key in self.ROW_KEYS:
            setattr(self, key, getattr(self, key)[keep])
        self.n_done = 0
        self.k0_min = int(self.k0.min()) if len(keep) else 0

    def screen(self) -> None:
        """Re-choose the tracked concepts (re-evaluating the candidates first where needed) of the signals whose
        ``beta`` moved so far that an untracked concept could reach the threshold."""
        d_near = torch.linalg.vector_norm(self.beta - self.beta_P, dim=1)
        need = d_near >= self.near
        if not bool(need.any()):
            return
        live = self.live
        g = self.sol.group
        d_far = torch.linalg.vector_norm(self.beta - self.beta_F, dim=1)
        if bool((need & (d_far >= self.far)).any()):  # with those halfway there, so that refreshes come in groups
            for sel in ((d_far >= g * self.far) & live).nonzero()[:, 0].split(self.REFRESH_ROWS):
                self._evaluate_all(sel)
        for sel in ((d_near >= g * self.near) & live).nonzero()[:, 0].split(self.REFRESH_ROWS):
            self._choose_tracked(sel)

    def _dense(self, values: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """[len(sel), T + 1] from values on the tracked concepts."""
        return values.new_zeros(len(sel), self.sol.T + 1).scatter_(1, self.idx[sel], values[sel])

    def _evaluate_all(self, sel: torch.Tensor) -> None:
        """Evaluate ``w`` on every concept for signals ``sel``: their candidates and far radius."""
        sol, T = self.sol, self.sol.T
        z, z_old = self._dense(self.z, sel)[:, :T], self._dense(self.z_old, sel)[:, :T]
        w = z + self.beta[sel] @ sol.Ct[:T].T  # w_k = z_k + C~ beta_{k-1}
        forced = (z > 0) | (z_old > 0) | (w > self.thr)  # non-zero at k-1, k or k+1
        need = int(forced.sum(1).max())
        if 2 * need + 16 > self.M and self.M < T:  # widen every candidate set (padding: index T, a zero atom)
            grow = min(T, max(2 * self.M, 2 * need + 32)) - self.M
            self.cand = torch.cat([self.cand, self.cand.new_full((self.size, grow), T)], 1)
            self.M += grow
        if self.M < T:
            top = torch.topk(w.masked_fill(forced, float("inf")), self.M + 1, dim=1).indices
            self.cand[sel] = top[:, :self.M]
            self.far[sel] = (self.thr - w.gather(1, top[:, self.M:]).squeeze(1)) / sol.cmax
        else:
            self.cand[sel] = torch.arange(T, device=sol.device).expand(len(sel), -1)
            self.far[sel] = float("inf")
        self.beta_F[sel] = self.beta[sel]

    def _choose_tracked(self, sel: torch.Tensor) -> None:
        """Re-choose the tracked concepts of signals ``sel`` among their candidates, at the current beta."""
        sol, T = self.sol, self.sol.T
        cand = self.cand[sel]
        z_c = self._dense(self.z, sel).gather(1, cand)  # the tracked concepts are candidates; the rest are 0
        z_old_c = self._dense(self.z_old, sel).gather(1, cand)
        rows_c = sol.Ct[cand]  # [p, M, d]
        w_c = z_c + torch.bmm(self.beta[sel].unsqueeze(1), rows_c.transpose(1, 2)).squeeze(1)
        forced = (z_c > 0) | (z_old_c > 0) | (w_c > self.thr)
        need = int(forced.sum(1).max())
        if need + 8 > self.m and self.m < self.M:  # widen every tracked set
            grow = min(self.M, need + 16) - self.m
            for key in ("w", "w_old", "z", "z_old"):
                setattr(self, key, torch.cat([getattr(self, key), getattr(self, key).new_zeros(self.size, grow)], 1))
            self.idx = torch.cat([self.idx, self.idx.new_full((self.size, grow), T)], 1)
            self.CS = torch.cat([self.CS, self.CS.new_zeros(self.size, grow, sol.d)], 1)
            self.m += grow
        m = self.m
        if m < cand.shape[1]:
            top = torch.topk(w_c.masked_fill(forced, float("inf")), m + 1, dim=1).indices
            pos = top[:, :m]
            near = (self.thr - w_c.gather(1, top[:, m:]).squeeze(1)) / sol.cmax
        else:
            pos = torch.arange(m, device=sol.device).expand(len(sel), -1)
            near = torch.full((len(sel),), float("inf"), device=sol.device, dtype=sol.dtype)
        # one test for both radii: |beta - beta_P| < near implies |beta - beta_F| < far
        far_left = self.far[sel] - torch.linalg.vector_norm(self.beta[sel] - self.beta_F[sel], dim=1)
        self.near[sel] = torch.minimum(near, far_left)
        CS = rows_c.gather(1, pos.unsqueeze(2).expand(-1, -1, sol.d))
        z_old = z_old_c.gather(1, pos)
        self.idx[sel], self.CS[sel] = cand.gather(1, pos), CS
        self.w[sel], self.z[sel], self.z_old[sel] = w_c.gather(1, pos), z_c.gather(1, pos), z_old
        self.w_old[sel] = z_old + torch.bmm(self.beta_prev[sel].unsqueeze(1), CS.transpose(1, 2)).squeeze(1)
        self.beta_P[sel] = self.beta[sel]
