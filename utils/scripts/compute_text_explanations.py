"""PCLens' compute_text_explanations: explain every head of the last layers with texts, PCLens' JSONL output.

Reads from --input_dir
  {dataset}_{attn|mlp|labels}_{model}_seed_{seed}.npy   (python -m utils.scripts.compute_activation_values)
  {dataset}_classifier_{model}.npy                       (python -m utils.scripts.compute_classes_embeddings)
  {text_descriptions}_{model}.npy                        (python -m utils.scripts.compute_text_embeddings)
and the lines of --text_dir/{text_descriptions}.txt (or its external/ folder; text_descriptions/ and PCLens'
utils/text_descriptions/ stand for each other). PCLens' own text sets, e.g.
top_1500_nouns_5_sentences_imagenet_bias_clean, are fetched with
`python text_descriptions/fetch_original.py top_1500_nouns_5_sentences_imagenet_bias_clean.txt` and embedded
with `python -m utils.scripts.compute_text_embeddings --model M --pretrained P --data_path
utils/text_descriptions/NAME.txt`.

Runs compute_complete_text_set.py's computation (streamed; utils/text/textspan.py) with --algorithm
  svd_data_approx  PCLens: per head, principal components up to 99 % of the singular-value sum (+1), at most
                   --max_text; per component the --text_per_princ_comp texts of largest and of smallest cosine
                   (centred, unit texts); the head is replaced by its projection onto the span of each
                   component's top text. PCLens keeps the SVD's arbitrary sign of each component and so
                   reconstructs from an arbitrary pole; here each component's stronger pole is made positive,
                   listed first and used, which removes that dependence. Strengths: s^2 and 100 s^2 / sum s^2.
                   A head that keeps one component works (PCLens: IndexError).
  text_span        PCLens' TextSpan variant: --max_text texts per head, rank 80, centred texts and data.
and writes --output_dir/{dataset}_completeness_{text_descriptions}_{model}_algo_{algorithm}_seed_{seed}.jsonl:
one record per head ("layer", "head" and PCLens' fields), then one for the whole final embedding ("layer" and
"head" -1, "accuracy" with every head replaced, "nr_texts": distinct texts used; PCLens always writes 0 there).
Details and differences: docs/pclens.md.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from utils.cli import DEVICE_HELP, add_mismatch_arg, add_num_workers_arg, positive_int, run
from utils.files.atomic import atomic_write_text, make_output_dir
from utils.files.names import classifier_path, pclens_explanations_path, pclens_paths
from utils.files.provenance import derived_record, write_provenance
from utils.files.readers import load_decomposition
from utils.models import default_device
from utils.text.completeness import CompletenessSettings, completeness
from utils.text.textspan import pclens_from_stats, pclens_record, textspan_from_stats

TEXT_SPAN_RANK = 80  # PCLens' text_span: the span of the top 80 right singular vectors


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Completeness part", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-H-14", type=str, metavar="MODEL", help="model name in file names")
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--output_dir", default="./output_dir", help="where the JSONL goes (default %(default)s)")
    parser.add_argument("--input_dir", default="./output_dir", help="where the arrays are (default %(default)s)")
    parser.add_argument("--text_descriptions", default="image_descriptions_per_class", type=str,
                        help="name of the text set (default %(default)s)")
    parser.add_argument("--text_dir", default="./text_descriptions", type=str,
                        help="folder of the .txt text sets (default %(default)s, and its external/; PCLens: "
                             "./utils/text_descriptions)")
    parser.add_argument("--dataset", type=str, default="imagenet", help="dataset name in file names")
    parser.add_argument("--num_of_last_layers", type=int, default=4, help="attention layers to replace (default 4)")
    parser.add_argument("--text_per_princ_comp", type=positive_int, default=5,
                        help="texts listed per pole of each principal component (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the seed in the input and output names (default: %(default)s)")
    parser.add_argument("--max_text", type=positive_int, default=80,
                        help="svd_data_approx: at most this many components per head; text_span: texts per head "
                             "(default %(default)s)")
    parser.add_argument("--algorithm", default="svd_data_approx", choices=["svd_data_approx", "text_span"],
                        help="see above (default %(default)s)")
    parser.add_argument("--device", default=default_device(), help=DEVICE_HELP)
    parser.add_argument("--chunk", type=int, default=None, help="images per read from the memmaps (default: ~256 MB)")
    parser.add_argument("--stats_dtype", default="float64", choices=["float64", "float32"],
                        help="precision of the per-head scatter products (see compute_complete_text_set.py)")
    add_mismatch_arg(parser)
    return parser


def load_arrays(args: argparse.Namespace) -> tuple[dict, dict]:
    """The seed-named decomposition and the classifier (memory-mapped), checked against each other."""
    paths = {**pclens_paths(args.input_dir, args.dataset, args.model, args.seed),
             "classifier": classifier_path(args.input_dir, args.dataset, args.model)}
    arrays = load_decomposition(args.input_dir, args.dataset, args.model, args.allow_mismatch, paths=paths,
                                written_by=("python -m utils.scripts.compute_activation_values",
                                            "python -m utils.scripts.compute_classes_embeddings"), cls_attn=False)
    return arrays, arrays["paths"]


def text_span_record(res, i: int, texts: list[str], text_mean: np.ndarray) -> dict:
    """PCLens' text_span JSON object for head ``i`` of a ``TextSpanResult``."""
    return {"mean_values_att": res.mean[i].tolist(), "mean_values_text": text_mean.tolist(),
            "project_matrix": res.span[i].tolist(), "embeddings_sort": [{"text": texts[j]} for j in res.indices[i]]}


def main(args: argparse.Namespace) -> Path:
    arrays, paths = load_arrays(args)
    svd = args.algorithm == "svd_data_approx"
    settings = CompletenessSettings(
        model=args.model, input_dir=args.input_dir, text_dir=args.text_dir, text_set=args.text_descriptions,
        num_of_last_layers=args.num_of_last_layers, algorithm="pclens" if svd else "text_span",
        texts_per_head=args.text_per_princ_comp if svd else args.max_text, w_ov_rank=TEXT_SPAN_RANK,
        max_text=args.max_text, device=args.device, chunk=args.chunk, stats_dtype=args.stats_dtype,
        allow_mismatch=args.allow_mismatch)
    res = completeness(settings, arrays, paths, final=True)
    lines, features, heads = res["lines"], res["features"], res["heads"]
    text_mean = features.mean(0, dtype=np.float64)
    if svd:
        records = [pclens_record(r, lines) for r in res["results"]]
        whole = pclens_record(pclens_from_stats(res["final_stats"], features, args.text_per_princ_comp,
                                                device=args.device)[0], lines)  # no cap, as PCLens
    else:
        records = [text_span_record(res["results"], i, lines, text_mean) for i in range(len(heads))]
        whole = text_span_record(textspan_from_stats(res["final_stats"], features - text_mean.astype(np.float32),
                                                     TEXT_SPAN_RANK, TEXT_SPAN_RANK, args.device, centred=True),
                                 0, lines, text_mean)
    accuracy = res["curve"][-1]
    nr_texts = len({t for h in heads for t in h["texts"]})
    print("Current accuracy:", accuracy, "\nNumber of texts:", nr_texts)
    rows = [{"layer": h["layer"], "head": h["head"], **r} for h, r in zip(heads, records)]
    rows.append({"layer": -1, "head": -1, "accuracy": accuracy, "nr_texts": nr_texts, **whole})
    path = pclens_explanations_path(make_output_dir(args.output_dir), args.dataset, args.text_descriptions,
                                    args.model, args.algorithm, args.seed)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    write_provenance(path, derived_record([paths["attn"], res["embeddings"]], algorithm=args.algorithm,
                                          seed=args.seed, baseline_accuracy=res["baseline"]))
    print(f"wrote {path} ({len(rows) - 1} heads and the whole embedding)")
    return path


if __name__ == "__main__":
    run(main, get_args_parser())
