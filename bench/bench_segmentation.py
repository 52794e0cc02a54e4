"""Images per second of the segmentation evaluation against a plain forward, on the same images, in one run.

Rows (same batches of random images and elliptic masks, weights random unless --pretrained is given):
  plain encode_image         model.encode_image (the reference; ratio 1.0)
  segmentation (sum mode)    what compute_segmentations.py runs per batch: the decomposition with spatial="sum",
                             heatmaps, pixAcc/IoU counts and the batched AP (utils.segmentation.evaluate_batch)
  segmentation (full tensor) the same from the full spatial tensor [b, L, N, H, d] (spatial=True), as the original
  sum mode + sklearn AP      the sum-mode heatmaps with sklearn's average_precision_score per image (the original's
                             AP path; shows what the batched AP saves)

    python bench/bench_segmentation.py --model ViT-B-16 --pretrained none --device cpu --num_images 32
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prs_hook import Decomposer  # noqa: E402
from utils.cli import add_model_args, load_model_from_args  # noqa: E402
from utils.segmentation import class_heatmaps, evaluate_batch, grid_and_patch, spatial_image_terms  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Segmentation benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="ViT-B-16", pretrained="none")
    parser.add_argument("--num_images", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000, help="classifier columns (ImageNet: 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (the best is kept)")
    parser.add_argument("--skip_full", action="store_true", help="skip the full-tensor row (memory)")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(rows, batches, device, repeats: int) -> dict:
    """Best wall time per row over ``repeats`` passes over all batches; rows alternate within each repeat so
    that load drift on a shared machine hits them alike. One warm-up batch per row first."""
    for _, fn in rows:
        fn(*batches[0])
    best = {name: float("inf") for name, _ in rows}
    for _ in range(repeats):
        for name, fn in rows:
            _sync(device)
            t0 = time.perf_counter()
            for b in batches:
                fn(*b)
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model, _, _ = load_model_from_args(args)
    grid, patch = grid_and_patch(model)
    S = grid[0] * patch[0]
    d = model.visual.output_dim
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.num_images, 3, S, S, generator=g)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    centres = torch.rand(args.num_images, 2, generator=g) * S * 0.5 + S * 0.25
    masks = (((yy - centres[:, :1, None]) / (0.3 * S)) ** 2 + ((xx - centres[:, 1:, None]) / (0.25 * S)) ** 2 < 1)
    masks = masks.long()
    classifier = torch.nn.functional.normalize(torch.randn(d, args.classes, generator=g), dim=0).to(args.device)
    batches = [(images[i:i + args.batch_size], masks[i:i + args.batch_size])
               for i in range(0, args.num_images, args.batch_size)]

    def plain(x, _m):
        with torch.no_grad():
            model.encode_image(x.to(args.device)).cpu()

    engine = Decomposer(model, args.device)

    def seg_sum(x, m):
        evaluate_batch(engine, x, m, classifier, grid, patch, spatial="sum")

    def seg_full(x, m):
        evaluate_batch(engine, x, m, classifier, grid, patch, spatial=True)

    def seg_sklearn(x, m):
        from sklearn.metrics import average_precision_score

        r, terms = spatial_image_terms(engine, x, "sum")
        res, _, _ = class_heatmaps(terms, r, classifier, grid, patch)
        res = res.cpu().numpy()
        for h, t in zip(res, m.numpy()):
            average_precision_score(np.concatenate([(t == 0).ravel(), (t == 1).ravel()]),
                                    np.concatenate([1 - h.ravel(), h.ravel()]))

    rows = [("plain encode_image", plain), ("segmentation (sum mode)", seg_sum)]
    if not args.skip_full:
        rows.append(("segmentation (full tensor)", seg_full))
    rows.append(("sum mode + sklearn AP", seg_sklearn))
    results = {name: args.num_images / t for name, t in timed(rows, batches, args.device, args.repeats).items()}
    base = results["plain encode_image"]
    print(f"{args.model} ({args.pretrained}), {args.device}, {torch.get_num_threads()} threads, "
          f"{args.num_images} images {S}x{S}, batch {args.batch_size}, {args.classes} classes")
    print(f"| {'':28s} | images/s | vs plain forward |")
    print(f"|{'-' * 30}|---------:|-----------------:|")
    for name, v in results.items():
        print(f"| {name:28s} | {v:8.2f} | {v / base:15.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "images_per_s": results,
                                               "ratio_vs_plain": {k: v / base for k, v in results.items()}},
                                              indent=1))
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
