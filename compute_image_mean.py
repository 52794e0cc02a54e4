"""The mean of a dataset's normalised image embeddings: the image mean SpLiCE needs, for any model.

  python compute_image_mean.py --model open_clip:ViT-L-14 --pretrained laion2b_s32b_b82k \\
      --dataset MSCOCO --data_path /data/coco/train2017 --output vit-l-14_mscoco_mean.pt

SpLiCE ships means for its four backbones, computed on MSCOCO; this makes one for any other model (then pass it
to the SpLiCE scripts with --image_mean). The mean is not renormalised. --output: .pt (a float32 torch tensor [d],
SpLiCE's format) or .npy; a provenance record is written beside it. The embeddings are streamed, batch by batch,
into {output stem}_embeddings.npy.partial, so --resume continues a killed run; --keep_embeddings keeps them
({output stem}_embeddings.npy [N, d], normalised, dataset order).
"""
import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.cli import DEVICE_HELP, add_num_workers_arg, args_record, positive_int, run, splice_weights
from utils.errors import InputError
from utils.files.atomic import atomic_save, atomic_write
from utils.files.names import image_embeddings_path, image_mean_path
from utils.files.provenance import provenance_path, write_provenance
from utils.files.streaming import Output, stream_dataset
from utils.models import default_device
from utils.splice import DEFAULT_MODEL, load_backbone, resolve_backbone, splice_dataset


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SpLiCE: image mean", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-model", "--model", default=DEFAULT_MODEL,
                        help="backbone, [library:]model as in the SpLiCE scripts (default: %(default)s)")
    parser.add_argument("--pretrained", default=None, help="weights: open_clip tag, checkpoint path or 'none'")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or a folder)")
    parser.add_argument("-dataset", "--dataset", default="MSCOCO",
                        help="MSCOCO (a folder of images, as SpLiCE's means), ImageNetVal, CIFAR10, CIFAR100, or "
                             "any dataset name of utils/datasets.py (default: %(default)s)")
    parser.add_argument("-data_path", "--data_path", default=None, help="dataset root")
    parser.add_argument("--output", default=None,
                        help="the mean, .pt or .npy (default: {model}_{weights}_{dataset}_image_mean.pt)")
    parser.add_argument("-batch_size", "--batch_size", type=positive_int, default=256,
                        help="images per batch (default: %(default)s)")
    add_num_workers_arg(parser)
    parser.add_argument("-device", "--device", default=default_device(), help=DEVICE_HELP)
    parser.add_argument("--resume", action="store_true", help="continue a killed run (same model and dataset)")
    parser.add_argument("--keep_embeddings", action="store_true", help="keep the normalised embeddings [N, d]")
    return parser


def main(args: argparse.Namespace) -> dict:
    backbone = resolve_backbone(args.model, args.pretrained)
    out = Path(args.output) if args.output else image_mean_path(backbone.label, args.dataset)
    if out.suffix not in (".pt", ".npy"):
        raise InputError(f"--output {out}: must end in .pt or .npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, preprocess, _ = load_backbone(backbone, args.device, args.model_config)
    ds = splice_dataset(args.dataset, args.data_path, preprocess)
    n, d = len(ds), int(model.visual.output_dim)
    record = args_record(args, model=backbone.name, pretrained=backbone.pretrained, num_images=n)
    emb_path = image_embeddings_path(out)

    @torch.no_grad()
    def compute(images, labels, start):  # [b, d] unit-norm embeddings
        return {"emb": F.normalize(model.encode_image(images.to(args.device)).float(), dim=1).cpu().numpy()}

    stream_dataset(ds, {"emb": Output(emb_path, (d,), "float32")}, compute, record=record, resume=args.resume,
                   batch_size=args.batch_size, num_workers=args.num_workers, desc=f"embedding {n} images")
    emb = np.load(emb_path, mmap_mode="r")
    total = np.zeros(d, dtype=np.float64)
    for st in range(0, n, 65536):
        total += emb[st:st + 65536].sum(0, dtype=np.float64)
    mean = torch.from_numpy((total / n).astype(np.float32))
    if out.suffix == ".pt":
        atomic_write(out, lambda f: torch.save(mean, f))
    else:
        atomic_save(out, mean.numpy())
    write_provenance(out, {**record, "norm": float(mean.norm())})
    if not args.keep_embeddings:
        emb_path.unlink()
        provenance_path(emb_path).unlink(missing_ok=True)
    print(f"wrote {out}: the mean of {n} normalised image embeddings, [{d}], norm {float(mean.norm()):.4f}")
    return {"mean": mean, "file": str(out), "num_images": n}


if __name__ == "__main__":
    run(main, get_args_parser(), weights=splice_weights)
