"""Project the residual stream of a dataset: per-layer, per-head direct contributions to the CLS embedding.

Writes, in --output_dir (paper 1 names; docs/design.md section 3):
  {dataset}_attn_{model}.npy      [B, L, H, d]  per layer and head, summed over source tokens
  {dataset}_mlp_{model}.npy       [B, L+1, d]   index 0 = embedding term, then one per MLP
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
import os

from prs_hook import hook_prs_logger
from utils.errors import InputError
from utils.cli import add_model_args, args_record, layer_list, load_model_from_args, positive_int, run
from utils.files.names import format_layers
from utils.datasets import build_dataset

from utils.files.atomic import make_output_dir
from utils.files.names import attn_rest_path, labels_path, prs_paths
from utils.files.provenance import save_output
from utils.files.streaming import Output, init_distributed, is_main_process, stream_dataset


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
    parser.add_argument("--layers", default=None, type=layer_list, metavar="LAYERS",
                        help="store the attention terms of these layers only, e.g. 28-31 or 0,5,28-31 (the others "
                             "summed into {dataset}_attn_rest_{model}.npy; see above). Default: every layer")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def kept_layers(layers, num_layers: int, model: str):
    """The layers to store (``None``: all); ``InputError`` naming --layers when one is out of range."""
    if layers is None:
        return None
    bad = [l for l in layers if l >= num_layers]
    if bad:
        raise InputError(f"--layers {format_layers(layers)}: {format_layers(bad)} out of range; {model} has "
                         f"{num_layers} layers (0-{num_layers - 1})")
    if len(layers) == num_layers:
        print(f"--layers {format_layers(layers)}: every layer of {model}; writing the full files")
        return None
    return list(layers)


def main(args: argparse.Namespace) -> dict:
    init_distributed(args)
    ds = build_dataset(args.dataset, args.data_path)  # validate the data before loading any weights
    out = make_output_dir(args.output_dir)
    model, preprocess, _ = load_model_from_args(args)
    layers = kept_layers(getattr(args, "layers", None), len(model.visual.transformer.resblocks), args.model)
    ds.transform = preprocess
    # hooks for `python -m utils.scripts.compute_activation_values` (PCLens): a subset of the images, other names
    ds = args.select_images(ds) if getattr(args, "select_images", None) else ds
    names = getattr(args, "output_names", None) or {**prs_paths(out, args.dataset, args.model),
                                                    "labels": labels_path(out, args.dataset)}
    record = args_record(args) if layers is None else args_record(args, layers=layers)
    if is_main_process():
        save_output(names["labels"], ds.labels, dict(record, num_images=len(ds)))

    prs = hook_prs_logger(model, args.device, model_name=args.model, layers=layers)
    L, H, d = prs.num_layers, prs.num_heads, prs.out_dim
    outputs = {"attn": Output(names["attn"], (L if layers is None else len(layers), H, d), args.dtype),
               "mlp": Output(names["mlp"], (L + 1, d), args.dtype),
               "cls_attn": Output(names["cls_attn"], (L, d), args.dtype)}
    if layers is not None:
        rest = names.get("attn_rest") or attn_rest_path(out, args.dataset, args.model)
        outputs["attn_rest"] = Output(rest, (d,), args.dtype)

    def compute(images, labels, start):
        attentions, mlps = prs.finalize(prs.encode_image(images))
        batch = {"attn": attentions.cpu().numpy(), "mlp": mlps.cpu().numpy(),
                 "cls_attn": prs.cls_attentions.cpu().numpy()}
        if prs.attn_rest is not None:
            batch["attn_rest"] = prs.attn_rest.cpu().numpy()
        return batch

    stream_dataset(ds, outputs, compute, record=record, resume=args.resume, batch_size=args.batch_size,
                   num_workers=args.num_workers, desc=f"compute_prs {args.model} {args.dataset}")
    if is_main_process():
        for k, o in outputs.items():
            print(f"wrote {o.path} {[len(ds), *o.shape]} {args.dtype}")
    return {"labels": str(names["labels"]), **{k: str(o.path) for k, o in outputs.items()}}


if __name__ == "__main__":
    run(main, get_args_parser())
