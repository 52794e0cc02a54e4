"""One command per paper: run its scripts in order, then write REPORT.md with our numbers beside the published ones.

    python reproduce.py paper1 --model ViT-B-16 --pretrained laion2b_s34b_b88k --imagenet PATH \\
        [--imagenet_seg FILE] [--waterbirds PATH] --output_dir runs/b16
    python reproduce.py paper2 --model ViT-B-32 --pretrained openai --imagenet PATH [--imagenet_seg FILE] \\
        --mlp_layers 9 --output_dir runs/b32
    python reproduce.py splice --model open_clip:ViT-B-32 --cifar10 PATH --output_dir runs/splice
    python reproduce.py paper1 --smoke --output_dir /tmp/smoke   # tiny test model, bundled photos: <1 min of CPU

Every step is one of this repository's scripts, run as a subprocess from the repository root; its exact command
line is printed first (and listed in REPORT.md), so any step can be rerun alone. Running the same command again:
  - skips a step whose outputs exist, whose provenance records (<file>.provenance.json) hold the same command
    (flags that only change speed, such as --device, --batch_size, --num_workers, --resume, are ignored), and
    which are newer than the outputs of the steps it reads (as make does);
  - continues a killed step where it stopped: the streaming steps get --resume;
  - reports a step whose data was not given (no --waterbirds, no --imagenet_seg) as skipped, not failed.
Where a script writes no record of its own, reproduce.py writes one after the step succeeds ("recorded_by").
--steps runs a subset (names as listed by --dry_run; "neuron_prs" selects every layer's), --dry_run prints the
plan without running anything, --fresh reruns everything from scratch. Each step's output is also kept in
{output_dir}/logs/{step}.log. REPORT.md and report.json (the same content) go to --output_dir; see
docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from utils.errors import InputError
from utils.cli import run
from utils.files.atomic import atomic_write_text, make_output_dir
from utils.files.rows import StreamingArrays
from utils.files.names import (ablations_stem, classifier_path, classifier_path_pretrained, completeness_stem, labels_path,
                         neuron_segmentation_dir, prs_paths, representations_path, second_order_ablations_path,
                         second_order_paths, segmentation_dir, sparse_decomposition_stem, specific_heads_stem,
                         split_classes_path, split_labels_path, text_embeddings_path)
from utils.files.provenance import (git_state, make_record, pretrained_identity, provenance_path, read_provenance, run_key,
                              write_provenance)
from utils.reproduce.report import Row, Section, build_section, load_published, read_key_values, write_report

REPO = Path(__file__).resolve().parent
TEXTS = "text_descriptions"
SMOKE_MODEL = ["--model_config", "tests/configs", "--model", "prsclip-tiny",
               "--pretrained", "tests/golden/prsclip-tiny_seed0.safetensors"]
SMOKE_SEGMENTATION = REPO / "tests/golden/segmentation/gtsegs_golden.mat"  # 3 images, 64 x 64
DEFAULTS = {"paper1": ("ViT-B-16", "laion2b_s34b_b88k"), "paper2": ("ViT-B-32", "openai"),
            "splice": ("open_clip:ViT-B-32", None)}
DATA_FLAGS = ("imagenet", "imagenet_seg", "waterbirds", "cifar10")
# flags that change how a script runs, not what it computes (value-taking: 1, switch: 0)
RUN_ONLY_FLAGS = {"--device": 1, "--batch_size": 1, "--num_workers": 1, "--chunk": 1, "--chunk_gb": 1,
                  "--solver_batch_size": 1, "--resume": 0, "-device": 1, "-batch_size": 1}


# ----------------------------------------------------------------------------- steps
@dataclass
class Step:
    """One script run: ``script`` with ``args``; what it writes (``outputs``), the steps whose outputs it reads
    (``needs``), the data flag it needs (``data``: skipped without it), whether it streams (gets ``--resume``),
    and whether its outputs carry provenance records (``records``). ``group`` names a family for ``--steps``."""
    name: str
    script: str
    args: Sequence[str]
    outputs: Sequence[Path]
    needs: Sequence[str] = ()
    data: Optional[str] = None
    streaming: bool = False
    records: bool = True
    group: str = ""

    def chosen(self, selected: Optional[set]) -> bool:
        """Picked by ``--steps`` (by its name or its group; everything without ``--steps``)."""
        return selected is None or bool({self.name, self.group} & selected)

    def argv(self, resume: bool) -> list[str]:
        return [self.script, *map(str, self.args), *(["--resume"] if resume else [])]


class Plan:
    """What the pipelines are built from: the run's settings, with the flags every script shares."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.smoke = args, args.smoke
        self.out = Path(args.output_dir).resolve()
        self.model, self.pretrained = args.model, args.pretrained
        self.data = {k: getattr(args, k) for k in DATA_FLAGS}
        if self.smoke:  # the tiny model, bundled photos, a synthetic segmentation file and Waterbirds
            self.data.update(imagenet="sample", imagenet_seg=str(SMOKE_SEGMENTATION), cifar10="sample",
                             waterbirds=str(self.out / "smoke_data" / "waterbirds"))
        self.pretrained_arg = SMOKE_MODEL[-1] if self.smoke else self.pretrained  # as --pretrained says it

    def model_flags(self) -> list[str]:
        """The model (and device) flags of the scripts that load the model."""
        if self.smoke:
            return list(SMOKE_MODEL) + self.device_flags()
        a = self.args
        return ["--model", self.model, *(["--pretrained", self.pretrained] if self.pretrained else []),
                *(["--model_config", a.model_config] if a.model_config else []),
                *(["--force_quick_gelu"] if a.force_quick_gelu else []), *self.device_flags()]

    def device_flags(self) -> list[str]:
        device = "cpu" if self.smoke else self.args.device
        return [*(["--device", device] if device else []), *(["--allow_tf32"] if self.args.allow_tf32 else [])]

    def loader_flags(self) -> list[str]:
        a = self.args
        batch = 4 if self.smoke and a.batch_size is None else a.batch_size
        workers = 0 if self.smoke and a.num_workers is None else a.num_workers
        return [*(["--batch_size", str(batch)] if batch else []), *(["--num_workers", str(workers)]
                                                                     if workers is not None else [])]

    def path(self, flag: str) -> str:
        """The absolute path given with ``--{flag}`` (a placeholder when it was not given: the step is skipped)."""
        return str(Path(self.data[flag]).resolve()) if self.data[flag] else f"<--{flag}>"

    def images(self, flag: str, dataset: str) -> list[str]:
        """``--dataset`` and ``--data_path`` for the data of ``flag`` (smoke: the bundled photos)."""
        if self.data[flag] == "sample":
            return ["--dataset", "sample"]
        return ["--dataset", dataset, "--data_path", self.path(flag)]

    def dataset(self, name: str) -> str:
        return "sample" if self.smoke else name


def fetch_texts(name: str) -> list[Step]:
    """The authors' text set ``name`` (hash-pinned download), unless the set ships with the repository."""
    if (REPO / TEXTS / f"{name}.txt").is_file():
        return []
    return [Step("texts", f"{TEXTS}/fetch_original.py", [f"{name}.txt"], [REPO / TEXTS / "external" / f"{name}.txt"],
                 records=False)]


def paper1(p: Plan) -> tuple[list[Step], list[Section]]:
    """Paper 1: decomposition of ImageNet val, mean-ablations, TextSpan, segmentation, Waterbirds."""
    o, m = p.out, p.model
    ds, seg_ds, wb = p.dataset("imagenet"), "imagenet_seg", "binary_waterbirds"
    text_set = "image_descriptions_3500" if p.smoke else "image_descriptions_general"
    texts_per_head, layers = 5 if p.smoke else 20, 4  # the paper's TextSpan: 20 texts, last 4 layers
    heads = ["--heads", "3.0,3.1,2.2", "--random_trials", "3"] if p.smoke else ["--random_trials", "10"]
    abl, span = ablations_stem(ds, m), completeness_stem(ds, text_set, texts_per_head, m)
    seg = segmentation_dir(o, seg_ds, m, p.pretrained)
    wb_stem = specific_heads_stem(wb, m)
    model, loader = p.model_flags(), p.loader_flags()
    steps = [
        Step("prs", "compute_prs.py", [*model, *p.images("imagenet", "imagenet"), *loader, "--output_dir", o],
             [*prs_paths(o, ds, m).values(), labels_path(o, ds)], data="imagenet", streaming=True),
        Step("classifier", "compute_text_projection.py", [*model, "--dataset", ds, "--output_dir", o],
             [classifier_path(o, ds, m)]),
        Step("ablations", "compute_ablations.py", ["--model", m, "--dataset", ds, "--input_dir", o, "--figures_dir", o],
             [o / f"{abl}.json", o / f"{abl}.png"], needs=("prs", "classifier")),
        *fetch_texts(text_set),
        Step("text_embeddings", "compute_text_set_projection.py",
             [*model, "--data_path", f"{TEXTS}/{text_set}.txt", "--output_dir", o],
             [text_embeddings_path(o, text_set, m)], needs=("texts",)),
        Step("textspan", "compute_complete_text_set.py",
             ["--model", m, "--dataset", ds, "--input_dir", o, "--output_dir", o, "--text_descriptions", text_set,
              "--texts_per_head", texts_per_head, "--num_of_last_layers", layers, *p.device_flags()],
             [o / f"{span}.{ext}" for ext in ("json", "txt", "png")], needs=("prs", "classifier", "text_embeddings")),
        Step("segmentation", "compute_segmentations.py",
             [*model, "--data_path", p.path("imagenet_seg"), "--classifier_dir", o,
              "--classifier_dataset", ds, "--output_dir", o, *(["--image_size", "64"] if p.smoke else []),
              *loader], [seg / "heatmaps.npy", seg / "per_image_metrics.npy", seg / "segmentation.json"],
             needs=("classifier",), data="imagenet_seg", streaming=True),
        Step("waterbirds_prs", "compute_prs.py", [*model, *p.images("waterbirds", wb), *loader, "--output_dir", o],
             [*prs_paths(o, wb, m).values(), labels_path(o, wb)], data="waterbirds", streaming=True),
        Step("waterbirds_classifier", "compute_text_projection.py", [*model, "--dataset", wb, "--output_dir", o],
             [classifier_path(o, wb, m)], data="waterbirds"),
        Step("waterbirds_heads", "compute_use_specific_heads.py",
             ["--model", m, "--dataset", wb, "--input_dir", o, "--figures_dir", o, *heads],
             [o / f"{wb_stem}.json", o / f"{wb_stem}.png"], needs=("waterbirds_prs", "waterbirds_classifier"),
             data="waterbirds"),
    ]
    ctx = {"model": m, "pretrained": p.pretrained}
    sections = [
        Section("ImageNet zero-shot accuracy and mean-ablations (paper 1, section 3)", "ablations", o / f"{abl}.json",
                [Row("zero-shot top-1, no ablation (%)", "accuracy_percent.baseline", "imagenet_zero_shot_top1"),
                 Row("MLPs mean-ablated (%)", "accuracy_percent.mlps_mean_ablated"),
                 Row("CLS->CLS attention term mean-ablated (%)", "accuracy_percent.cls_to_cls_mean_ablated"),
                 Row("both mean-ablated (%)", "accuracy_percent.mlps_and_cls_to_cls_mean_ablated")],
                figures=[o / f"{abl}.png"], context=dict(ctx, dataset=ds),
                note="The published top-1 is open_clip's own evaluation of these weights; the no-ablation row "
                     "should approach it."),
        Section(f"TextSpan: the last {layers} layers' heads replaced by {texts_per_head} texts each (paper 1, "
                f"section 4)", "textspan", o / f"{span}.json",
                [Row("zero-shot top-1, no replacement (%)", "accuracy.baseline"),
                 Row("those heads mean-ablated (%)", "accuracy.replaced_heads_mean_ablated"),
                 Row(f"those heads replaced by their {texts_per_head} texts (%)", "accuracy.final")],
                figures=[o / f"{span}.png"], files=[o / f"{span}.txt"], context=ctx),
        Section("Zero-shot segmentation on ImageNet-segmentation (paper 1, section 5)", "segmentation",
                seg / "segmentation.json",
                [Row("pixel accuracy (%)", "metrics.pixAcc", "segmentation_pixel_accuracy", 100),
                 Row("mIoU (%)", "metrics.mIoU", "segmentation_miou", 100),
                 Row("mAP (%)", "metrics.mAP", "segmentation_map", 100)],
                files=[seg / "images"], context=ctx),
        Section("Waterbirds worst-group accuracy (paper 1, section 4.3)", "waterbirds_heads", o / f"{wb_stem}.json",
                [Row("worst group, base (%)", "baseline.worst_group", "waterbirds_worst_group_base"),
                 Row("worst group, spurious heads mean-ablated (%)", "ablated.worst_group",
                     "waterbirds_worst_group_heads_removed"),
                 Row("worst group, random heads mean-ablated (mean over sets, %)", "random.mean_worst_group",
                     "waterbirds_worst_group_random_heads"),
                 Row("average, base (%)", "baseline.average"),
                 Row("average, spurious heads mean-ablated (%)", "ablated.average")],
                figures=[o / f"{wb_stem}.png"], context=ctx),
    ]
    return steps, sections


def paper2(p: Plan) -> tuple[list[Step], list[Section]]:
    """Paper 2: second-order effects of the neurons of --mlp_layers, their PCs, ablations, text decompositions,
    and segmentation from neurons."""
    o, m, pre = p.out, p.model, p.pretrained
    ds = p.dataset("imagenet")
    text_set = "common_words_3500" if p.smoke else "30k"
    top_k, components, alpha = (3, 4, 1.0) if p.smoke else (100, 128, 1.0)
    model, loader = p.model_flags(), p.loader_flags()
    images = p.images("imagenet", "imagenet")
    steps = [
        Step("representations", "compute_representations.py", [*model, *images, *loader, "--output_dir", o],
             [representations_path(o, ds, "train", m, pre), split_classes_path(o, ds, "train")], data="imagenet",
             streaming=True),
        Step("classifier", "compute_classifier_projection.py", [*model, "--dataset", ds, "--output_dir", o],
             [classifier_path_pretrained(o, ds, m, pre)]),
        *fetch_texts(text_set),
        Step("text_embeddings", "compute_text_set_projection.py",
             [*model, "--data_path", f"{TEXTS}/{text_set}.txt", "--output_dir", o],
             [text_embeddings_path(o, text_set, m)], needs=("texts",)),
    ]
    sections = []
    ctx = {"model": m, "pretrained": pre, "dataset": ds}
    for layer in p.args.mlp_layers:
        so = second_order_paths(o, ds, "train", m, pre, layer, top_k)
        abl = second_order_ablations_path(o, ds, "val", m, pre, layer, top_k)
        stem = sparse_decomposition_stem(ds, m, pre, layer, text_set, "omp", alpha, components)
        per_layer = [
            Step(f"neuron_prs_L{layer}", "compute_second_order_neuron_prs.py",
                 [*model, "--mlp_layer", layer, *images, *loader, "--output_dir", o],
                 [so["merged"], split_labels_path(o, ds, "train")], data="imagenet", streaming=True,
                 group="neuron_prs"),
            Step(f"pcas_L{layer}", "compute_pcas.py",
                 ["--model", m, "--pretrained", p.pretrained_arg, "--mlp_layer", layer,
                  "--top_k_pca", top_k, "--dataset", ds, "--input_dir", o, "--output_dir", o],
                 [so["pca"], so["norm"]], needs=(f"neuron_prs_L{layer}",), group="pcas"),
            Step(f"ablations_L{layer}", "compute_ablations.py",
                 [*model, "--mlp_layer", layer, "--top_k_pca", top_k, *images, "--split", "val", *loader,
                  "--input_dir", o, "--output_dir", o],
                 [abl, abl.with_suffix(".png")], needs=(f"pcas_L{layer}", "classifier"), data="imagenet",
                 group="ablations"),
            Step(f"sparse_L{layer}", "compute_sparse_decomposition.py",
                 [*model, "--mlp_layer", layer, "--top_k_pca", top_k, "--components", components,
                  "--transform_alpha", alpha, "--text_descriptions", text_set, "--descriptions_dir", TEXTS,
                  "--input_dir", o, "--output_dir", o,
                  "--evaluate", *images, "--split", "val", *loader],
                 [o / f"{stem}.json", o / f"{stem}.npz", o / f"{stem}_fit.png", o / f"{stem}_evaluation.json"],
                 needs=(f"pcas_L{layer}", "classifier", "text_embeddings"), data="imagenet", group="sparse"),
        ]
        steps += per_layer
        sections += [
            Section(f"Second-order ablations, MLP layer {layer} (paper 2, section 4)", f"ablations_L{layer}", abl,
                    [Row("zero-shot top-1, no ablation (%)", "accuracy_percent.baseline"),
                     Row("every neuron mean-ablated (%)", "accuracy_percent.all_neurons_mean_ablated"),
                     Row("only the non-significant neurons kept (%)", "accuracy_percent.only_non_significant_kept"),
                     Row("only the significant neurons kept (%)", "accuracy_percent.only_significant_kept"),
                     Row("each neuron projected on its first PC (%)", "accuracy_percent.projected_to_first_pc")],
                    figures=[abl.with_suffix(".png")], context=ctx),
            Section(f"Sparse text decomposition of the PCs, MLP layer {layer}, {components} texts per neuron "
                    f"(paper 2, section 5)", f"sparse_L{layer}", o / f"{stem}_evaluation.json",
                    [Row("cosine(reconstruction, PC), mean over neurons", "cosine_reconstruction_pc_mean", None, 1, 4),
                     Row("zero-shot top-1, no ablation (%)", "accuracy_percent.baseline"),
                     Row("every neuron mean-ablated (%)", "accuracy_percent.all_neurons_mean_ablated"),
                     Row("neurons replaced by their text reconstruction (%)", "accuracy_percent.reconstructed")],
                    figures=[o / f"{stem}_fit.png"], files=[o / f"{stem}.json"], context=ctx),
        ]
    top_neurons = 5 if p.smoke else 200
    seg = neuron_segmentation_dir(o, "imagenet_seg", m, pre, p.args.mlp_layers, top_k, top_neurons)
    steps.append(Step("segmentation", "compute_segmentation.py",
                      [*model, "--mlp_layers", *p.args.mlp_layers, "--top_k_pca", top_k, "--dataset", ds,
                       "--data_path", p.path("imagenet_seg"), "--classifier_dir", o,
                       "--output_dir", o, "--top_neurons", top_neurons, *(["--image_size", "64"] if p.smoke else []),
                       *loader],
                      [seg / "segmentation.json"], needs=tuple(f"pcas_L{la}" for la in p.args.mlp_layers) +
                      ("classifier",), data="imagenet_seg", streaming=True))
    sections.append(Section("Zero-shot segmentation from neurons on ImageNet-segmentation (paper 2)", "segmentation",
                            seg / "segmentation.json",
                            [Row("pixel accuracy (%)", "metrics.pixAcc", None, 100),
                             Row("mIoU (%)", "metrics.mIoU", None, 100), Row("mAP (%)", "metrics.mAP", None, 100)],
                            files=[seg / "images"], context=ctx))
    return steps, sections


def splice(p: Plan) -> tuple[list[Step], list[Section]]:
    """SpLiCE: CIFAR-10 test set decomposed at l1 penalty 0.35 (average L0 and cosine, as its README)."""
    o, penalty = p.out, 0.35
    out = o / "cifar10_decomp.txt"
    # smoke: a text file as the vocabulary, and the tiny model's image mean (SpLiCE ships means for its models only)
    smoke = ["-vocab", f"{TEXTS}/common_words_3500.txt", "-vocab_size", "0",
             "--image_mean", "tests/golden/splice/image_mean.npy"] if p.smoke else []
    data = [*p.images("cifar10", "CIFAR10"), *smoke]
    steps = [Step("decompose", "decompose_data.py",
                  [*p.model_flags(), *data, *p.loader_flags(), "-l1_penalty", penalty, "-out_path", out], [out],
                  data="cifar10", streaming=True)]
    ctx = {"model": p.model, "dataset": p.dataset("CIFAR10"), "l1_penalty": penalty}
    sections = [Section(f"SpLiCE decomposition of CIFAR-10, l1 penalty {penalty}", "decompose", out,
                        [Row("average L0 (concepts per image)", "Average Decomposition L0 Norm", "splice_average_l0",
                             1, 4),
                         Row("average cosine(CLIP, SpLiCE)", "Average CLIP, SpLiCE Cosine Sim",
                             "splice_average_cosine", 1, 4)],
                        context=ctx, read=read_key_values)]
    return steps, sections


PIPELINES = {"paper1": paper1, "paper2": paper2, "splice": splice}


# ----------------------------------------------------------------------------- the runner
def identity(argv: Sequence[str]) -> list[str]:
    """The part of a script's command line that decides its outputs: the script's file name and its flags,
    without ``RUN_ONLY_FLAGS``."""
    out, skip = [Path(argv[0]).name], 0
    for tok in argv[1:]:
        if skip:
            skip -= 1
            continue
        flag = tok.split("=", 1)[0]
        if flag in RUN_ONLY_FLAGS:
            skip = 0 if "=" in tok else RUN_ONLY_FLAGS[flag]
            continue
        out.append(tok)
    return out


def up_to_date(step: Step, argv: Sequence[str], inputs: Sequence[Path], pretrained: Optional[str]) -> bool:
    """Every output exists (no ``.partial`` left), holds a record of the same command (and, for a local
    checkpoint, the same weights), was not rewritten after its record, and is newer than every input."""
    for path in step.outputs:
        if not path.is_file() or StreamingArrays.partial(path).exists():
            return False
        if not step.records:
            continue
        record = read_provenance(path)
        if record is None or identity(shlex.split(record.get("command", ""))[1:]) != identity(argv):
            return False
        if provenance_path(path).stat().st_mtime < path.stat().st_mtime:
            return False
        if pretrained and Path(pretrained).is_file() and "pretrained" in record and \
                run_key({"pretrained": record["pretrained"]}) != run_key({"pretrained": pretrained_identity(pretrained)}):
            return False
    newest_input = max((q.stat().st_mtime for q in inputs if q.is_file()), default=0.0)
    return min(q.stat().st_mtime for q in step.outputs) >= newest_input


def run_logged(argv: Sequence[str], log: Path) -> int:
    """Run ``argv`` from the repository root, its output both shown and kept in ``log``; the exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            f.write(chunk)
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        return proc.wait()


def record_outputs(step: Step, argv: Sequence[str]) -> None:
    """Give each output its script did not record (no record, or one older than the file) a provenance record
    holding the step's command."""
    if not step.records:
        return
    for path in step.outputs:
        own = provenance_path(path)
        if not own.is_file() or own.stat().st_mtime < path.stat().st_mtime:
            record = make_record(None, recorded_by="reproduce.py")
            record.update(script=step.script, command=shlex.join(["python", *argv]))
            write_provenance(path, record)


def execute(steps: Sequence[Step], plan: Plan, selected: Optional[set[str]], dry_run: bool, fresh: bool,
            log_dir: Path) -> list[dict]:
    """Run (or, with ``dry_run``, describe) the steps in order; one status dict per step."""
    by_name = {s.name: s for s in steps}
    status: dict[str, str] = {}
    results = []
    for step in steps:
        inputs = [q for n in step.needs if n in by_name for q in by_name[n].outputs]
        resume = step.streaming and not fresh and (
            not all(q.is_file() for q in step.outputs) or any(StreamingArrays.partial(q).exists()
                                                              for q in step.outputs))
        argv = step.argv(resume)
        command = shlex.join([sys.executable, *argv])
        entry = {"name": step.name, "script": step.script, "command": command, "seconds": None, "log": None}
        failed = [n for n in step.needs if status.get(n, "").startswith(("failed", "skipped: needs"))]
        if not step.chosen(selected):
            entry.update(status="not selected (--steps)", command=None)
        elif step.data and not plan.data[step.data]:
            entry.update(status=f"skipped: no --{step.data} given", command=None)
        elif failed:
            entry.update(status=f"skipped: needs {', '.join(failed)}", command=None)
        elif not fresh and not any(status.get(n, "").startswith(("ran", "would run")) for n in step.needs) \
                and up_to_date(step, argv, inputs, plan.pretrained):
            entry.update(status="up to date (skipped)")
        elif dry_run:
            entry.update(status="would run" if (REPO / step.script).is_file() else "would run: script missing")
        else:
            print(f"\n[{step.name}] {command}", flush=True)
            log = log_dir / f"{step.name}.log"
            start = time.time()
            code = run_logged([sys.executable, *argv], log)
            entry.update(seconds=round(time.time() - start, 1), log=os.path.relpath(log, plan.out))
            absent = [q.name for q in step.outputs if not q.is_file()]
            if code == 0 and not absent:
                record_outputs(step, argv)
            entry["status"] = "ran" if code == 0 and not absent else f"failed (exit {code})" if code else \
                f"failed: exit 0 but {', '.join(absent)} not written"
        status[step.name] = entry["status"]
        if dry_run:
            print(f"{step.name:24s} {entry['status']:32s} {entry['command'] or ''}".rstrip())
        results.append(entry)
    return results


def make_smoke_waterbirds(folder: Path) -> None:
    """A Waterbirds-shaped folder from the bundled photos: metadata.csv and 8 test images, 2 per (class, place)."""
    if (folder / "metadata.csv").is_file():
        return
    from utils.datasets import SampleImages

    folder.mkdir(parents=True, exist_ok=True)
    rows, photos = ["img_filename,y,split,place"], SampleImages()
    for i in range(len(photos)):
        photos.load(i).resize((64, 64)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{i % 2},2,{(i // 2) % 2}")
    atomic_write_text(folder / "metadata.csv", "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("reproduce.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", choices=sorted(PIPELINES), help="which paper's experiments")
    parser.add_argument("--output_dir", required=True, help="where every output, REPORT.md and report.json go")
    parser.add_argument("--model", default=None,
                        help="open_clip model (default: paper1 ViT-B-16, paper2 ViT-B-32, splice open_clip:ViT-B-32)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: paper1 "
                        "laion2b_s34b_b88k, paper2 openai; required with another --model)")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or folder)")
    parser.add_argument("--force_quick_gelu", action="store_true", help="QuickGELU whatever the config says")
    parser.add_argument("--device", default=None, help="torch device of every step (default: the scripts' own)")
    parser.add_argument("--batch_size", type=int, default=None, help="batch size of the model-running steps "
                        "(default: the scripts' own)")
    parser.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: the scripts')")
    parser.add_argument("--imagenet", default=None, help="ImageNet root (torchvision layout: train/, val/, meta)")
    parser.add_argument("--imagenet_seg", default=None, help="gtsegs_ijcv.mat (ImageNet-segmentation)")
    parser.add_argument("--waterbirds", default=None, help="Waterbirds root (with metadata.csv); paper1")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 root (torchvision files); splice")
    parser.add_argument("--mlp_layers", type=int, nargs="+", default=None,
                        help="paper2: MLP layers (default 9; --smoke: 1)")
    parser.add_argument("--steps", default=None, help="comma-separated steps to run (default: all)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and what would run; run nothing")
    parser.add_argument("--fresh", action="store_true", help="rerun every step from scratch (no skipping, no resume)")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model on the bundled photos and "
                        "small synthetic files, end to end in under a minute of CPU time (checks the plumbing, not "
                        "the numbers)")
    return parser


def main(args: argparse.Namespace) -> dict:
    default_model, default_pretrained = DEFAULTS[args.pipeline]
    if args.smoke:
        args.model, args.pretrained = "prsclip-tiny", str(REPO / SMOKE_MODEL[-1])
    elif args.model is None or args.model == default_model:
        args.model, args.pretrained = default_model, args.pretrained or default_pretrained
    elif args.pretrained is None and args.pipeline != "splice":
        raise InputError(f"--pretrained is required with --model {args.model}")
    args.mlp_layers = args.mlp_layers or ([1] if args.smoke else [9])
    plan = Plan(args)
    steps, sections = PIPELINES[args.pipeline](plan)
    names = {s.name for s in steps} | {s.group for s in steps if s.group}
    selected = None if args.steps is None else {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = sorted((selected or set()) - names)
    if unknown:
        raise InputError(f"--steps {','.join(unknown)}: no such step in {args.pipeline} (steps: "
                         f"{', '.join(s.name for s in steps)})")
    for flag, value in plan.data.items():
        if value and value != "sample" and not args.smoke and not Path(value).exists():
            raise FileNotFoundError(f"--{flag} {value}: no such file or folder")
    wanted = [s for s in steps if s.chosen(selected) and (not s.data or plan.data[s.data])]
    missing = sorted({s.script for s in wanted if not (REPO / s.script).is_file()})
    if missing and not args.dry_run:
        raise InputError(f"{args.pipeline} needs {', '.join(missing)}, not in this checkout; leave its steps out "
                         f"with --steps")

    out = make_output_dir(plan.out)
    log_dir = out / "logs"
    if not args.dry_run:
        log_dir.mkdir(exist_ok=True)
        if args.smoke and args.pipeline == "paper1":
            make_smoke_waterbirds(Path(plan.data["waterbirds"]))
    print(f"{args.pipeline}: {len(steps)} steps, commands run in {REPO}", flush=True)
    results = execute(steps, plan, selected, args.dry_run, args.fresh, log_dir)
    if args.dry_run:
        return {"steps": results}

    status = {r["name"]: r["status"] for r in results}
    table = load_published()
    report = {"title": f"{args.pipeline}: {args.model}" + (f" ({Path(args.pretrained).name})" if args.pretrained
                                                           else "") + (" [smoke test]" if args.smoke else ""),
              "pipeline": args.pipeline, "model": args.model, "pretrained": args.pretrained, "smoke": args.smoke,
              "command": shlex.join(["python", "reproduce.py", *sys.argv[1:]]), "output_dir": str(out),
              "repository": str(REPO), "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_state()[0], "steps": results,
              "sections": [build_section(s, table, status.get(s.step, "was not run"), out) for s in sections]}
    md, js = write_report(out, report)
    failed = [r["name"] for r in results if r["status"].startswith("failed")]
    print(f"\nwrote {md} and {js}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)
    return report


if __name__ == "__main__":
    run(main, get_args_parser())
