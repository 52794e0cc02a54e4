"""The plan of each paper: which scripts run, in which order, with which flags, and what the report shows.

A pipeline (``paper1``, ``paper2``, ``splice``) turns a ``Plan`` (the run's settings with the defaults filled in)
into ``Step`` s, one script run each, and report ``Section`` s, one table each (utils/reproduce/report.py). The
settings default to the papers' (``PAPER``); ``--smoke`` swaps in the tiny model, the bundled photos and small
sizes (``SMOKE``, utils/reproduce/smoke.py). Every output name comes from utils/files/names.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from utils import REPO_ROOT
from utils.errors import InputError
from utils.files.names import (ablations_stem, classifier_path, classifier_path_pretrained, completeness_stem,
                               format_layers, labels_path, neuron_segmentation_dir, prs_paths, representations_path,
                               result_files, second_order_ablations_path, second_order_paths, segmentation_dir,
                               segmentation_files, sparse_decomposition_files, sparse_decomposition_stem,
                               specific_heads_stem, splice_decomposition_path, splice_weights_path, split_classes_path,
                               text_embeddings_path)
from utils.reproduce.report import Row, Section, read_key_values
from utils.reproduce.smoke import SMOKE_DATA_NAMES, SMOKE_IMAGE_MEAN, SMOKE_MODEL, SMOKE_VOCABULARY, smoke_data
from utils.text.sets import EXTERNAL, TEXT_DIR

__all__ = ["DATA_FLAGS", "DEFAULT_MODELS", "Sizes", "PAPER", "SMOKE", "Settings", "Step", "Plan", "paper1", "paper2",
           "splice", "PIPELINES", "build", "select_steps"]

TEXTS = "text_descriptions"  # the text sets, relative to the repository root
DATA_FLAGS = ("imagenet", "imagenet_seg", "waterbirds", "cifar10")
DATA_NAMES = {"imagenet": "ImageNet", "imagenet_seg": "ImageNet-segmentation", "waterbirds": "Waterbirds",
              "cifar10": "CIFAR-10"}
DEFAULT_MODELS = {"paper1": ("ViT-B-16", "laion2b_s34b_b88k"), "paper2": ("ViT-B-32", "openai"),
                  "splice": ("open_clip:ViT-B-32", None)}


@dataclass(frozen=True)
class Sizes:
    """The experiments' settings. ``PAPER``: the papers' (paper 1: TextSpan with 20 texts per head on the last 4
    layers, section 4.1; Waterbirds with 10 random head sets, section 4.3. Paper 2: the top 100 images per neuron,
    128 texts per neuron from 30k.txt, section 4; MLP layer 9, Table 1; segmentation from the top 200 neurons of
    layers 8-10, Table 4. SpLiCE: l1 penalty 0.35 and class 4, its README). ``SMOKE``: cut down for the tiny
    model."""
    text_dir: str = TEXTS  # the text sets' folder, relative to the repository root
    textspan_texts: str = "image_descriptions_general"
    texts_per_head: int = 20
    textspan_layers: int = 4
    waterbirds_heads: Optional[str] = None  # None: compute_use_specific_heads.py's own (the paper's heads)
    random_trials: int = 10
    sparse_texts: str = "30k"
    top_k_pca: int = 100
    components: int = 128
    transform_alpha: float = 1.0
    mlp_layers: tuple[int, ...] = (9,)
    segmentation_layers: tuple[int, ...] = (8, 9, 10)
    top_neurons: int = 200
    image_size: Optional[int] = None  # the segmentation scripts' --image_size (None: theirs)
    splice_l1_penalty: float = 0.35
    splice_class: int = 4
    splice_batch_size: Optional[int] = None  # SpLiCE's own batch (None: batch_size); its solver's time is per batch
    device: Optional[str] = None  # None: each script's own default
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None


PAPER = Sizes()
SMOKE = Sizes(text_dir=str(Path(SMOKE_VOCABULARY).parent), textspan_texts=Path(SMOKE_VOCABULARY).stem, texts_per_head=5,
              waterbirds_heads="3.0,3.1,2.2", random_trials=3, sparse_texts=Path(SMOKE_VOCABULARY).stem, top_k_pca=3,
              components=4, mlp_layers=(1,),
              segmentation_layers=(0, 1), top_neurons=5, image_size=64, device="cpu", batch_size=4, num_workers=0,
              splice_batch_size=8)


@dataclass
class Settings:
    """What reproduce.py was asked for: the pipeline, the output folder, the model, the data (``data``: flag ->
    path, ``None`` or absent when not given), the per-layer choices of paper 2 (``None``: the paper's) and the
    flags handed to every step. ``smoke`` runs the tiny model on the bundled data."""
    pipeline: str
    output_dir: str | Path
    model: Optional[str] = None
    pretrained: Optional[str] = None
    model_config: Optional[str] = None
    force_quick_gelu: bool = False
    device: Optional[str] = None
    allow_tf32: bool = False
    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    data: Mapping[str, Optional[str]] = field(default_factory=dict)
    mlp_layers: Optional[Sequence[int]] = None
    segmentation_layers: Optional[Sequence[int]] = None
    smoke: bool = False


@dataclass
class Step:
    """One script run: ``script`` with ``args``; what it writes (``outputs``), the steps whose outputs it reads
    (``needs``), the data flags it needs (``data``: skipped without any of them), whether it streams (gets
    ``--resume``), and whether its outputs carry provenance records (``records``). ``group`` names a family for
    ``--steps``."""
    name: str
    script: str
    args: Sequence[object]
    outputs: Sequence[Path]
    needs: Sequence[str] = ()
    data: Sequence[str] | str = ()
    streaming: bool = False
    records: bool = True
    group: str = ""

    def __post_init__(self):
        self.data = (self.data,) if isinstance(self.data, str) else tuple(self.data)

    def chosen(self, selected: Optional[set[str]]) -> bool:
        """Picked by ``--steps`` (by its name or its group; everything without ``--steps``)."""
        return selected is None or bool({self.name, self.group} & selected)

    def argv(self, resume: bool) -> list[str]:
        """``[script, *args]`` as strings, plus ``--resume`` when ``resume``."""
        return [self.script, *map(str, self.args), *(["--resume"] if resume else [])]


class Plan:
    """The run's settings with the defaults filled in (the model and weights of the paper, ``PAPER`` or ``SMOKE``
    sizes, the data of a smoke run), and the flags every script shares."""

    def __init__(self, settings: Settings):
        s = settings
        if s.pipeline not in DEFAULT_MODELS:
            raise InputError(f"no pipeline '{s.pipeline}' (pipelines: {', '.join(sorted(DEFAULT_MODELS))})")
        self.settings, self.pipeline, self.smoke = s, s.pipeline, s.smoke
        self.sizes = SMOKE if s.smoke else PAPER
        self.out = Path(s.output_dir).resolve()
        default_model, default_pretrained = DEFAULT_MODELS[s.pipeline]
        if s.smoke:
            self.model, self.pretrained = SMOKE_MODEL["model"], str(REPO_ROOT / SMOKE_MODEL["pretrained"])
        elif s.model is None or s.model == default_model:
            self.model, self.pretrained = default_model, s.pretrained or default_pretrained
        elif s.pretrained is None and s.pipeline != "splice":
            raise InputError(f"--pretrained is required with --model {s.model}")
        else:
            self.model, self.pretrained = s.model, s.pretrained
        self.pretrained_arg = SMOKE_MODEL["pretrained"] if s.smoke else self.pretrained  # as --pretrained says it
        self.data = {k: s.data.get(k) for k in DATA_FLAGS}
        if s.smoke:
            self.data.update(smoke_data(self.out))
        self.mlp_layers = sorted(set(s.mlp_layers or self.sizes.mlp_layers))
        self.segmentation_layers = sorted(set(s.segmentation_layers or self.sizes.segmentation_layers))

    def check_data(self) -> None:
        """Every data path given exists (``FileNotFoundError`` naming the flag otherwise)."""
        for flag, value in self.data.items():
            if value and value != "sample" and not self.smoke and not Path(value).exists():
                raise FileNotFoundError(f"--{flag} {value}: no such file or folder")

    def model_flags(self) -> list[str]:
        """The model (and device) flags of the scripts that load the model."""
        s = self.settings
        if self.smoke:
            return ["--model_config", SMOKE_MODEL["model_config"], "--model", self.model,
                    "--pretrained", self.pretrained_arg, *self.device_flags()]
        return ["--model", self.model, *(["--pretrained", self.pretrained] if self.pretrained else []),
                *(["--model_config", s.model_config] if s.model_config else []),
                *(["--force_quick_gelu"] if s.force_quick_gelu else []), *self.device_flags()]

    def device_flags(self) -> list[str]:
        device = self.settings.device or self.sizes.device
        return [*(["--device", device] if device else []), *(["--allow_tf32"] if self.settings.allow_tf32 else [])]

    def loader_flags(self, default_batch: Optional[int] = None) -> list[str]:
        """``--batch_size`` and ``--num_workers``: as given, else the sizes' (``default_batch`` first)."""
        s = self.settings
        batch = s.batch_size if s.batch_size is not None else default_batch or self.sizes.batch_size
        workers = s.num_workers if s.num_workers is not None else self.sizes.num_workers
        return [*(["--batch_size", str(batch)] if batch else []),
                *(["--num_workers", str(workers)] if workers is not None else [])]

    def path(self, flag: str) -> str:
        """The absolute path given with ``--{flag}`` (a placeholder when it was not given: the step is skipped)."""
        return str(Path(self.data[flag]).resolve()) if self.data[flag] else f"<--{flag}>"

    def images(self, flag: str, dataset: str) -> list[str]:
        """``--dataset`` and ``--data_path`` for the data of ``flag`` (smoke: the bundled photos)."""
        if self.data[flag] == "sample":
            return ["--dataset", "sample"]
        return ["--dataset", dataset, "--data_path", self.path(flag)]

    def dataset(self, name: str) -> str:
        """The ``--dataset`` name of the data (``sample`` in a smoke run)."""
        return "sample" if self.smoke else name

    def data_name(self, flag: str, split: str = "") -> str:
        """What the data of ``flag`` is, for headings: ``ImageNet val``, or in a smoke run what stands in for it."""
        return SMOKE_DATA_NAMES[flag] if self.smoke else f"{DATA_NAMES[flag]} {split}".strip()


def fetch_texts(name: str, folder: str = TEXTS) -> list[Step]:
    """The authors' text set ``name`` (hash-pinned download), unless ``folder`` holds it."""
    if (REPO_ROOT / folder / f"{name}.txt").is_file():
        return []
    return [Step("texts", f"{TEXTS}/fetch_original.py", [f"{name}.txt"], [TEXT_DIR / EXTERNAL / f"{name}.txt"],
                 records=False)]


def segmentation_rows(quantity_prefix: str) -> list[Row]:
    """pixel accuracy, mIoU, mAP of a segmentation.json (fractions, shown in %), compared with
    ``{quantity_prefix}pixel_accuracy`` / ``miou`` / ``map``."""
    return [Row("pixel accuracy (%)", "metrics.pixAcc", f"{quantity_prefix}pixel_accuracy", 100),
            Row("mIoU (%)", "metrics.mIoU", f"{quantity_prefix}miou", 100),
            Row("mAP (%)", "metrics.mAP", f"{quantity_prefix}map", 100)]


def paper1(p: Plan) -> tuple[list[Step], list[Section]]:
    """Paper 1: decomposition of ImageNet val, mean-ablations, TextSpan, segmentation, Waterbirds."""
    o, m, s = p.out, p.model, p.sizes
    ds, seg_ds, wb = p.dataset("imagenet"), "imagenet_seg", "binary_waterbirds"
    text_set = s.textspan_texts
    abl = result_files(o, ablations_stem(ds, m))
    span = result_files(o, completeness_stem(ds, text_set, s.texts_per_head, m), (".json", ".txt", ".png"))
    seg = segmentation_files(segmentation_dir(o, seg_ds, m, p.pretrained))
    heads = result_files(o, specific_heads_stem(wb, m))
    model, loader = p.model_flags(), p.loader_flags()
    image_size = ["--image_size", s.image_size] if s.image_size else []
    steps = [
        Step("prs", "compute_prs.py", [*model, *p.images("imagenet", "imagenet"), *loader, "--output_dir", o],
             [*prs_paths(o, ds, m).values(), labels_path(o, ds)], data="imagenet", streaming=True),
        Step("classifier", "compute_text_projection.py", [*model, "--dataset", ds, "--output_dir", o],
             [classifier_path(o, ds, m)]),
        Step("ablations", "compute_ablations.py", ["--model", m, "--dataset", ds, "--input_dir", o, "--figures_dir", o],
             [abl["json"], abl["png"]], needs=("prs", "classifier")),
        *fetch_texts(text_set, s.text_dir),
        Step("text_embeddings", "compute_text_set_projection.py",
             [*model, "--data_path", f"{s.text_dir}/{text_set}.txt", "--output_dir", o],
             [text_embeddings_path(o, text_set, m)], needs=("texts",)),
        Step("textspan", "compute_complete_text_set.py",
             ["--model", m, "--dataset", ds, "--input_dir", o, "--output_dir", o, "--text_descriptions", text_set,
              *(["--text_dir", s.text_dir] if s.text_dir != TEXTS else []),
              "--texts_per_head", s.texts_per_head, "--num_of_last_layers", s.textspan_layers, *p.device_flags()],
             list(span.values()), needs=("prs", "classifier", "text_embeddings")),
        Step("segmentation", "compute_segmentations.py",
             [*model, "--data_path", p.path("imagenet_seg"), "--classifier_dir", o, "--classifier_dataset", ds,
              "--output_dir", o, *image_size, *loader], [seg["heatmaps"], seg["metrics"], seg["json"]],
             needs=("classifier",), data="imagenet_seg", streaming=True),
        Step("waterbirds_prs", "compute_prs.py", [*model, *p.images("waterbirds", wb), *loader, "--output_dir", o],
             [*prs_paths(o, wb, m).values(), labels_path(o, wb)], data="waterbirds", streaming=True),
        Step("waterbirds_classifier", "compute_text_projection.py", [*model, "--dataset", wb, "--output_dir", o],
             [classifier_path(o, wb, m)], data="waterbirds"),
        Step("waterbirds_heads", "compute_use_specific_heads.py",
             ["--model", m, "--dataset", wb, "--input_dir", o, "--figures_dir", o,
              *(["--heads", s.waterbirds_heads] if s.waterbirds_heads else []), "--random_trials", s.random_trials],
             [heads["json"], heads["png"]], needs=("waterbirds_prs", "waterbirds_classifier"), data="waterbirds"),
    ]
    ctx = {"model": m, "pretrained": p.pretrained}
    val = p.data_name("imagenet", "val")
    sections = [
        Section(f"Zero-shot accuracy and mean-ablations on {val} (paper 1, section 3.2)", "ablations", abl["json"],
                [Row("zero-shot top-1, no ablation (%)", "accuracy_percent.baseline", "imagenet_zero_shot_top1"),
                 Row("MLPs mean-ablated (%)", "accuracy_percent.mlps_mean_ablated"),
                 Row("CLS->CLS attention term mean-ablated (%)", "accuracy_percent.cls_to_cls_mean_ablated"),
                 Row("both mean-ablated (%)", "accuracy_percent.mlps_and_cls_to_cls_mean_ablated")],
                figures=[abl["png"]], context=dict(ctx, dataset=ds),
                note="The published top-1 is open_clip's own evaluation of these weights; the no-ablation row "
                     "should approach it. Paper 1's Table 1 (the ablated rows) could not be read as numbers "
                     "(utils/data/published_numbers.json, not_found)."),
        Section(f"TextSpan on {val}: the last {s.textspan_layers} layers' heads replaced by {s.texts_per_head} texts "
                f"each (paper 1, section 4.1)", "textspan", span["json"],
                [Row("zero-shot top-1, no replacement (%)", "accuracy.baseline", "imagenet_zero_shot_top1"),
                 Row("those heads mean-ablated (%)", "accuracy.replaced_heads_mean_ablated"),
                 Row(f"those heads replaced by their {s.texts_per_head} texts (%)", "accuracy.final")],
                figures=[span["png"]], files=[span["txt"]], context=dict(ctx, dataset=ds),
                note="Paper 1's TextSpan accuracies could not be read as numbers (utils/data/published_numbers.json, "
                     "not_found)."),
        Section(f"Zero-shot segmentation on {p.data_name('imagenet_seg')} (paper 1, section 5)", "segmentation",
                seg["json"], segmentation_rows("segmentation_"), files=[seg["images"]], context=ctx),
        Section(f"Worst-group accuracy on {p.data_name('waterbirds', 'test')} (paper 1, section 4.3)",
                "waterbirds_heads", heads["json"],
                [Row("worst group, base (%)", "baseline.worst_group", "waterbirds_worst_group_base"),
                 Row("worst group, spurious heads mean-ablated (%)", "ablated.worst_group",
                     "waterbirds_worst_group_heads_removed"),
                 Row("worst group, random heads mean-ablated (mean over sets, %)", "random.mean_worst_group",
                     "waterbirds_worst_group_random_heads"),
                 Row("average, base (%)", "baseline.average"),
                 Row("average, spurious heads mean-ablated (%)", "ablated.average")],
                figures=[heads["png"]], context=ctx),
    ]
    return steps, sections


def paper2(p: Plan) -> tuple[list[Step], list[Section]]:
    """Paper 2: second-order effects of the neurons of the MLP layers, their PCs, ablations and text
    decompositions (per layer of ``mlp_layers``), and segmentation from the neurons of ``segmentation_layers``
    beside paper 1's segmentation on the same model (Table 4)."""
    o, m, pre, s = p.out, p.model, p.pretrained, p.sizes
    ds, text_set, top_k = p.dataset("imagenet"), s.sparse_texts, s.top_k_pca
    model, loader, images = p.model_flags(), p.loader_flags(), p.images("imagenet", "imagenet")
    image_size = ["--image_size", s.image_size] if s.image_size else []
    steps = [
        Step("representations", "compute_representations.py", [*model, *images, *loader, "--output_dir", o],
             [representations_path(o, ds, "train", m, pre), split_classes_path(o, ds, "train")], data="imagenet",
             streaming=True),
        Step("classifier", "compute_classifier_projection.py", [*model, "--dataset", ds, "--output_dir", o],
             [classifier_path_pretrained(o, ds, m, pre)]),
        *fetch_texts(text_set, s.text_dir),
        Step("text_embeddings", "compute_text_set_projection.py",
             [*model, "--data_path", f"{s.text_dir}/{text_set}.txt", "--output_dir", o],
             [text_embeddings_path(o, text_set, m)], needs=("texts",)),
    ]
    sections = []
    ctx = {"model": m, "pretrained": pre, "dataset": ds}
    val = p.data_name("imagenet", "val")
    for layer in sorted(set(p.mlp_layers) | set(p.segmentation_layers)):
        # a layer only segmentation reads: its PCs are computed only when segmentation runs
        only_for_segmentation = ("imagenet_seg",) if layer not in p.mlp_layers else ()
        so = second_order_paths(o, ds, "train", m, pre, layer, top_k)
        steps += [
            # (each layer's run also rewrites the same {dataset}_train_labels.npy, which no step reads: not listed,
            # or every layer but the last would look stale)
            Step(f"neuron_prs_L{layer}", "compute_second_order_neuron_prs.py",
                 [*model, "--mlp_layer", layer, *images, *loader, "--output_dir", o],
                 [so["merged"]], data=("imagenet", *only_for_segmentation), streaming=True, group="neuron_prs"),
            Step(f"pcas_L{layer}", "compute_pcas.py",
                 ["--model", m, "--pretrained", p.pretrained_arg, "--mlp_layer", layer,
                  "--top_k_pca", top_k, "--dataset", ds, "--input_dir", o, "--output_dir", o],
                 [so["pca"], so["norm"]], needs=(f"neuron_prs_L{layer}",), data=only_for_segmentation, group="pcas"),
        ]
        if only_for_segmentation:
            continue
        abl = result_files(o, second_order_ablations_path(o, ds, "val", m, pre, layer, top_k).stem)
        sparse = sparse_decomposition_files(o, sparse_decomposition_stem(ds, m, pre, layer, text_set, "omp",
                                                                         s.transform_alpha, s.components))
        steps += [
            Step(f"ablations_L{layer}", "compute_ablations.py",
                 [*model, "--mlp_layer", layer, "--top_k_pca", top_k, *images, "--split", "val", *loader,
                  "--input_dir", o, "--output_dir", o],
                 [abl["json"], abl["png"]], needs=(f"pcas_L{layer}", "classifier"), data="imagenet",
                 group="ablations"),
            Step(f"sparse_L{layer}", "compute_sparse_decomposition.py",
                 [*model, "--mlp_layer", layer, "--top_k_pca", top_k, "--components", s.components,
                  "--transform_alpha", s.transform_alpha, "--text_descriptions", text_set, "--descriptions_dir", s.text_dir,
                  "--input_dir", o, "--output_dir", o, "--evaluate", *images, "--split", "val", *loader],
                 list(sparse.values()), needs=(f"pcas_L{layer}", "classifier", "text_embeddings"), data="imagenet",
                 group="sparse"),
        ]
        layer_ctx = dict(ctx, mlp_layer=layer)
        baseline = Row("zero-shot top-1, no ablation (%)", "accuracy_percent.baseline", "imagenet_zero_shot_top1")
        all_ablated = Row("every neuron mean-ablated (%)", "accuracy_percent.all_neurons_mean_ablated",
                          "second_order_all_neurons_mean_ablated_accuracy")
        sections += [
            Section(f"Second-order ablations on {val}, MLP layer {layer} (paper 2, section 3.3)", f"ablations_L{layer}",
                    abl["json"], [baseline, all_ablated,
                          Row("only the non-significant neurons kept (%)", "accuracy_percent.only_non_significant_kept"),
                          Row("only the significant neurons kept (%)", "accuracy_percent.only_significant_kept"),
                          Row("each neuron projected on its first PC (%)", "accuracy_percent.projected_to_first_pc")],
                    figures=[abl["png"]], context=layer_ctx,
                    note="Paper 2 gives layer 9's 'every neuron mean-ablated' in Table 1; the other rows are only "
                         "plotted (Figure 3)."),
            Section(f"Sparse text decomposition of the PCs on {val}, MLP layer {layer}, {s.components} texts per "
                    f"neuron (paper 2, section 4)", f"sparse_L{layer}", sparse["evaluation"],
                    [Row("cosine(reconstruction, PC), mean over neurons", "cosine_reconstruction_pc_mean", None, 1, 4),
                     baseline, all_ablated,
                     Row("neurons replaced by their text reconstruction (%)", "accuracy_percent.reconstructed")],
                    figures=[sparse["fit"]], files=[sparse["json"]], context=layer_ctx,
                    note="The reconstruction accuracies of paper 2 are only plotted (Figure 4)."),
        ]
    seg_layers, seg_data = p.segmentation_layers, p.data_name("imagenet_seg")
    neuron_seg = segmentation_files(neuron_segmentation_dir(o, "imagenet_seg", m, pre, seg_layers, top_k,
                                                            s.top_neurons))
    textspan_seg = segmentation_files(segmentation_dir(o, "imagenet_seg", m, pre))
    steps += [
        Step("segmentation", "compute_segmentation.py",
             [*model, "--mlp_layers", *seg_layers, "--top_k_pca", top_k, "--dataset", ds,
              "--data_path", p.path("imagenet_seg"), "--classifier_dir", o, "--output_dir", o,
              "--top_neurons", s.top_neurons, *image_size, *loader],
             [neuron_seg["json"]], needs=(*(f"pcas_L{la}" for la in seg_layers), "classifier"), data="imagenet_seg",
             streaming=True),
        # paper 1's segmentation on the same model, Table 4's "TextSpan" row; it reads paper 1's classifier name
        Step("textspan_classifier", "compute_text_projection.py", [*model, "--dataset", ds, "--output_dir", o],
             [classifier_path(o, ds, m)], data="imagenet_seg"),
        Step("textspan_segmentation", "compute_segmentations.py",
             [*model, "--data_path", p.path("imagenet_seg"), "--classifier_dir", o, "--classifier_dataset", ds,
              "--output_dir", o, *image_size, *loader],
             [textspan_seg["heatmaps"], textspan_seg["metrics"], textspan_seg["json"]],
             needs=("textspan_classifier",), data="imagenet_seg", streaming=True),
    ]
    sections += [
        Section(f"Zero-shot segmentation from neurons on {seg_data}: the top {s.top_neurons} neurons of MLP layers "
                f"{format_layers(seg_layers)} (paper 2, section 5.2)", "segmentation", neuron_seg["json"],
                segmentation_rows("neuron_segmentation_"), files=[neuron_seg["images"]],
                context={"model": m, "pretrained": pre, "mlp_layers": list(seg_layers), "top_neurons": s.top_neurons},
                note="Paper 2's Table 4 uses the top 200 neurons of layers 8-10 (--segmentation_layers 8 9 10, the "
                     "default)."),
        Section(f"Zero-shot segmentation on {seg_data} by paper 1's decomposition of the same model (paper 2, "
                f"Table 4, row TextSpan)", "textspan_segmentation", textspan_seg["json"],
                segmentation_rows("segmentation_"), files=[textspan_seg["images"]],
                context={"model": m, "pretrained": pre}),
    ]
    return steps, sections


def splice(p: Plan) -> tuple[list[Step], list[Section]]:
    """SpLiCE: the CIFAR-10 test set decomposed at l1 penalty 0.35, and its class 4 (deer) alone (average L0 and
    cosine, as its README)."""
    o, s = p.out, p.sizes
    ds, penalty, label = p.dataset("CIFAR10"), s.splice_l1_penalty, s.splice_class
    out, class_out = splice_decomposition_path(o, ds), splice_decomposition_path(o, ds, label)
    weights = splice_weights_path(out)
    # smoke: a small text file as the vocabulary, and the tiny model's image mean
    smoke = ["-vocab", SMOKE_VOCABULARY, "-vocab_size", "0", "--image_mean", SMOKE_IMAGE_MEAN] if p.smoke else []
    steps = [Step("decompose", "decompose_data.py",
                  [*p.model_flags(), *p.images("cifar10", "CIFAR10"), *smoke, *p.loader_flags(s.splice_batch_size),
                   "-l1_penalty", penalty, "-out_path", out], [out, weights], data="cifar10", streaming=True),
             # the README's -class_label 4, read back from the per-image weights: no second pass of the model
             Step("decompose_class", "decompose_data.py",
                  ["-dataset", ds, "--from_weights", weights, "-class_label", label, "-out_path", class_out],
                  [class_out], needs=("decompose",))]
    ctx = {"model": p.model, "dataset": ds, "l1_penalty": penalty}
    data = p.data_name("cifar10", "test")

    def rows(prefix: str) -> list[Row]:
        return [Row("average L0 (concepts per image)", "Average Decomposition L0 Norm", f"{prefix}_average_l0", 1, 4),
                Row("average cosine(CLIP, SpLiCE)", "Average CLIP, SpLiCE Cosine Sim", f"{prefix}_average_cosine",
                    1, 4)]
    sections = [Section(f"SpLiCE decomposition of {data}, l1 penalty {penalty}", "decompose", out, rows("splice"),
                        context=ctx, read=read_key_values),
                Section(f"SpLiCE decomposition of {data}, class {label} only, l1 penalty {penalty}", "decompose_class",
                        class_out, rows("splice_class"), context=dict(ctx, class_label=label), read=read_key_values)]
    return steps, sections


PIPELINES: dict[str, Callable[[Plan], tuple[list[Step], list[Section]]]] = {
    "paper1": paper1, "paper2": paper2, "splice": splice}


def build(settings: Settings) -> tuple[Plan, list[Step], list[Section]]:
    """The plan of ``settings`` (defaults filled in), its steps in order, and its report sections."""
    plan = Plan(settings)
    steps, sections = PIPELINES[settings.pipeline](plan)
    return plan, steps, sections


def select_steps(steps: Sequence[Step], text: Optional[str], pipeline: str) -> Optional[set[str]]:
    """The step names (or groups) of ``--steps`` ``text`` (comma-separated; ``None``: every step), checked."""
    if text is None:
        return None
    selected = {s.strip() for s in text.split(",") if s.strip()}
    unknown = sorted(selected - {s.name for s in steps} - {s.group for s in steps if s.group})
    if unknown:
        raise InputError(f"--steps {','.join(unknown)}: no such step in {pipeline} (steps: "
                         f"{', '.join(s.name for s in steps)})")
    return selected

