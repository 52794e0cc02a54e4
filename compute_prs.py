"""Project the residual stream of a dataset: per-layer, per-head direct contributions to the CLS embedding.

Writes, in --output_dir (paper 1 names; docs/design.md section 3):
  {dataset}_attn_{model}.npy      [B, L, H, d]  per layer and head, summed over source tokens
  {dataset}_mlp_{model}.npy       [B, L+1, d]   index 0 = embedding term, then one per MLP; towers read out by
                                                pooling (SigLIP, EVA, CLIPA, CoCa): [B, L+2, d], the last entry
                                                the pooling MLP and constants (docs/design.md section 1b)
  {dataset}_cls_attn_{model}.npy  [B, L, d]     CLS->CLS attention term, summed over heads
  {dataset}_labels.npy            [B]           (binary_waterbirds: [B, 2] = class, background)
The parts of each image sum to its normalised embedding: attn.sum((1, 2)) + mlp.sum(1) = r / ||r||.

--layers 28-31 (or 0,5,28-31) keeps the attention terms of the listed layers only:
  {dataset}_attn_{model}.npy       [B, len(layers), H, d]  the listed layers, ascending
  {dataset}_attn_rest_{model}.npy  [B, d]                  the other layers, summed over layers and heads
and mlp and cls_attn as above, so attn.sum((1, 2)) + attn_rest + mlp.sum(1) = r / ||r||. Every output's
provenance record lists the kept layers ("layers"). TextSpan (compute_complete_text_set.py, PCLens) and the
Waterbirds study (compute_use_specific_heads.py) use only the last --num_of_last_layers (4) layers; the
cumulative layer study of compute_ablations.py needs them all. Sizes for ImageNet val (50,000 images) with
ViT-H-14 (L=32, H=16, d=1024) in float32 (half with --dtype float16): attn 50000*32*16*1024*4 B = 104.9 GB,
with --layers 28-31 13.1 GB, plus attn_rest 0.2 GB; mlp (6.8 GB) and cls_attn (6.6 GB) stay: 118.2 GB in all,
26.6 GB with --layers 28-31.

Several GPUs: torchrun --nproc_per_node 8 compute_prs.py ... (docs/torchrun.md).
"""
import argparse

import numpy as np

from utils.cli import (add_model_args, add_num_workers_arg, args_record, layer_list, load_engine_from_args,
                       positive_int, run)
from utils.datasets import build_dataset
from utils.decomposition import decompose_dataset
from utils.files.atomic import make_output_dir
from utils.files.names import attn_rest_path, labels_path, prs_paths
from utils.files.streaming import init_distributed, is_main_process


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project residual stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=2, type=positive_int, help="batch size")
    add_model_args(parser)
    parser.add_argument("--data_path", default=None, type=str, help="dataset root (not needed for 'sample')")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="imagenet, binary_waterbirds, CIFAR10, CIFAR100, sample, or any ImageFolder name")
    add_num_workers_arg(parser)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    parser.add_argument("--layers", default=None, type=layer_list, metavar="LAYERS",
                        help="store the attention terms of these layers only, e.g. 28-31 or 0,5,28-31 (the others "
                             "summed into {dataset}_attn_rest_{model}.npy; see above). Default: every layer")
    parser.add_argument("--map_mlp", default="lumped", choices=["lumped", "gate"],
                        help="towers with a MAP head (SigLIP, PE-Core): 'lumped' keeps the pooling head's MLP as one "
                             "term, the last mlp entry; 'gate' splits it exactly over every term by freezing its "
                             "input LayerNorm's std and its activation's gate (docs/design.md section 1b)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def main(args: argparse.Namespace) -> dict:
    args.device = init_distributed(args.device)
    ds = build_dataset(args.dataset, args.data_path)  # validate the data before loading any weights
    out = make_output_dir(args.output_dir)
    _, preprocess, engine, layers = load_engine_from_args(args)
    ds.transform = preprocess
    paths = {**prs_paths(out, args.dataset, args.model), "attn_rest": attn_rest_path(out, args.dataset, args.model),
             "labels": labels_path(out, args.dataset)}
    record = args_record(args, **({"map_mlp": args.map_mlp} if args.map_mlp != "lumped" else {}))
    written = decompose_dataset(engine, ds, paths, record=record, layers=layers, dtype=args.dtype,
                                batch_size=args.batch_size, num_workers=args.num_workers, resume=args.resume,
                                model_name=args.model, desc=f"compute_prs {args.model} {args.dataset}")
    if is_main_process():
        for k, path in written.items():
            if k != "labels":
                print(f"wrote {path} {list(np.load(path, mmap_mode='r').shape)} {args.dtype}")
    return {k: str(p) for k, p in written.items()}


if __name__ == "__main__":
    run(main, get_args_parser())
