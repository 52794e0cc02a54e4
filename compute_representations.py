"""Image representations of a dataset (paper 2): the unit-norm image embedding times --coefficient, per image.

Writes, in --output_dir (the original's names; {pretrained} is the tag or a checkpoint's file stem):
  {dataset}_{split}_representations_{model}_{pretrained}.npy  [images, d]  float32, coefficient * r / ||r||
  {dataset}_{split}_classes.npy                                [images]     int64 labels, in image order
--dataset imagenet is the paper's subsample of torchvision ImageNet (train: every 250th image, 5,124; val: every
10th, 5,000); CIFAR10 / CIFAR100 take --split train or test (the original crashed on CIFAR). Streamed into a
memory map; --resume continues a killed run; torchrun splits the images across processes.

Differences from the original: OpenAI weights run with QuickGELU as they were trained (the original forced
QuickGELU for every model, LAION weights included: pass --force_quick_gelu to reproduce that), and the embedding
comes from open_clip's own encode_image (the original's per-head attention path agrees with it to ~1e-6).

Several GPUs: torchrun --nproc_per_node 8 compute_representations.py ... (docs/torchrun.md).
"""
import argparse

import torch
import torch.nn.functional as F

from utils.cli import add_model_args, add_num_workers_arg, args_record, load_model_from_args, positive_int, run
from utils.datasets import build_second_order_dataset, class_column
from utils.files.atomic import make_output_dir
from utils.files.names import representations_path, split_classes_path
from utils.files.provenance import save_output
from utils.files.streaming import Output, init_distributed, is_main_process, stream_dataset
from utils.neurons.effects import COEFFICIENT


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project Residual Stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--data_path", default=None, type=str, help="dataset root")
    parser.add_argument("--coefficient", default=COEFFICIENT, type=float,
                        help="scale on the unit-norm embeddings (default %(default)s, as the original)")
    parser.add_argument("--split", default="train", type=str, help="train (default), val (imagenet), test (CIFAR)")
    add_num_workers_arg(parser)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="imagenet (subsampled), CIFAR10, CIFAR100, sample, or any ImageFolder name")
    parser.add_argument("--batch_size", default=16, type=positive_int, help="batch size")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def main(args: argparse.Namespace) -> dict:
    args.device = init_distributed(args.device)
    model, preprocess, _ = load_model_from_args(args)
    ds = build_second_order_dataset(args.dataset, args.data_path, preprocess, args.split)
    out = make_output_dir(args.output_dir)
    record = args_record(args, coefficient=args.coefficient)
    classes = split_classes_path(out, args.dataset, args.split)
    if is_main_process():
        save_output(classes, class_column(ds.labels), dict(record, num_images=len(ds)))

    path = representations_path(out, args.dataset, args.split, args.model, args.pretrained)
    dim = model.visual.output_dim

    @torch.no_grad()
    def compute(images, labels, start):  # [b, d]
        r = model.encode_image(images.to(args.device)).float()
        return {"representations": (args.coefficient * F.normalize(r, dim=-1)).cpu().numpy()}

    stream_dataset(ds, {"representations": Output(path, (dim,), "float32")}, compute, record=record,
                   resume=args.resume, batch_size=args.batch_size, num_workers=args.num_workers,
                   desc=f"representations {args.model} {args.dataset} {args.split}")
    if is_main_process():
        print(f"wrote {path} {[len(ds), dim]} and {classes} {[len(ds)]}")
    return {"representations": str(path), "classes": str(classes)}


if __name__ == "__main__":
    run(main, get_args_parser())
