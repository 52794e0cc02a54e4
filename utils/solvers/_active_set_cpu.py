"""The CPU kernels of ``utils.solvers.active_set`` (numba): one round of small QPs per signal, and the residuals.

On the CPU the small problems are solved one signal at a time in compiled loops, where a Lawson-Hanson step
costs microseconds: the passive set's Cholesky factor grows by one row per entering atom (O(p^2)) and is
refactored only when atoms leave. The batched torch version in ``active_set.py`` (which runs on GPUs) solves the
same problems with the same rules; see its docstrings for the method.
"""
from __future__ import annotations

import numpy as np
from numba import njit

PIVOT = 1e-12  # as active_set.PIVOT


@njit(cache=True, fastmath=True)
def _dot(a, b):
    s = 0.0
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@njit(cache=True)
def residuals(C64, Y, W, w):
    """R [a, d] = Y - sum_j w[:, j] C64[W[:, j]] (float64); padding atoms (the zero row) add nothing."""
    a, d = Y.shape
    R = Y.copy()
    for i in range(a):
        for j in range(W.shape[1]):
            if w[i, j] != 0.0:
                row = C64[W[i, j]]
                for k in range(d):
                    R[i, k] -= w[i, j] * row[k]
    return R


@njit(cache=True)
def _factor(G, P, n, L):
    """Cholesky factor of G[P[:n], P[:n]] into L[:n, :n]; False where a pivot is below PIVOT of its diagonal."""
    for r in range(n):
        for c in range(r + 1):
            s = G[P[r], P[c]]
            for k in range(c):
                s -= L[r, k] * L[c, k]
            if r == c:
                if not s > PIVOT * G[P[r], P[r]]:
                    return False
                L[r, r] = np.sqrt(s)
            else:
                L[r, c] = s / L[c, c]
    return True


@njit(cache=True)
def _solve(L, n, b, out):
    """out[:n] = (L L^T)^-1 b[:n]."""
    for r in range(n):
        s = b[r]
        for k in range(r):
            s -= L[r, k] * out[k]
        out[r] = s / L[r, r]
    for r in range(n - 1, -1, -1):
        s = out[r]
        for k in range(r + 1, n):
            s -= L[k, r] * out[k]
        out[r] = s / L[r, r]


@njit(cache=True)
def _lawson_hanson(G, q, w, m, tol, max_steps):
    """Lawson-Hanson on slots [:m] of one problem (``min 1/2 w^T G w - q^T w, w >= 0``), ``w`` updated in place
    from a warm start that is optimal on its own support. Returns the KKT residual on the m slots."""
    P = np.empty(m, np.int64)  # the passive slots, in factor order
    n = 0
    for j in range(m):
        if w[j] > 0:
            P[n] = j
            n += 1
    L = np.zeros((m, m))
    if not _factor(G, P, n, L):  # a singular warm start (it cannot come from a solve here): start from 0
        for r in range(n):
            w[P[r]] = 0.0
        n = 0
    banned = np.zeros(m, np.bool_)
    inP = np.zeros(m, np.bool_)
    for k in range(n):
        inP[P[k]] = True
    b = np.empty(m)
    s = np.empty(m)
    z = np.empty(m)
    for _ in range(max_steps):
        # the atom of largest gradient
        best, j = tol, -1
        for c in range(m):
            if not inP[c] and not banned[c]:
                g = q[c] - _dot(G[c, :m], w[:m])
                if g > best:
                    best, j = g, c
        if j < 0:
            break
        # its row of the factor: L z = G[P, j], pivot^2 = G_jj - |z|^2
        for r in range(n):
            acc = G[P[r], j]
            for k in range(r):
                acc -= L[r, k] * z[k]
            z[r] = acc / L[r, r]
        piv = G[j, j] - _dot(z[:n], z[:n])
        if not piv > PIVOT * G[j, j]:
            # j is in the span of P: move along (v_P = -G_PP^-1 G_Pj, v_j = 1) until a weight of P reaches 0
            for r in range(n):
                b[r] = G[P[r], j]
            _solve(L, n, b, s)
            t, out = np.inf, -1
            for r in range(n):
                if s[r] > 0 and w[P[r]] / s[r] < t:
                    t, out = w[P[r]] / s[r], r
            if out < 0:
                banned[j] = True
                continue
            for r in range(n):
                w[P[r]] -= t * s[r]
            w[j] = t
            w[P[out]] = 0.0
            keep = 0
            for r in range(n):
                if w[P[r]] > 0:
                    P[keep] = P[r]
                    keep += 1
                else:
                    w[P[r]] = 0.0
                    inP[P[r]] = False
            n = keep
            P[n] = j
            n += 1
            inP[j] = True
            if not _factor(G, P, n, L):
                break
            entering = -1
        else:
            for k in range(n):
                L[n, k] = z[k]
            L[n, n] = np.sqrt(piv)
            P[n] = j
            n += 1
            inP[j] = True
            entering = n - 1
        # solve on P, stepping back to feasibility while weights come out <= 0
        for _inner in range(m + 1):
            for r in range(n):
                b[r] = q[P[r]]
            _solve(L, n, b, s)
            if entering >= 0 and not s[entering] > 0:  # a weight <= 0 from rounding: it would cycle
                n -= 1
                inP[j] = False
                banned[j] = True
                break
            entering = -1
            alpha, any_neg = 1.0, False
            for r in range(n):
                if not s[r] > 0:
                    any_neg = True
                    x = w[P[r]] / (w[P[r]] - s[r]) if w[P[r]] > 0 else 0.0
                    if x < alpha:
                        alpha = x
            if not any_neg:
                for r in range(n):
                    w[P[r]] = s[r]
                break
            keep = 0
            for r in range(n):
                v = w[P[r]] + alpha * (s[r] - w[P[r]])
                if not s[r] > 0 and (w[P[r]] <= 0 or w[P[r]] / (w[P[r]] - s[r]) <= alpha or not v > 0):
                    w[P[r]] = 0.0
                    inP[P[r]] = False
                else:
                    w[P[r]] = v
                    P[keep] = P[r]
                    keep += 1
            n = keep
            if not _factor(G, P, n, L):
                break
    res = 0.0
    for c in range(m):
        g = q[c] - _dot(G[c, :m], w[:m])
        v = abs(g) if inP[c] else max(g, 0.0)
        if v > res:
            res = v
    return res


@njit(cache=True)
def qp_round(C64, Y, lam, W, w, G, q, new, tol):
    """One round for the signals ``a`` [their rows of Y [a, d]]: append the atoms ``new`` [a, k] (pad: T) to the
    working sets W [a, m] (passive atoms first, then padding), compute their Gram rows and q in float64, run
    Lawson-Hanson, and keep the passive atoms. Returns (W, w, G, q) of the width of the largest passive set,
    and the KKT residual inside each working set [a]."""
    a, m0 = W.shape
    k = new.shape[1]
    T = C64.shape[0] - 1
    m = m0 + k
    W2 = np.full((a, m), T, np.int64)
    w2 = np.zeros((a, m))
    G2 = np.zeros((a, m, m))
    q2 = np.zeros((a, m))
    res = np.zeros(a)
    cnt = np.zeros(a, np.int64)
    Gi = np.zeros((m, m))
    qi = np.zeros(m)
    wi = np.zeros(m)
    Wi = np.empty(m, np.int64)
    keep = np.empty(m, np.int64)
    for i in range(a):
        n0 = 0
        while n0 < m0 and W[i, n0] < T:
            n0 += 1
        nk = 0
        while nk < k and new[i, nk] < T:
            nk += 1
        mi = n0 + nk
        for r in range(n0):
            Wi[r] = W[i, r]
            wi[r] = w[i, r]
            qi[r] = q[i, r]
            for c in range(n0):
                Gi[r, c] = G[i, r, c]
        for r in range(nk):
            Wi[n0 + r] = new[i, r]
            wi[n0 + r] = 0.0
            row = C64[new[i, r]]
            qi[n0 + r] = _dot(row, Y[i]) - lam
            for c in range(n0 + r + 1):
                v = _dot(row, C64[Wi[c]])
                Gi[n0 + r, c] = v
                Gi[c, n0 + r] = v
        res[i] = _lawson_hanson(Gi, qi, wi, mi, tol, 4 * mi + 20)
        p = 0
        for r in range(mi):  # keep the passive atoms, in order
            if wi[r] > 0:
                keep[p] = r
                p += 1
        for r in range(p):
            W2[i, r] = Wi[keep[r]]
            w2[i, r] = wi[keep[r]]
            q2[i, r] = qi[keep[r]]
            for c in range(p):
                G2[i, r, c] = Gi[keep[r], keep[c]]
        cnt[i] = p
    pmax = 0
    for i in range(a):
        if cnt[i] > pmax:
            pmax = cnt[i]
    return W2[:, :pmax].copy(), w2[:, :pmax].copy(), G2[:, :pmax, :pmax].copy(), q2[:, :pmax].copy(), res
