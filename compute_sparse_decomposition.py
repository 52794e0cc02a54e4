"""Sparse text decomposition of every neuron's first principal component (paper 2, section 5).

Reads
  the first PCs  {dataset}_{train_split}_mlps_{model}_{pretrained}_{mlp_layer}_{top_k_pca}_pca.npy [neurons, d]
                 (compute_pcas.py; looked for in --output_dir, as the original, then --input_dir)
  the texts      {text_descriptions}_{model}_{pretrained}.npy, else {text_descriptions}_{model}.npy [T, d]
                 (compute_text_set_projection.py; in --input_dir, as the original, then --descriptions_dir, then
                 --output_dir) and their lines, {descriptions_dir}/{text_descriptions}.txt (line i = row i).
The texts are centred over texts and rescaled (--dictionary_norm, see below) and times --coefficient; each PC
is then decomposed over them by --solver:
  omp      Orthogonal Matching Pursuit, exactly --components texts per neuron (the original: scikit-learn's
           SparseCoder(transform_algorithm='omp'); here our batched torch OMP, same supports and coefficients).
  nnlasso  SpLiCE's non-negative lasso by ADMM, penalty --l1_penalty (default: --transform_alpha, which the
           original passed to its decomposer as the l1 penalty); seeded by --seed. Only the --components
           largest coefficients are listed and used for the reconstruction.
Writes to --output_dir
  {dataset}_mlps_{model}_{pretrained}_{mlp_layer}_{text_descriptions}_decomposition_omp_{transform_alpha}_{components}
    .json  {neuron: [[text index, coefficient, text], ...]} sorted by |coefficient|, largest first
    .npz   scipy.sparse CSC [neurons, T]: all coefficients
    _fit.png  histogram of cosine(reconstruction, PC) over neurons
  (nnlasso: ..._decomposition_nnlasso_{l1_penalty}_{components}; per_text adds the suffix _per_text).
--evaluate: for --dataset/--split (model run on the images, as the original), zero-shot accuracy when every
neuron's second-order effect is replaced by its training mean plus its projection on the neuron's sparse
text reconstruction; also the baseline and the all-neurons-mean-ablated accuracy. The training mean comes
from {dataset}_{train_split}_..._merged.npy and the classifier from {dataset}_classifier_{model}_{pretrained}.npy
(else {dataset}_classifier_{model}.npy) in --input_dir, then --output_dir. Written as ..._evaluation.json.

--dictionary_norm:
  per_dimension  (default, the original) each embedding dimension (column) of the centred texts is divided
                 by its norm over the texts (a per-axis standardisation). Texts end up with unequal norms and OMP,
                 which picks by |<text, residual>|, favours texts far out along rarely-used axes.
  per_text       each centred text (row) is scaled to the same norm, coefficient*sqrt(d/T): the texts keep
                 their directions (cosine geometry, as in SpLiCE), and the dictionary keeps the total norm of
                 the per_dimension one, so --l1_penalty means about the same under both.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from utils.cli import (add_mismatch_arg, add_model_args, add_num_workers_arg, load_model_from_args, model_weights,
                       positive_int, run, say_wrote)
from utils.datasets import build_second_order_dataset, class_labels
from utils.errors import InputError
from utils.files.atomic import load_array, make_output_dir
from utils.files.names import (find_input, find_text_set, pretrained_name, second_order_paths,
                               sparse_decomposition_files, sparse_decomposition_stem)
from utils.files.provenance import check_consistent, derived_record, write_provenance
from utils.files.readers import load_classifier
from utils.files.results import save_result
from utils.neurons.ablations import accuracy_over_dataset
from utils.neurons.effects import COEFFICIENT, SecondOrderEffects
from utils.neurons.pca import neuron_means
from utils.neurons.sparse import (EVALUATIONS, NORMS, SOLVERS, build_text_dictionary, cosine_rows, decompose,
                                  decomposition_json, plot_fit, reconstruction_logits, save_sparse_npz, top_components)
from utils.text.sets import read_text_set


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Sparse decomposition part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--data_path", default=None, type=str, help="dataset root (for --evaluate)")
    parser.add_argument("--coefficient", default=COEFFICIENT, type=float,
                        help="scale of the dictionary and of the normalised representation (100 in the paper)")
    parser.add_argument("--split", default="val", type=str, help="the split --evaluate runs on")
    parser.add_argument("--train_split", default="train", type=str,
                        help="split of the PCA and merged (training mean) files; the original hard-codes train")
    parser.add_argument("--mlp_layer", default=9, type=int, help="the MLP layer of the neurons (0-based)")
    parser.add_argument("--components", default=32, type=int, help="texts per neuron")
    parser.add_argument("--top_k_pca", default=100, type=int, help="which PCA file (its top k)")
    add_num_workers_arg(parser)
    parser.add_argument("--batch_size", default=16, type=positive_int, help="images per batch for --evaluate")
    parser.add_argument("--output_dir", default="./output_dir", help="where the decomposition is written")
    parser.add_argument("--descriptions_dir", default="./text_descriptions",
                        help="where {text_descriptions}.txt is (then its external/ subfolder)")
    parser.add_argument("--input_dir", default="./output_dir", help="where the merged / text / classifier files are")
    parser.add_argument("--text_descriptions", default="30k", help="name of the text set (file stem)")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name (file names; --evaluate data)")
    parser.add_argument("--transform_alpha", type=float, default=1.0,
                        help="the original's 'algorithm alpha': part of the output name; with --solver omp it "
                             "does not change the result (scikit-learn ignores it when the number of atoms is "
                             "given); the default l1 penalty of --solver nnlasso")
    parser.add_argument("--evaluate", action="store_true", help="evaluate the reconstruction (runs the model)")
    parser.add_argument("--solver", default="omp", choices=SOLVERS, help="omp (the original) or nnlasso (SpLiCE)")
    parser.add_argument("--l1_penalty", default=None, type=float,
                        help="nnlasso: weight of sum(w) in |pc - w D|^2 + l1 * sum(w), w >= 0 "
                             "(default: --transform_alpha)")
    parser.add_argument("--max_iter", default=None, type=int, help="nnlasso: ADMM iteration cap (default 2000)")
    parser.add_argument("--seed", default=0, type=int, help="nnlasso: seed of the ADMM start")
    parser.add_argument("--dictionary_norm", default="per_dimension", choices=NORMS,
                        help="per_dimension (the original: each embedding dimension scaled to norm "
                             "--coefficient over the texts) or per_text (each text scaled to the same norm); "
                             "see above")
    parser.add_argument("--solver_batch_size", default=1024, type=int, help="neurons solved at once")
    add_mismatch_arg(parser)
    return parser


def load_inputs(args: argparse.Namespace) -> dict:
    """PCs [K, d], text embeddings [T, d] and their lines, checked against each other."""
    pca_name = second_order_paths(".", args.dataset, args.train_split, args.model, args.pretrained,
                                  args.mlp_layer, args.top_k_pca)["pca"].name
    pca_path = find_input([args.output_dir, args.input_dir], [pca_name],
                          "first PCs [neurons, d] (written by compute_pcas.py)")
    pcas = np.asarray(load_array(pca_path, "compute_pcas.py", mmap=False), np.float32)
    if pcas.ndim != 2:
        raise InputError(f"{pca_path}: expected [neurons, d], got shape {pcas.shape}")
    text_path = find_text_set([args.input_dir, args.descriptions_dir, args.output_dir], args.text_descriptions,
                              args.model, args.pretrained)
    texts = np.asarray(load_array(text_path, "compute_text_set_projection.py", mmap=False))
    if texts.ndim != 2:
        raise InputError(f"{text_path}: expected [texts, d], got shape {texts.shape}")
    if texts.shape[1] != pcas.shape[1]:
        raise InputError(f"{text_path}: text embeddings of dimension {texts.shape[1]}, but the PCs in {pca_path} "
                         f"have dimension {pcas.shape[1]} (texts embedded with another model?)")
    lines = read_text_set(Path(args.descriptions_dir) / f"{args.text_descriptions}.txt", "--text_descriptions")
    if len(lines) != len(texts):
        raise InputError(f"{text_path}: {len(texts)} embeddings but {len(lines)} lines in "
                         f"{Path(args.descriptions_dir) / (args.text_descriptions + '.txt')} (re-embed the text set)")
    if not 1 <= args.components <= len(texts):
        raise InputError(f"--components {args.components}: must be between 1 and the number of texts in the "
                         f"dictionary ({len(texts)}, {text_path})")
    check_consistent([pca_path, text_path], ("model", "pretrained"), allow_mismatch=args.allow_mismatch)
    return {"pcas": pcas, "pca_path": pca_path, "texts": texts, "text_path": text_path, "lines": lines}


def prepare_evaluation(args: argparse.Namespace, K: int, d: int) -> dict:
    """Model, effects, training mean [K, d] and classifier [d, C] for --evaluate (checked before solving)."""
    model, preprocess, _ = load_model_from_args(args)
    effects = SecondOrderEffects(model, args.mlp_layer, args.device, args.coefficient, model_name=args.model)
    if (effects.num_neurons, effects.out_dim) != (K, d):
        raise InputError(f"the PCs are [{K}, {d}] but {args.model} layer {args.mlp_layer} has "
                         f"[{effects.num_neurons}, {effects.out_dim}] (neurons, d): wrong --model or --mlp_layer?")
    mpath = second_order_paths(args.input_dir, args.dataset, args.train_split, args.model, args.pretrained,
                               args.mlp_layer)["merged"]
    merged = load_array(mpath, "compute_second_order_neuron_prs.py")
    if merged.ndim != 3 or merged.shape[1:] != (K, d):
        raise InputError(f"{mpath}: shape {merged.shape} does not match the PCs [{K}, {d}] "
                         f"(expected [images, {K}, {d}])")
    classifier, cpath = load_classifier([args.input_dir, args.output_dir], args.dataset, args.model,
                                        args.pretrained, d, args.allow_mismatch)
    check_consistent([mpath], ("model", "pretrained"), expected={"model": args.model, "pretrained": args.pretrained},
                     allow_mismatch=args.allow_mismatch)
    ds = build_second_order_dataset(args.dataset, args.data_path, preprocess, args.split)
    labels = class_labels(ds, classifier.shape[1], str(cpath))
    mean = neuron_means(merged, progress=True)
    return {"effects": effects, "mean": mean, "classifier": classifier, "classifier_path": cpath,
            "merged_path": mpath, "dataset": ds, "labels": labels}


def evaluate(args: argparse.Namespace, ev: dict, reconstruction: np.ndarray) -> dict:
    """Accuracies (%) of ``EVALUATIONS`` over --dataset/--split."""
    dev = ev["effects"].device
    mean = torch.from_numpy(ev["mean"]).to(dev)
    rec = torch.from_numpy(np.asarray(reconstruction, np.float32)).to(dev)
    weights = torch.from_numpy(ev["classifier"]).to(dev)
    logits = lambda effects, representation: reconstruction_logits(  # noqa: E731
        effects, representation, mean, rec, weights, args.coefficient)
    return accuracy_over_dataset(ev["effects"], ev["dataset"], ev["labels"], logits, args.batch_size,
                                 args.num_workers, desc=f"evaluate on {args.dataset} {args.split}")


def main(args: argparse.Namespace) -> dict:
    l1 = args.transform_alpha if args.l1_penalty is None else args.l1_penalty
    inputs = load_inputs(args)
    pcas, texts = inputs["pcas"], inputs["texts"]
    K, d = pcas.shape
    T = len(texts)
    if args.solver == "omp" and args.components > d:
        print(f"note: --components {args.components} > d = {d}: OMP stops once the picked texts span the space")
    ev = prepare_evaluation(args, K, d) if args.evaluate else None

    dictionary = build_text_dictionary(texts, args.coefficient, args.dictionary_norm, str(inputs["text_path"]))
    print(f"dictionary: {T} texts x {d} ({args.dictionary_norm}); {K} neurons; solver {args.solver}")
    before = time.time()
    codes = decompose(dictionary, pcas, args.solver, args.components, l1_penalty=l1, seed=args.seed,
                      device=args.device, batch_size=args.solver_batch_size, max_iter=args.max_iter, progress=True)
    print(f"decomposed in {time.time() - before:.1f} s")
    top, truncated = top_components(codes, args.components)

    out = make_output_dir(args.output_dir)
    penalty = args.transform_alpha if args.solver == "omp" else l1
    stem = sparse_decomposition_stem(args.dataset, args.model, args.pretrained, args.mlp_layer, args.text_descriptions,
                       args.solver, penalty, args.components, args.dictionary_norm)
    files = sparse_decomposition_files(out, stem)
    save_sparse_npz(files["npz"], codes)
    reconstruction = np.asarray(truncated @ dictionary, np.float32)  # [K, d]
    cos = cosine_rows(reconstruction, pcas)
    nnz = np.diff(truncated.indptr)
    print(f"texts per neuron: mean {nnz.mean():.1f} (min {nnz.min()}, max {nnz.max()}); "
          f"cosine(reconstruction, PC): mean {cos.mean():.4f}, median {np.median(cos):.4f}, min {cos.min():.4f}")
    record = derived_record([inputs["pca_path"], inputs["text_path"]], solver=args.solver, penalty=penalty,
                            components=args.components, dictionary_norm=args.dictionary_norm,
                            text_set=args.text_descriptions)
    write_provenance(files["npz"], record)
    written = save_result(out, stem, decomposition_json(top, inputs["lines"]), record, indent=None,
                          figure=plot_fit(cos, f"{args.model} ({pretrained_name(args.pretrained)}), MLP layer "
                                               f"{args.mlp_layer}: {K} neurons' first PCs as {args.components} texts of "
                                               f"{args.text_descriptions}\n({args.solver}, {args.dictionary_norm})"),
                          figure_name=files["fit"].name)
    say_wrote([written[0], files["npz"], *written[1:]])
    result = {"json": str(files["json"]), "npz": str(files["npz"]),
              "cosine_mean": float(cos.mean()), "texts_per_neuron_mean": float(nnz.mean())}
    if ev is None:
        return result

    accuracy = evaluate(args, ev, reconstruction)
    print(f"evaluated on {len(ev['labels'])} images of {args.dataset} {args.split}")
    for k, v in accuracy.items():
        print(f"{EVALUATIONS[k]}:", v)
    evaluation = {"args": vars(args), "num_images": len(ev["labels"]), "classifier": str(ev["classifier_path"]),
                  "training_mean": str(ev["merged_path"]), "accuracy_percent": accuracy,
                  "printed": {EVALUATIONS[k]: v for k, v in accuracy.items()},
                  "cosine_reconstruction_pc_mean": float(cos.mean())}
    say_wrote(save_result(out, stem, evaluation, dict(record, split=args.split, data_path=args.data_path,
                                                      num_images=len(ev["labels"])),
                          json_name=files["evaluation"].name))
    result["accuracy_percent"] = accuracy
    return result


if __name__ == "__main__":
    # the model runs only to evaluate
    run(main, get_args_parser(), weights=lambda args: model_weights(args) if args.evaluate else None)
