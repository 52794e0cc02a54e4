"""Semantic adversarial images (paper 2): words from neuron decompositions, an LLM, a text-to-image model, CLIP.

Finds the words that push CLIP's image embedding from --class_1 (the true class, e.g. "cat") toward --class_0
(e.g. "vacuum cleaner"), has a chat LLM write image descriptions that use them and mention class_1, renders
them with FLUX.1-schnell or DeepFloyd IF, and scores every image with CLIP: score = image embedding . Δ with
Δ = t(class_0) - t(class_1); score > 0 is a success. Stages: see utils/neurons/adversarial.py.

Reads from --output_dir (alias --input_dir; the original reads its inputs from --output_dir), per --mlp_layers:
  {dataset}_{train_split}_mlps_{model}_{pretrained}_{layer}_{top_k_pca}_pca.npy          (compute_pcas.py)
  {dataset}_mlps_{model}_{pretrained}_{layer}_{text_descriptions}_decomposition_omp_{transform_alpha}_{neurons_texts}
    .json                                                               (compute_sparse_decomposition.py)
Writes to --dataset_path:
  {counter:03}.png    --batch_size images per description (counter = description * batch_size + image)
  files.csv           tab-separated: file, prompt, class_0, class_1, score (the original's format, no header)
  summary.json        words with weights, neurons with scores, prompts, each image's score, success rates
  prompts.json        the descriptions and the settings they belong to (a rerun reuses them: resumable)
  llm_reply.txt       what the LLM answered
  baseline_{counter:03}.png, baseline.csv   with --baseline N: N plain prompts "a photo of a {class_1}"
A rerun skips images that exist, and rebuilds files.csv and summary.json from every image there.

Fixed here (the original's FLUX branch saved its [0, 1] output through a [-1, 1] -> [0, 1] conversion, so its
images were washed out into [0.5, 1]; here FLUX images are saved as the pipeline returns them). Differences:
docs/adversarial.md. Needs the optional extra: pip install -e ".[adversarial]".
"""
import argparse
import json
from pathlib import Path

import tqdm

from utils.cli import (HelpFormatter, add_mismatch_arg, add_model_args, add_num_workers_arg, args_record,
                       load_model_from_args, positive_int, run)
from utils.errors import InputError
from utils.files.atomic import atomic_write_json, atomic_write_text
from utils.files.names import pretrained_name
from utils.files.provenance import check_consistent, write_provenance
from utils.neurons import adversarial as adv
from utils.neurons.sparse import NORMS, SOLVERS

PROMPTS_FILE = "prompts.json"
# the settings that decide the descriptions and images of a --dataset_path (a rerun must match them)
RUN_SETTINGS = ("model", "pretrained", "class_0", "class_1", "dataset", "train_split", "mlp_layers", "top_k_pca",
                "text_descriptions", "neurons_texts", "solver", "transform_alpha", "dictionary_norm", "neurons_num",
                "overall_words", "cosim_similarity", "similarity_model", "block_words", "llm", "max_new_tokens",
                "prompts_file", "results_per_generation", "seed", "image_model", "flux_model", "if_stage_1",
                "if_stage_2", "batch_size")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("generate_adversarial_images.py", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_model_args(parser, model="ViT-B-32", pretrained="openai")
    parser.add_argument("--class_0", default="dog", type=str,
                        help="the wrong class the images are pushed toward (never named in a description)")
    parser.add_argument("--class_1", default="cat", type=str, help="the true class (named in every description)")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--seed", default=0, type=int,
                        help="seeds the LLM's sampling; description i's images use generator seed --seed + i")
    parser.add_argument("--dataset_path", default="dataset", type=str,
                        help="OUTPUT folder: where the images and results go (the original's name, kept)")
    parser.add_argument("--image_model", default="FLUX", choices=adv.IMAGE_MODELS, help="text-to-image model")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in the input file names")
    parser.add_argument("--train_split", default="train", type=str,
                        help="split in the PCA file names (the original hard-codes train)")
    parser.add_argument("--mlp_layers", default=[8, 9, 10], nargs="+", type=int, help="MLP layers of the neurons")
    parser.add_argument("--top_k_pca", default=100, type=int, help="which PCA files (their top k)")
    parser.add_argument("--coefficient", default=100.0, type=float,
                        help="accepted for compatibility; no effect (the original only used it on a text-embedding "
                             "file that nothing read afterwards)")
    parser.add_argument("--output_dir", "--input_dir", dest="output_dir", default="./output_dir",
                        help="INPUT folder: where the PCA and decomposition files are read from (the original's "
                             "name, kept: despite it, nothing is written there; results go to --dataset_path)")
    parser.add_argument("--descriptions_dir", default="./text_descriptions",
                        help="accepted for compatibility; not used (the decompositions hold the texts)")
    parser.add_argument("--text_descriptions", default="30k",
                        help="text set of the decompositions (part of their file names)")
    parser.add_argument("--solver", default="omp", choices=SOLVERS, help="solver in the decomposition file names")
    parser.add_argument("--transform_alpha", default=1.0, type=float,
                        help="penalty in the decomposition file names (1.0, as the original hard-codes)")
    parser.add_argument("--dictionary_norm", default="per_dimension", choices=NORMS,
                        help="dictionary scaling of the decompositions (per_text adds _per_text to the names)")
    parser.add_argument("--cosim_similarity", default=0.6, type=float,
                        help="drop words whose sentence-embedding cosine to class_0 is at least this")
    parser.add_argument("--similarity_model", default=adv.DEFAULT_SIMILARITY_MODEL,
                        help="sentence-transformers model (hub id or folder) for --cosim_similarity")
    parser.add_argument("--block_words", default=None,
                        help="JSON {class: [words]} adding to or replacing the shipped block lists "
                             "(utils/data/adversarial_block_words.json); a class with no list blocks only its "
                             "name and plural")
    parser.add_argument("--neurons_num", default=50, type=positive_int, help="neurons with the largest |<PC, Δ>| to use")
    parser.add_argument("--results_per_generation", default=10, type=positive_int,
                        help="descriptions to render (taken from the LLM's reply)")
    parser.add_argument("--neurons_texts", default=128, type=int,
                        help="texts per neuron of the decompositions (their --components; part of the names)")
    parser.add_argument("--overall_words", default=20, type=positive_int, help="distinct words given to the LLM")
    parser.add_argument("--batch_size", default=4, type=positive_int, help="images per description")
    parser.add_argument("--llm", default=adv.DEFAULT_LLM, help="chat LLM (hub id or folder) writing the descriptions")
    parser.add_argument("--max_new_tokens", default=1024, type=positive_int, help="length limit of the LLM's reply")
    parser.add_argument("--prompts_file", default=None,
                        help="use these descriptions (one per line) instead of asking the LLM")
    parser.add_argument("--flux_model", default=adv.DEFAULT_FLUX, help="FLUX pipeline (hub id or folder)")
    parser.add_argument("--if_stage_1", default=adv.DEFAULT_IF_STAGE_1, help="DeepFloyd IF stage I (id or folder)")
    parser.add_argument("--if_stage_2", default=adv.DEFAULT_IF_STAGE_2, help="DeepFloyd IF stage II (id or folder)")
    parser.add_argument("--cpu_offload", default=True, action=argparse.BooleanOptionalAction,
                        help="keep the LLM / image-model parts on the CPU until they run (on by default; no "
                             "effect on CPU)")
    parser.add_argument("--baseline", default=0, type=int, metavar="N",
                        help="also render and score N plain prompts 'a photo of a {class_1}' (same seeds as "
                             "descriptions 0..N-1): the reference for the attack's success rate")
    parser.add_argument("--dry_run", action="store_true", help="stop after printing the words and the LLM request")
    add_mismatch_arg(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    adv.require_extra()
    if args.baseline < 0:
        raise InputError(f"--baseline {args.baseline}: must be 0 or more")
    out = Path(args.dataset_path)
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings["pretrained"] = pretrained_name(args.pretrained)
    # a --dataset_path holding another run is refused here, before any model is loaded
    saved_prompts = None if args.dry_run else adv.read_saved_prompts(out / PROMPTS_FILE, settings)

    # 1. the direction Δ = t(class_0) - t(class_1)
    model, preprocess, tokenizer = load_model_from_args(args)
    direction = adv.class_direction(model, tokenizer, args.class_0, args.class_1, args.device)

    # 2. the neurons whose PCs point most along ±Δ
    pcs, spans = adv.load_layer_pcs(args.output_dir, args.dataset, args.train_split, args.model, args.pretrained,
                                    args.mlp_layers, args.top_k_pca, len(direction))
    adv.check_layer_sizes(model, spans)
    json_paths = adv.decomposition_paths(args.output_dir, args.dataset, args.model, args.pretrained, spans,
                                         args.text_descriptions, args.solver, args.transform_alpha,
                                         args.neurons_texts, args.dictionary_norm)
    decompositions = adv.load_decompositions(json_paths, spans)
    check_consistent([s.pca_path for s in spans] + json_paths, expected={"model": args.model,
                     "pretrained": args.pretrained}, allow_mismatch=args.allow_mismatch)
    neurons, scores = adv.top_neurons(pcs, direction, args.neurons_num)

    # 3. their words, minus class_0's synonyms
    candidates = adv.weighted_words(decompositions, neurons, scores)
    blocked = adv.blocked_words(args.class_0, adv.load_block_words(args.block_words))
    similarity = adv.load_similarity(args.similarity_model, args.device)
    kept, removed = adv.filter_words(candidates, args.class_0, blocked, similarity, args.cosim_similarity)
    del similarity
    adv.free_memory()
    for r in removed:
        print(f"removed '{r['word']}' ({r['reason']})")
    words = adv.top_words(kept, args.overall_words)
    print("words:", [w for w, _ in words])

    # 4. the descriptions
    messages = adv.build_request([w for w, _ in words], args.class_1, args.class_0)
    if args.dry_run:
        print("LLM request:\n" + "\n".join(f"[{m['role']}] {m['content']}" for m in messages))
        return {"words": words, "messages": messages}
    prompts = saved_prompts
    out.mkdir(parents=True, exist_ok=True)
    if prompts is not None:
        print(f"reusing the {len(prompts)} descriptions of {out / PROMPTS_FILE}")
    elif args.prompts_file:
        prompts = adv.read_prompts_file(args.prompts_file)
    else:
        reply = adv.describe(args.llm, messages, args.device, args.seed, args.max_new_tokens, args.cpu_offload)
        atomic_write_text(out / "llm_reply.txt", reply)
        print("LLM reply:\n" + reply)
        prompts = adv.select_descriptions(reply, args.class_0, args.class_1, args.results_per_generation)
    atomic_write_json(out / PROMPTS_FILE, {"settings": settings, "prompts": prompts})
    print("descriptions:\n" + "\n".join(f"{i}. {p}" for i, p in enumerate(prompts)))

    # 5. the images (existing ones are kept: a rerun resumes)
    n = args.batch_size
    jobs = adv.make_jobs(prompts, args.seed, n)
    plain = f"a photo of a {args.class_1}"
    baseline_jobs = adv.make_jobs([plain] * args.baseline, args.seed, n, prefix="baseline_")
    todo = [j for j in jobs + baseline_jobs if not all((out / f).is_file() for f in j.files)]
    print(f"{len(todo)} of {len(jobs) + len(baseline_jobs)} prompts to render ({n} images each)")
    if todo:
        render = adv.load_image_generator(args.image_model, args.device, args.cpu_offload, args.flux_model,
                                          args.if_stage_1, args.if_stage_2)
        for job in tqdm.tqdm(todo, desc=f"render ({args.image_model})", unit="prompt"):
            for image, name in zip(render(job.prompt, n, job.seed), job.files):
                if not (out / name).is_file():
                    adv.save_png(image, out / name)
        del render
        adv.free_memory()

    # 6. CLIP scores: image embedding . Δ, a success when > 0
    rows = adv.score_jobs(model, preprocess, jobs, out, direction, args.device)
    baseline_rows = adv.score_jobs(model, preprocess, baseline_jobs, out, direction, args.device)
    summary = adv.build_summary(args.class_0, args.class_1, spans, neurons, scores, words, removed, prompts, rows, n,
                                baseline_rows)
    print("Successful images:", [int(f[:-4]) for f, _, s in rows if s > 0])
    print(f"success rate {summary['success_rate']:.3f}" + (
        f" (baseline '{plain}': {summary['baseline']['success_rate']:.3f}; lift {summary['lift']:+.3f})"
        if baseline_rows else ""))
    record = args_record(args, num_images=len(rows), num_baseline_images=len(baseline_rows),
                         inputs=[str(s.pca_path) for s in spans] + [str(p) for p in json_paths])
    outputs = {"files.csv": adv.files_csv(rows, args.class_0, args.class_1), "summary.json": json.dumps(summary,
                                                                                                       indent=1)}
    if baseline_rows:
        outputs["baseline.csv"] = adv.files_csv(baseline_rows, args.class_0, args.class_1)
    for name, text in outputs.items():
        atomic_write_text(out / name, text)
        write_provenance(out / name, record)
    print(f"wrote files.csv ({len(rows)} images) and summary.json to {out}")
    return summary


if __name__ == "__main__":
    run(main, get_args_parser(), outputs=("dataset_path",))  # its --output_dir is where inputs are read
