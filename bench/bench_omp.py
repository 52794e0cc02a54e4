"""Our batched torch OMP (utils.solvers.omp) against scikit-learn's SparseCoder(transform_algorithm='omp'), the
original's decomposition, on the paper's problem: 3,072 signals (ViT-B-32's MLP neurons) x 512 dims, a
30,000-atom text dictionary, k = 128 atoms per signal.

Data: a random Gaussian text set, centred and rescaled per embedding dimension exactly as
compute_sparse_decomposition.py does (coefficient 100), and random unit signals (like the neurons' PCs).
Both sides use float32 and the same number of CPU threads (--threads, for torch and for NumPy's BLAS).

scikit-learn is slow and memory-hungry: SparseCoder computes the [atoms, atoms] Gram matrix and then, in
orthogonal_mp_gram, holds a Fortran-ordered copy of it plus one more copy per signal: three Gram matrices
(30,000 atoms: 3 x 3.6 GB). So it runs
  * on --sklearn_signals signals (default 16), its time scaled to all signals as
    gram time + signals x (time per signal), both measured;
  * with at most --sklearn_max_gib of Gram copies (default 3.5): if the full dictionary does not fit, on the
    largest whole thousand of atoms that does (17,000 by default), side by side with ours on that same
    dictionary; it is then also timed on half that many atoms, and its time at the full size is
    extrapolated from those two points with the measured growth exponent (printed as an estimate). Pass
    --sklearn_max_gib 12 on a machine with the memory to time it at 30,000 atoms directly.
Ours always runs on all signals, at both dictionary sizes. On the sklearn subset the supports and
coefficients are compared.

    python bench/bench_omp.py                                   # the full problem (CPU: ~10-20 minutes)
    python bench/bench_omp.py --signals 512 --atoms 5000 --k 32   # quick
"""
import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.neurons.sparse import build_text_dictionary  # noqa: E402
from utils.solvers.omp import omp  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_omp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", type=int, default=3072)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--atoms", type=int, default=30000)
    p.add_argument("--k", type=int, default=128, help="atoms per signal")
    p.add_argument("--sklearn_signals", type=int, default=16, help="signals timed for scikit-learn")
    p.add_argument("--sklearn_max_gib", type=float, default=3.5,
                   help="memory allowed for scikit-learn's three [atoms, atoms] float32 Gram copies")
    p.add_argument("--device", default="cpu", help="device of our OMP")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: torch's)")
    p.add_argument("--batch_size", type=int, default=1024, help="our OMP: signals per chunk")
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings, each side (shared machines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def problem(n: int, d: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary [T, d] (centred, per-dimension scaled, x100, float32) and unit signals [n, d]."""
    rng = np.random.default_rng(seed)
    texts = rng.standard_normal((T, d), dtype=np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    X = rng.standard_normal((n, d), dtype=np.float32)
    return build_text_dictionary(texts, 100.0, "per_dimension"), X / np.linalg.norm(X, axis=1, keepdims=True)


def time_ours(D: np.ndarray, X: np.ndarray, k: int, device: str, batch_size: int, repeats: int):
    """Our OMP on X's first chunk (``batch_size`` signals, or all if fewer), best of ``repeats``, scaled to
    all of X (its chunks are independent and cost the same). Returns (codes of that chunk, seconds for X)."""
    Dt, Xt = torch.from_numpy(D), torch.from_numpy(X[:batch_size])
    omp(Dt, Xt[:8], min(k, 4), device=device)  # warm-up (thread pool; on GPU kernels and allocator), untimed
    best = math.inf
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        codes = omp(Dt, Xt, k, device=device, batch_size=batch_size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return codes, best * len(X) / len(Xt)


def time_sklearn(D: np.ndarray, X: np.ndarray, k: int, n_total: int, repeats: int) -> dict:
    """SparseCoder.transform on X (a subset), best of ``repeats``; its time scaled to n_total signals as
    Gram time + n_total x time per signal (the Gram product is also timed alone)."""
    from sklearn.decomposition import SparseCoder

    coder = SparseCoder(dictionary=D, transform_algorithm="omp", transform_alpha=1e-4, transform_n_nonzero_coefs=k)
    t_gram = t_loop = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.dot(D, D.T)  # what transform starts with; timed alone to separate the per-signal part
        g = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            codes = coder.transform(X)
            t_run = time.perf_counter() - t0
        t_gram, t_loop = min(t_gram, g), min(t_loop, max(t_run - g, 1e-9))
    per_signal = t_loop / len(X)
    return {"codes": codes, "gram_s": t_gram, "run_s": t_gram + t_loop, "signals": len(X),
            "per_signal_s": per_signal, "scaled_s": t_gram + n_total * per_signal}


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    same = [(set(np.nonzero(a)[0]) == set(np.nonzero(b)[0])) for a, b in zip(ours, ref)]
    return {"same_support_fraction": float(np.mean(same)), "max_abs_coef_diff": float(np.abs(ours - ref).max()),
            "max_abs_coef": float(np.abs(ref).max())}


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)  # NumPy's BLAS, for scikit-learn, with as many threads as torch
    n, d, T, k, m = args.signals, args.dim, args.atoms, args.k, min(args.sklearn_signals, args.signals)
    cap = int(math.sqrt(args.sklearn_max_gib * 2 ** 30 / (3 * 4)))  # atoms whose 3 Gram copies fit
    T_sk = min(T, cap - cap % 1000 if cap >= 1000 else cap)
    if T_sk < 2 * k:
        raise SystemExit(f"--sklearn_max_gib {args.sklearn_max_gib}: room for only {T_sk} atoms")
    print(f"problem: {n} signals x {d} dims, {T} atoms, k = {k}; float32; {threads} CPU threads; "
          f"ours on {args.device}; every time is the best of {args.repeats}")
    D, X = problem(n, d, T, args.seed)
    rows = []

    n_ours = min(n, args.batch_size)
    codes, t_ours = time_ours(D, X, k, args.device, args.batch_size, args.repeats)
    print(f"ours      {T:>6} atoms, {n_ours} signals -> scaled to {n}: {t_ours:8.1f} s  "
          f"({1e3 * t_ours / n:.1f} ms/signal)")
    rows.append({"what": f"ours ({args.device})", "atoms": T, "signals": f"{n_ours} -> {n}", "seconds": t_ours})
    result = {"args": vars(args), "threads": threads, "ours_full_s": t_ours}

    sizes = [T_sk] if T_sk == T else [T_sk // 2, T_sk]
    sk = {}
    for Ts in sizes:
        Ds = D if Ts == T else build_text_dictionary(np.random.default_rng(args.seed + Ts).standard_normal(
            (Ts, d), dtype=np.float32), 100.0, "per_dimension")
        ref = time_sklearn(Ds, X[:m], k, n, args.repeats)
        sk[Ts] = ref
        print(f"sklearn   {Ts:>6} atoms, {m} signals: {ref['run_s']:8.1f} s (Gram {ref['gram_s']:.1f} s, "
              f"{ref['per_signal_s']:.3f} s/signal) -> scaled to {n} signals: {ref['scaled_s']:8.1f} s")
        if Ts != T:
            c_s, t_s = time_ours(Ds, X, k, args.device, args.batch_size, args.repeats)
            print(f"ours      {Ts:>6} atoms, {n_ours} signals -> scaled to {n}: {t_s:8.1f} s")
            rows.append({"what": f"ours ({args.device})", "atoms": Ts, "signals": f"{n_ours} -> {n}", "seconds": t_s})
            sk[Ts]["ours_s"] = t_s
            sk[Ts]["check"] = compare(c_s.to_dense()[:m], ref["codes"])
        else:
            sk[Ts]["ours_s"] = t_ours
            sk[Ts]["check"] = compare(codes.to_dense()[:m], ref["codes"])
        rows.append({"what": "scikit-learn SparseCoder", "atoms": Ts, "signals": f"{m} -> {n}",
                     "seconds": ref["scaled_s"]})
        print(f"  check on {m} signals: same support {100 * sk[Ts]['check']['same_support_fraction']:.0f} %, "
              f"max |coef diff| {sk[Ts]['check']['max_abs_coef_diff']:.2e} (max |coef| "
              f"{sk[Ts]['check']['max_abs_coef']:.2e})")
        print(f"  ratio at {Ts} atoms (measured side by side): {ref['scaled_s'] / sk[Ts]['ours_s']:.1f}x")

    result["sklearn"] = {str(t): {k_: v for k_, v in r.items() if k_ != "codes"} for t, r in sk.items()}
    if T_sk == T:
        ratio = sk[T]["scaled_s"] / t_ours
        print(f"\nours vs scikit-learn at {T} atoms: {ratio:.1f}x faster")
        result["ratio_full"] = ratio
    else:
        a, b = sizes
        expo = math.log(sk[b]["per_signal_s"] / sk[a]["per_signal_s"]) / math.log(b / a)
        per_sig = sk[b]["per_signal_s"] * (T / b) ** expo
        gram = sk[b]["gram_s"] * (T / b) ** 2
        est = gram + n * per_sig
        ratio_meas = sk[b]["scaled_s"] / sk[b]["ours_s"]
        print(f"\nscikit-learn per-signal time grows as atoms^{expo:.2f} ({a} -> {b} atoms); at {T} atoms it would "
              f"need {3 * 4 * T * T / 2 ** 30:.1f} GiB, so it is estimated: {per_sig:.2f} s/signal, "
              f"Gram {gram:.0f} s -> {est:.0f} s for {n} signals")
        print(f"ours vs scikit-learn: {ratio_meas:.1f}x at {b} atoms (measured side by side); "
              f"about {est / t_ours:.0f}x at {T} atoms (estimated)")
        rows.append({"what": "scikit-learn SparseCoder (estimate)", "atoms": T, "signals": n, "seconds": est})
        result.update(ratio_measured=ratio_meas, ratio_measured_atoms=b, ratio_full_estimate=est / t_ours,
                      sklearn_growth_exponent=expo)
    print("\n| method | atoms | signals (timed -> scaled) | seconds | per signal (ms) |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["atoms"], r["what"])):
        print(f"| {r['what']} | {r['atoms']:,} | {r['signals']} | {r['seconds']:.1f} | "
              f"{1e3 * r['seconds'] / n:.1f} |")
    result["table"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
