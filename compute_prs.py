"""Project the residual stream of a dataset: per-layer, per-head direct contributions to the CLS embedding.

Writes, in --output_dir (paper 1 names; docs/design.md section 3):
  {dataset}_attn_{model}.npy      [B, L, H, d]  per layer and head, summed over source tokens
  {dataset}_mlp_{model}.npy       [B, L+1, d]   index 0 = embedding term, then one per MLP
  {dataset}_cls_attn_{model}.npy  [B, L, d]     CLS->CLS attention term, summed over heads
  {dataset}_labels.npy            [B]           (binary_waterbirds: [B, 2] = class, background)
The parts of each image sum to its normalised embedding.
"""
import argparse
import os

from prs_hook import hook_prs_logger
from utils.cli import positive_int, run
from utils.datasets import build_dataset
from utils.factory import add_model_args, load_model_from_args
from utils.io import make_output_dir
from utils.names import labels_path, prs_paths
from utils.provenance import make_record, save_output
from utils.streaming import Output, init_distributed, is_main_process, stream_dataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project residual stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=2, type=positive_int, help="batch size")
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
    init_distributed(args)
    ds = build_dataset(args.dataset, args.data_path)  # validate the data before loading any weights
    out = make_output_dir(args.output_dir)
    model, preprocess, _ = load_model_from_args(args)
    ds.transform = preprocess
    # hooks for `python -m utils.scripts.compute_activation_values` (PCLens): a subset of the images, other names
    ds = args.select_images(ds) if getattr(args, "select_images", None) else ds
    names = getattr(args, "output_names", None) or {**prs_paths(out, args.dataset, args.model),
                                                    "labels": labels_path(out, args.dataset)}
    record = make_record(args)
    if is_main_process():
        save_output(names["labels"], ds.labels, dict(record, num_images=len(ds)))

    prs = hook_prs_logger(model, args.device, model_name=args.model)
    L, H, d = prs.num_layers, prs.num_heads, prs.out_dim
    outputs = {"attn": Output(names["attn"], (L, H, d), args.dtype), "mlp": Output(names["mlp"], (L + 1, d), args.dtype),
               "cls_attn": Output(names["cls_attn"], (L, d), args.dtype)}

    def compute(images, labels, start):
        attentions, mlps = prs.finalize(prs.encode_image(images))
        return {"attn": attentions.cpu().numpy(), "mlp": mlps.cpu().numpy(),
                "cls_attn": prs.cls_attentions.cpu().numpy()}

    stream_dataset(ds, outputs, compute, record=record, resume=args.resume, batch_size=args.batch_size,
                   num_workers=args.num_workers, desc=f"compute_prs {args.model} {args.dataset}")
    if is_main_process():
        for k, o in outputs.items():
            print(f"wrote {o.path} {[len(ds), *o.shape]} {args.dtype}")
    return {k: str(v) for k, v in names.items()}


if __name__ == "__main__":
    run(main, get_args_parser())
