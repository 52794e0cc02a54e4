"""Zero-shot segmentation from neurons (paper 2, second-order effects of neurons), on ImageNet-segmentation.

Not to be confused with compute_segmentations.py (with an s): paper 1's segmentation from the attention heads'
spatial decomposition. This one is paper 2's, from neurons.

Per class c, the --top_neurons (neuron, layer) pairs over all --mlp_layers whose first principal component r_n is
most aligned with the class's classifier column w_c: the largest |<r_n, w_c>| (--random: a random choice per
class, seeded by --seed). Per image:
  1. its class is the argmax of (unnormalised image embedding) @ classifier;
  2. its map is the mean, over that class's neurons, of their post-activation values at every image token
     (CLS dropped), on the patch grid;
  3. upsampled bilinearly by the patch size and min-max normalised per image (no clipping);
  4. foreground = map > 0.5.
Metrics as compute_segmentations.py (paper 1): pixel accuracy, mIoU over 2 classes, mAP, the precision-recall
curve over all pixels (of the map clamped at --thr), and the result text.

Reads  --output_dir/{dataset}_train_mlps_{model}_{pretrained}_{layer}_{top_k_pca}_pca.npy [neurons, d], one per
       listed layer (compute_pcas.py)
       --classifier_dir/{dataset}_classifier_{model}_{pretrained}.npy [d, C] (compute_classifier_projection.py;
       else paper 1's {dataset}_classifier_{model}.npy)
       --data_path gtsegs_ijcv.mat (MATLAB v7.3 / HDF5)
Writes --output_dir/{train_dataset}_neuron_segmentation_{model}_{pretrained}_mlp_{layers}_pca_{top_k_pca}_top_{k}
       (+ _random_{seed})/:
       result_mIoU_{mIoU:.4f}.txt   the original's three result lines
       segmentation.json            metrics, per-image counts and AP, chosen classes, args
       precision.npy, recall.npy    sklearn precision_recall_curve over all pixels of all images
       heatmaps.npy [B, S, S]       the scores behind that curve (normalised map, clamped at --thr)
       neuron_maps.npy [B, g, g]    the mean activation of the chosen neurons per patch (step 2)
       per_image_metrics.npy [B, 8] correct, labeled, inter(bg, fg), union(bg, fg), ap, chosen class
       neurons_per_class.npy [C, k, 2]  each class's (neuron, layer) pairs, ascending score
       images/NNNNN_{input,gt,mask,heatmap}.png   with --save_img
With --batch_size 1 and the same weights, pixAcc, mIoU and mAP are the original's.

Fixed defects of the original script:
  - layer lists that are not consecutive (e.g. --mlp_layers 8 10) are mapped to the right (neuron, layer); the
    original assumes consecutive ascending layers;
  - any --batch_size gives the numbers of --batch_size 1 (the original takes the class of the first image of a
    batch and normalises over the batch);
  - no autograd graph is kept, and one forward per batch is enough (the activations do not depend on the
    chosen neurons; the original ran the model twice per batch).
The original forces QuickGELU for every model; here OpenAI tags get it automatically (--force_quick_gelu for
QuickGELU weights from a file). The --save_img pictures are paper 1's (input, mask, predicted mask, heatmap).

Several GPUs: torchrun --nproc_per_node 8 compute_segmentation.py ... (docs/torchrun.md).
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from utils.cli import (add_model_args, add_segmentation_args, args_record, finish_segmentation_run,
                       load_engine_from_args, run, segmentation_options)
from utils.errors import InputError
from utils.files.atomic import make_output_dir
from utils.files.names import neuron_segmentation_dir, pretrained_name, segmentation_files
from utils.files.provenance import check_consistent, save_output
from utils.files.readers import load_classifier, load_layer_pcs
from utils.files.streaming import Output, init_distributed, is_main_process
from utils.imagenet_segmentation import ImagenetSegmentation
from utils.neurons.segmentation import evaluate_neuron_batch, neuron_layer_pairs, select_neurons
from utils.segmentation import check_image_size, stream_segmentation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Segmentation scores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_segmentation_args(parser, output_help="where the PCA files are and the results go")
    parser.add_argument("--random", action="store_true", default=False,
                        help="a random choice of --top_neurons neurons per class instead of the aligned ones")
    parser.add_argument("--seed", default=0, type=int, help="seed of --random (default 0)")
    parser.add_argument("--dataset", type=str, default="imagenet",
                        help="dataset name of the classifier and PCA files (default imagenet)")
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--mlp_layers", default=[8, 9, 10], nargs="+", type=int,
                        help="MLP layers whose neurons are candidates, any order (default 8 9 10)")
    parser.add_argument("--top_k_pca", default=100, type=int, help="which PCA files (their top k; default 100)")
    parser.add_argument("--top_neurons", default=200, type=int, help="neurons per class (default 200)")
    return parser


def load_pcas(args: argparse.Namespace) -> tuple[list[Path], np.ndarray]:
    """The PCA file of every listed layer and their PCs stacked in that order, ``[layers * neurons, d]``."""
    pcs, spans = load_layer_pcs(args.output_dir, args.dataset, "train", args.model, args.pretrained, args.mlp_layers,
                                args.top_k_pca)
    for s in spans:  # the same number of neurons in every layer: neuron_layer_pairs maps row i to i // M
        if s.size != spans[0].size:
            raise InputError(f"{s.pca_path}: PCs of shape {[s.size, pcs.shape[1]]}; expected [neurons, d] = "
                             f"{[spans[0].size, pcs.shape[1]]}")
    return [s.pca_path for s in spans], pcs


def main(args: argparse.Namespace) -> dict:
    args.device = init_distributed(args.device)
    # validate the inputs before loading any weights
    ds = ImagenetSegmentation(args.data_path, image_size=args.image_size, mask_resize=args.mask_resize)
    pca_files, pcs = load_pcas(args)
    classifier, cls_file = load_classifier(args.classifier_dir, args.dataset, args.model, args.pretrained,
                                           pcs.shape[1], args.allow_mismatch)
    model, preprocess, engine, _ = load_engine_from_args(args)
    ds.transform = preprocess
    grid, patch = check_image_size(model, args.image_size, args.model)
    blocks = model.visual.transformer.resblocks
    outside = [layer for layer in args.mlp_layers if not 0 <= layer < len(blocks)]
    if outside:
        raise InputError(f"--mlp_layers: layer {outside[0]} out of range for {args.model} (0..{len(blocks) - 1})")
    neurons = len(pcs) // len(args.mlp_layers)
    for layer, f in zip(args.mlp_layers, pca_files):
        expected = [blocks[layer].mlp.c_proj.in_features, engine.out_dim]
        if [neurons, pcs.shape[1]] != expected:
            raise InputError(f"{f}: PCs of shape {[neurons, pcs.shape[1]]}, but {args.model} layer {layer} has "
                             f"[neurons, d] = {expected} (written for another model?)")
    check_consistent(pca_files, ("model", "pretrained"),
                     expected={"model": args.model, "pretrained": args.pretrained}, allow_mismatch=args.allow_mismatch)

    rows = select_neurons(pcs, classifier, args.top_neurons, args.random, args.seed)  # [C, k] stacked-PC rows
    out = make_output_dir(neuron_segmentation_dir(args.output_dir, args.train_dataset, args.model, args.pretrained,
                                                  args.mlp_layers, args.top_k_pca, args.top_neurons,
                                                  args.seed if args.random else None))
    files = segmentation_files(out)
    record = args_record(args, dataset=args.train_dataset, classifier=str(cls_file), pcas=list(map(str, pca_files)),
                         mlp_layers=args.mlp_layers, top_k_pca=args.top_k_pca, top_neurons=args.top_neurons,
                         random=args.random, seed=args.seed, image_size=args.image_size, thr=args.thr,
                         mask_resize=args.mask_resize)
    if is_main_process():
        save_output(files["neurons_per_class"], neuron_layer_pairs(rows, args.mlp_layers, neurons), record)
    weights = torch.from_numpy(classifier).to(args.device)
    selection = torch.from_numpy(rows).to(args.device)
    stream_segmentation(ds, out, lambda images, targets: evaluate_neuron_batch(
        engine, images, targets, weights, selection, args.mlp_layers, grid, patch, args.thr), preprocess, record=record,
        **segmentation_options(args),
        extra={"neuron_map": Output(files["neuron_maps"], tuple(grid), "float32")}, desc="neuron segmentation")
    if not is_main_process():
        return {}
    summary = {"model": args.model, "pretrained": pretrained_name(args.pretrained), "classifier": str(cls_file),
               "pcas": list(map(str, pca_files)), "neurons_per_class": files["neurons_per_class"].name}
    return finish_segmentation_run(ds, out, args, record, summary)


if __name__ == "__main__":
    run(main, get_args_parser())
