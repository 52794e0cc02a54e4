"""TextSpan for all heads of the last layers: the batched torch version against a straightforward NumPy port.

Synthetic data of the shape of ViT-L-14 on ImageNet val (default: 50,000 images, 4 last layers x 16 heads,
d = 768, 3,500 texts, m = 60 texts per head, w_ov_rank 80), timed side by side in one run:

- ``batched`` (what compute_complete_text_set.py does): one streamed pass of per-head statistics over the
  images (all heads), TextSpan for all heads at once in the rank-k text space, and each head's [B, d]
  reconstruction.
- ``numpy``: ``utils.text.textspan.textspan_reference_numpy``, the algorithm as written (SVD of [B, d], then per
  step data @ texts [B, T], std, deflation of data and texts), one head at a time, float32 like the original.
  It is slow (minutes per head on a laptop CPU), so it runs on ``--baseline_heads`` heads (default 1) and
  its time is scaled to all heads; ``--baseline_iters`` can also cut its steps (scaled linearly, the steps
  cost the same). Both facts are printed.

Each head's data is generated from its own seed (low-rank signal + noise + a mean), so both sides see the
same numbers, and only one group of heads is in memory at a time (``--group``); generation is not timed.
The chosen texts of the baseline heads are compared, and the reconstructions' max difference is printed.

    python bench/bench_textspan.py                       # the full ViT-L-14 shape (several minutes)
    python bench/bench_textspan.py --images 5000 --texts 1000 --m 20 --heads 4   # quick
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.text.textspan import (HeadStats, HeadStatsAccumulator, reconstruct, textspan_from_stats,  # noqa: E402
                                 textspan_reference_numpy)


def head_data(i: int, B: int, d: int, signal_rank: int = 96, seed: int = 0) -> torch.Tensor:
    """Head i's synthetic outputs [B, d], float32: decaying-spectrum low-rank signal + noise + a mean."""
    g = torch.Generator().manual_seed(seed * 100003 + i)
    scales = torch.logspace(0, -2, signal_rank)
    basis = torch.randn(signal_rank, d, generator=g) / d ** 0.5
    z = torch.randn(B, signal_rank, generator=g) * scales
    x = z @ basis + 0.003 * torch.randn(B, d, generator=g)
    return x + 0.05 * torch.randn(d, generator=g)


def texts_matrix(T: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7)
    t = torch.randn(T, d, generator=g)
    return t / t.norm(dim=-1, keepdim=True)


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50000)
    p.add_argument("--layers", type=int, default=4, help="last layers (all their heads are processed)")
    p.add_argument("--heads", type=int, default=16, help="heads per layer")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--texts", type=int, default=3500)
    p.add_argument("--m", type=int, default=60, help="texts per head")
    p.add_argument("--rank", type=int, default=80, help="w_ov_rank")
    p.add_argument("--group", type=int, default=4, help="heads generated / held in memory at once")
    p.add_argument("--baseline_heads", type=int, default=1, help="heads the NumPy port runs on (then scaled)")
    p.add_argument("--baseline_iters", type=int, default=None, help="steps the NumPy port runs (default: m)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--stats_dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the per-chunk scatter products (compute_complete_text_set.py: float64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()

    nh, B, d, dev = args.layers * args.heads, args.images, args.dim, args.device
    texts = texts_matrix(args.texts, d, args.seed)
    print(f"TextSpan bench: {nh} heads ({args.layers} layers x {args.heads}), B={B}, d={d}, T={args.texts}, "
          f"m={args.m}, w_ov_rank={args.rank}, device={dev}, stats {args.stats_dtype}, "
          f"torch threads={torch.get_num_threads()}")

    # ---- batched: pass 1 (stats), TextSpan for all heads, reconstructions
    t_stats = t_rec = 0.0
    means, scatters = [], []
    for g0 in range(0, nh, args.group):  # the statistics pass, one group of heads in memory at a time
        group = torch.stack([head_data(i, B, d, seed=args.seed) for i in range(g0, min(nh, g0 + args.group))])
        acc = HeadStatsAccumulator(len(group), d, dev, getattr(torch, args.stats_dtype))

        def feed():  # in chunks of images, as compute_complete_text_set.py streams them
            for s in range(0, B, 8192):
                acc.update(group[:, s:s + 8192].to(dev))
        _, t = timed(feed, dev)
        t_stats += t
        part = acc.finalize()
        means.append(part.mean)
        scatters.append(part.scatter)
        del group
    stats = HeadStats(B, torch.cat(means), torch.cat(scatters))
    res, t_span = timed(lambda: textspan_from_stats(stats, texts, args.m, args.rank, dev), dev)
    basis = res.basis()
    recs = {}
    for g0 in range(0, nh, args.group):
        idx = list(range(g0, min(nh, g0 + args.group)))
        group = torch.stack([head_data(i, B, d, seed=args.seed) for i in idx]).to(dev)
        rec, t = timed(lambda: reconstruct(group, res.mean[idx].float(), basis[idx].float()), dev)
        t_rec += t
        for j, i in enumerate(idx):
            if i < args.baseline_heads:
                recs[i] = rec[j].cpu().numpy()
        del group, rec
    t_ours = t_stats + t_span + t_rec
    indices = res.indices
    del stats, means, scatters, res, basis  # free the batched side's memory before the port runs
    print(f"batched torch : stats {t_stats:8.2f} s | TextSpan (all heads) {t_span:7.2f} s | "
          f"reconstructions {t_rec:7.2f} s | total {t_ours:8.2f} s for {nh} heads")

    # ---- the straightforward NumPy port, on a subset of heads
    iters = args.baseline_iters or args.m
    t_np, agree, maxdiff = 0.0, True, 0.0
    tf = texts.numpy()
    for i in range(args.baseline_heads):
        x = head_data(i, B, d, seed=args.seed).numpy()
        (rec_np, chosen), t = timed(lambda: textspan_reference_numpy(x, tf, iters, args.rank), "cpu")
        t_np += t
        agree &= list(chosen) == indices[i][:iters].tolist()
        if iters == args.m:
            maxdiff = max(maxdiff, float(np.abs(rec_np - recs[i]).max()))
        print(f"numpy port    : head {i}: {t:8.2f} s ({iters} steps); same texts as batched: "
              f"{list(chosen) == indices[i][:iters].tolist()}")
    per_head = t_np / args.baseline_heads * (args.m / iters)
    t_np_all = per_head * nh
    scaled = []
    if args.baseline_heads < nh:
        scaled.append(f"{args.baseline_heads} of {nh} heads")
    if iters < args.m:
        scaled.append(f"{iters} of {args.m} steps")
    note = f" (measured on {' and '.join(scaled)}, scaled)" if scaled else ""
    print(f"numpy port    : {per_head:8.2f} s per head -> {t_np_all:9.1f} s for {nh} heads{note}")
    print(f"texts agree on the measured heads: {agree}; reconstruction max |diff|: {maxdiff:.2e}")
    print(f"speed-up (numpy port / batched torch): {t_np_all / t_ours:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "batched_s": {"stats": t_stats, "textspan": t_span, "reconstruct": t_rec,
                                              "total": t_ours},
            "numpy_s_per_head": per_head, "numpy_s_all_heads": t_np_all, "numpy_scaled_from": scaled,
            "ratio": t_np_all / t_ours, "texts_agree": agree, "reconstruction_maxdiff": maxdiff}, indent=1))


if __name__ == "__main__":
    main()
