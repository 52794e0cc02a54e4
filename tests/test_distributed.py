"""torchrun set-up (utils/files/streaming.py): the process group and GPU of each rank, and --resume with another number of
processes. The 2-process byte-identity and resume tests are in test_robustness.py and test_layers.py."""
import argparse
import filecmp
from pathlib import Path

import torch
from conftest import GOLDEN, TINY_ARGS, run_inprocess, run_killed
from test_robustness import _error_line

import utils.files.streaming as streaming

IMAGES = ["--dataset", "golden", "--data_path", str(GOLDEN / "images"), "--num_workers", "0", "--batch_size", "2"]
ATTN = "golden_attn_prsclip-tiny.npy"


def test_ranks_use_gloo_and_their_own_gpu(monkeypatch):
    """NCCL has no CPU tensors, and the loop's flags and objects are CPU ones: the group is gloo on GPUs too."""
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("gpu", i))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.update(backend=backend, **kw))
    args = argparse.Namespace(device="cuda")
    args.device = streaming.init_distributed(args.device)
    assert calls["backend"] == "gloo" and calls["gpu"] == 3 and args.device == "cuda:3"
    assert calls["timeout"].total_seconds() >= 3600  # a finished rank waits for the others' rows
    calls.clear()
    args = argparse.Namespace(device="cpu")
    args.device = streaming.init_distributed(args.device)
    assert calls["backend"] == "gloo" and "gpu" not in calls and args.device == "cpu"


def test_resume_with_another_number_of_processes(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    code, _, err = run_inprocess("compute_prs.py", *TINY_ARGS, *IMAGES, "--output_dir", clean)
    assert code == 0, err
    res = run_killed("compute_prs.py", 5, *TINY_ARGS, *IMAGES, "--output_dir", killed, torchrun=2)
    assert res.returncode != 0 and (killed / f"{ATTN}.progress.rank1.json").is_file()
    # one process cannot continue two processes' rows: one line saying how to resume
    code, _, err = run_inprocess("compute_prs.py", *TINY_ARGS, *IMAGES, "--output_dir", killed, "--resume")
    line = _error_line(err)
    assert code == 2 and f"{ATTN}.partial was being written by another number of processes (2 processes under " \
                         f"torchrun), this run has 1" in line, err
    # without --resume it starts over, and no progress file of the 2-process run is left behind
    code, _, err = run_inprocess("compute_prs.py", *TINY_ARGS, *IMAGES, "--output_dir", killed)
    assert code == 0, err
    assert filecmp.cmp(clean / ATTN, killed / ATTN, shallow=False)
    assert not list(killed.glob("*.progress*")) and not list(killed.glob("*.partial"))


def test_writers_are_described_by_their_progress_files():
    files = [Path(f"a.npy.progress.rank{r}.json") for r in (0, 3)]
    assert streaming._describe_writers(files) == "4 processes under torchrun"
    assert streaming._describe_writers([Path("a.npy.progress.json")]) == "1 process"
