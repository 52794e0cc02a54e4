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
relative precision in ``conv1`` on Ampere and later GPUs).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from utils.errors import InputError

__all__ = ["run", "configure_torch", "add_tf32_arg", "positive_int", "layer_list"]


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


def run(main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> None:
    """Parse the command line, set the shared numerics, and call ``main(args)`` (see the module docstring)."""
    add_tf32_arg(parser)
    args = parser.parse_args(argv)
    configure_torch(getattr(args, "allow_tf32", False))
    try:
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


# ----------------------------------------------------------------------------- SpLiCE's scripts
def note(message: str) -> None:
    """An informational line on stderr (the SpLiCE scripts' stdout carries SpLiCE's own output)."""
    print(message, file=sys.stderr)


def add_splice_args(parser: argparse.ArgumentParser, l1_penalty: float | None = None) -> None:
    """SpLiCE's flags (single dash, its defaults; a double-dash spelling works too) and ours."""
    from utils.models import default_device
    from utils.splice import DEFAULT_DOWNLOAD_ROOT, DEFAULT_MODEL, LOCAL_VOCABULARIES, SOLVERS, SPLICE_VOCABULARIES

    parser.add_argument("-model", "--model", default=DEFAULT_MODEL,
                        help="backbone, [library:]model: clip:ViT-B/32, clip:ViT-B/16, clip:RN50 (OpenAI weights), "
                             "open_clip:ViT-B-32 (LAION-2B laion2b_s34b_b79k), or any open_clip name with "
                             "--pretrained (default: %(default)s)")
    parser.add_argument("--pretrained", default=None,
                        help="weights: open_clip tag, checkpoint path or 'none' (default: the backbone's own; "
                             "required for other open_clip models)")
    parser.add_argument("--model_config", default=None, help="extra open_clip model config (.json or a folder)")
    parser.add_argument("-device", "--device", default=default_device(),
                        help="torch device (default: cuda if available, else cpu; SpLiCE: cuda)")
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
    from utils.files.provenance import add_mismatch_arg
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
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="data loader workers (default: %(default)s)")
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
