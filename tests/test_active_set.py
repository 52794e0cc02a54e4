"""The exact active-set non-negative lasso (utils.solvers.active_set) against scikit-learn and hand-built cases, with
its small QPs solved by either implementation: compiled per signal (numba, the CPU's) and batched torch (the
GPU's, run here on the CPU)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import Lasso

from utils.solvers import _active_set_cpu
from utils.solvers.active_set import ActiveSetLasso, _lawson_hanson

SOLVES = ["numba", "torch"]
from utils.splice import centre_concepts


def problem(T: int, d: int, n: int, seed: int, scale: float = 1.0, mix: int = 4):
    """SpLiCE-like dictionary [T, d] (normalise, centre, normalise; times ``scale``) and unit targets [n, d] made
    of ``mix`` atoms plus noise (float64)."""
    rng = np.random.default_rng(seed)
    C = centre_concepts(torch.from_numpy(rng.standard_normal((T, d)) / np.sqrt(np.arange(1, d + 1)))).double()
    W = np.zeros((n, T))
    for i in range(n):
        W[i, rng.choice(T, mix, replace=False)] = rng.random(mix)
    Y = torch.from_numpy(W) @ C + 0.3 * torch.from_numpy(rng.standard_normal((n, d))) / np.sqrt(d)
    return (C * scale).numpy(), F.normalize(Y, dim=1).numpy()


def sklearn_weights(C: np.ndarray, Y: np.ndarray, l1: float) -> np.ndarray:
    """scikit-learn's positive Lasso in float64, run to a tight tolerance: SpLiCE's problem, alpha = l1 / (2 d)."""
    d = C.shape[1]
    lasso = Lasso(alpha=l1 / (2 * d), positive=True, fit_intercept=False, max_iter=200000, tol=1e-12)
    return np.stack([lasso.fit(C.T, y).coef_ for y in Y])


def objective(C, Y, W, l1):
    """SpLiCE's objective |y - w C|^2 + l1 sum(w) per row, float64."""
    R = Y - W @ C
    return (R * R).sum(1) + l1 * W.sum(1)


def kkt(C, Y, W, l1):
    """max over atoms of the KKT violation of 1/2 |y - w C|^2 + l1/2 sum(w), w >= 0, per row (float64)."""
    c = (Y - W @ C) @ C.T - l1 / 2
    return np.where(W > 0, np.abs(c), np.clip(c, 0, None)).max(1)


@pytest.mark.parametrize("small_solves", SOLVES)
@pytest.mark.parametrize("T, d, n, l1, scale, screen", [
    (300, 32, 8, 0.25, 1.0, torch.float32),
    (300, 32, 8, 0.05, 1.0, torch.float32),
    (300, 32, 8, 0.25, 1.0, torch.float64),
    (200, 24, 6, 0.25, 100.0, torch.float32),  # a dictionary of norm-100 atoms: the unit scaling
    (20, 32, 6, 0.1, 1.0, torch.float32),  # fewer atoms than dimensions: unique solution, many non-zeros
])
def test_matches_sklearn(T, d, n, l1, scale, screen, small_solves):
    C, Y = problem(T, d, n, seed=T + n, scale=scale)
    got, rep = ActiveSetLasso(C, screen_dtype=screen, initial=4, grow=3, small_solves=small_solves).fit(
        Y, l1, return_report=True)
    ref = sklearn_weights(C, Y, l1)
    assert got.dtype == np.float64 and (got >= 0).all()
    assert rep.certified.all() and (rep.kkt <= 1e-10).all() and (rep.rounds >= 2).all()
    assert kkt(C, Y, got, l1).max() <= 1e-12 * scale
    np.testing.assert_array_equal(got > 0, ref > 1e-9)
    assert (objective(C, Y, got, l1) <= objective(C, Y, ref, l1) + 1e-13 * scale ** 2).all()
    np.testing.assert_allclose(got, ref, atol=1e-7 / scale)
    np.testing.assert_array_equal(rep.working, (got > 0).sum(1))


def test_float32_and_float64_inputs_and_both_small_solvers():
    C, Y = problem(400, 32, 6, seed=3)
    w64 = ActiveSetLasso(C).fit(Y, 0.2)
    np.testing.assert_allclose(ActiveSetLasso(C, small_solves="torch").fit(Y, 0.2), w64, atol=1e-13, rtol=0)
    w32 = ActiveSetLasso(C.astype(np.float32)).fit(Y.astype(np.float32), 0.2)
    wt = ActiveSetLasso(torch.from_numpy(C).float()).fit(torch.from_numpy(Y).float(), 0.2, as_numpy=False)
    assert w32.dtype == np.float32 and wt.dtype == torch.float32
    np.testing.assert_array_equal(w32, wt.numpy())
    np.testing.assert_array_equal(w32 > 0, w64 > 0)
    np.testing.assert_allclose(w32, w64, atol=1e-6)


@pytest.mark.parametrize("small_solves", SOLVES)
def test_duplicate_atoms_same_objective_and_group_sums(small_solves):
    """Exact twins make the minimiser non-unique: scikit-learn splits a weight between twins, the active set
    gives it to one. Per duplicate group the weights sum to the same, and the objective is the same."""
    C, Y = problem(150, 24, 6, seed=5, mix=3)
    ref0 = sklearn_weights(C, Y, 0.2)
    used = np.nonzero(ref0.max(0) > 0)[0][:6]  # duplicate atoms that are in some support
    dup = np.concatenate([C, C[used], C[used[:2]]])  # twins, and two triplets
    group = np.concatenate([np.arange(150), used, used[:2]])
    got, rep = ActiveSetLasso(dup, initial=3, grow=2, small_solves=small_solves).fit(Y, 0.2, return_report=True)
    ref = sklearn_weights(dup, Y, 0.2)
    assert rep.certified.all() and kkt(dup, Y, got, 0.2).max() <= 1e-12

    def sums(W):
        out = np.zeros((len(W), 150))
        np.add.at(out.T, group, W.T)
        return out

    np.testing.assert_allclose(sums(got), sums(ref), atol=1e-6)
    np.testing.assert_allclose(objective(dup, Y, got, 0.2), objective(dup, Y, ref, 0.2), atol=1e-12)
    # each group's weight is on one of its atoms
    for g in used:
        members = np.nonzero(group == g)[0]
        assert ((got[:, members] > 0).sum(1) <= 1).all()


@pytest.mark.parametrize("small_solves", SOLVES)
def test_zero_and_all_zero_solutions(small_solves):
    C, Y = problem(100, 16, 4, seed=7)
    Y[1] = 0  # y = 0
    big = float(np.abs(Y @ C.T).max()) * 2 * 1.01  # l1/2 above every correlation: w = 0
    for l1, zero_rows in ((0.1, [1]), (big, [0, 1, 2, 3])):
        got, rep = ActiveSetLasso(C, small_solves=small_solves).fit(Y, l1, return_report=True)
        assert rep.certified.all()
        assert (got[zero_rows] == 0).all() and (rep.rounds[zero_rows] == 1).all()
        assert kkt(C, Y, got, l1).max() <= 1e-12


@pytest.mark.parametrize("small_solves", SOLVES)
def test_caps_report_uncertified(small_solves):
    C, Y = problem(300, 32, 5, seed=11, mix=8)
    full = ActiveSetLasso(C).fit(Y, 0.02)
    need = (full > 0).sum(1)
    cap = int(need.min()) - 1
    got, rep = ActiveSetLasso(C, initial=2, grow=2, max_working=cap, small_solves=small_solves).fit(
        Y, 0.02, return_report=True)
    assert not rep.certified.any() and (rep.working <= cap).all() and (rep.kkt > 1e-10).all()
    np.testing.assert_array_equal(rep.uncertified, np.arange(5))
    assert (got >= 0).all() and ((got > 0).sum(1) <= cap).all()
    _, rep = ActiveSetLasso(C, initial=2, grow=2, max_rounds=1, small_solves=small_solves).fit(
        Y, 0.02, return_report=True)
    assert not rep.certified.any() and (rep.rounds == 2).all()


def test_screening_band_is_recomputed_in_float64():
    """Atoms whose correlation with the residual is within float32's rounding of the threshold: the float32
    GEMM cannot tell violators from inactive atoms; the float64 recomputation must."""
    d, base, tol = 8, 0.1, 1e-10
    deltas = np.array([-3e-8, -2e-9, -1e-12, 1e-12, 2e-9, 3e-8, 0.05, -0.05])
    C = np.zeros((len(deltas), d))
    C[:, 0] = base + deltas  # with the residual e_0: c_j = (base + delta_j) / s in the solver's units
    C[:, 1:] = np.random.default_rng(0).standard_normal((len(deltas), d - 1)) * 0.01
    s = ActiveSetLasso(C, tol=tol)
    lam = base / s.scale - tol  # the threshold lam + tol sits at c = base / s
    R = torch.zeros(1, d, dtype=torch.float64)
    R[0, 0] = 1
    new, outside = s._violators(R, torch.full((1, 0), len(deltas)), lam, k=8)
    assert set(new[0].tolist()) == set(np.nonzero(deltas > 0)[0].tolist())
    assert new[0, 0] == 6  # the largest first
    none, outside = s._violators(R, torch.tensor([[3, 4, 5, 6]]), lam, k=8)
    assert none.shape[1] == 0 and outside[0] <= tol  # certified: every other atom is at most lam + tol
    new, _ = s._violators(R, torch.tensor([[3, 4, 5, 6]]), lam - 1e-11, k=8)  # now the 1e-12 one is above
    assert set(new[0].tolist()) == {2}


def test_lawson_hanson_small_qp_by_enumeration():
    """Both Lawson-Hansons (batched torch; compiled, one problem at a time) = the best of all 2^m supports (each
    solved by hand), on random small QPs, from zero and from a warm start."""
    import itertools

    rng = np.random.default_rng(2)
    a, m = 12, 6
    A = rng.standard_normal((a, m, 9))
    G = torch.from_numpy(A @ A.transpose(0, 2, 1))
    q = torch.from_numpy(rng.standard_normal((a, m)))
    valid = torch.ones(a, m, dtype=torch.bool)
    w, ok, res = _lawson_hanson(G, q, valid, torch.zeros(a, m, dtype=torch.float64), ~valid, 1e-12)
    assert ok.all() and (res <= 1e-12).all()
    compiled = np.zeros((a, m))
    for i in range(a):
        assert _active_set_cpu._lawson_hanson(G[i].numpy().copy(), q[i].numpy().copy(), compiled[i], m, 1e-12,
                                              50) <= 1e-12
    # warm starts: the solution on the first m - 2 slots, then all m
    first = valid.clone()
    first[:, -2:] = False
    w0, _, _ = _lawson_hanson(G, q, first, torch.zeros(a, m, dtype=torch.float64), ~first, 1e-12)
    warm, ok, _ = _lawson_hanson(G, q, valid, w0, ~valid, 1e-12)
    assert ok.all()
    np.testing.assert_allclose(warm.numpy(), w.numpy(), atol=1e-10)
    for i in range(a):
        wi = np.zeros(m)
        _active_set_cpu._lawson_hanson(G[i].numpy().copy(), q[i].numpy().copy(), wi, m - 2, 1e-12, 50)
        _active_set_cpu._lawson_hanson(G[i].numpy().copy(), q[i].numpy().copy(), wi, m, 1e-12, 50)
        np.testing.assert_allclose(wi, compiled[i], atol=1e-10)
    for i in range(a):
        best, best_val = None, np.inf
        for r in range(m + 1):
            for S in itertools.combinations(range(m), r):
                x = np.zeros(m)
                if S:
                    x[list(S)] = np.linalg.solve(G[i][np.ix_(S, S)].numpy(), q[i, list(S)].numpy())
                if (x >= 0).all():
                    val = 0.5 * x @ G[i].numpy() @ x - q[i].numpy() @ x
                    if val < best_val:
                        best, best_val = x, val
        np.testing.assert_allclose(w[i].numpy(), best, atol=1e-10)
        np.testing.assert_allclose(compiled[i], best, atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="dictionary"):
        ActiveSetLasso(np.zeros(5))
    with pytest.raises(ValueError, match="all zeros"):
        ActiveSetLasso(np.zeros((5, 3)))
    s = ActiveSetLasso(np.eye(3))
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        s.fit(np.zeros((2, 4)), 0.1)
    with pytest.raises(ValueError, match="l1_penalty"):
        s.fit(np.zeros((2, 3)), -1)
    with pytest.raises(ValueError, match="small_solves"):
        ActiveSetLasso(np.eye(3), small_solves="fortran")
