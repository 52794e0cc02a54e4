"""Zero-shot segmentation on ImageNet-segmentation from the spatial decomposition (paper 1, section 5).

Not to be confused with compute_segmentation.py (no s): paper 2's segmentation from neurons. This one is
paper 1's, from the attention heads' spatial decomposition.

Per image: the spatial attention terms (image tokens, summed over layers and heads) times the zero-shot
classifier; the predicted class's map minus the mean over classes, upsampled, clipped at 0, min-max
normalised and thresholded at its mean (utils/segmentation.py). Reports pixel accuracy, mIoU (2 classes)
and mAP, and saves the precision-recall curve.

Every image is scored on its own: any --batch_size gives the numbers of --batch_size 1, which are the
original code's (the original normalises over the whole batch and scores only its first image). Pixel
counts, pixAcc and mIoU match it exactly; AP to float32 noise (~1e-5, see README).

Reads  --classifier_dir/{classifier_dataset}_classifier_{model}.npy  [d, C]  (compute_text_projection.py)
       --data_path gtsegs_ijcv.mat                                         (MATLAB v7.3 / HDF5)
Writes --output_dir/{train_dataset}_segmentation_{model}_{pretrained}/:
       result_mIoU_{mIoU:.4f}.txt   the original's three result lines
       segmentation.json            metrics, per-image counts and AP, args, model
       precision.npy, recall.npy    sklearn precision_recall_curve over all pixels of all images
       heatmaps.npy [B, S, S]       the scores behind that curve (normalised heatmap, clamped at --thr)
       per_image_metrics.npy [B, 8] correct, labeled, inter(bg, fg), union(bg, fg), ap, chosen class
       images/NNNNN_{input,gt,mask,heatmap}.png   with --save_img

Several GPUs: torchrun --nproc_per_node 8 compute_segmentations.py ... (docs/torchrun.md).
"""
import argparse

import torch

from utils.cli import (add_model_args, add_segmentation_args, args_record, finish_segmentation_run,
                       load_engine_from_args, run, segmentation_options)
from utils.errors import InputError
from utils.files.atomic import make_output_dir
from utils.files.names import classifier_path, pretrained_name, segmentation_dir
from utils.files.provenance import check_consistent
from utils.files.readers import read_classifier
from utils.files.streaming import init_distributed, is_main_process
from utils.imagenet_segmentation import ImagenetSegmentation
from utils.segmentation import check_image_size, evaluate_batch, stream_segmentation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Segmentation scores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_segmentation_args(parser)
    parser.add_argument("--classifier_dataset", type=str, default="imagenet",
                        help="which {dataset}_classifier_{model}.npy to use (default imagenet)")
    add_model_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    args.device = init_distributed(args.device)
    # validate the inputs before loading any weights
    ds = ImagenetSegmentation(args.data_path, image_size=args.image_size, mask_resize=args.mask_resize)
    cls_file = classifier_path(args.classifier_dir, args.classifier_dataset, args.model)
    classifier = read_classifier(cls_file)  # its size is checked against the model's once it is loaded
    model, preprocess, engine, _ = load_engine_from_args(args)
    ds.transform = preprocess
    grid, patch = check_image_size(model, args.image_size, args.model)
    if classifier.shape[0] != engine.out_dim:
        raise InputError(f"{cls_file}: classifier of shape {list(classifier.shape)}, but {args.model} embeds into "
                         f"{engine.out_dim} dimensions; expected [{engine.out_dim}, classes] (written for another "
                         f"model?)")
    check_consistent([cls_file], ("model", "pretrained"), expected={"model": args.model, "pretrained": args.pretrained},
                     allow_mismatch=args.allow_mismatch)
    weights = torch.from_numpy(classifier).to(args.device)

    out = make_output_dir(segmentation_dir(args.output_dir, args.train_dataset, args.model, args.pretrained))
    record = args_record(args, dataset=args.train_dataset, classifier=str(cls_file), image_size=args.image_size,
                         thr=args.thr, mask_resize=args.mask_resize)
    stream_segmentation(ds, out, lambda images, targets: evaluate_batch(engine, images, targets, weights, grid, patch,
                                                                        args.thr), preprocess, record=record,
        **segmentation_options(args))
    if not is_main_process():
        return {}
    summary = {"model": args.model, "pretrained": pretrained_name(args.pretrained), "classifier": str(cls_file)}
    return finish_segmentation_run(ds, out, args, record, summary)


if __name__ == "__main__":
    run(main, get_args_parser())
