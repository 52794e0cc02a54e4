"""The streaming loop, written once: dataset -> remaining rows -> batches -> pre-allocated files.

Every script that runs the model over a dataset (compute_prs.py, compute_second_order_neuron_prs.py,
compute_segmentations.py, compute_representations.py, ...) calls ``stream_dataset``. It

- pre-allocates the outputs as ``.partial`` .npy files (``utils.files.rows.StreamingArrays``) and fills them in image order;
- resumes (``--resume``) from the last completed batch, refusing another run's partial files; says so when it
  starts fresh; and over finished outputs of the same run (their provenance records) does nothing;
- writes a provenance record beside every output, then renames the ``.partial`` files to their final names;
- splits the images across processes under ``torchrun`` (``torch.distributed``): each rank fills its own
  contiguous block of whole batches of the same files, with its own progress record, and rank 0 renames the
  files once every rank is done. Batches are the single-process batches, so the result is byte-identical to a
  single-process run (same batch size, same kernels).

Call ``args.device = init_distributed(args.device)`` at the top of ``main`` (before the model is loaded): under
torchrun it sets up the process group and, for CUDA, gives each rank its own GPU (``cuda:{LOCAL_RANK}``).
"""
from __future__ import annotations

import datetime
import glob
import math
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch
import tqdm
from torch.utils.data import DataLoader, Dataset, Subset

from utils import LOG
from utils.errors import InputError
from utils.files.provenance import read_provenance, run_key, write_provenance
from utils.files.rows import StreamingArrays, finish_renames

__all__ = ["init_distributed", "rank_and_world", "is_main_process", "barrier", "stream_dataset", "Output"]


# ----------------------------------------------------------------------------- torch.distributed
def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``: ``(0, 1)`` outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every process (a no-op outside torchrun)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


# A rank that has finished its rows waits for the others (on --resume that can be another rank's whole share)
WAIT_TIMEOUT = datetime.timedelta(hours=24)


def init_distributed(device: str = "cpu") -> str:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group and, for a CUDA ``device``, use
    ``cuda:{LOCAL_RANK}``. Returns the device this process should use (``device`` itself without torchrun, or
    when the group is already set up).

    The backend is gloo, on GPUs too: the processes only exchange small CPU objects and flags (NCCL has no CPU
    tensors), and the images' arrays go through the shared files, never through the process group.
    """
    device = str(device or "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    return device


def _broadcast(obj):
    """``obj`` of rank 0, on every rank."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool) -> bool:
    """``True`` on every rank if ``ok`` on every rank."""
    if rank_and_world()[1] == 1:
        return ok
    flag = torch.tensor([0 if ok else 1])
    torch.distributed.all_reduce(flag)
    return int(flag.item()) == 0


# ----------------------------------------------------------------------------- the loop
class Output:
    """One streamed output: its final ``path``, per-image ``shape`` (without the image axis) and ``dtype``."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: str = "float32"):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)


def _rank_rows(num: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s rows: a contiguous block of whole batches (the single-process batches)."""
    batches = math.ceil(num / batch_size)
    per_rank = math.ceil(batches / world)
    return min(num, rank * per_rank * batch_size), min(num, (rank + 1) * per_rank * batch_size)


def _progress_suffix(rank: int, world: int) -> str:
    return ".progress.json" if world == 1 else f".progress.rank{rank}.json"


def stream_dataset(dataset: Dataset, outputs: Mapping[str, Output],
                   compute: Callable[[torch.Tensor, torch.Tensor, int], Mapping[str, np.ndarray]], *,
                   record: dict, resume: bool = False, batch_size: int = 1, num_workers: int = 0,
                   desc: str = "", describe: Optional[Callable[[Mapping[str, np.ndarray]], str]] = None,
                   log: Callable[[str], None] = LOG.info) -> bool:
    """Run ``compute(images, labels, first_index)`` over ``dataset`` in order and stream what it returns to disk.

    Args:
        dataset: yields ``(image tensor, label)``; ``len(dataset)`` rows are written.
        outputs: name -> ``Output`` (final path, per-image shape, dtype); ``compute`` returns name -> ``[b, *shape]``.
        record: the provenance record of these outputs (``utils.files.provenance.make_record``); its identifying
            fields (model, weights, dataset, split, data_path, num_images, ...) are the resume key.
        resume: continue an interrupted run; over finished outputs of the same run, do nothing.
        batch_size, num_workers: the DataLoader's.
        desc: the progress bar's label; ``describe(batch outputs)`` may return a running summary for it.

    Returns ``True`` when it computed, ``False`` when the outputs were already complete (``--resume``).
    """
    if batch_size < 1:
        raise InputError(f"--batch_size {batch_size}: must be >= 1")
    num = len(dataset)
    if num == 0:
        raise InputError("the dataset has no images")
    rank, world = rank_and_world()
    main = rank == 0
    say = log if main else (lambda s: None)
    paths = {k: o.path for k, o in outputs.items()}
    shapes = {k: (num, *o.shape) for k, o in outputs.items()}
    dtypes = {k: o.dtype for k, o in outputs.items()}
    record = dict(record, num_images=num)
    key = run_key(record)
    first = next(iter(paths.values()))
    progress_files = [first.with_name(first.name + _progress_suffix(r, world)) for r in range(world)]

    name_of = {p: k for k, p in paths.items()}

    def finish() -> None:  # rank 0: provenance records, renames, then the progress files go
        finish_renames(paths.values(), progress_files, before_rename=lambda p: write_provenance(
            p, dict(record, shape=list(shapes[name_of[p]]), storage_dtype=dtypes[name_of[p]].name)))

    # finished outputs (no progress file left)
    if all(p.is_file() for p in paths.values()) and not any(f.exists() for f in progress_files):
        if resume:
            mismatch = [str(p) for p in paths.values() if run_key(read_provenance(p) or {}) != key]
            if mismatch:
                raise InputError(f"--resume: {mismatch[0]} is a finished output of another run (its provenance "
                                 f"record differs); rerun without --resume to overwrite it")
            say(f"--resume: {', '.join(str(p) for p in paths.values())} already complete (same run); nothing to do")
            return False

    # killed while renaming: every row was written, some files renamed; finish the renames
    if resume and _broadcast(_all_rows_done(progress_files, key) if main else None):
        if main:
            say("--resume: every row was already written; finishing the renames")
            finish()
        barrier()
        return True

    # resume or start fresh (rank 0 decides; every rank opens the same files)
    mine = progress_files[rank]
    partials = all(StreamingArrays.partial(p).is_file() for p in paths.values())
    can_resume, other = None, []
    if main:
        can_resume = resume and partials and mine.is_file()
        other = _other_progress_files(first, progress_files)
    can_resume, refuse = _broadcast((can_resume, resume and partials and not can_resume and bool(other)))
    if refuse:
        raise InputError(f"--resume: {StreamingArrays.partial(first)} was being written by another number of "
                         f"processes ({_describe_writers(other)}), this run has {world}; resume with that number "
                         f"of processes and the same --batch_size, or rerun without --resume to start over")
    fresh = not can_resume
    if resume and fresh:
        say(f"--resume: no progress file {mine} (or its .partial files) to continue: starting fresh")
    if fresh and main:  # another number of processes' progress files would outlive this run
        for f in other:
            f.unlink(missing_ok=True)
    start, stop = _rank_rows(num, batch_size, rank, world)

    def open_writer(create: bool) -> StreamingArrays:
        return StreamingArrays(paths, shapes, dtypes, key={"record": key}, resume=not fresh, start=start, stop=stop,
                               create=create, progress_suffix=_progress_suffix(rank, world))

    writer = open_writer(create=fresh) if main else None  # rank 0 allocates fresh files, the others open them
    barrier()
    if not main:
        writer = open_writer(create=False)
    if writer.done and world == 1:
        say(f"Resuming at image {writer.next_row} of {num}")
    elif world > 1:
        counts = f"rows {writer.next_row}..{stop} of {start}..{stop}"
        log(f"[rank {rank}/{world}] {'resuming at' if writer.done else 'computing'} {counts}")

    loader = DataLoader(Subset(dataset, range(writer.next_row, stop)), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    bar = tqdm.tqdm(loader, desc=desc, unit="batch", disable=not main)
    for images, labels in bar:
        batch = compute(images, labels, writer.next_row)
        writer.write(batch)
        if describe is not None and main:
            bar.set_description(describe(batch))
    writer.close()

    # every rank done -> rank 0 writes the provenance records and renames
    complete = _all_ok(writer.complete)
    if not complete:
        raise RuntimeError("stream_dataset: a process did not complete its rows")
    if main:
        if not _all_rows_done(progress_files, key):
            raise RuntimeError(f"stream_dataset: incomplete progress records {progress_files}")
        finish()
    barrier()
    return True


def _all_rows_done(progress_files: list[Path], key: dict) -> bool:
    """Every progress file exists, belongs to this run and records all of its rows."""
    states = [StreamingArrays.read_progress(f) for f in progress_files]
    return all(s is not None and s.get("key", {}).get("record") == key and s["start"] + s["done"] >= s["stop"]
               for s in states)


def _other_progress_files(first: Path, progress_files: list[Path]) -> list[Path]:
    """Progress files of these outputs written by another number of processes (not in ``progress_files``)."""
    return sorted(f for f in first.parent.glob(glob.escape(first.name) + ".progress*.json") if f not in progress_files)


def _describe_writers(files: list[Path]) -> str:
    """``"1 process"`` or ``"4 processes under torchrun"`` from their progress files' names."""
    ranks = [int(m.group(1)) for f in files if (m := re.search(r"\.progress\.rank(\d+)\.json$", f.name))]
    return f"{max(ranks) + 1} processes under torchrun" if ranks else "1 process"

