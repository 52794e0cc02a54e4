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
