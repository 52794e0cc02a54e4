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
