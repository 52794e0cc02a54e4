"""Throughput of compute_prs's decomposition against a plain ``model.encode_image``, side by side in one run.

Same device, model, batch and inputs for every mode; modes are interleaved round by round so machine noise
hits them alike, and the median images/s is reported with its ratio to the plain forward. Peak memory is
measured per mode in a fresh child process: the extra memory one batch needs above the loaded model and inputs
(CPU: peak RSS after a warm-up batch, Linux ``clear_refs``; CUDA: ``max_memory_allocated``, which includes the
weights).

    python bench/bench_prs.py --model ViT-B-16 --batch_size 64 --device cpu
    python bench/bench_prs.py --model ViT-H-14 --batch_size 128 --device cuda
    python bench/bench_prs.py --model ViT-B-16-SigLIP --batch_size 4 --modes plain,prs,spatial_sum  # a pooled tower

Modes: ``plain`` = ``model.encode_image``; ``prs`` = what compute_prs.py does per batch (``prs_hook.Decomposer``,
copy of attn/mlp/cls_attn to host); ``spatial`` = the same with the per-token axis ([b, L, N, H, d], as the demo
and the original spatial mode need); ``spatial_sum`` = spatial terms summed over layers and heads in the forward
([b, N, d], what segmentation needs).

``--baseline FILE`` also times another version of ``prs_hook.py`` (through its ``hook_prs_logger`` API), as
``base:<mode>`` beside each mode, interleaved in the same run: a before/after comparison of the engine, e.g.

    git show 54fc4b0:prs_hook.py > /tmp/prs_hook_before.py
    python bench/bench_prs.py --baseline /tmp/prs_hook_before.py --no_memory
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prs_hook import Decomposer  # noqa: E402

MODES = ["plain", "prs", "spatial", "spatial_sum"]


def build(model_name: str, device: str):
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None).to(device).eval()  # weights do not change speed
    return model


def load_baseline(path: str):
    """Another ``prs_hook.py`` (e.g. an earlier commit's) as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_prs_hook", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_step(model, mode: str, device: str, baseline=None):
    """A callable that processes one batch in ``mode`` and returns when the results are on the host
    (``base:<mode>``: with the ``baseline`` module's ``hook_prs_logger``)."""
    if mode == "plain":
        @torch.no_grad()
        def step(x):
            return model.encode_image(x).cpu()
        return step
    base, _, kind = mode.rpartition(":")
    spatial = {"prs": False, "spatial": True, "spatial_sum": "sum"}[kind]
    if base:
        prs = baseline.hook_prs_logger(model, device, spatial=spatial)

        def step(x):
            attn, mlps = prs.finalize(prs.encode_image(x))
            return attn.cpu(), mlps.cpu(), prs.cls_attentions.cpu()
        step.release = prs.reinit  # drop the batch the logger still holds
        return step
    engine = Decomposer(model, device)

    def step(x):
        return engine(x, spatial=spatial).numpy("attn", "mlp", "cls_attn")
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_child(args, mode: str) -> float:
    """Peak memory (GiB) of one batch in ``mode``, in a fresh process."""
    cmd = [sys.executable, __file__, "--model", args.model, "--batch_size", str(args.batch_size), "--device",
           args.device, "--_child", mode] + (["--baseline", args.baseline] if args.baseline else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_gib"]


def child(args) -> None:
    model = build(args.model, args.device)
    x = torch.randn(args.batch_size, 3, *model.visual.image_size, device=args.device)
    step = make_step(model, args._child, args.device, load_baseline(args.baseline) if args.baseline else None)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        step(x)
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        step(x)  # warm-up: allocator pools and lazy init are not the mode's cost
        getattr(step, "release", lambda: None)()
        base = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (Linux)
        step(x)
        peak = (_rss_kib("VmHWM") - base) / 2 ** 20  # above the resident model and inputs
    print(json.dumps({"peak_gib": peak}))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=3, help="timed batches per mode (after one warm-up)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--no_memory", action="store_true", help="skip the per-mode peak-memory child processes")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--baseline", default=None, help="another prs_hook.py to time beside this one (base:<mode>)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        return child(args)
    modes = args.modes.split(",")
    baseline = load_baseline(args.baseline) if args.baseline else None
    if baseline is not None:
        modes = [x for m in modes for x in ([m] if m == "plain" else [m, f"base:{m}"])]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 throughout, like the tests
    model = build(args.model, args.device)
    x = torch.randn(args.batch_size, 3, *model.visual.image_size, device=args.device,
                    generator=torch.Generator(args.device).manual_seed(0))
    steps = {m: make_step(model, m, args.device, baseline) for m in modes}
    for m in modes:  # warm-up
        steps[m](x)
    times = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            sync(args.device)
            t0 = time.perf_counter()
            steps[m](x)
            sync(args.device)
            times[m].append(time.perf_counter() - t0)
    del steps
    res = {}
    for m in modes:
        ips = args.batch_size / statistics.median(times[m])
        res[m] = {"images_per_s": ips}
    base = res.get("plain", {}).get("images_per_s")
    for m in modes:
        if base:
            res[m]["ratio_vs_plain"] = res[m]["images_per_s"] / base
        if not args.no_memory:
            res[m]["peak_gib"] = peak_memory_child(args, m)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{args.model}, batch {args.batch_size}, {dev}, fp32, median of {args.rounds} rounds")
    print("| mode | images/s | ratio vs plain | peak memory (GiB) |\n|---|---|---|---|")
    for m in modes:
        r = res[m]
        print(f"| {m} | {r['images_per_s']:.2f} | {r.get('ratio_vs_plain', float('nan')):.2f} | "
              f"{r.get('peak_gib', float('nan')):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": dev, "results": res}, indent=1))


if __name__ == "__main__":
    main()
