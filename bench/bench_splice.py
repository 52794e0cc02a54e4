"""SpLiCE's solve on CPU: our batched ADMM (utils.solvers.nnlasso.ScreenedADMM, each image stopping on its own
residuals) against SpLiCE's per-image scikit-learn loop (-solver skl, utils.splice.solve_skl: one
Lasso(alpha = l1 / (2 d), positive=True, fit_intercept=False, max_iter=10000, tol=1e-6) per image, as SpLiCE's
SPLICE.decompose), at SpLiCE's size: 10,000 concepts x 512 dims, 256 images, l1_penalty 0.25.

Data (no CLIP weights here): a CLIP-like synthetic problem. Concepts are Gaussian vectors with a decaying
spectrum (dimension k scaled by 1/sqrt(k)), made into a dictionary exactly as SpLiCE does (normalise, centre
over the concepts, normalise). Each image is a normalised sparse non-negative mix of --mix concepts plus
noise, centred and normalised with an image mean as SpLiCE does with its targets.

The machine may be shared: the two solvers run alternately, --repeats times each, and the best time of each
is reported. Both run on one core by default (--threads; scikit-learn's coordinate descent is single-threaded
anyway). The supports are compared: every weight above 1e-3 in one solution must be non-zero in the other.
--dense_images N also times SpLiCE's own ADMM formulation (dense [T, T]-sized updates, batched, its random
start, the batch stopping when all its images have converged: utils.solvers.nnlasso.nnlasso_admm) on the first N images.

    python bench/bench_splice.py                 # the full problem (a few minutes)
    python bench/bench_splice.py --smoke         # tiny, for the tests
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.solvers.nnlasso import ScreenedADMM  # noqa: E402
from utils.splice import centre_concepts, solve_skl  # noqa: E402


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
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--dense_images", type=int, default=0, help="also time SpLiCE's dense ADMM on this many images")
    p.add_argument("--repeats", type=int, default=3, help="best of this many alternating timings")
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


def main(args: argparse.Namespace) -> dict:
    if args.smoke:
        args.concepts, args.dim, args.images, args.repeats = 300, 32, 8, 1
    torch.set_num_threads(args.threads)
    C, Y = problem(args.concepts, args.dim, args.images, args.mix, args.noise, args.seed)
    bs = args.batch_size
    best = {"skl": float("inf"), "admm": float("inf"), "admm_setup": float("inf")}
    for r in range(args.repeats):
        t = time.perf_counter()
        w_skl = solve_skl(C, Y, args.l1_penalty).numpy()
        best["skl"] = min(best["skl"], time.perf_counter() - t)
        t = time.perf_counter()
        solver = ScreenedADMM(C)
        t_setup = time.perf_counter() - t
        w_admm, iters = solver.fit(Y, args.l1_penalty, batch_size=bs, return_iters=True)
        best["admm"] = min(best["admm"], time.perf_counter() - t)
        best["admm_setup"] = min(best["admm_setup"], t_setup)
        print(f"repeat {r + 1}/{args.repeats}: skl {best['skl']:.2f} s, admm {best['admm']:.2f} s (best so far)",
              flush=True)
    big_skl, big_admm = w_skl > 1e-3, w_admm > 1e-3
    same_support = bool(((~big_skl) | (w_admm > 0)).all() and ((~big_admm) | (w_skl > 0)).all())
    res = {
        "problem": {"concepts": args.concepts, "dim": args.dim, "images": args.images, "l1_penalty": args.l1_penalty,
                    "mix": args.mix, "noise": args.noise, "threads": torch.get_num_threads(), "admm_batch": bs},
        "seconds": best,
        "speedup": best["skl"] / best["admm"],
        "max_abs_diff": float(np.abs(w_admm - w_skl).max()),
        "same_support": same_support,
        "l0_mean": float((w_skl > 0).sum(1).mean()),
        "admm_iterations": {"mean": float(iters.mean()), "max": int(iters.max())},
    }
    print(f"{args.images} images, {args.concepts} concepts x {args.dim} dims, l1 {args.l1_penalty}, "
          f"{res['problem']['threads']} threads; L0 {res['l0_mean']:.1f}")
    print(f"  skl  (SpLiCE's per-image scikit-learn Lasso): {best['skl']:8.2f} s")
    print(f"  admm (batched, per-image stopping)          : {best['admm']:8.2f} s "
          f"(setup {best['admm_setup']:.2f} s; iterations mean {iters.mean():.0f}, max {iters.max()})")
    print(f"  speedup {res['speedup']:.1f}x; max |w_admm - w_skl| {res['max_abs_diff']:.2e}; "
          f"same supports: {same_support}")
    if args.dense_images:
        from utils.solvers.nnlasso import nnlasso_admm

        nd = min(args.dense_images, args.images)
        t = time.perf_counter()
        w_dense, dense_iters = nnlasso_admm(C, Y[:nd], args.l1_penalty, return_iters=True)
        res["seconds"]["splice_dense_admm"] = time.perf_counter() - t
        res["splice_dense_admm"] = {"images": nd, "iterations": dense_iters, "per_image_vs_admm": (
            res["seconds"]["splice_dense_admm"] / nd) / (best["admm"] / args.images),
            "max_abs_diff_vs_skl": float(np.abs(w_dense - w_skl[:nd]).max())}
        print(f"  SpLiCE's dense ADMM on {nd} images: {res['seconds']['splice_dense_admm']:.2f} s "
              f"({res['splice_dense_admm']['per_image_vs_admm']:.0f}x our admm's time per image)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(get_args_parser().parse_args())
