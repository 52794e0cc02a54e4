"""SpLiCE's non-negative lasso solved exactly by a working-set active-set method, many signals at once (torch,
CPU or GPU).

For every signal ``y`` [d] and a dictionary ``C`` [T, d] (atoms = rows) it solves the problem of
``utils.solvers.nnlasso``,

    min_w  || y - w C ||^2  +  l1_penalty * sum(w)      subject to  w >= 0,

written as ``min 1/2 |y - C^T w|^2 + lam sum(w)`` with ``lam = l1_penalty / 2``. With ``w >= 0`` the l1 term is
linear, and the solutions are very sparse (SpLiCE: 5-30 non-zeros out of 10,000), so:

1. Correlations of all atoms with the residual ``r = y - C^T w`` (one GEMM for the whole batch) give the KKT
   condition: ``w`` is optimal iff ``c_j = C_j . r <= lam`` for every atom, with equality where ``w_j > 0``.
   Each signal starts with a working set ``W`` of its ``initial`` largest violators (``c_j > lam``).
2. On ``W`` the problem is a small non-negative QP, ``min 1/2 w^T G w - q^T w`` with ``G = C_W C_W^T`` and
   ``q = C_W y - lam``, solved exactly in float64 by Lawson-Hanson: add the atom of largest gradient ``q - G w``,
   solve on the passive set (Cholesky), step back to feasibility, drop the atoms that reach 0; warm-started from
   the previous round.
   ``small_solves`` picks how: ``numba`` (the CPU's default) solves the signals one by one in compiled loops
   (``utils.solvers._active_set_cpu``), the factor growing by one row per entering atom; ``torch`` (the GPU's)
   batches the steps over the signals (``_lawson_hanson``), each on its own passive set gathered into a small
   [signals, p, p] system, so that a step is a few dozen torch calls for all of them (and, to need fewer steps,
   it adds every atom with a positive gradient at once while that works).
3. For the signals not yet finished, one GEMM of the residuals against all atoms: a signal is finished when no
   atom outside ``W`` has ``c_j > lam + tol``; otherwise its ``grow`` worst violators join ``W`` (whose atoms at
   0 leave it: the next check watches them like any other) and the QP is solved again. On CLIP-like problems it
   takes 3-6 such checks.
4. That GEMM may run in float32 (``screen_dtype``) only with a rounding bound: ``|c32_j - c_j| <= e_j``, with
   ``e_j = 1.01 (2 u_in + d u_acc) |r| |C_j|`` (``u_in``: the unit roundoff of the inputs as the GEMM sees them,
   2^-11 for TF32 on CUDA; ``u_acc`` that of its float32 sums; the bound holds for any order of summation).
   Atoms with ``c32 + e <= lam + tol`` are certified inactive, those with ``c32 - e > lam + tol`` are violators,
   and the band between is recomputed in float64. A signal is never declared finished from a float32 product
   without that bound. On the CPU this GEMM goes through numpy's BLAS (faster than torch's where we timed it).

The result is exact: every certified signal's weights satisfy the KKT conditions to ``tol`` (the stationarity on
the support to float64 rounding, ~1e-15), unlike an iterative solver stopped at a tolerance. ``ActiveSetReport``
says which signals are certified; a signal whose working set reached ``max_working`` atoms, that used
``max_rounds`` rounds, or whose QP met a degenerate atom it had to refuse (see below) is reported uncertified,
with the best weights found.

Degenerate cases. Exact duplicate atoms make the minimiser non-unique (scikit-learn splits the weight between
twins, this method gives it to one; the objective is the same): a twin never needs to enter, since its gradient
is its twin's, 0. An entering atom that makes the passive Gram matrix numerically singular (a Cholesky pivot
below ``PIVOT`` of its diagonal; more atoms than dimensions) lies in the span of the passive atoms: it is swapped
in along the direction that keeps ``C^T w`` fixed, on which the objective falls linearly, until the first passive
weight reaches 0 and leaves. An atom whose new weight comes out <= 0 from rounding (it would cycle), or that
nothing can make room for, is refused for the rest of that QP.

Units. As ``utils.solvers.nnlasso``, the problem is solved in units where the atoms have unit mean squared norm
(``C / s``, ``w * s``, ``l1 / s``: the same minimiser; ``s = 1`` for SpLiCE's unit-norm concepts), and ``tol``
and the reported KKT residuals are in those units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from utils.errors import InputError
from utils.solvers import _active_set_cpu as _cpu
from utils.solvers.nnlasso import _unit_scale

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

PIVOT = 1e-12  # a Cholesky pivot below this fraction of its atom's squared norm: the passive set is singular


@dataclass
class ActiveSetReport:
    """Per signal [n]: ``certified`` (the KKT conditions hold to ``tol``), ``kkt`` (an upper bound on the KKT
    residual: ``max(c_j - lam)_+`` off the support, ``|c_j - lam|`` on it), ``rounds`` (correlation GEMMs) and
    ``working`` (the final working-set size)."""
    certified: np.ndarray
    kkt: np.ndarray
    rounds: np.ndarray
    working: np.ndarray

    @property
    def uncertified(self) -> np.ndarray:
        """Indices of the signals that are not certified optimal."""
        return np.nonzero(~self.certified)[0]


def gemm_roundoff(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(unit roundoff of the inputs as a ``dtype`` matmul on ``device`` sees them, that of its sums) under the
    current torch settings: CUDA float32 matmuls may run in TF32 (10-bit mantissa) or bfloat16 internally."""
    u = float(torch.finfo(dtype).eps) / 2
    if dtype == torch.float32 and device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            return 2.0 ** -8, u
        if precision == "high" or torch.backends.cuda.matmul.allow_tf32:
            return 2.0 ** -11, u
    return u, u


class ActiveSetLasso:
    """The exact non-negative lasso of many signals over one dictionary (see the module docstring).

    Args:
        dictionary: [T, d] (numpy or torch), atoms as rows (SpLiCE: unit-norm concepts).
        device: where the GEMMs and the small solves run (default: the dictionary's).
        tol: KKT tolerance (unit-scaled; see the module docstring): an atom is a violator when ``c_j > lam + tol``.
        initial, grow: working-set atoms a signal starts with, and the most it adds per round.
        max_working, max_rounds: the caps beyond which a signal is reported uncertified.
        screen_dtype: the precision of the correlation GEMM (float32 with the rounding bound, or float64).
        small_solves: ``numba`` (compiled, one signal at a time: CPU only), ``torch`` (batched, any device) or
            ``auto`` (numba on the CPU, torch elsewhere).
    """

    def __init__(self, dictionary, device: Optional[str | torch.device] = None, tol: float = 1e-10,
                 initial: int = 16, grow: int = 16, max_working: int = 512, max_rounds: int = 50,
                 screen_dtype: torch.dtype = torch.float32, small_solves: str = "auto"):
        C = torch.as_tensor(dictionary)
        if C.ndim != 2 or C.shape[0] < 1 or not C.is_floating_point():
            raise InputError(f"ActiveSetLasso: need a float dictionary [atoms, d], got {C.dtype} {tuple(C.shape)}")
        if not torch.isfinite(C).all():
            raise InputError(f"ActiveSetLasso: the dictionary {tuple(C.shape)} has non-finite values")
        if not (tol >= 0 and initial >= 1 and grow >= 1 and max_working >= 1 and max_rounds >= 1):
            raise ValueError(f"ActiveSetLasso: need tol >= 0 and initial, grow, max_working, max_rounds >= 1 "
                             f"(got {tol}, {initial}, {grow}, {max_working}, {max_rounds})")
        self.device = torch.device(device) if device is not None else C.device
        self.tol, self.initial, self.grow = float(tol), int(initial), int(grow)
        self.max_working, self.max_rounds = int(max_working), int(max_rounds)
        self.screen_dtype = screen_dtype
        if small_solves not in ("auto", "numba", "torch"):
            raise ValueError(f"ActiveSetLasso: small_solves must be auto, numba or torch (got {small_solves})")
        if small_solves == "auto":
            small_solves = "numba" if self.device.type == "cpu" else "torch"
        if small_solves == "numba" and self.device.type != "cpu":
            raise ValueError(f"ActiveSetLasso: small_solves='numba' runs on the CPU, not on {self.device}")
        self.small_solves = small_solves
        C64 = C.to(device=self.device, dtype=torch.float64)
        self.T, self.d = C64.shape
        self.scale = _unit_scale(C64, "ActiveSetLasso")
        C64 = C64 / self.scale
        # row T: a zero atom that pads the index sets
        self.C64 = torch.cat([C64, C64.new_zeros(1, self.d)])  # [T + 1, d]
        self.Cs = self.C64.to(screen_dtype)  # [T + 1, d] the screening copy
        self._CsT = self.Cs.T.numpy() if self.device.type == "cpu" else None  # [d, T + 1] for numpy
        self._C64np = self.C64.numpy() if self.device.type == "cpu" else None
        self.max_norm = float(torch.linalg.vector_norm(C64, dim=1).max())
        u_in, u_acc = gemm_roundoff(self.device, screen_dtype)
        # |c32 - c| <= e |r| |C_j|; 0 for a float64 screen (computed exactly enough: float64 rounding << tol)
        self.bound = 0.0 if screen_dtype == torch.float64 else 1.01 * (2 * u_in + self.d * u_acc)

    # ----------------------------------------------------------------------------- the driver
    @torch.no_grad()
    def fit(self, signals, l1_penalty: float, batch_size: int = 256, progress: bool = False,
            return_report: bool = False, as_numpy: bool = True):
        """Weights [n, T] of ``signals`` [n, d] (numpy; with ``as_numpy=False`` a tensor on ``self.device``), in
        the signals' float dtype; with ``return_report`` also an ``ActiveSetReport``. ``batch_size`` signals are
        solved together."""
        V = torch.as_tensor(signals)
        if V.ndim != 2 or V.shape[1] != self.d:
            raise InputError(f"ActiveSetLasso.fit: need signals [n, {self.d}], got {tuple(V.shape)}")
        if not (l1_penalty >= 0 and np.isfinite(l1_penalty)):
            raise InputError(f"ActiveSetLasso.fit: l1_penalty must be a finite number >= 0 (got {l1_penalty})")
        out_dtype = V.dtype if V.is_floating_point() else torch.float32
        V = V.to(device=self.device, dtype=torch.float64)
        if not torch.isfinite(V).all():
            raise InputError(f"ActiveSetLasso.fit: the signals {tuple(V.shape)} have non-finite values")
        n = V.shape[0]
        lam = l1_penalty / 2 / self.scale
        out = torch.zeros(n, self.T, device=self.device, dtype=out_dtype)
        report = {k: np.zeros(n, dtype=t) for k, t in (("certified", bool), ("kkt", np.float64),
                                                         ("rounds", np.int64), ("working", np.int64))}
        starts = range(0, n, max(1, int(batch_size)))
        bar = tqdm(starts, desc=f"non-negative lasso (active set, {self.T} atoms)", unit="batch") \
            if progress and tqdm and n else starts
        for st in bar:
            e = min(n, st + max(1, int(batch_size)))
            w, rep = self._solve_batch(V[st:e], lam)
            out[st:e] = w[:, :self.T].div_(self.scale).to(out_dtype)
            for k in report:
                report[k][st:e] = rep[k].cpu().numpy()
        if as_numpy:
            out = out.cpu().numpy()
        return (out, ActiveSetReport(**report)) if return_report else out

    def _solve_batch(self, Y: torch.Tensor, lam: float):
        """(weights [b, T + 1] float64 (column T: padding), report tensors [b]) of targets Y [b, d] float64.

        The state of the signals still being solved (``act``): their working sets W [a, m] (pad: T), weights w,
        Gram matrices G [a, m, m] and q [a, m]. Between rounds W holds only the passive atoms (w > 0); the
        others go back outside, where the correlation check watches them like any other atom.
        """
        b, dev, T = Y.shape[0], self.device, self.T
        out = torch.zeros(b, T + 1, device=dev, dtype=torch.float64)
        certified = torch.zeros(b, device=dev, dtype=torch.bool)
        kkt = torch.zeros(b, device=dev, dtype=torch.float64)
        rounds = torch.zeros(b, device=dev, dtype=torch.long)
        working = torch.zeros(b, device=dev, dtype=torch.long)
        act, Ya = torch.arange(b, device=dev), Y
        W = torch.full((b, 0), T, device=dev, dtype=torch.long)
        w, q = (torch.zeros(b, 0, device=dev, dtype=torch.float64) for _ in range(2))
        G = torch.zeros(b, 0, 0, device=dev, dtype=torch.float64)
        inside = torch.zeros(b, device=dev, dtype=torch.float64)  # KKT residual on W after the last QP
        failed = torch.zeros(b, device=dev, dtype=torch.bool)
        compiled = self.small_solves == "numba"
        for r in range(self.max_rounds + 1):
            if compiled:
                Dp = None
                R = torch.from_numpy(_cpu.residuals(self._C64np, *_arrays(Ya, W, w)))
            else:
                Dp = self.C64[W]  # [a, m, d] the passive atoms
                R = Ya - torch.bmm(w.unsqueeze(1), Dp).squeeze(1)  # [a, d] residuals
            rounds[act] += 1
            new, outside = self._violators(R, W, lam, self.initial if r == 0 else self.grow)
            kkt[act] = torch.maximum(inside, outside)
            done = (new == T).all(1)
            certified[act] = done & ~failed
            # atoms beyond max_working are not added; a full set (or the last round) cannot be certified
            room = (self.max_working - (W < T).sum(1)).clamp_min(0)
            new = new.masked_fill(torch.arange(new.shape[1], device=dev)[None] >= room[:, None], T)
            stop = done | failed | (new == T).all(1) | (r == self.max_rounds)
            if bool(stop.any()):
                s = stop.nonzero()[:, 0]
                out.index_put_((act[s, None].expand(-1, W.shape[1]), W[s]), w[s])  # pads go to column T
                working[act[s]] = (W[s] < T).sum(1)
                keep = (~stop).nonzero()[:, 0]
                act, Ya, W, w, G, q, new = (x[keep] for x in (act, Ya, W, w, G, q, new))
                Dp = None if compiled else Dp[keep]
            if len(act) == 0:
                break
            if compiled:  # the same round, one signal at a time in compiled loops
                Yn, Wn, wn, Gn, qn, newn = _arrays(Ya, W, w, G, q, new)
                W, w, G, q, inside = (torch.from_numpy(x) for x in _cpu.qp_round(
                    self._C64np, Yn, lam, Wn, wn, Gn, qn, newn, self.tol))
                failed = inside > self.tol
                continue
            W, w, G, q = _extend(self.C64, Ya, lam, W, w, G, q, Dp, new)
            w, ok, inside = _lawson_hanson(G, q, W < T, w, W == T, self.tol)
            failed = ~ok
            W, w, G, q = _keep_passive(W, w, G, q, T)
        report = {"certified": certified, "kkt": kkt, "rounds": rounds, "working": working}
        return out, report

    def _violators(self, R: torch.Tensor, W: torch.Tensor, lam: float, k: int):
        """(up to ``k`` violators per residual [a, k'] (pad: T), largest first; an upper bound on
        ``max(c_j - lam)_+`` over the atoms outside W [a]) for residuals R [a, d] float64, working sets W [a, m].

        One GEMM in ``screen_dtype``, then its top ``k`` per row. Those within its rounding bound ``e`` of the
        threshold are recomputed in float64; a row whose top ``k`` are all within the band and none violates
        (the band may go on below them) gets all its correlations in float64.
        """
        T, thr, a = self.T, lam + self.tol, R.shape[0]
        sdt = self.screen_dtype
        # per-row bound, plus room for rounding the threshold and the comparison to screen_dtype
        e = self.bound * torch.linalg.vector_norm(R, dim=1) * self.max_norm
        if self.bound:
            e = e + 2 * float(torch.finfo(sdt).eps) * abs(thr)
        c = self._correlations(R)  # [a, T + 1]
        c.scatter_(1, W, -float("inf"))  # the working set, and the padding column T, are not screened
        c[:, T] = -float("inf")
        low = (thr - e).to(sdt)
        low = torch.where(low.double() > thr - e, torch.nextafter(low, low.new_tensor(-float("inf"))), low)
        vals, idx = torch.topk(c, min(k, T), dim=1)  # [a, k], largest first
        v = vals.double()
        sure = v - e[:, None] > thr
        band = (vals > low[:, None]) & ~sure
        exact = v.clone()
        bi, bj = band.nonzero(as_tuple=True)
        if len(bi):  # recompute the uncertain ones in float64
            exact[bi, bj] = (R[bi] * self.C64[idx[bi, bj]]).sum(1)
        viol = sure | (band & (exact > thr))
        hi = torch.where(band, exact, v + e[:, None])  # upper bounds; the atoms below the top k: v[:, -1] + e
        outside = torch.maximum(hi.amax(1), v[:, -1] + e)
        over = (~viol.any(1) & band[:, -1]).nonzero()[:, 0]
        if len(over):  # all of the top k in the band: every correlation of those rows in float64
            c64 = R[over] @ self.C64.T  # [o, T + 1]
            c64.scatter_(1, W[over], -float("inf"))
            c64[:, T] = -float("inf")
            vals, idx[over] = torch.topk(c64, min(k, T), dim=1)
            viol[over] = vals > thr
            outside[over] = vals[:, 0]
        outside = (outside - lam).clamp_min(0)
        kk = int(viol.sum(1).max()) if a else 0
        new = idx.masked_fill(~viol, T).gather(1, _pack(viol))[:, :kk]  # the violators, in order
        return new, outside

    def _correlations(self, R: torch.Tensor) -> torch.Tensor:
        """R [a, d] times the screening dictionary: [a, T + 1] in ``screen_dtype``."""
        R = R.to(self.screen_dtype)
        if self.device.type == "cpu":  # numpy's BLAS: faster than torch's for this product on the CPUs we timed
            return torch.from_numpy(np.matmul(R.numpy(), self._CsT))
        return R @ self.Cs.T


def _extend(C64: torch.Tensor, Y: torch.Tensor, lam: float, W, w, G, q, Dp: torch.Tensor, new: torch.Tensor):
    """Working sets W [a, m] (atoms Dp [a, m, d]) with atoms ``new`` [a, k] (pad: T) appended: (W, w, G, q) of
    width m + k, the new Gram rows and q computed in float64 (pad rows and columns are 0)."""
    Dn = C64[new]  # [a, k, d]
    B = torch.bmm(Dn, Dp.transpose(1, 2))  # [a, k, m]
    G = torch.cat([torch.cat([G, B.transpose(1, 2)], 2), torch.cat([B, torch.bmm(Dn, Dn.transpose(1, 2))], 2)], 1)
    W = torch.cat([W, new], 1)
    q = torch.cat([q, torch.bmm(Dn, Y.unsqueeze(2)).squeeze(2) - lam], 1).masked_fill(W == len(C64) - 1, 0)
    return W, torch.cat([w, w.new_zeros(new.shape)], 1), G, q


def _keep_passive(W, w, G, q, pad: int):
    """Working sets reduced to their passive atoms (w > 0), packed first; the rest is padding (atom ``pad``,
    weight, q and Gram rows 0)."""
    P = w > 0
    p = int(P.sum(1).max()) if len(w) else 0
    order = _pack(P)[:, :p]
    inside = P.gather(1, order)  # [a, p]
    m = W.shape[1]
    G = G.gather(1, order[:, :, None].expand(-1, -1, m)).gather(2, order[:, None, :].expand(-1, p, -1))
    G = G * (inside[:, :, None] & inside[:, None, :])
    return (W.gather(1, order).masked_fill(~inside, pad), w.gather(1, order) * inside, G,
            q.gather(1, order) * inside)


def _arrays(*tensors: torch.Tensor) -> list[np.ndarray]:
    """C-contiguous numpy views (copies where needed) of CPU tensors, for the compiled kernels."""
    return [np.ascontiguousarray(t.numpy()) for t in tensors]


# ----------------------------------------------------------------------------- the small QPs (batched torch)
def _pack(P: torch.Tensor) -> torch.Tensor:
    """A permutation [a, m] of each row's slots that puts those with ``P`` [a, m] first, each group in order."""
    a, m = P.shape
    cp = P.cumsum(1)
    slot = torch.arange(m, device=P.device).expand(a, m)
    pos = torch.where(P, cp - 1, cp[:, -1:] + slot - cp)
    return torch.empty_like(pos).scatter_(1, pos, slot)


def _passive_solve(G: torch.Tensor, q: torch.Tensor, P: torch.Tensor):
    """(s [a, m], ok [a]) with ``s_P = G_PP^-1 q_P`` and 0 elsewhere, for Gram matrices G [a, m, m], q [a, m] and
    passive sets P [a, m]; ``ok`` is False where a Cholesky pivot is below ``PIVOT`` of its diagonal."""
    a, m = q.shape
    cnt = P.sum(1)
    p = int(cnt.max()) if a else 0
    if p == 0:
        return torch.zeros_like(q), torch.ones(a, device=q.device, dtype=torch.bool)
    order = _pack(P)[:, :p]  # the passive slots first [a, p]
    inside = torch.arange(p, device=q.device)[None] < cnt[:, None]  # [a, p]
    Gp = G.gather(1, order[:, :, None].expand(-1, -1, m)).gather(2, order[:, None, :].expand(-1, p, -1))
    both = inside[:, :, None] & inside[:, None, :]
    Gp = torch.where(both, Gp, torch.diag_embed(inside.logical_not().to(Gp.dtype)))
    diag = Gp.diagonal(dim1=1, dim2=2)
    L, info = torch.linalg.cholesky_ex(Gp)
    piv = L.diagonal(dim1=1, dim2=2)
    ok = (info == 0) & ((piv * piv > PIVOT * diag) | ~inside).all(1)
    L = torch.where(ok[:, None, None], L, torch.eye(p, device=q.device, dtype=L.dtype))
    sp = torch.cholesky_solve((q.gather(1, order) * inside).unsqueeze(2), L).squeeze(2) * inside
    return torch.zeros_like(q).scatter_(1, order, sp), ok


def _swap_in(G: torch.Tensor, w: torch.Tensor, P: torch.Tensor, j: torch.Tensor, rows: torch.Tensor):
    """For the problems ``rows`` [a] (bool) whose entering atom ``j`` [a] (already in ``P``) is in the span of the
    rest of P: (w [a, m], P [a, m], done [a]) after the step along ``v = (v_P, v_j = 1)``, ``G v = 0`` (the
    objective falls linearly along it, by ``g_j`` per unit), up to the first weight of P that reaches 0 (it
    leaves P). ``done`` is False where no weight of P decreases along v."""
    done = torch.zeros_like(rows)
    w, P = w.clone(), P.clone()
    r = rows.nonzero()[:, 0]
    if len(r) == 0:
        return w, P, done
    jr, ar = j[r], torch.arange(len(r), device=w.device)
    old = P[r].clone()
    old[ar, jr] = False
    Gr = G[r]
    v, ok = _passive_solve(Gr, -Gr[ar, :, jr], old)  # v_P = -G_PP^-1 G_Pj
    v[ar, jr] = 1
    wr = w[r]
    neg = old & (v < 0)
    ratio = torch.where(neg, wr / -v, torch.full_like(wr, float("inf")))
    t = ratio.min(1).values
    good = ok & torch.isfinite(t)
    wn = wr + t[:, None] * v
    drop = neg & ((ratio <= t[:, None]) | ~(wn > 0))
    Pn = (old & ~drop)
    Pn[ar, jr] = True
    wn = wn.masked_fill(~Pn, 0)
    g = good.nonzero()[:, 0]
    w[r[g]], P[r[g]] = wn[g], Pn[g]
    done[r] = good
    return w, P, done


def _lawson_hanson(G: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, w: torch.Tensor, banned: torch.Tensor,
                   tol: float, max_steps: Optional[int] = None):
    """Lawson-Hanson for ``min 1/2 w^T G w - q^T w, w >= 0`` of many small problems at once.

    Each step adds the atom ``j`` of largest gradient ``g = q - G w`` (> tol) to the passive set P and solves on
    P; if some weights come out <= 0 it steps back to the last feasible point on the segment and drops the atoms
    that reach 0 (re-solving on the smaller P). To save steps, an add first takes every atom with ``g > tol`` at
    once (the objective still falls along the segment to the new solution); an atom of such a block that comes
    out <= 0 is dropped by a step of 0, and once a block goes nowhere (or is singular) that problem adds one atom
    at a time, Lawson-Hanson's rule, which always makes progress. ``G`` may be singular (more atoms than
    dimensions): if ``j`` is in the span of P (a Cholesky pivot below ``PIVOT``), the objective decreases linearly
    along the direction that moves ``w_j`` up while keeping ``C^T w`` fixed, and the step follows it until a
    weight of P reaches 0, which leaves P (a swap). An atom that cannot enter (its weight <= 0 from rounding,
    which would cycle, or no weight to swap out) is refused for the rest of this QP.

    Args:
        G [a, m, m], q [a, m] (float64); valid [a, m] the real slots; w [a, m] a feasible warm start whose
        non-zeros are optimal on their own support (0, or a previous solution); banned [a, m] slots that may not
        enter (the atoms refused here are added to a copy).

    Returns (w [a, m], ok [a]: solved, KKT residual inside [a]: ``max(g_j)_+`` off the passive set and
    ``|g_j|`` on it). Not ok: the step cap was hit, or an atom with gradient > tol was refused.
    """
    a, m = q.shape
    dev = q.device
    w, banned = w.clone(), banned.clone()
    P = w > 0
    max_steps = max_steps if max_steps is not None else 4 * m + 20
    inf = float("inf")
    # the problems being iterated, [live]; finished ones (~run) are written back and dropped in bulk
    live = torch.arange(a, device=dev)
    Gl, ql, wl, Pl, bl = G, q, w.clone(), P.clone(), banned.clone()
    run = torch.ones(a, device=dev, dtype=torch.bool)
    add = torch.ones(a, device=dev, dtype=torch.bool)  # the next step adds an atom (else: re-solves after a drop)
    blk = torch.ones(a, device=dev, dtype=torch.bool)  # adds may take several atoms at once (see above)
    for _ in range(max_steps):
        if 4 * int((~run).sum()) >= len(live):
            w[live], P[live], banned[live] = wl, Pl, bl
            keep = run.nonzero()[:, 0]
            live, Gl, ql, wl, Pl, bl, run, add, blk = (x[keep] for x in (live, Gl, ql, wl, Pl, bl, run, add, blk))
            if len(live) == 0:
                break
        ar = torch.arange(len(live), device=dev)
        grad = ql - torch.bmm(Gl, wl.unsqueeze(2)).squeeze(2)
        out = Pl | bl
        gmax, j = grad.masked_fill(out, -inf).max(1)
        finished = run & add & ~(gmax > tol)
        enter = run & add & ~finished
        cand = ~out & (grad > tol)
        many = enter & blk & (cand.sum(1) > 1)  # a block: every atom with a positive gradient at once
        single = enter & ~many
        old = Pl
        Pl = Pl | (cand & many[:, None])
        Pl[ar[single], j[single]] = True
        stuck = run & ~add  # re-solves; those that fail (they cannot, on a subset of a set that passed) end
        s, ok = _passive_solve(Gl, ql, Pl)
        blk = blk & ~(many & ~ok)  # a singular block: back to P, single atoms from now on
        Pl = torch.where((many & ~ok)[:, None], old, Pl)
        swap = single & ~ok  # j in the span of P
        w_swap, P_swap, swapped = _swap_in(Gl, wl, Pl, j, swap)
        refuse = single & ((ok & ~(s[ar, j] > 0)) | (swap & ~swapped))
        Pl[ar[refuse], j[refuse]] = False
        bl[ar[refuse], j[refuse]] = True
        step = run & ~finished & ~refuse & ~swap & ok
        neg = Pl & ~(s > 0)
        back = step & neg.any(1)
        # an atom of a block may enter at 0 and come out <= 0: a step of 0 that drops it
        ratio = torch.where(neg & (wl > 0), wl / (wl - s), torch.where(neg, 0.0, inf))
        alpha = ratio.min(1).values.clamp(0, 1)
        blk = blk & ~(back & (alpha <= 0))  # a block that went nowhere: single atoms from now on
        wb = wl + alpha[:, None] * (s - wl)
        drop = neg & ((ratio <= alpha[:, None]) | ~(wb > 0))
        wb = wb.masked_fill(drop | ~Pl, 0)
        wl = torch.where(back[:, None], wb, torch.where((step & ~back)[:, None], s, wl))
        Pl = torch.where(back[:, None], Pl & ~drop, Pl)
        swapped = swap & swapped
        wl = torch.where(swapped[:, None], w_swap, wl)
        Pl = torch.where(swapped[:, None], P_swap, Pl)
        add = torch.where(step, ~back, add) & ~swapped
        run = run & ~finished & ~(stuck & ~ok)
    w[live], P[live], banned[live] = wl, Pl, bl
    grad = q - torch.bmm(G, w.unsqueeze(2)).squeeze(2)
    res = torch.where(P, grad.abs(), grad.clamp_min(0)).masked_fill(~valid, 0).amax(1) if m else q.new_zeros(a)
    ok = res <= tol
    return w, ok, res
