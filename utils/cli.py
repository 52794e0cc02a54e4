"""Command-line entry point shared by the scripts: bad input becomes one clear line, real bugs keep their traceback.

Only *input* errors are turned into ``<script>: error: <message>`` with exit status 2:

- ``InputError``, raised by our own validation (bad flag values, files of the wrong shape, unknown names, ...);
- ``FileNotFoundError`` (a missing input file or folder);
- argparse's own errors (argparse prints them and exits 2 itself).

Everything else (``RuntimeError``, ``KeyError``, a CUDA error, ...) is a bug or a hardware problem and keeps its
full traceback. A CUDA out-of-memory error keeps its traceback and gets one added line suggesting a smaller
``--batch_size``. ``PRSCLIP_TRACEBACK=1`` shows the traceback of input errors too.

``run`` also sets the numerics every script shares, once: TF32 is off for matmuls and cuDNN convolutions unless
``--allow_tf32`` is given (PyTorch enables TF32 for cuDNN convolutions by default, which costs ~1e-3 of
relative precision in ``conv1`` on Ampere and later GPUs). It shows the library's messages (the ``prsclip``
logger) on stdout and gives the provenance records the command line.

This is the only module of ``utils/`` that knows about the command line: the flag groups several scripts share
are declared here once (``add_model_args``, ``add_mismatch_arg``, ``add_segmentation_args``, ...), and
``args_record``/``load_model_from_args`` turn parsed flags into the library's plain arguments.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from utils import LOG
from utils.errors import InputError
from utils.files.names import format_layers
from utils.models import default_device, load_model, register_model_config

__all__ = ["run", "configure_torch", "add_tf32_arg", "positive_int", "layer_list", "add_model_args",
           "load_model_from_args", "args_record", "add_text_set_args", "run_text_embeddings", "add_mismatch_arg",
           "add_segmentation_args", "say_wrote"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--batch_size 0`` is refused before anything is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def layer_list(text: str) -> list[int]:
    """argparse type: layer indices as ``28-31`` or ``0,5,28-31`` (inclusive ranges) -> sorted distinct ints."""
    layers: set[int] = set()
    for item in text.replace(" ", "").split(","):
        lo, sep, hi = item.partition("-")
        if not (lo.isdigit() and (hi.isdigit() if sep else not hi)):
            raise argparse.ArgumentTypeError(f"'{item}' in '{text}' is not a layer (e.g. 5) or a range (e.g. 28-31)")
        lo, hi = int(lo), int(hi) if sep else int(lo)
        if hi < lo:
            raise argparse.ArgumentTypeError(f"'{item}' in '{text}': the range ends before it starts")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def configure_torch(allow_tf32: bool = False) -> None:
    """Set TF32 for CUDA matmuls and cuDNN convolutions (off by default: exact float32)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")


def add_tf32_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--allow_tf32`` to ``parser`` (once; ``run`` calls this for every script)."""
    if any("--allow_tf32" in a.option_strings for a in parser._actions):
        return
    parser.add_argument("--allow_tf32", action="store_true",
                        help="allow TF32 matmuls/convolutions on Ampere+ GPUs: faster, but ~1e-3 less exact "
                             "(default: off, exact float32)")


def _script_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "prsclip"


OUTPUT_FLAGS = ("output_dir", "figures_dir")  # the folders most scripts write into


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every script's ``--help``: the description as written, and each flag's default shown (``(default: X)``) where
    its help does not already say it. Switches (``store_true``) and flags without a default show none."""

    STATED = re.compile(r"%\(default\)|\(default[ :]|[;,] default[ :]|^default[ :]|Default: ", re.I)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (self.STATED.search(text) or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


# What a run loads, for preflight's weights check: (open_clip model name, --pretrained, the weights' cache folder)
Weights = Optional[tuple[str, Optional[str], Optional[str]]]


def model_weights(args: argparse.Namespace) -> Weights:
    """The weights of a script with the model flags (``model_flags``; its ``--cache_dir``, where it has one, is the
    weights' cache); ``None`` for scripts without them."""
    if not hasattr(args, "force_quick_gelu"):
        return None
    return args.model, args.pretrained, getattr(args, "cache_dir", None)


def splice_weights(args: argparse.Namespace) -> Weights:
    """The weights of SpLiCE's scripts: the backbone ``-model [library:]name --pretrained`` resolves to (their
    ``--cache_dir`` holds concept embeddings, so the weights come from the default cache); ``None`` when
    ``--from_weights`` reads a finished decomposition instead of running the model."""
    if getattr(args, "from_weights", None):
        return None
    from utils.splice import resolve_backbone

    backbone = resolve_backbone(args.model, args.pretrained)
    return backbone.open_clip_name, backbone.pretrained, None


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None, outputs: Sequence[str] = OUTPUT_FLAGS,
        weights: Callable[[argparse.Namespace], Weights] = model_weights) -> None:
    """Parse the command line, set the shared numerics, check what every script shares (``preflight``: the
    ``outputs`` flags name folders written into; ``weights(args)`` names the weights this run loads, ``None`` for
    none), and call ``main(args)`` (see the module docstring)."""
    from utils.files.provenance import set_invocation

    add_tf32_arg(parser)
    parser.prog = _script_name()  # usage and argparse's errors name the script: "compute_prs.py: error: ..."
    parser.formatter_class = HelpFormatter
    args = parser.parse_args(argv)
    configure_torch(getattr(args, "allow_tf32", False))
    show_library_messages()
    set_invocation(sys.argv if argv is None else [sys.argv[0], *argv])
    try:
        preflight(args, outputs, weights(args))
        main(args)
    except (InputError, FileNotFoundError) as e:
        if os.environ.get("PRSCLIP_TRACEBACK"):
            raise
        print(f"{_script_name()}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:
        if _is_cuda_oom(e):
            import traceback

            traceback.print_exc()
            print(f"{_script_name()}: CUDA ran out of memory; try a smaller --batch_size"
                  f"{' (now ' + str(args.batch_size) + ')' if hasattr(args, 'batch_size') else ''}",
                  file=sys.stderr)
            sys.exit(1)
        raise
    finally:
        _end_distributed()


def preflight(args: argparse.Namespace, outputs: Sequence[str] = OUTPUT_FLAGS, weights: Weights = None) -> None:
    """The checks every script shares, before any work and before anything is written, each one line: the
    ``--device`` is usable here, the ``weights`` (model, pretrained, cache folder) are cached or can be downloaded
    (seconds, not a minute of retries, when offline), and the folders of ``outputs`` can be created and written."""
    from utils.models import check_device, check_weights_available

    if getattr(args, "device", None):
        check_device(args.device)
    if weights is not None:
        register_model_config(getattr(args, "model_config", None))
        check_weights_available(*weights)
    for flag in outputs:
        if getattr(args, flag, None):
            check_writable_folder(getattr(args, flag), f"--{flag}")


def check_writable_folder(path: str | Path, flag: str) -> None:
    """``InputError`` naming ``flag`` unless ``path`` is a folder this process can write, or can be created (its
    nearest existing parent is a writable folder). Creates nothing."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise InputError(f"{flag} {path}: {what} (read-only file system or no permission)")


def _one_line(e: BaseException) -> str:
    """The message of an input error; one raised in a DataLoader worker carries the worker's traceback, whose last
    line is the original ``...Error: message``."""
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: {e.strerror}"
    message = str(e)
    if "Original Traceback" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = last.split("Error: ", 1)[1] if "Error: " in last else last
    return message


def _end_distributed() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _is_cuda_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(e, oom)


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at the time (redirections included)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Plain(logging.Formatter):
    """The library's messages as the scripts always printed them: INFO as is, warnings as ``warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def show_library_messages() -> None:
    """Send the ``prsclip`` logger's INFO and above to stdout (once per process)."""
    if not any(getattr(h, "_prsclip", False) for h in LOG.handlers):
        handler = _Stdout()
        handler.setFormatter(_Plain())
        handler._prsclip = True
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def say_wrote(paths: Iterable[str | Path], what: str = "") -> None:
    """The line every script ends with: ``wrote a.json, b.png`` (``what`` after it, e.g. shapes)."""
    paths = [str(p) for p in paths]
    print(f"wrote {', '.join(paths)}{' ' + what if what else ''}")


# ----------------------------------------------------------------------------- flag groups several scripts share
DEVICE_HELP = "torch device (default: %(default)s here: cuda when a GPU is usable, else cpu)"
# The one --num_workers rule: DataLoader workers, up to 8 and never more than this machine's cores. Scripts that keep
# the flag only for an original command line take it too (and say that they do not use it).
NUM_WORKERS = min(8, os.cpu_count() or 1)


def num_workers_flag(used: bool = True) -> "Flag":
    """``--num_workers`` (``NUM_WORKERS``); ``used=False`` for a script that accepts it for an original command line
    but loads no images."""
    return (("--num_workers",), dict(default=NUM_WORKERS, type=int, help="DataLoader worker processes" if used else
                                     "accepted for the original command line; this script loads no images"))


def add_num_workers_arg(parser, used: bool = True) -> None:
    """Add ``num_workers_flag`` to ``parser``."""
    options, kwargs = num_workers_flag(used)
    parser.add_argument(*options, **kwargs)


# A flag as data: (option strings, add_argument keywords), keyed by its dest. Scripts that combine the flags of
# several studies (compute_ablations.py) read these tables instead of another parser's internals.
Flag = tuple[tuple[str, ...], dict]


def add_flags(container, flags: dict[str, Flag]) -> None:
    """``container.add_argument`` for each flag of ``flags`` (a parser or an argument group)."""
    for options, kwargs in flags.values():
        container.add_argument(*options, **kwargs)


def model_flags(model: str = "ViT-H-14", pretrained: str = "laion2b_s32b_b79k") -> dict[str, Flag]:
    """The model flags every script shares: ``--model --pretrained --force_quick_gelu --model_config --device``."""
    return {
        "model": (("--model",), dict(default=model, type=str, metavar="MODEL",
                                     help="open_clip model name (default: %(default)s)")),
        "pretrained": (("--pretrained",), dict(
            default=pretrained, type=str,
            help="open_clip pretrained tag, a local checkpoint path, or 'none' (random init) (default: %(default)s)")),
        "force_quick_gelu": (("--force_quick_gelu",), dict(
            action="store_true", help="use QuickGELU whatever the config says (OpenAI weights from a local file)")),
        "model_config": (("--model_config",), dict(
            default=None, type=str, help="extra open_clip model config: a .json file or a folder of them (custom "
                                         "models)")),
        "device": (("--device",), dict(default=default_device(), help=DEVICE_HELP)),
    }


def add_model_args(parser, model: str = "ViT-H-14", pretrained: str = "laion2b_s32b_b79k") -> None:
    """Add ``model_flags`` to ``parser``."""
    add_flags(parser, model_flags(model, pretrained))


def load_model_from_args(args: argparse.Namespace):
    """``utils.models.load_model`` driven by the flags of ``add_model_args`` (and ``--cache_dir``, where downloaded
    weights go, for the scripts that have it): ``(model, preprocess, tokenizer)``."""
    register_model_config(getattr(args, "model_config", None))
    return load_model(args.model, args.pretrained, args.device, force_quick_gelu=args.force_quick_gelu,
                      cache_dir=getattr(args, "cache_dir", None))


def kept_layers(layers: Optional[Sequence[int]], num_layers: int, model_name: str) -> Optional[list[int]]:
    """The attention layers to store: ``None`` for every layer (``layers`` is ``None`` or lists them all), else
    ``layers`` as a list; ``InputError`` naming ``--layers`` when one is out of range (scripts with that flag)."""
    if layers is None:
        return None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise InputError(f"--layers {format_layers(layers)}: {format_layers(bad)} out of range; {model_name} has "
                         f"{num_layers} layers (0-{num_layers - 1})")
    if len(set(layers)) == num_layers:
        return None
    return list(layers)


def load_engine_from_args(args: argparse.Namespace):
    """The model of ``add_model_args``'s flags and its ``prs_hook.Decomposer`` (``--map_mlp`` where the script has
    it), with the layers ``--layers`` keeps (``None``: every layer; said when the flag lists them all):
    ``(model, preprocess, engine, layers)``."""
    from prs_hook import Decomposer

    model, preprocess, _ = load_model_from_args(args)
    engine = Decomposer(model, args.device, model_name=args.model, map_mlp=getattr(args, "map_mlp", "lumped"))
    layers = kept_layers(getattr(args, "layers", None), engine.num_layers, args.model)
    if getattr(args, "layers", None) is not None and layers is None:
        print(f"--layers {format_layers(args.layers)}: every layer of {args.model}; writing the full files")
    return model, preprocess, engine, layers


RECORD_FLAGS = ("model", "pretrained", "force_quick_gelu", "dataset", "split", "data_path", "dtype")


def args_record(args: argparse.Namespace | None = None, **fields: Any) -> dict:
    """``utils.files.provenance.make_record`` of the flags that identify a computation (``RECORD_FLAGS``, those the
    script has) and ``fields`` (which override them)."""
    from utils.files.provenance import make_record

    given = vars(args) if args is not None else {}
    return make_record(**{**{k: given[k] for k in RECORD_FLAGS if k in given}, **fields})


MISMATCH_FLAG: dict[str, Flag] = {"allow_mismatch": (("--allow_mismatch",), dict(
    action="store_true", help="use input files even when their provenance records disagree (model, pretrained "
                              "weights, dataset); default: refuse"))}


def add_mismatch_arg(parser) -> None:
    """``--allow_mismatch``: use input files whose provenance records disagree (a warning instead of an error)."""
    add_flags(parser, MISMATCH_FLAG)


def second_order_ablation_flags() -> dict[str, Flag]:
    """Paper 2's second-order ablation study (compute_second_order_ablations.py; compute_ablations.py in paper 2's
    mode): the original's flags and defaults."""
    from utils.neurons.effects import COEFFICIENT

    return {
        **model_flags(model="ViT-B-32", pretrained="openai"),
        "mlp_layer": (("--mlp_layer",), dict(default=9, type=int, help="the MLP layer of the neurons (0-based)")),
        "coefficient": (("--coefficient",), dict(default=COEFFICIENT, type=float,
                                                 help="scale on the normalised output (the paper's 100)")),
        "top_k_pca": (("--top_k_pca",), dict(default=100, type=int, help="which PCA / norm files (their top k)")),
        "batch_size": (("--batch_size",), dict(default=16, type=positive_int, help="images per batch")),
        "output_dir": (("--output_dir",), dict(default="./output_dir/", help="where the JSON goes")),
        "input_dir": (("--input_dir",), dict(default="./output_dir/", help="where the training files are")),
        "data_path": (("--data_path",), dict(default=None, type=str, help="dataset root")),
        "split": (("--split",), dict(default="val", type=str, help="the evaluated split")),
        "num_workers": num_workers_flag(),
        "dataset": (("--dataset",), dict(
            type=str, default="imagenet",
            help="evaluated dataset: imagenet (val: every 10th image), CIFAR10/100, or an ImageFolder")),
        "train_dataset": (("--train_dataset",), dict(
            default=None, type=str, help="dataset name of the training files and classifier (default: --dataset "
                                         "without a trailing '_r', as the original)")),
        "train_split": (("--train_split",), dict(default="train", type=str, help="split of the training files")),
        **MISMATCH_FLAG,
    }


def run_second_order_ablations(args: argparse.Namespace) -> dict:
    """Paper 2's study from its flags (``second_order_ablation_flags``): the library's
    ``second_order_ablation_study``, the original's printout, then the JSON and bar chart (with their records)."""
    from utils.files.atomic import make_output_dir
    from utils.files.names import pretrained_name, second_order_ablations_path
    from utils.files.results import save_result
    from utils.neurons.ablations import plot_second_order_ablations, second_order_ablation_study

    train_dataset = args.train_dataset or (args.dataset[:-2] if args.dataset.endswith("_r") else args.dataset)
    model, preprocess, _ = load_model_from_args(args)
    study = second_order_ablation_study(
        model, preprocess, model_name=args.model, pretrained=args.pretrained, mlp_layer=args.mlp_layer,
        input_dir=args.input_dir, classifier_dirs=[args.input_dir, args.output_dir], train_dataset=train_dataset,
        train_split=args.train_split, top_k_pca=args.top_k_pca, dataset=args.dataset, data_path=args.data_path,
        split=args.split, coefficient=args.coefficient, batch_size=args.batch_size, num_workers=args.num_workers,
        device=args.device, allow_mismatch=args.allow_mismatch)
    print("Please note: evaluated on", study["num_images"], "images of", args.dataset, args.split)
    for line, value in study["printed"].items():
        print(f"{line}:", value)
    out = make_output_dir(args.output_dir)
    path = second_order_ablations_path(out, args.dataset, args.split, args.model, args.pretrained, args.mlp_layer,
                                       args.top_k_pca)
    result = {"args": vars(args), **{k: study[k] for k in ("num_images", "classifier", "accuracy_percent",
                                                           "printed")}}
    title = (f"{args.model} ({pretrained_name(args.pretrained)}), MLP layer {args.mlp_layer}: "
             f"{study['num_images']} images of {args.dataset} {args.split}")
    say_wrote(save_result(out, path.stem, result, study["record"],
                          figure=plot_second_order_ablations(study["accuracy_percent"], title)))
    return result


def add_segmentation_args(parser, output_help: str = "where the results go") -> None:
    """The flags both segmentation scripts share (the originals' names and defaults)."""
    from utils.imagenet_segmentation import MASK_RESIZE

    parser.add_argument("--save_img", action="store_true", default=False,
                        help="save input, ground-truth mask, predicted mask and heatmap overlay per image (PNG)")
    parser.add_argument("--train_dataset", type=str, default="imagenet_seg",
                        help="dataset name in the output folder (default imagenet_seg)")
    parser.add_argument("--image_size", default=224, type=int, help="image size, the model's input size (default 224)")
    parser.add_argument("--thr", type=float, default=0.0,
                        help="lower clamp of the scores behind the precision-recall curve (default 0.0, as the "
                             "original)")
    parser.add_argument("--data_path", default="imagenet_seg/gtsegs_ijcv.mat", type=str,
                        help="ImageNet-segmentation's gtsegs_ijcv.mat (default imagenet_seg/gtsegs_ijcv.mat)")
    add_num_workers_arg(parser)
    parser.add_argument("--classifier_dir", default="./output_dir/",
                        help="where the classifier is (default ./output_dir/)")
    parser.add_argument("--batch_size", default=1, type=positive_int,
                        help="images per batch; does not change the numbers (default 1)")
    parser.add_argument("--output_dir", default="./output_dir", help=f"{output_help} (default ./output_dir)")
    parser.add_argument("--mask_resize", default="stretch", choices=MASK_RESIZE,
                        help="stretch: the original's mask resize (misaligned on non-square images); "
                             "crop: resize + centre crop like the image (default stretch)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    add_mismatch_arg(parser)


def segmentation_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``utils.segmentation.stream_segmentation`` that ``add_segmentation_args`` sets."""
    return {"image_size": args.image_size, "resume": args.resume, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "save_images": args.save_img}


def finish_segmentation_run(ds, out: Path, args: argparse.Namespace, record: dict, summary: dict) -> dict:
    """``utils.segmentation.finish_segmentation`` with the flags in the JSON, then the original's printout and the
    ``wrote`` line."""
    from utils.segmentation import finish_segmentation

    from utils.files.names import segmentation_files

    result = finish_segmentation(ds, out, record, {**summary, "args": dict(vars(args))})
    print(result["result_txt"], end="")
    written = [p.name + ("/" if p.is_dir() else "") for p in segmentation_files(out).values() if p.exists()]
    say_wrote([f"{out}/"], f"({', '.join([*written, Path(result['result_file']).name])})")
    return result


def add_classifier_args(parser, model: str = "ViT-H-14", pretrained: str = "laion2b_s32b_b79k") -> None:
    """The flags of the zero-shot classifier scripts (compute_text_projection.py, compute_classifier_projection.py,
    PCLens's compute_classes_embeddings)."""
    add_model_args(parser, model=model, pretrained=pretrained)
    parser.add_argument("--dataset", default="imagenet", help="which class names (see above; default imagenet)")
    parser.add_argument("--classnames", default=None, help="file with one class name per line")
    parser.add_argument("--batch_size", default=256, type=positive_int,
                        help="prompts per encode_text batch (default 256)")
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default ./output_dir)")


def run_classifier(args: argparse.Namespace, path: Callable[[argparse.Namespace], Path]) -> Path:
    """Check the class names and the folder, load the model, write the classifier at ``path(args)``, say so."""
    from utils.files.atomic import make_output_dir
    from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames
    from utils.text.embeddings import write_classifier

    classnames = get_classnames(args.dataset, args.classnames)
    make_output_dir(args.output_dir)
    model, _, tokenizer = load_model_from_args(args)
    target = path(args)
    classifier = write_classifier(model, tokenizer, classnames, target, args_record(args, classnames=args.classnames),
                                  args.device, args.batch_size)
    say_wrote([target], f"{list(classifier.shape)} ({len(classnames)} classes x {len(OPENAI_IMAGENET_TEMPLATES)} "
                        f"templates)")
    return target


def add_text_set_args(parser, data_path: str, data_path_help: str) -> None:
    """The flags of the text-set embedding scripts (compute_text_set_projection.py, PCLens'
    compute_text_embeddings): ``--batch_size``, the model flags, ``--data_path``, ``--num_workers`` (unused),
    ``--output_dir``."""
    parser.add_argument("--batch_size", default=2048, type=positive_int, help="texts per encode_text batch")
    add_model_args(parser)
    parser.add_argument("--data_path", default=data_path, type=str, help=data_path_help)
    add_num_workers_arg(parser, used=False)
    parser.add_argument("--output_dir", default="./output_dir", help="where to save (default %(default)s)")


def run_text_embeddings(args: argparse.Namespace) -> Path:
    """Embed the text set ``--data_path`` (one normalised embedding per line, ``utils.text.embeddings.encode_texts``)
    and write ``{text_set}_{model}.npy`` [T, d] in ``--output_dir``, say so (compute_text_set_projection.py,
    PCLens' compute_text_embeddings)."""
    from utils.files.atomic import make_output_dir
    from utils.files.names import text_embeddings_path
    from utils.files.provenance import save_output
    from utils.text.embeddings import encode_texts
    from utils.text.sets import read_text_set, resolve_text_file, sha256_of

    lines = read_text_set(args.data_path, "--data_path")
    text_file = resolve_text_file(args.data_path)
    name = text_file.name[:-len(".txt")] if text_file.name.endswith(".txt") else text_file.name
    make_output_dir(args.output_dir)
    model, _, tokenizer = load_model_from_args(args)
    features = encode_texts(model, tokenizer, lines, args.device, args.batch_size)  # [T, d], unit rows
    path = text_embeddings_path(args.output_dir, name, args.model)
    save_output(path, features.cpu().numpy(), args_record(args, text_set=name, num_texts=len(lines),
                                                        text_file_sha256=sha256_of(text_file)))
    say_wrote([path], f"{list(features.shape)} ({len(lines)} lines of {text_file})")
    return path


# ----------------------------------------------------------------------------- SpLiCE's scripts
def note(message: str) -> None:
    """An informational line on stderr (the SpLiCE scripts' stdout carries SpLiCE's own output)."""
    print(message, file=sys.stderr)


def add_splice_args(parser: argparse.ArgumentParser, l1_penalty: float | None = None) -> None:
    """SpLiCE's flags (single dash, its defaults; a double-dash spelling works too) and ours."""
    from utils.splice import DEFAULT_DOWNLOAD_ROOT, DEFAULT_MODEL, LOCAL_VOCABULARIES, SOLVERS, SPLICE_VOCABULARIES

    parser.add_argument("-model", "--model", default=DEFAULT_MODEL,
                        help="backbone, [library:]model: clip:ViT-B/32, clip:ViT-B/16, clip:RN50 (OpenAI weights), "
                             "open_clip:ViT-B-32 (LAION-2B laion2b_s34b_b79k), or any open_clip name with "
                             "--pretrained (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="weights: open_clip tag, checkpoint path or 'none' (default: the backbone's own; "
                             "required for other open_clip models)")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or a folder)")
    parser.add_argument("-device", "--device", default=default_device(), help=DEVICE_HELP + "; SpLiCE's: cuda")
    parser.add_argument("-l1_penalty", "--l1_penalty", type=float, default=l1_penalty,
                        help="weight of the l1 penalty, > 0; larger is sparser"
                             + (f" (default: {l1_penalty})" if l1_penalty is not None else " (required)"))
    parser.add_argument("-vocab", "--vocab", default="laion",
                        help=f"concept vocabulary: SpLiCE's {', '.join(SPLICE_VOCABULARIES)} (downloaded, "
                             f"SHA-256 checked), ours {', '.join(LOCAL_VOCABULARIES)} (no download), or a text "
                             f"file, one concept per line (default: %(default)s)")
    parser.add_argument("-vocab_size", "--vocab_size", type=int, default=10000,
                        help="keep the last k lines of the vocabulary (its most frequent concepts); 0: all "
                             "(default: %(default)s)")
    parser.add_argument("-solver", "--solver", default="active_set", choices=SOLVERS,
                        help="active_set: exact working-set active-set solver, batched (default); admm: batched "
                             "ADMM, each image stopping on its own residuals; skl: SpLiCE's own per-image "
                             "scikit-learn Lasso (its default)")
    parser.add_argument("--image_mean", default=None,
                        help="image mean .pt or .npy [d] (default: SpLiCE's for its four backbones; "
                             "compute_image_mean.py makes one for any model)")
    parser.add_argument("--download_root", default=None,
                        help=f"where SpLiCE's vocabularies and means are kept (default: {DEFAULT_DOWNLOAD_ROOT})")
    parser.add_argument("--base_url", default=None,
                        help="take SpLiCE's files from this folder URL (a mirror, or file:///path/) instead of "
                             "GitHub; SHA-256 checked all the same")
    parser.add_argument("--cache_dir", default=None,
                        help="where the concept embeddings are cached (default: beside the outputs)")
    parser.add_argument("--text_batch_size", type=int, default=256,
                        help="concepts embedded at once (default: %(default)s)")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """SpLiCE's dataset flags, and ours for resuming and for reading a decomposition back (``--from_weights``)."""
    from utils.splice import SPLICE_DATASETS

    parser.add_argument("-dataset", "--dataset", required=True,
                        help=f"SpLiCE's {', '.join(SPLICE_DATASETS)} (MSCOCO: a folder of images), or any name "
                             f"utils/datasets.py knows (imagenet, sample, binary_waterbirds, ...; other names: an "
                             f"ImageFolder at -data_path)")
    parser.add_argument("-data_path", "--data_path", default=None, help="dataset root (CIFAR: ./datasets/)")
    parser.add_argument("-class_label", "--class_label", type=int, default=None,
                        help="decompose only the images with this label (default: all)")
    parser.add_argument("-batch_size", "--batch_size", type=positive_int, default=512,
                        help="images per batch (default: %(default)s)")
    add_num_workers_arg(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue a killed run from its last finished batch (the per-image weights are "
                             "streamed to disk as the batches finish)")
    parser.add_argument("--from_weights", default=None,
                        help="read the per-image weights from this decompose_data.py .npz instead of running the "
                             "model (its model, vocabulary and l1 penalty apply)")
    add_mismatch_arg(parser)


def splice_settings(args: argparse.Namespace):
    """The ``utils.splice.SpliceSettings`` of ``add_splice_args``'s flags."""
    from dataclasses import fields

    from utils.splice import SpliceSettings

    return SpliceSettings(**{f.name: getattr(args, f.name) for f in fields(SpliceSettings)})


def dataset_settings(args: argparse.Namespace):
    """The ``utils.splice.DatasetSettings`` of ``add_dataset_args``'s flags."""
    from dataclasses import fields

    from utils.splice import DatasetSettings

    return DatasetSettings(**{f.name: getattr(args, f.name) for f in fields(DatasetSettings)})
