"""SpLiCE's solve, three solvers side by side on one problem: SpLiCE's per-image scikit-learn loop (-solver skl,
utils.splice.solve_skl: one Lasso(alpha = l1 / (2 d), positive=True, fit_intercept=False, max_iter=10000,
tol=1e-6) per image, as SpLiCE's SPLICE.decompose), our batched ADMM (-solver admm,
utils.solvers.nnlasso.ScreenedADMM) and our exact active-set solver (-solver active_set,
utils.solvers.active_set.ActiveSetLasso), at SpLiCE's size: 10,000 concepts x 512 dims, 256 images, l1 0.25.

Data (no CLIP weights here): a CLIP-like synthetic problem. Concepts are Gaussian vectors with a decaying
spectrum (dimension k scaled by 1/sqrt(k)), made into a dictionary exactly as SpLiCE does (normalise, centre
over the concepts, normalise). Each image is a normalised sparse non-negative mix of --mix concepts plus
noise, centred and normalised with an image mean as SpLiCE does with its targets.

Timing: the solvers run in turn within each of --repeats rounds (so a shared machine's load hits them alike),
each after an untimed warm-up on 8 images; the median of the rounds is reported, and the ratios are of medians
from this one run. Both the wall time and the process's CPU time are recorded: with one thread, the CPU time is
what the solver itself used, less disturbed by other jobs competing for the cores of a shared machine.
Everything runs on --threads CPU threads (default 1: torch, numba, and numpy's and scikit-learn's BLAS through
threadpoolctl); --device cuda moves admm and active_set (skl stays on the CPU). The solvers' setup (ADMM's
eigendecomposition, the active set's dictionary copies) is timed with them; the warm-up also loads (or, the
first time, compiles) the active set's numba kernels.

Checks against skl, per solver, in float64 on the exact data: the supports (exactly equal non-zero sets, and
"every weight above 1e-3 in one is non-zero in the other"), max |w - w_skl|, the KKT residual (max over atoms of
|c_j - l1/2| on the support and (c_j - l1/2)_+ off it, c = C (y - C^T w)) and the objective
|y - C^T w|^2 + l1 sum(w) minus skl's (<= 0: no worse). active_set is given float64 targets (the float32 data,
exactly) and returns float64 weights; admm and skl return float32. --dense_images N also times SpLiCE's own ADMM
formulation (utils.solvers.nnlasso.nnlasso_admm) on the first N images.

    python bench/bench_splice.py                 # the full problem (a few minutes, mostly scikit-learn)
    python bench/bench_splice.py --smoke         # tiny, for the tests
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.solvers.active_set import ActiveSetLasso  # noqa: E402
from utils.solvers.nnlasso import ScreenedADMM  # noqa: E402
from utils.splice import centre_concepts, solve_skl  # noqa: E402

SOLVERS = ("skl", "admm", "active_set")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_splice", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, default=10000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--l1_penalty", type=float, default=0.25)
    p.add_argument("--mix", type=int, default=12, help="concepts mixed into each synthetic image")
    p.add_argument("--noise", type=float, default=0.6, help="relative noise of the synthetic images")
    p.add_argument("--batch_size", type=int, default=64, help="ADMM: images iterated together")
    p.add_argument("--active_batch_size", type=int, default=256, help="active_set: images solved together")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch, BLAS)")
    p.add_argument("--device", default="cpu", help="where admm and active_set run (skl: the CPU)")
    p.add_argument("--dense_images", type=int, default=0, help="also time SpLiCE's dense ADMM on this many images")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median of each solver's times is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny problem (300 concepts x 32 dims x 8 images)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def problem(T: int, d: int, n: int, mix: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dictionary [T, d] (SpLiCE's normalise-centre-normalise) and targets [n, d] (centred, normalised)."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
    C = centre_concepts(torch.randn(T, d, generator=g, dtype=torch.float64) * spectrum).double()
    W = torch.zeros(n, T, dtype=torch.float64)
    for i in range(n):
        W[i, torch.randperm(T, generator=g)[:mix]] = torch.rand(mix, generator=g, dtype=torch.float64)
    Z = W @ C
    Z = Z / Z.norm(dim=1, keepdim=True) + noise * torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum \
        / spectrum.norm()
    Z = torch.nn.functional.normalize(Z, dim=1)
    mean = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0) * 0.5
    targets = torch.nn.functional.normalize(Z - mean, dim=1)
    return C.float(), targets.float()


def objective_and_kkt(C: np.ndarray, Y: np.ndarray, W: np.ndarray, l1: float) -> tuple[np.ndarray, np.ndarray]:
    """SpLiCE's objective |y - C^T w|^2 + l1 sum(w) and the KKT residual, per image, in float64 [n]."""
    W = W.astype(np.float64)
    R = Y - W @ C
    c = R @ C.T - l1 / 2
    return (R * R).sum(1) + l1 * W.sum(1), np.where(W > 0, np.abs(c), np.clip(c, 0, None)).max(1)


def compare(w: np.ndarray, ref: np.ndarray, C: np.ndarray, Y: np.ndarray, l1: float) -> dict:
    """The checks of ``w`` against skl's ``ref`` (see the module docstring)."""
    obj, kkt = objective_and_kkt(C, Y, w, l1)
    obj_ref, _ = objective_and_kkt(C, Y, ref, l1)
    big, big_ref = w > 1e-3, ref > 1e-3
    return {"same_support_images": int(((w > 0) == (ref > 0)).all(1).sum()),
            "same_support_above_1e-3": bool((((~big) | (ref > 0)) & ((~big_ref) | (w > 0))).all()),
            "max_abs_diff": float(np.abs(w - ref).max()), "kkt_max": float(kkt.max()),
            "objective_minus_skl_max": float((obj - obj_ref).max()), "l0_mean": float((w > 0).sum(1).mean())}


def main(args: argparse.Namespace) -> dict:
    if args.smoke:
        args.concepts, args.dim, args.images, args.repeats = 300, 32, 8, 1
    with threadpool_limits(limits=args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    C, Y = problem(args.concepts, args.dim, args.images, args.mix, args.noise, args.seed)
    l1, dev = args.l1_penalty, torch.device(args.device)
    report = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def skl(Yi):
        return solve_skl(C, Yi, l1).numpy()

    def admm(Yi):
        return ScreenedADMM(C, device=dev).fit(Yi, l1, batch_size=args.batch_size)

    def active_set(Yi):
        w, report["active_set"] = ActiveSetLasso(C, device=dev).fit(Yi.double(), l1, return_report=True,
                                                                     batch_size=args.active_batch_size)
        return w

    run_solver = {"skl": skl, "admm": admm, "active_set": active_set}
    for name in SOLVERS[1:]:  # warm-up: thread pools, kernels, allocator
        run_solver[name](Y[:8])
    times = {name: [] for name in SOLVERS}
    cpu = {name: [] for name in SOLVERS}
    out = {}
    for r in range(args.repeats):
        for name in SOLVERS:
            sync()
            t, c = time.perf_counter(), time.process_time()
            out[name] = run_solver[name](Y)
            sync()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s (CPU {cpu[k][-1]:.3f} s)"
                                                            for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    C64, Y64 = C.double().numpy(), Y.double().numpy()
    checks = {name: compare(out[name], out["skl"], C64, Y64, l1) for name in SOLVERS}
    rep = report["active_set"]
    res = {
        "problem": {"concepts": args.concepts, "dim": args.dim, "images": args.images, "l1_penalty": l1,
                    "mix": args.mix, "noise": args.noise, "threads": args.threads, "device": str(dev),
                    "admm_batch": args.batch_size, "active_set_batch": args.active_batch_size,
                    "repeats": args.repeats},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "seconds": {k: {"median": median[k], "all": times[k]} for k in SOLVERS},
        "cpu_seconds": {k: {"median": median_cpu[k], "all": cpu[k]} for k in SOLVERS},
        "speedup_vs_skl": {k: median["skl"] / median[k] for k in SOLVERS[1:]},
        "cpu_speedup_vs_skl": {k: median_cpu["skl"] / median_cpu[k] for k in SOLVERS[1:]},
        "checks_vs_skl": checks,
        "active_set": {"certified": int(rep.certified.sum()), "kkt_bound_max": float(rep.kkt.max()),
                       "rounds": {"mean": float(rep.rounds.mean()), "max": int(rep.rounds.max())},
                       "working_max": int(rep.working.max())},
    }
    # the smoke test's and gpu_summary's keys
    res["speedup"] = res["speedup_vs_skl"]["active_set"]
    res["same_support"] = checks["active_set"]["same_support_images"] == args.images
    res["max_abs_diff"] = checks["active_set"]["max_abs_diff"]
    n = args.images
    print(f"{n} images, {args.concepts} concepts x {args.dim} dims, l1 {l1}, {args.threads} thread(s), "
          f"{dev}; medians of {args.repeats}; L0 (skl) {checks['skl']['l0_mean']:.1f}")
    print(f"  {'solver':<11} {'median s':>9} {'vs skl':>7} {'CPU s':>8} {'vs skl':>7} {'same supports':>14} "
          f"{'max|w-skl|':>11} {'KKT max':>9} {'obj - skl':>10}")
    for name in SOLVERS:
        c = checks[name]
        ratio = "" if name == "skl" else f"{median['skl'] / median[name]:.1f}x"
        ratio_cpu = "" if name == "skl" else f"{median_cpu['skl'] / median_cpu[name]:.1f}x"
        print(f"  {name:<11} {median[name]:9.3f} {ratio:>7} {median_cpu[name]:8.3f} {ratio_cpu:>7} "
              f"{c['same_support_images']:>9}/{n:<4} {c['max_abs_diff']:11.1e} {c['kkt_max']:9.1e} "
              f"{c['objective_minus_skl_max']:10.1e}")
    a = res["active_set"]
    print(f"  active_set: {a['certified']}/{n} certified (KKT bound {a['kkt_bound_max']:.1e}), rounds mean "
          f"{a['rounds']['mean']:.1f} max {a['rounds']['max']}, working set max {a['working_max']}")
    if args.dense_images:
        from utils.solvers.nnlasso import nnlasso_admm

        nd = min(args.dense_images, n)
        t = time.perf_counter()
        w_dense, dense_iters = nnlasso_admm(C, Y[:nd], l1, return_iters=True)
        res["seconds"]["splice_dense_admm"] = time.perf_counter() - t
        res["splice_dense_admm"] = {"images": nd, "iterations": dense_iters, "per_image_vs_admm": (
            res["seconds"]["splice_dense_admm"] / nd) / (median["admm"] / n),
            "max_abs_diff_vs_skl": float(np.abs(w_dense - out["skl"][:nd]).max())}
        print(f"  SpLiCE's dense ADMM on {nd} images: {res['seconds']['splice_dense_admm']:.2f} s "
              f"({res['splice_dense_admm']['per_image_vs_admm']:.0f}x our admm's time per image)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())
