"""First principal component of each neuron's second-order effects (paper 2).

Reads {dataset}_{split}_mlps_{model}_{pretrained}_{mlp_layer}_merged.npy [images, neurons, d] from --input_dir
(written by compute_second_order_neuron_prs.py) in chunks of neurons. Per neuron: centre over images, keep
the --top_k_pca images with the largest centred norm, take the first right singular vector of those rows,
and orient it so that more than top_k_pca // 2 of them project positively. Writes, in --output_dir:
  ..._{mlp_layer}_{top_k_pca}_pca.npy   [neurons, d]       the signed first PC per neuron
  ..._{mlp_layer}_{top_k_pca}_norm.npy  [neurons, top_k]   the top-k centred norms per neuron, ascending
(The original always reads the train split; --split makes that explicit.)
"""
import argparse

from utils.cli import run
from utils.errors import InputError
from utils.files.atomic import load_array, make_output_dir
from utils.files.names import second_order_paths
from utils.files.provenance import derived_record, save_output
from utils.neurons.pca import neuron_pcas, neurons_per_chunk


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Compute PCAs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", type=str, metavar="MODEL", help="model name in file names")
    parser.add_argument("--pretrained", default="openai", type=str,
                        help="pretrained tag (or checkpoint path: its file stem) in file names")
    parser.add_argument("--mlp_layer", default=9, type=int, help="the MLP layer of the neurons (0-based)")
    parser.add_argument("--top_k_pca", default=100, type=int, help="images per neuron for its PCA")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in file names")
    parser.add_argument("--split", type=str, default="train", help="split in file names")
    parser.add_argument("--input_dir", default="./output_dir/", help="where the merged file is")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--chunk_gb", default=1.0, type=float,
                        help="read this many GB (as float32) of the merged file at a time")
    return parser


def main(args: argparse.Namespace) -> dict:
    src = second_order_paths(args.input_dir, args.dataset, args.split, args.model, args.pretrained, args.mlp_layer)
    merged = load_array(src["merged"], "compute_second_order_neuron_prs.py")  # [B, K, d], memory-mapped
    if merged.ndim != 3:
        raise InputError(f"{src['merged']}: expected [images, neurons, d], got shape {merged.shape}")
    if not 1 <= args.top_k_pca <= merged.shape[0]:
        raise InputError(f"--top_k_pca {args.top_k_pca}: must be between 1 and the {merged.shape[0]} images "
                         f"of {src['merged']}")
    chunk = neurons_per_chunk(merged, int(args.chunk_gb * 2 ** 30))
    pcas, norms = neuron_pcas(merged, args.top_k_pca, chunk)
    out = second_order_paths(args.output_dir, args.dataset, args.split, args.model, args.pretrained,
                             args.mlp_layer, args.top_k_pca)
    make_output_dir(args.output_dir)
    record = derived_record([src["merged"]], top_k_pca=args.top_k_pca)
    save_output(out["pca"], pcas, record)
    save_output(out["norm"], norms, record)
    print(f"wrote {out['pca']} {list(pcas.shape)} and {out['norm']} {list(norms.shape)}")
    return {"pca": str(out["pca"]), "norm": str(out["norm"])}


if __name__ == "__main__":
    run(main, get_args_parser())
