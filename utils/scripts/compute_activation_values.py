"""PCLens' compute_activation_values: the projected residual stream of a dataset, under PCLens' file names.

Runs compute_prs.py's decomposition (``utils.decomposition.decompose_dataset``: per layer and head, the direct
contribution to the normalised CLS embedding) and writes to --output_dir
  {dataset}_attn_{model}_seed_{seed}.npy      [B, L, H, d]
  {dataset}_mlp_{model}_seed_{seed}.npy       [B, L+1, d]
  {dataset}_cls_attn_{model}_seed_{seed}.npy  [B, L, d]   the CLS->CLS attention term, summed over heads
  {dataset}_labels_{model}_seed_{seed}.npy    [B]
and with --layers 28-31 (not a PCLens flag) only those layers in attn, the others summed over heads in
  {dataset}_attn_rest_{model}_seed_{seed}.npy [B, d]  (see compute_prs.py --help)
(PCLens' own cls_attn file holds head 0 of each layer in this mode, not what its comment says; ours holds the
CLS->CLS term.) Datasets: imagenet (val) and binary_waterbirds are looked for in their PCLens folders under
--data_path (imagenet/, waterbird_complete95_forest2water2/), or --data_path may be that folder; CIFAR10,
CIFAR100; anything else is an ImageFolder at --data_path.

--samples_per_class k --tot_samples_per_class n takes PCLens' subset: with Python's random seeded by --seed,
k images drawn from each block of n consecutive images (one block per class: the dataset must store its
classes in blocks of n, as ImageNet val does); `--samples_per_class None` (PCLens' notebook) takes every image.
--cache_dir is where open_clip puts downloaded weights. Flags this project cannot honour are refused with one
line: --vision_proj False, --full_output True (PCLens' notebook passes False and True: accepted). --quantization fp16 stores
the arrays as float16; the model runs in float32 (PCLens runs the model itself in float16).
--max_nr_samples_before_writing is not needed: every batch goes straight to resumable memory-mapped files
(--resume).
"""
import argparse
import random
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from utils.cli import add_model_args, args_record, layer_list, load_engine_from_args, run
from utils.datasets import build_dataset, class_column
from utils.decomposition import decompose_dataset
from utils.errors import InputError
from utils.files.atomic import make_output_dir
from utils.files.names import pclens_paths
from utils.files.streaming import init_distributed, is_main_process
from utils.scripts import add_cache_dir_arg, int_or_none, str2bool

# where PCLens looks for a dataset under --data_path
SUBFOLDERS = {"imagenet": "imagenet", "binary_waterbirds": "waterbird_complete95_forest2water2"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project Residual Stream - Option B", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=2, type=int, help="batch size (default %(default)s)")
    add_model_args(parser)
    parser.add_argument("--data_path", default="./datasets/", type=str,
                        help="datasets folder (default %(default)s; see above)")
    parser.add_argument("--dataset", type=str, default="CIFAR10",
                        help="imagenet, binary_waterbirds, CIFAR10, CIFAR100, or an ImageFolder name "
                             "(default %(default)s)")
    parser.add_argument("--num_workers", default=4, type=int, help="data loader workers (default %(default)s)")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default %(default)s)")
    parser.add_argument("--seed", default=0, type=int, help="seed of the subset, and part of the file names")
    add_cache_dir_arg(parser)
    parser.add_argument("--samples_per_class", default=None, type=int_or_none,
                        help="images drawn per class (default: all images)")
    parser.add_argument("--tot_samples_per_class", default=None, type=int_or_none,
                        help="images per class block in the dataset (needed with --samples_per_class)")
    parser.add_argument("--max_nr_samples_before_writing", default=20, type=int,
                        help="not needed (every batch is written to resumable memmaps); accepted")
    parser.add_argument("--quantization", default="fp32", choices=["fp32", "fp16"],
                        help="fp16: store the arrays as float16 (the model runs in float32)")
    parser.add_argument("--vision_proj", default=True, type=str2bool,
                        help="project to the joint embedding space (only True is supported)")
    parser.add_argument("--full_output", default=False, type=str2bool,
                        help="keep every token, not only CLS (only False is supported)")
    parser.add_argument("--layers", default=None, type=layer_list, metavar="LAYERS",
                        help="store the attention terms of these layers only, e.g. 28-31 (as compute_prs.py "
                             "--layers; default: every layer)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def data_root(dataset: str, data_path: str) -> str:
    """PCLens' folder of ``dataset`` under ``data_path`` when it is there, else ``data_path`` itself."""
    sub = SUBFOLDERS.get(dataset)
    return str(Path(data_path) / sub) if sub and (Path(data_path) / sub).is_dir() else data_path


def class_block_subset(samples_per_class: int, tot_samples_per_class: int, seed: int):
    """PCLens' subset: ``random.seed(seed)``, then per class c, ``random.sample`` of ``samples_per_class``
    indices among ``c * tot .. (c + 1) * tot - 1``, classes in order. Returns ``Dataset -> Subset`` (with
    ``.labels``)."""

    def select(ds: Dataset) -> Dataset:
        rng = random.Random(seed)  # the same draws as seeding the global generator, as PCLens does
        everything = list(range(len(ds)))
        index: list[int] = []
        for c in range(len(ds.classes)):
            block = everything[c * tot_samples_per_class:(c + 1) * tot_samples_per_class]
            if len(block) < samples_per_class:
                raise InputError(f"--samples_per_class {samples_per_class}: class block {c} has only {len(block)} "
                                 f"images ({len(ds)} images, {len(ds.classes)} classes, --tot_samples_per_class "
                                 f"{tot_samples_per_class})")
            index += rng.sample(block, samples_per_class)
        cls = class_column(ds.labels)
        if any((cls[c * tot_samples_per_class:(c + 1) * tot_samples_per_class] != c).any()
               for c in range(len(ds.classes))):
            print(f"warning: the images are not stored in blocks of {tot_samples_per_class} per class, as PCLens' "
                  f"subset assumes: the subset does not take {samples_per_class} images from each class")
        sub = Subset(ds, index)
        sub.labels = np.asarray(ds.labels)[index]
        return sub

    return select


def main(args: argparse.Namespace) -> dict:
    if not args.vision_proj:
        raise InputError("--vision_proj False: not supported; the decomposition is always projected to the joint "
                         "image-text space")
    if args.full_output:
        raise InputError("--full_output True: not supported; only the CLS token is decomposed here (per-patch "
                         "terms: compute_segmentations.py and prs_hook's spatial mode)")
    select = None
    if args.samples_per_class is not None:
        if args.tot_samples_per_class is None:
            raise InputError("--samples_per_class needs --tot_samples_per_class (images per class in the dataset)")
        if not 1 <= args.samples_per_class <= args.tot_samples_per_class:
            raise InputError(f"--samples_per_class {args.samples_per_class}: must be between 1 and "
                             f"--tot_samples_per_class {args.tot_samples_per_class}")
        select = class_block_subset(args.samples_per_class, args.tot_samples_per_class, args.seed)
    dtype = "float16" if args.quantization == "fp16" else "float32"
    if dtype == "float16":
        print("--quantization fp16: the arrays are stored as float16; the model runs in float32")
    args.device = init_distributed(args.device)
    root = data_root(args.dataset, args.data_path)
    ds = build_dataset(args.dataset, root)  # validate the data before loading any weights
    make_output_dir(args.output_dir)
    _, preprocess, engine, layers = load_engine_from_args(args)
    ds.transform = preprocess
    ds = select(ds) if select else ds
    written = decompose_dataset(
        engine, ds, pclens_paths(args.output_dir, args.dataset, args.model, args.seed),
        record=args_record(args, data_path=root, dtype=dtype), layers=layers, dtype=dtype,
        batch_size=args.batch_size, num_workers=args.num_workers, resume=args.resume, model_name=args.model,
        desc=f"compute_activation_values {args.model} {args.dataset}")
    if is_main_process():
        print(f"wrote {', '.join(str(p) for p in written.values())}")
    return {k: str(p) for k, p in written.items()}


if __name__ == "__main__":
    run(main, get_args_parser())
