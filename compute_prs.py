"""Project the residual stream of a dataset: per-layer, per-head direct contributions to the CLS embedding.

Writes, in --output_dir (paper 1 names; DESIGN.md section 3):
  {dataset}_attn_{model}.npy      [B, L, H, d]  per layer and head, summed over source tokens
  {dataset}_mlp_{model}.npy       [B, L+1, d]   index 0 = embedding term, then one per MLP
  {dataset}_cls_attn_{model}.npy  [B, L, d]     CLS->CLS attention term, summed over heads
  {dataset}_labels.npy            [B]           (binary_waterbirds: [B, 2] = class, background)
The parts of each image sum to its normalised embedding.
"""
import argparse
import os
from pathlib import Path

import tqdm
from torch.utils.data import DataLoader, Subset

from prs_hook import hook_prs_logger
from utils.datasets import build_dataset
from utils.factory import add_model_args, load_model_from_args, pretrained_name
from utils.io import StreamingArrays, atomic_save, labels_path, prs_paths
from utils.cli import run


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project residual stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=2, type=int, help="batch size")
    add_model_args(parser)
    parser.add_argument("--data_path", default=None, type=str, help="dataset root (not needed for 'sample')")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="imagenet, binary_waterbirds, CIFAR10, CIFAR100, sample, or any ImageFolder name")
    parser.add_argument("--num_workers", default=min(10, os.cpu_count() or 1), type=int)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def main(args: argparse.Namespace) -> dict:
    ds = build_dataset(args.dataset, args.data_path)  # validate the data before loading any weights
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model, preprocess, _ = load_model_from_args(args)
    ds.transform = preprocess
    # hooks for utils/scripts/compute_activation_values.py (PCLens): a subset of the images, other file names
    ds = args.select_images(ds) if getattr(args, "select_images", None) else ds
    names = getattr(args, "output_names", None)  # {"attn", "mlp", "cls_attn", "labels"} -> path
    atomic_save(names["labels"] if names else labels_path(args.output_dir, args.dataset), ds.labels)

    prs = hook_prs_logger(model, args.device, model_name=args.model)
    L, H, d, B = prs.num_layers, prs.num_heads, prs.out_dim, len(ds)
    paths = {k: names[k] for k in ("attn", "mlp", "cls_attn")} if names else prs_paths(args.output_dir, args.dataset,
                                                                                         args.model)
    shapes = {"attn": (B, L, H, d), "mlp": (B, L + 1, d), "cls_attn": (B, L, d)}
    meta = {"model": args.model, "pretrained": pretrained_name(args.pretrained), "dataset": args.dataset,
            "force_quick_gelu": args.force_quick_gelu}
    writer = StreamingArrays(paths, shapes, args.dtype, resume=args.resume, meta=meta)
    if writer.done:
        print(f"Resuming at image {writer.done} of {B}")
    loader = DataLoader(Subset(ds, range(writer.done, B)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    for images, _ in tqdm.tqdm(loader, desc=f"compute_prs {args.model} {args.dataset}", unit="batch"):
        representation = prs.encode_image(images)
        attentions, mlps = prs.finalize(representation)
        writer.write({"attn": attentions.cpu().numpy(), "mlp": mlps.cpu().numpy(),
                      "cls_attn": prs.cls_attentions.cpu().numpy()})
    writer.finish()
    for k, p in paths.items():
        print(f"wrote {p} {list(shapes[k])} {args.dtype}")
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":
    run(main, get_args_parser())
