"""Second-order effects of every neuron of one MLP layer, through all later attention heads (paper 2).

For each image and each neuron k of --mlp_layer: the neuron's output at every token, passed through the
frozen ln_1, value and attention of each later layer's heads into the CLS token, and projected with the
frozen ln_post, scaled by --coefficient / ||r|| (docs/design.md section 4). Computed batched: the sum over
source tokens comes before the projection, so nothing of size [batch, tokens, neurons, width] is built.

Writes, in --output_dir (the original's names; {pretrained} is the tag or a checkpoint's file stem):
  {dataset}_{split}_mlps_{model}_{pretrained}_{mlp_layer}_merged.npy  [images, neurons, d]
  {dataset}_{split}_labels.npy                                         [images]
--dataset imagenet is the paper's subsample of torchvision ImageNet (train: every 250th image, 5,124;
val: every 10th, 5,000). For ViT-B-32 on the train subsample the merged file is about 32 GB in float32
(16 GB with --dtype float16); it is streamed into a memory map and --resume continues a killed run.
OpenAI weights run with QuickGELU (set automatically for the 'openai' tag; --force_quick_gelu for files).

Several GPUs: torchrun --nproc_per_node 8 compute_second_order_neuron_prs.py ... (docs/torchrun.md).
"""
import argparse
from pathlib import Path

import numpy as np

from utils.cli import add_model_args, add_num_workers_arg, args_record, load_model_from_args, positive_int, run
from utils.datasets import build_second_order_dataset
from utils.files.atomic import make_output_dir
from utils.files.names import second_order_paths, split_labels_path
from utils.files.provenance import save_output
from utils.files.streaming import Output, init_distributed, is_main_process, stream_dataset
from utils.neurons.effects import COEFFICIENT, SecondOrderEffects


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project Second Order Residual Stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=16, type=positive_int, help="images per batch")
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--mlp_layer", default=9, type=int, help="the MLP layer whose neurons to analyse (0-based)")
    parser.add_argument("--coefficient", default=COEFFICIENT, type=float,
                        help="scale on the normalised output (the paper's 100)")
    parser.add_argument("--data_path", default=None, type=str, help="dataset root")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="imagenet (subsampled), CIFAR10, CIFAR100, sample, or any ImageFolder name")
    parser.add_argument("--split", type=str, default="train", help="val or train")
    add_num_workers_arg(parser)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def main(args: argparse.Namespace) -> Path:
    args.device = init_distributed(args.device)
    model, preprocess, _ = load_model_from_args(args)
    effects = SecondOrderEffects(model, args.mlp_layer, args.device, args.coefficient, model_name=args.model)
    ds = build_second_order_dataset(args.dataset, args.data_path, preprocess, args.split)
    out = make_output_dir(args.output_dir)
    record = args_record(args, mlp_layer=args.mlp_layer, coefficient=args.coefficient)
    if is_main_process():
        save_output(split_labels_path(out, args.dataset, args.split), np.asarray(ds.labels),
                    dict(record, num_images=len(ds)))

    B, K, d = len(ds), effects.num_neurons, effects.out_dim
    path = second_order_paths(out, args.dataset, args.split, args.model, args.pretrained, args.mlp_layer)["merged"]
    stream_dataset(ds, {"merged": Output(path, (K, d), args.dtype)},
                   lambda images, labels, start: {"merged": effects(images)[0].cpu().numpy()},
                   record=record, resume=args.resume, batch_size=args.batch_size, num_workers=args.num_workers,
                   desc=f"second order {args.model} layer {args.mlp_layer}")
    if is_main_process():
        print(f"wrote {path} {[B, K, d]} {args.dtype}")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
