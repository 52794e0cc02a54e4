"""SigLIP's pooled image representation, decomposed: per pooling head, the MLP of the pooling head, and a constant.

The original repository's last script ("Added siglip"). --model is read by one of two libraries:
  transformers: a Hugging Face id (google/siglip-so400m-patch14-384, google/siglip-base-patch16-224) or a
    save_pretrained folder, when --pretrained is not given (the original's route: its classes, processor, tokenizer);
  open_clip: an open_clip name (ViT-SO400M-14-SigLIP-384 --pretrained webli; --model_config for configs of your
    own), hf-hub:timm/..., or any --model with --pretrained (open_clip's preprocess and tokenizer).
Each image's pooled output splits exactly into the attention-pooling head's per-head outputs (summed over tokens),
the pooling MLP's output and a constant, the out-projection's bias (utils/siglip.py, docs/siglip.md). It prints the
zero-shot accuracy of four representations, in the original's words: the full representation; the MLP term
(+ the bias); the attention term (+ the bias and the MLP's output bias); attention + MLP (the sanity check,
equal to the first). Then it embeds --text_descriptions, measures how orthogonal the pooling heads are and,
with --compute_text_spans, prints the TextSpan texts of every pooling head.

Writes, in --output_dir ({model}: the id with / as _, a local folder's name or the open_clip name; {text_set}:
the stem of --text_descriptions):
  {dataset}_zeroshot_weights_{model}.npy    [C, d]     zero-shot classifier, 80 templates (rows: classes)
  {dataset}_siglip_heads_{model}.npy        [N, H, d]  per pooling head, summed over tokens (streamed)
  {dataset}_siglip_mlp_{model}.npy          [N, d]     the pooling MLP's output (streamed)
  {dataset}_siglip_pooled_{model}.npy       [N, d]     the model's pooler_output (streamed)
  {dataset}_siglip_constant_{model}.npy     [d]        the out-projection's bias: heads.sum(1) + mlp + constant = pooled
  {dataset}_labels.npy                      [N]
  {dataset}_siglip_accuracies_{model}.json  the four accuracies
  siglip_{model}_prs.pt                     with --save_everything: the original's file, {"attention_records":
                                            [N, 1, H, d], "mlp_records": [N, 1, d]}
  {dataset}_{attn,mlp,cls_attn}_{model}.npy  with --save_everything, open_clip models: compute_prs.py's full
                                            backbone decomposition (docs/towers.md)
  {text_set}_{model}.npy                    [T, d]     normalised text features, row i = line i
  {text_set}_{model}_orthogonalities.npy    [H, H]     mean |cos| of the centred pooling heads; and .pdf
  {text_set}_{model}_text_spans.txt, .json  with --compute_text_spans: the texts of each pooling head
each with a .provenance.json record. The streamed files resume (--resume); the zero-shot weights and the text
features are reused when their records match this model and text set.

Differences from the original (docs/siglip.md): runs on Python 3.10+ (the original's nested f-string quotes need
3.12); any SigLIP id or folder works (the original knew the text length of two ids only, a KeyError for any other:
here it is the model's own text length); texts longer than it are truncated (the original refused them: a crash on
the text position embeddings); --dataset picks the data (default imagenet, the original's; ImageNet val needs
meta.bin or the devkit in --data_path, as torchvision's ImageNet); --data_path has no default; --device defaults
to cuda when usable, else cpu; --num_workers defaults to min(8, this machine's cores) (the original: 10);
the TextSpan texts are written to a file too; the decomposition is recomputed from the head's weights, not read
through a patched copy of transformers' model.
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from utils.cli import (DEVICE_HELP, add_flags, add_num_workers_arg, args_record, load_model_from_args, model_flags,
                       positive_int, run, say_wrote)
from utils.datasets import build_dataset
from utils.decomposition import decompose_dataset
from utils.errors import InputError
from utils.files.atomic import atomic_write, load_array, make_output_dir, save_figure
from utils.files.names import prs_paths, siglip_model_name, siglip_paths
from utils.files.provenance import make_record, reusable_output, save_output, write_provenance
from utils.files.readers import MODEL_FIELDS
from utils.files.results import save_result
from utils.files.streaming import init_distributed, is_main_process
from utils.metrics import percent
from utils.models import default_device, register_model_config
from utils.siglip import (ACCURACIES, decompose_siglip_dataset, head_orthogonality, is_open_clip_model, load_siglip,
                          open_clip_pooled_model, pooling_accuracies, pooling_head_stats)
from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames
from utils.text.embeddings import encode_texts, zero_shot_classifier
from utils.text.sets import read_text_set
from utils.text.textspan import textspan_from_stats

# what the original prints before each accuracy
COMPUTING = {"representation": "representation", "mlp": "mlp", "attention": "attention",
             "attention + mlp": "attention + mlp for sanity check"}
SEP = "-" * 32
DATASET_NAMES = {"imagenet": "ImageNet"}  # as the original says it


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Project Residual Stream (SigLIP)", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", default=256, type=positive_int, help="batch size")
    parser.add_argument("--model", default="google/siglip-so400m-patch14-384", type=str,
                        help="Hugging Face SigLIP id (from the cache or downloaded) or a save_pretrained folder "
                             "(transformers); or an open_clip name or hf-hub:timm/... (open_clip)")
    flags = model_flags()
    parser.add_argument(*flags["pretrained"][0], **dict(
        flags["pretrained"][1], default=None,
        help="open_clip pretrained tag (webli), a checkpoint file, or 'none' (random init): loads --model with "
             "open_clip (needed for open_clip names; default: none given)"))
    add_flags(parser, {k: flags[k] for k in ("model_config", "force_quick_gelu")})
    parser.add_argument("--data_path", default=None, type=str, help="dataset root (not needed for 'sample')")
    parser.add_argument("--dataset", default="imagenet", type=str,
                        help="imagenet (its val split, as the original), CIFAR10, CIFAR100, sample, ...")
    parser.add_argument("--save_everything", action="store_true",
                        help="also write the original's siglip_{model}_prs.pt (open_clip models: and "
                             "compute_prs.py's files)")
    add_num_workers_arg(parser)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save")
    parser.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    parser.add_argument("--compute_text_spans", action="store_true", help="TextSpan for every pooling head")
    parser.add_argument("--text_descriptions", default="text_descriptions/image_descriptions_general.txt",
                        type=str, help="text set, one description per line (the authors' sets: "
                                       "text_descriptions/fetch_original.py)")
    parser.add_argument("--texts_per_head", default=None, type=positive_int,
                        help="TextSpan texts per pooling head (default: d, the original's)")
    parser.add_argument("--w_ov_rank", default=None, type=positive_int,
                        help="TextSpan's rank (default: d, the original's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return parser


def cached(path: Path, record: dict, build, what: str) -> np.ndarray:
    """The array at ``path`` when its record matches ``record`` (said as the original says it), else built,
    saved and said."""
    array = reusable_output(path, record)
    if array is not None:
        print(f"Loading {what} from {path}")
        return array
    array = build()
    save_output(path, array, record)
    print(f"Saved {what} to {path}")
    return array


def orthogonality_figure(orth: np.ndarray, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(10, 10))
    plt.imshow(orth - np.eye(orth.shape[0]))
    plt.colorbar()
    plt.xlabel("pooling head")
    plt.ylabel("pooling head")
    plt.title(title)
    return fig


def load(args: argparse.Namespace) -> tuple:
    """``(open_clip model or None, PooledImageModel)``: --model through open_clip or transformers
    (``is_open_clip_model``)."""
    register_model_config(args.model_config)
    if not is_open_clip_model(args.model, args.pretrained):
        return None, load_siglip(args.model, args.device).pooled_model()
    if args.pretrained is None and not args.model.startswith(("hf-hub:", "local-dir:")):
        import open_clip

        raise InputError(f"--model {args.model}: an open_clip name needs --pretrained (its tags: "
                         f"{open_clip.list_pretrained_tags_by_model(args.model) or 'none'}; 'none': random init)")
    model, preprocess, tokenizer = load_model_from_args(args)
    return model, open_clip_pooled_model(model, preprocess, tokenizer, args.model)


def main(args: argparse.Namespace) -> dict:
    args.device = init_distributed(args.device)
    lines = read_text_set(args.text_descriptions, "--text_descriptions")  # before any work
    text_set = Path(args.text_descriptions).stem
    ds = build_dataset(args.dataset, args.data_path)
    classnames = get_classnames(args.dataset)
    out = make_output_dir(args.output_dir)
    paths = siglip_paths(out, args.dataset, args.model, text_set)
    model, pm = load(args)
    main_process = is_main_process()
    say = print if main_process else (lambda *a: None)
    say("Model parameters:", f"{sum(p.numel() for p in pm.vision.parameters()):,}")

    encoder, tokenize = pm.text_encoder, pm.tokenize
    weights = {k: getattr(args, k) for k in MODEL_FIELDS}  # what the cached text-side arrays depend on
    zeroshot = None
    if main_process:
        print(f"Computing zeroshot weights for {DATASET_NAMES.get(args.dataset, args.dataset)}...")
        zeroshot = cached(paths["zeroshot"], make_record(
            **weights, dataset=args.dataset, classes=classnames,
            templates=len(OPENAI_IMAGENET_TEMPLATES), max_length=pm.text_length), lambda: zero_shot_classifier(
                encoder, tokenize, classnames, OPENAI_IMAGENET_TEMPLATES, args.device, args.batch_size).T.cpu().numpy(),
            "zeroshot weights")

    ds.transform = pm.transform
    record = args_record(args)
    files = decompose_siglip_dataset(pm, ds, paths, record=record, device=args.device, batch_size=args.batch_size,
                                     num_workers=args.num_workers, resume=args.resume,
                                     desc=f"compute_siglip {Path(args.model).name} {args.dataset}")
    if not main_process:
        return {}
    heads, mlp, pooled = (load_array(files[k], "compute_siglip.py") for k in ("heads", "mlp", "pooled"))
    labels = np.asarray(load_array(files["labels"], "compute_siglip.py"))
    counts = pooling_accuracies(heads, mlp, pooled, labels, zeroshot, np.load(files["constant"]),
                                pm.pool.mlp_bias.cpu().numpy())
    total = len(labels)
    accuracies = {}
    for k in ACCURACIES:
        accuracies[k] = percent(counts[k], total)
        print(f"Computing accuracy ({COMPUTING[k]})...")
        print(f"Top-1 {k} accuracy: {accuracies[k]:.2f}% ({counts[k]}/{total})")
    written = save_result(out, paths["accuracies"].stem, {"model": args.model, "dataset": args.dataset,
                                                           "num_images": total, "accuracy": accuracies,
                                                           "correct": counts}, record)

    if args.save_everything:
        prs = {"attention_records": torch.from_numpy(np.array(heads))[:, None],
               "mlp_records": torch.from_numpy(np.array(mlp))[:, None]}
        atomic_write(paths["prs"], lambda f: torch.save(prs, f))
        write_provenance(paths["prs"], dict(record, keys={k: list(v.shape) for k, v in prs.items()}))
        written.append(paths["prs"])
        del prs
        if model is not None:  # open_clip: the engine's full decomposition, as compute_prs.py writes it
            prs_files = {**prs_paths(out, args.dataset, siglip_model_name(args.model)), "labels": files["labels"]}
            written += list(decompose_dataset(model, ds, prs_files, record=record, device=args.device,
                                              batch_size=args.batch_size, num_workers=args.num_workers,
                                              resume=args.resume, model_name=args.model,
                                              desc=f"compute_prs {args.model}").values())

    text_features = cached(paths["text_features"], make_record(
        **weights, text_set=str(args.text_descriptions), num_texts=len(lines), max_length=pm.text_length),
        lambda: encode_texts(encoder, tokenize, lines, args.device, args.batch_size).cpu().numpy(), "text features")
    print(f"Text features shape: {text_features.shape}")

    print("Checking how orthogonal the heads are...")
    orth = head_orthogonality(heads).astype(np.float32)
    save_output(paths["orthogonality"], orth, record)
    save_figure(orthogonality_figure(orth, f"{args.model} on {args.dataset}: mean |cos| between centred pooling "
                                           f"heads, minus the identity"), paths["orthogonality_plot"])
    write_provenance(paths["orthogonality_plot"], record)
    print(f"Saved orthogonalities to {paths['orthogonality']}")

    if args.compute_text_spans:
        d = heads.shape[-1]
        print(f"Non-spatial results shape: {list(heads.shape)}")
        print(f"Text features shape: {text_features.shape}")
        res = textspan_from_stats(pooling_head_stats(heads, args.device), text_features,
                                  args.texts_per_head or d, args.w_ov_rank or d, args.device)
        blocks = [f"{SEP}\nHead {h}\n" + "".join(f"{lines[i]}\n" for i in res.indices[h]) + SEP
                  for h in range(heads.shape[1])]
        print("\n".join(blocks))
        result = {"model": args.model, "text_set": str(args.text_descriptions), "heads": [
            {"head": h, "texts": [lines[i] for i in res.indices[h]], "indices": res.indices[h].tolist(),
             "variance_explained": res.variance_explained[h].tolist()} for h in range(heads.shape[1])]}
        written += save_result(out, paths["text_spans"].name, result, record, texts={".txt": "\n".join(blocks) + "\n"})
    say_wrote(written)
    return {"accuracy": accuracies, "files": {k: str(p) for k, p in files.items()}}


if __name__ == "__main__":
    run(main, get_args_parser())
