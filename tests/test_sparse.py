"""Unit tests of the sparse text decomposition: our OMP against scikit-learn's, our ADMM non-negative lasso
against scikit-learn's Lasso and against SpLiCE's direct-Cholesky iterations, the dictionary scalings, the
.json/.npz helpers and the --evaluate formula against the original's, written out per neuron."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.decomposition import SparseCoder
from sklearn.linear_model import Lasso, orthogonal_mp_gram

from utils.files.names import sparse_decomposition_stem as output_stem
from utils.neurons.sparse import (build_text_dictionary, cosine_rows, decompose, decomposition_json,
                                  reconstruction_logits, save_sparse_npz, top_components)
from utils.solvers.nnlasso import nnlasso_admm
from utils.solvers.omp import omp


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: one thread avoids OpenMP hand-offs that dominate on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_problem(T: int, d: int, n: int, seed: int, dtype=np.float64):
    """Dictionary [T, d] with unequal atom norms (OMP must not normalise them) and signals [n, d]."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, d)) * rng.uniform(0.3, 3.0, (T, 1))
    X = rng.standard_normal((n, d))
    return D.astype(dtype), X.astype(dtype)


def sklearn_omp(D: np.ndarray, X: np.ndarray, k: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Orthogonal matching pursuit ended prematurely"
        return np.atleast_2d(orthogonal_mp_gram(D @ D.T, D @ X.T, n_nonzero_coefs=k).T)  # [n, T]


@pytest.mark.parametrize("T,d,n,k,batch", [(300, 64, 40, 20, 1024), (200, 32, 33, 1, 7), (500, 48, 25, 48, 10),
                                           (120, 16, 20, 16, 6)])
def test_omp_matches_sklearn_float64(T, d, n, k, batch):
    D, X = random_problem(T, d, n, seed=T + k)
    ref = sklearn_omp(D, X, k)
    codes = omp(D, X, k, batch_size=batch)
    assert codes.indices.shape == (n, k)
    assert (codes.n_active == k).all()
    for i in range(n):  # same supports, as sets
        assert set(np.nonzero(ref[i])[0]) == set(codes.indices[i].tolist()), i
    np.testing.assert_allclose(codes.to_dense(), ref, atol=1e-10, rtol=0)
    # the selection order is the greedy order: the first atom is the best-correlated one
    np.testing.assert_array_equal(codes.indices[:, 0], np.abs(X @ D.T).argmax(1))


def test_omp_float32_matches_sparsecoder():
    """The original's call: SparseCoder(transform_algorithm='omp') in float32 (transform_alpha is ignored)."""
    D, X = random_problem(400, 64, 30, seed=3, dtype=np.float32)
    coder = SparseCoder(dictionary=D, transform_algorithm="omp", transform_alpha=1e-4, transform_n_nonzero_coefs=24)
    ref = coder.transform(X)
    assert ref.dtype == np.float32
    got = omp(torch.from_numpy(D), torch.from_numpy(X), 24).to_dense()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got != 0, ref != 0)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_omp_early_stop_like_sklearn():
    """Signals in the span of 3 atoms: scikit-learn stops after 3 when it finds them (residual ~0); k > d: it stops
    when the picked atoms span the space. Ours stops at the same place with the same coefficients."""
    D, _ = random_problem(80, 24, 1, seed=5)
    rng = np.random.default_rng(6)
    X = np.stack([rng.standard_normal(3) @ D[s] for s in ([1, 7, 30], [2, 50, 79], [0, 1, 2])])
    ref = sklearn_omp(D, X, 6)
    codes = omp(D, X, 6)
    np.testing.assert_array_equal(codes.n_active, (ref != 0).sum(1))
    early = codes.n_active == 3  # greedy found the 3 atoms (where it does not, both pick 6 others)
    assert early.any() and (codes.n_active[~early] == 6).all()
    assert (codes.indices[early, 3:] == -1).all() and (codes.coefs[early, 3:] == 0).all()
    np.testing.assert_allclose(codes.to_dense(), ref, atol=1e-9)

    D, X = random_problem(40, 8, 5, seed=7)
    ref = sklearn_omp(D, X, 12)
    codes = omp(D, X, 12)
    np.testing.assert_array_equal(codes.n_active, (ref != 0).sum(1))
    np.testing.assert_allclose(codes.to_dense(), ref, atol=1e-8)


def test_omp_correlated_dictionary_and_scipy():
    """Highly correlated atoms (like text embeddings) exercise the Gram-Schmidt re-orthogonalisation."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((1, 32))
    D = base + 0.05 * rng.standard_normal((150, 32))
    X = base * rng.standard_normal((12, 1)) + 0.2 * rng.standard_normal((12, 32))
    ref = sklearn_omp(D, X, 20)
    codes = omp(D, X, 20, batch_size=5)
    np.testing.assert_array_equal(codes.to_dense() != 0, ref != 0)
    np.testing.assert_allclose(codes.to_dense(), ref, atol=1e-6)
    m = codes.to_scipy()
    assert isinstance(m, sp.csr_matrix) and m.shape == (12, 150)
    np.testing.assert_array_equal(m.toarray(), codes.to_dense())


def test_omp_bad_input():
    D, X = random_problem(10, 4, 2, seed=0)
    with pytest.raises(ValueError, match="number of atoms"):
        omp(D, X, 11)
    with pytest.raises(ValueError, match="dimension"):
        omp(D, X[:, :3], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_omp_gpu_matches_cpu():
    D, X = random_problem(2000, 64, 100, seed=1)
    cpu = omp(D, X, 16).to_dense()
    gpu = omp(D, X, 16, device="cuda").to_dense()
    np.testing.assert_allclose(gpu, cpu, atol=1e-8)


# ----------------------------------------------------------------------------- non-negative lasso
def test_nnlasso_matches_sklearn_lasso_positive():
    """sklearn minimises |v - C^T w|^2 / (2 d) + alpha |w|_1: the same minimiser as ours with l1 = 2 d alpha."""
    rng = np.random.default_rng(0)
    T, d, n = 40, 16, 6
    C, V = rng.standard_normal((T, d)), rng.standard_normal((n, d))
    l1 = 0.5
    got, iters = nnlasso_admm(C, V, l1, tol=1e-10, max_iter=50000, return_iters=True)
    assert iters[0] < 50000  # converged
    ref = np.stack([Lasso(alpha=l1 / (2 * d), fit_intercept=False, positive=True, max_iter=100000, tol=1e-12)
                    .fit(C.T, v).coef_ for v in V])
    assert (got >= 0).all()
    np.testing.assert_array_equal(got > 0, ref > 1e-12)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert 0 < (got > 0).sum(1).mean() < T  # the penalty made it sparse
    # the objective both minimise (ours: |v - w C|^2 + l1 sum(w)): the same minimum
    np.testing.assert_allclose(nnlasso_objective(got, C, V, l1), nnlasso_objective(ref, C, V, l1), rtol=1e-9)


def nnlasso_objective(W: np.ndarray, C: np.ndarray, V: np.ndarray, l1: float) -> np.ndarray:
    """Per signal: |v - w C|^2 + l1 * sum(w), in float64 [n]."""
    W, C, V = (np.asarray(a, np.float64) for a in (W, C, V))
    return ((V - W @ C) ** 2).sum(1) + l1 * W.sum(1)


def test_nnlasso_iterates_equal_splice_cholesky_and_seed():
    """The Woodbury x-update gives SpLiCE's iterates (its direct [T, T] Cholesky solve) from our seeded start,
    in units where the atoms have unit mean squared norm (C / s, penalty / s, result / s)."""
    rng = np.random.default_rng(1)
    T, d, n, rho, l1, steps = 50, 12, 4, 5.0, 0.3, 25
    C, V = 7 * rng.standard_normal((T, d)), rng.standard_normal((n, d))
    s = np.linalg.norm(C) / np.sqrt(T)
    Ct, Vt = torch.from_numpy(C / s), torch.from_numpy(V)
    chol = torch.linalg.cholesky(2 * Ct @ Ct.T + rho * torch.eye(T, dtype=torch.float64))
    gen = torch.Generator().manual_seed(7)
    x, z, u = (torch.randn(n, T, generator=gen).double() for _ in range(3))
    for _ in range(steps):  # SpLiCE's ADMM.step, in [signals, atoms] layout
        x = torch.cholesky_solve(2 * Ct @ Vt.T + rho * (z - u).T, chol).T
        z = torch.clamp_min(x + u - l1 / s / rho, 0)
        u = u + x - z
    got = nnlasso_admm(C, V, l1, rho=rho, tol=0, max_iter=steps, seed=7)
    np.testing.assert_allclose(got, z.numpy() / s, atol=1e-10)
    again = nnlasso_admm(C, V, l1, rho=rho, tol=0, max_iter=steps, seed=7)
    np.testing.assert_array_equal(got, again)
    other = nnlasso_admm(C, V, l1, rho=rho, tol=0, max_iter=steps, seed=8)
    assert not np.array_equal(got, other)


# ----------------------------------------------------------------------------- the dictionary
def test_build_text_dictionary_per_dimension_is_the_original():
    rng = np.random.default_rng(2)
    texts = rng.standard_normal((30, 8)).astype(np.float32)
    D = build_text_dictionary(texts, 100.0, "per_dimension")
    # the original: centre over texts, divide each embedding dimension (column) by its norm, times coefficient
    c = texts - texts.mean(0)
    np.testing.assert_allclose(D, 100 * c / np.linalg.norm(c, axis=0, keepdims=True), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(D, axis=0), 100, rtol=1e-5)
    np.testing.assert_allclose(D.mean(0), 0, atol=1e-4)
    assert np.linalg.norm(D, axis=1).std() > 1  # texts end with unequal norms


def test_build_text_dictionary_per_text():
    rng = np.random.default_rng(3)
    texts = rng.standard_normal((30, 8)) * np.linspace(0.1, 5, 8)  # very unequal dimensions
    Dt = build_text_dictionary(texts, 100.0, "per_text")
    Dd = build_text_dictionary(texts, 100.0, "per_dimension")
    np.testing.assert_allclose(np.linalg.norm(Dt, axis=1), 100 * np.sqrt(8 / 30), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(Dt), np.linalg.norm(Dd), rtol=1e-5)  # same Frobenius norm
    c = texts - texts.mean(0)  # directions are the centred texts' own
    np.testing.assert_allclose(cosine_rows(Dt, c), 1, atol=1e-6)
    assert cosine_rows(Dd, c).min() < 0.9  # per-dimension scaling changes them


def test_build_text_dictionary_errors():
    with pytest.raises(ValueError, match="at least 2"):
        build_text_dictionary(np.ones((1, 4)), name="t.npy")
    x = np.random.default_rng(0).standard_normal((5, 4))
    x[:, 2] = 1.0
    with pytest.raises(ValueError, match=r"dimension\(s\) \[2\] are constant"):
        build_text_dictionary(x)
    with pytest.raises(ValueError, match="per_row"):
        build_text_dictionary(x, norm="per_row")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_text_dictionary(x)


# ----------------------------------------------------------------------------- outputs
def test_top_components_json_and_npz(tmp_path):
    codes = sp.csr_matrix(np.array([[0.0, -3.0, 1.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0, 0.0]], np.float32))
    top, trunc = top_components(codes, 2)
    assert top == [[(1, -3.0), (4, 2.0)], [(0, 0.5)]]  # by |coefficient|, zeros never listed
    np.testing.assert_array_equal(trunc.toarray(), [[0, -3, 0, 0, 2], [0.5, 0, 0, 0, 0]])
    js = json.loads(json.dumps(decomposition_json(top, ["a", "b", "c", "d", "e"])))
    assert js == {"0": [[1, -3.0, "b"], [4, 2.0, "e"]], "1": [[0, 0.5, "a"]]}
    save_sparse_npz(tmp_path / "x.npz", codes)
    back = sp.load_npz(tmp_path / "x.npz")
    assert back.format == "csc" and back.dtype == np.float32
    np.testing.assert_array_equal(back.toarray(), codes.toarray())
    assert not list(tmp_path.glob("*.partial"))
    assert output_stem("imagenet", "ViT-B-32", "openai", 9, "30k", "omp", 1.0, 128) == \
        "imagenet_mlps_ViT-B-32_openai_9_30k_decomposition_omp_1.0_128"
    assert output_stem("imagenet", "ViT-B-32", "/ckpt/my.pt", 9, "30k", "nnlasso", 0.25, 32, "per_text") == \
        "imagenet_mlps_ViT-B-32_my_9_30k_decomposition_nnlasso_0.25_32_per_text"


def test_decompose_dispatch():
    rng = np.random.default_rng(4)
    D = rng.standard_normal((60, 10)).astype(np.float32)
    X = rng.standard_normal((7, 10)).astype(np.float32)
    m = decompose(D, X, "omp", 4)
    assert m.shape == (7, 60) and (np.diff(m.indptr) == 4).all() and m.dtype == np.float32
    ref = SparseCoder(dictionary=D, transform_algorithm="omp", transform_n_nonzero_coefs=4).transform(X)
    np.testing.assert_allclose(m.toarray(), ref, atol=1e-4)
    m = decompose(D, X, "nnlasso", 4, l1_penalty=2.0)
    assert m.shape == (7, 60) and m.dtype == np.float32 and (m.data > 0).all()
    ref = np.stack([Lasso(alpha=2.0 / (2 * 10), fit_intercept=False, positive=True, max_iter=100000, tol=1e-12)
                    .fit(D.T.astype(np.float64), x.astype(np.float64)).coef_ for x in X])  # same minimiser
    np.testing.assert_array_equal(m.toarray() > 0, ref > 1e-12)
    np.testing.assert_allclose(m.toarray(), ref, atol=1e-5)
    np.testing.assert_allclose(nnlasso_objective(m.toarray(), D, X, 2.0), nnlasso_objective(ref, D, X, 2.0),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="--solver"):
        decompose(D, X, "lars", 4)


def test_reconstruction_logits_is_the_original_formula():
    """The original --evaluate, per image: rep - sum_k e_k + sum_k mean_k + sum_k <e_k - mean_k, rec_k> rec_k."""
    rng = np.random.default_rng(5)
    b, K, d, C = 3, 6, 5, 4
    e = rng.standard_normal((b, K, d))
    r = rng.standard_normal((b, d))
    mean = rng.standard_normal((K, d))
    rec = rng.standard_normal((K, d))
    W = rng.standard_normal((d, C))
    out = reconstruction_logits(*(torch.from_numpy(a).float() for a in (e, r, mean, rec, W)), coefficient=100.0)
    for i in range(b):
        rep = 100 * r[i] / np.linalg.norm(r[i])
        abl = rep - e[i].sum(0) + mean.sum(0)
        orig, proj = abl.copy(), abl.copy()
        for k in range(K):
            orig += np.dot(e[i, k] - mean[k], rec[k]) * rec[k]
            proj += np.dot(e[i, k] - mean[k], rec[k]) / np.dot(rec[k], rec[k]) * rec[k]
        for key, want in [("baseline", rep), ("all_neurons_mean_ablated", abl), ("reconstructed", orig),
                          ("reconstructed_projection", proj)]:
            np.testing.assert_allclose(out[key][i].numpy(), want @ W, rtol=1e-4, atol=1e-3)


def test_bench_omp_smoke(tmp_path):
    """bench/bench_omp.py on a tiny problem, both paths (scikit-learn at the full size, and on a smaller
    dictionary with extrapolation): runs, and our codes agree with scikit-learn's on the checked signals."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "bench"))
    import bench_omp

    for max_gib, sizes in [(1.0, ["600"]), (0.0115, ["500", "1000"])]:
        args = bench_omp.get_args_parser().parse_args(
            ["--signals", "40", "--dim", "16", "--atoms", "1200" if len(sizes) == 2 else "600", "--k", "6",
             "--sklearn_signals", "5", "--sklearn_max_gib", str(max_gib), "--json", str(tmp_path / "b.json")])
        res = bench_omp.main(args)
        assert sorted(res["sklearn"], key=int) == sizes
        for r in res["sklearn"].values():
            assert r["check"]["same_support_fraction"] == 1.0
            assert r["check"]["max_abs_coef_diff"] < 1e-4 * r["check"]["max_abs_coef"] + 1e-6
        assert ("ratio_full" in res) == (len(sizes) == 1)
        assert json.loads((tmp_path / "b.json").read_text())["table"]
