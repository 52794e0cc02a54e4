"""Nothing is lost, nothing is mixed up: kill -9 and resume, resume states, provenance records and mismatch checks,
float16 range, one-line errors for bad input, dataset splits, pickling for spawn workers, and torchrun."""
import filecmp
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (CONFIGS, GOLDEN, GOLDEN_WEIGHTS, REPO, TINY_ARGS, cifar_fixture, free_port, run_inprocess,
                      run_killed)

IMAGES = ["--dataset", "golden", "--data_path", str(GOLDEN / "images"), "--num_workers", "0"]
PRS = ["golden_attn_prsclip-tiny.npy", "golden_mlp_prsclip-tiny.npy", "golden_cls_attn_prsclip-tiny.npy"]
GOLDEN_SHA256 = "d6cbeac829cd2051ef480c614478d4a3d9d4f89a74d744110a89ec3f47f7f622"
QUICK = ["--model_config", str(CONFIGS), "--model", "prsclip-tiny-quickgelu", "--pretrained", str(GOLDEN_WEIGHTS),
         "--device", "cpu"]


def _ok(script, *args):
    code, out, err = run_inprocess(script, *map(str, args))
    assert code == 0, f"{script} failed ({code}):\n{out}\n{err}"
    return out, err


def _error_line(err: str) -> str:
    """The one error line (tqdm bars may precede it); fails on a traceback or several error lines."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def _finals(folder: Path) -> list[str]:
    """Files under final names (not .partial, progress or provenance records)."""
    return sorted(p.name for p in Path(folder).rglob("*") if p.is_file() and not p.name.endswith(
        (".partial", ".progress.json", ".provenance.json")) and ".progress.rank" not in p.name)


@pytest.fixture(scope="module")
def clean_prs(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    _ok("compute_prs.py", *TINY_ARGS, *IMAGES, "--batch_size", "2", "--output_dir", out)
    return out


# ----------------------------------------------------------------------------- kill -9 and resume
@pytest.mark.parametrize("script,args,files", [
    ("compute_prs.py", [*TINY_ARGS, *IMAGES], PRS),
    ("compute_representations.py", [*QUICK, *IMAGES],
     ["golden_train_representations_prsclip-tiny-quickgelu_prsclip-tiny_seed0.npy"]),
])
def test_kill9_then_resume_is_byte_identical(tmp_path, script, args, files):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _ok(script, *args, "--batch_size", "2", "--output_dir", clean)
    res = run_killed(script, 4, *args, "--batch_size", "2", "--output_dir", killed)
    assert res.returncode == -signal.SIGKILL, res.stderr
    for f in files:
        assert not (killed / f).exists() and (killed / f"{f}.partial").exists()
    progress = json.loads((killed / f"{files[0]}.progress.json").read_text())
    assert progress["done"] == 4  # two whole batches were on disk when it died
    out, _ = _ok(script, *args, "--batch_size", "2", "--output_dir", killed, "--resume")
    assert "Resuming at image 4 of 6" in out
    for f in files:
        assert filecmp.cmp(clean / f, killed / f, shallow=False), f
    assert not list(killed.glob("*.partial")) and not list(killed.glob("*.progress*"))


def test_resume_states(tmp_path, clean_prs):
    base = [*TINY_ARGS, *IMAGES, "--batch_size", "2", "--output_dir", tmp_path]
    out, _ = _ok("compute_prs.py", *base, "--resume")  # nothing to resume
    assert "starting fresh" in out
    for f in PRS:
        assert filecmp.cmp(clean_prs / f, tmp_path / f, shallow=False)
    stamps = {f: (tmp_path / f).stat().st_mtime_ns for f in PRS}
    out, _ = _ok("compute_prs.py", *base, "--resume")  # finished, same run: nothing to do
    assert "already complete" in out
    assert stamps == {f: (tmp_path / f).stat().st_mtime_ns for f in PRS}
    # finished outputs of another run (float32) are not overwritten by a --resume in float16
    code, _, err = run_inprocess("compute_prs.py", *base, "--resume", "--dtype", "float16")
    assert code == 2 and "another run" in _error_line(err)
    assert stamps == {f: (tmp_path / f).stat().st_mtime_ns for f in PRS}
    # without --resume a new run replaces them
    _ok("compute_prs.py", *base, "--dtype", "float16")
    assert np.load(tmp_path / PRS[0]).dtype == np.float16


def test_resume_refuses_another_runs_partial_files(tmp_path):
    base = [*TINY_ARGS, *IMAGES, "--batch_size", "2", "--output_dir", tmp_path]
    assert run_killed("compute_prs.py", 2, *base).returncode == -signal.SIGKILL
    code, _, err = run_inprocess("compute_prs.py", *base, "--resume", "--force_quick_gelu")
    line = _error_line(err)
    assert code == 2 and "different run" in line and "force_quick_gelu" in line
    assert _finals(tmp_path) == ["golden_labels.npy"]


def test_crash_between_renames_is_completed_by_resume(tmp_path, clean_prs, monkeypatch):
    import compute_prs
    import utils.files.atomic

    real, seen = utils.files.atomic.os.replace, []

    def crash_on_second_rename(src, dst):
        if Path(dst).name in PRS:  # the streamed arrays (not the labels, written before)
            seen.append(dst)
            if len(seen) == 2:
                raise OSError("simulated crash between renames")
        return real(src, dst)

    args = [*TINY_ARGS, *IMAGES, "--batch_size", "2", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(utils.files.atomic.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated"):
        compute_prs.main(compute_prs.get_args_parser().parse_args(args))
    monkeypatch.setattr(utils.files.atomic.os, "replace", real)
    assert (tmp_path / PRS[0]).exists() and not (tmp_path / PRS[1]).exists()
    out, _ = _ok("compute_prs.py", *args, "--resume")
    assert "finishing the renames" in out
    for f in PRS:
        assert filecmp.cmp(clean_prs / f, tmp_path / f, shallow=False), f
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.progress*"))


# ----------------------------------------------------------------------------- provenance
def test_provenance_records(tmp_path, clean_prs):
    record = json.loads((clean_prs / f"{PRS[0]}.provenance.json").read_text())
    assert record["file"] == PRS[0] and record["script"] == "compute_prs.py"
    assert record["model"] == "prsclip-tiny" and record["dataset"] == "golden" and record["num_images"] == 6
    assert record["pretrained"]["sha256"] == GOLDEN_SHA256
    assert record["pretrained"]["size"] == GOLDEN_WEIGHTS.stat().st_size
    assert record["data_path"] == str((GOLDEN / "images").resolve())
    assert record["dtype"] == "float32" and record["shape"] == [6, 4, 4, 32]
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"]
    assert "compute_prs.py" in record["command"] and "--batch_size 2" in record["command"]
    assert record["git_commit"] is None or len(record["git_commit"]) == 40
    labels = json.loads((clean_prs / "golden_labels.npy.provenance.json").read_text())
    assert labels["num_images"] == 6 and labels["pretrained"] == record["pretrained"]


def test_classifier_from_other_weights_is_refused(tmp_path, clean_prs):
    work = tmp_path / "work"
    work.mkdir()
    for f in clean_prs.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    # a classifier made with other weights (random init) under the name compute_ablations.py reads
    _ok("compute_text_projection.py", "--model_config", CONFIGS, "--model", "prsclip-tiny", "--pretrained", "none",
        "--device", "cpu", "--dataset", "golden", "--classnames", GOLDEN / "text" / "classnames.txt",
        "--output_dir", work)
    code, _, err = run_inprocess("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden",
                                 "--input_dir", work, "--figures_dir", work)
    line = _error_line(err)
    assert code == 2 and "pretrained" in line and "golden_classifier_prsclip-tiny.npy" in line and "golden_" in line
    assert not (work / "golden_ablations_prsclip-tiny.json").exists()
    out, _ = _ok("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir", work,
                 "--figures_dir", work, "--allow_mismatch")
    assert "warning:" in out and (work / "golden_ablations_prsclip-tiny.json").exists()
    assert (work / "golden_ablations_prsclip-tiny.json.provenance.json").exists()


def test_classifier_for_another_dataset_is_refused(tmp_path, clean_prs):
    work = tmp_path / "work"
    work.mkdir()
    for f in clean_prs.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    _ok("compute_text_projection.py", *TINY_ARGS, "--dataset", "sample", "--output_dir", tmp_path)
    (work / "golden_classifier_prsclip-tiny.npy").write_bytes((tmp_path / "sample_classifier_prsclip-tiny.npy")
                                                              .read_bytes())
    record = json.loads((tmp_path / "sample_classifier_prsclip-tiny.npy.provenance.json").read_text())
    (work / "golden_classifier_prsclip-tiny.npy.provenance.json").write_text(json.dumps(record))
    code, _, err = run_inprocess("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden",
                                 "--input_dir", work, "--figures_dir", work)
    assert code == 2 and "dataset='sample'" in _error_line(err)


# ----------------------------------------------------------------------------- float16 range
def test_float16_overflow_stops_with_a_message(tmp_path):
    code, _, err = run_inprocess("compute_second_order_neuron_prs.py", *QUICK, *IMAGES, "--mlp_layer", "1",
                                 "--coefficient", "1e7", "--dtype", "float16", "--output_dir", tmp_path)
    line = _error_line(err)
    assert code == 2 and "float16's range" in line and "--dtype float32" in line
    assert _finals(tmp_path) == ["golden_train_labels.npy"]


# ----------------------------------------------------------------------------- bad input: one line each
def _corrupt_folder(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "good.png").write_bytes((GOLDEN / "images" / "0_living" / "astronaut.png").read_bytes())
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def _bad_inputs(tmp: Path) -> dict:
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "garbage.safetensors").write_bytes(bytes(range(256)) * 4)
    (tmp / "imagenet" / "val" / "n01440764").mkdir(parents=True)
    (tmp / "empty.txt").write_text("")
    (tmp / "garbage.mat").write_bytes(b"MATLAB garbage" * 10)
    prs = ["compute_prs.py", *TINY_ARGS, "--num_workers", "0"]
    golden = ["--dataset", "golden", "--data_path", str(GOLDEN / "images")]
    out = ["--output_dir", str(tmp / "out")]
    model = ["--model_config", str(CONFIGS), "--device", "cpu", "--dataset", "golden", "--data_path",
             str(GOLDEN / "images"), "--num_workers", "0", *out]
    return {
        "missing data folder": ([*prs, "--dataset", "golden", "--data_path", str(tmp / "nope"), *out], "nope"),
        "empty data folder": ([*prs, "--dataset", "golden", "--data_path", str(tmp / "empty"), *out], "empty"),
        "corrupt image": ([*prs, "--dataset", "golden", "--data_path", str(_corrupt_folder(tmp / "corrupt")), *out],
                          "broken.png"),
        "corrupt image, 2 workers": ([*prs[:-2], "--num_workers", "2", "--dataset", "golden", "--data_path",
                                      str(tmp / "corrupt"), *out], "broken.png"),
        "unknown model": (["compute_prs.py", *model, "--model", "ViT-Nope-14", "--pretrained", "none"], "ViT-Nope-14"),
        "missing checkpoint": (["compute_prs.py", *model, "--model", "prsclip-tiny", "--pretrained",
                                str(tmp / "nope.safetensors")], "nope.safetensors"),
        "garbage checkpoint": (["compute_prs.py", *model, "--model", "prsclip-tiny", "--pretrained",
                                str(tmp / "garbage.safetensors")], "garbage.safetensors"),
        "batch size 0": ([*prs, *golden, "--batch_size", "0", *out], "--batch_size"),
        "output folder is a file": ([*prs, *golden, "--output_dir", str(tmp / "a_file")], "a_file"),
        "imagenet without metadata": ([*prs, "--dataset", "imagenet", "--data_path", str(tmp / "imagenet"), *out],
                                      "meta"),
        "ablations without inputs": (["compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden",
                                      "--input_dir", str(tmp / "empty"), "--figures_dir", str(tmp / "out")],
                                     "golden_attn_prsclip-tiny.npy"),
        "empty text set": (["compute_text_set_projection.py", *TINY_ARGS, "--data_path", str(tmp / "empty.txt"), *out],
                           "empty.txt"),
        "garbage .mat": (["compute_segmentations.py", *TINY_ARGS, "--image_size", "64", "--data_path",
                          str(tmp / "garbage.mat"), "--classifier_dir", str(GOLDEN / "prs"), "--classifier_dataset",
                          "golden", *out], "garbage.mat"),
    }


BAD = [
    "missing data folder", "empty data folder", "corrupt image", "corrupt image, 2 workers", "unknown model",
    "missing checkpoint", "garbage checkpoint", "batch size 0", "output folder is a file",
    "imagenet without metadata", "ablations without inputs", "empty text set", "garbage .mat"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_line(tmp_path, case):
    argv, culprit = _bad_inputs(tmp_path)[case]
    code, out, err = run_inprocess(*argv)
    assert code == 2, (code, out, err)
    # argparse's own errors print the usage first, then the one error line
    line = err.strip().splitlines()[-1] if case == "batch size 0" else _error_line(err)
    assert culprit in line, line
    if (tmp_path / "out").is_dir():  # no result under a final name (labels are complete before any image is read)
        assert [f for f in _finals(tmp_path / "out") if not f.endswith("_labels.npy")] == []


# ----------------------------------------------------------------------------- datasets: splits and pickling
def test_cifar_split_is_honoured(tmp_path):
    cifar_fixture(tmp_path / "data", "CIFAR10", train_labels=[0, 2, 4, 6, 8, 9])
    common = [*QUICK, "--dataset", "CIFAR10", "--data_path", tmp_path / "data", "--num_workers", "0",
              "--output_dir", tmp_path]
    _ok("compute_representations.py", *common, "--split", "train")
    _ok("compute_representations.py", *common, "--split", "test")
    # torchvision's train split is the five data batches (the fixture writes the same six images in each)
    np.testing.assert_array_equal(np.load(tmp_path / "CIFAR10_train_classes.npy"), [0, 2, 4, 6, 8, 9] * 5)
    np.testing.assert_array_equal(np.load(tmp_path / "CIFAR10_test_classes.npy"), [3, 1, 4, 1, 5, 9])
    name = "CIFAR10_{}_representations_prsclip-tiny-quickgelu_prsclip-tiny_seed0.npy"
    train, test = np.load(tmp_path / name.format("train")), np.load(tmp_path / name.format("test"))
    np.testing.assert_allclose(train[:6], test[::-1], atol=1e-4)  # the train split holds the test images reversed
    code, _, err = run_inprocess("compute_representations.py", *map(str, common), "--split", "val")
    assert code == 2 and "train, test" in _error_line(err)


def test_waterbirds_split_is_honoured(tmp_path, waterbirds_root):
    from utils.datasets import build_dataset

    assert len(build_dataset("binary_waterbirds", str(waterbirds_root))) == 4  # test (default)
    assert len(build_dataset("binary_waterbirds", str(waterbirds_root), split="train")) == 1
    with pytest.raises(ValueError, match="train, val, test"):
        build_dataset("binary_waterbirds", str(waterbirds_root), split="valid")


def _first_item_in_spawned_worker(ds):
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, multiprocessing_context="spawn")
    return next(iter(loader))


def test_datasets_pickle_for_spawn_workers(tmp_path):
    from torchvision import transforms

    from utils.datasets import build_dataset

    cifar_fixture(tmp_path / "data", "CIFAR100")
    tf = transforms.ToTensor()
    cifar = build_dataset("CIFAR100", str(tmp_path / "data"), tf, split="train")
    clone = pickle.loads(pickle.dumps(cifar))
    assert type(clone) is type(cifar) and np.array_equal(clone.labels, cifar.labels)
    folder = build_dataset("golden", str(GOLDEN / "images"), transforms.Compose([transforms.Resize(32),
                                                                                  transforms.CenterCrop(32), tf]))
    images, labels = _first_item_in_spawned_worker(cifar)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == list(cifar.labels[:2])
    images, labels = _first_item_in_spawned_worker(folder)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 0]


# ----------------------------------------------------------------------------- torchrun (gloo, 2 processes)
def test_torchrun_two_processes_byte_identical_and_resumable(tmp_path, clean_prs):
    args = [*TINY_ARGS, *IMAGES, "--batch_size", "2"]
    two = tmp_path / "two"
    _torchrun(args, two)
    for f in PRS:
        assert filecmp.cmp(clean_prs / f, two / f, shallow=False), f
    # rank 1 (images 4..5) is killed; rank 0 finished its rows; a --resume completes only what is missing
    killed = tmp_path / "killed"
    res = run_killed("compute_prs.py", 5, *args, "--output_dir", killed, torchrun=2)
    assert res.returncode != 0 and not (killed / PRS[0]).exists()
    ranks = [json.loads((killed / f"{PRS[0]}.progress.rank{r}.json").read_text()) for r in range(2)]
    # rank 1 died before its first batch; torchrun then stops rank 0 wherever it was (0, 2 or 4 rows done)
    assert ranks[1]["done"] == 0 and ranks[0]["done"] in (0, 2, 4)
    _torchrun([*args, "--resume"], killed)
    for f in PRS:
        assert filecmp.cmp(clean_prs / f, killed / f, shallow=False), f
    assert not list(killed.glob("*.progress*")) and not list(killed.glob("*.partial"))


def _torchrun(args, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "compute_prs.py"), *map(str, args), "--output_dir", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


# ----------------------------------------------------------------------------- utils.cli: numerics and errors
def test_tf32_is_off_unless_asked(tmp_path):
    import argparse

    from utils.cli import run

    seen = {}

    def main(args):
        seen[args.allow_tf32] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                 torch.get_float32_matmul_precision())

    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
        run(main, argparse.ArgumentParser(), [])
        run(main, argparse.ArgumentParser(), ["--allow_tf32"])
    finally:
        from utils.cli import configure_torch
        configure_torch(False)
    assert seen[False] == (False, False, "highest") and seen[True] == (True, True, "high")


def test_real_errors_keep_their_traceback_and_oom_gets_a_hint(capsys):
    import argparse

    from utils.cli import run

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--batch_size", type=int, default=64)

    def bug(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not turned into an input error
        run(bug, parser, [])

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(SystemExit) as e:
        run(oom, argparse.ArgumentParser(parents=[parser], add_help=False), [])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" in err and "Tried to allocate" in err
    assert "try a smaller --batch_size (now 64)" in err.strip().splitlines()[-1]


def test_resume_refuses_another_data_path(tmp_path):
    other = tmp_path / "copy"
    for p in (GOLDEN / "images").rglob("*.png"):
        (other / p.parent.name).mkdir(parents=True, exist_ok=True)
        (other / p.parent.name / p.name).write_bytes(p.read_bytes())
    base = [*TINY_ARGS, "--dataset", "golden", "--num_workers", "0", "--batch_size", "2", "--output_dir", tmp_path]
    assert run_killed("compute_prs.py", 2, *base, "--data_path", GOLDEN / "images").returncode == -signal.SIGKILL
    code, _, err = run_inprocess("compute_prs.py", *map(str, base), "--data_path", str(other), "--resume")
    assert code == 2 and "data_path" in _error_line(err)


# ----------------------------------------------------------------------------- a newcomer's mistakes (issue 17)
@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_uncached_weights_fail_fast_and_create_nothing(tmp_path, hub):
    """A tag whose weights are not cached: one line in seconds (not a minute of retries), no folder left behind."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO))
    env.pop("HF_HUB_OFFLINE", None)
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a hub that refuses connections (nothing listens on that port), so the test needs no network
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "output_dir"
    cmd = [sys.executable, "compute_prs.py", "--dataset", "sample", "--model", "ViT-B-16", "--pretrained",
           "laion2b_s34b_b88k", "--device", "cpu", "--output_dir", str(out)]
    import time

    start = time.monotonic()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert res.returncode == 2, res.stderr
    line = _error_line(res.stderr)
    assert "laion2b_s34b_b88k" in line and "not cached" in line and "prsclip-tiny" in line, line
    assert ("HF_HUB_OFFLINE" in line) == (hub == "offline")
    assert "Retrying" not in res.stderr and "Retrying" not in res.stdout
    assert not out.exists()
    assert seconds < 30, seconds  # python + torch start-up included; the retries took ~50 s


def test_splice_scripts_check_their_backbone_weights_first(tmp_path):
    """SpLiCE's scripts name their backbone as [library:]model: its open_clip weights are checked before any work
    (their --cache_dir holds concept embeddings and is not where weights are looked for)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    for cmd in (["decompose_image.py", "-path", str(tmp_path / "missing.png"), "-out_path", str(out)],
                ["decompose_data.py", "-dataset", "sample", "-out_path", str(out / "d.txt"), "--cache_dir",
                 str(tmp_path / "concepts")]):
        res = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        line = _error_line(res.stderr)
        assert "laion2b_s34b_b79k" in line and "ViT-B-32" in line and "not cached" in line, line
        assert not out.exists() and not (tmp_path / "concepts").exists()


def test_newcomer_mistakes_are_one_line_before_any_work(tmp_path, monkeypatch):
    """A CUDA device without a GPU, an output folder that cannot be written, CIFAR not downloaded without network,
    a truncated input file: one line each, exit 2, checked before any model is loaded or folder made."""
    import utils.datasets

    base = ["compute_prs.py", *TINY_ARGS[:-2], "--dataset", "sample", "--num_workers", "0"]
    out = ["--output_dir", str(tmp_path / "out")]
    if not torch.cuda.is_available():
        code, _, err = run_inprocess(*base, "--device", "cuda:0", *out)
        assert code == 2 and "--device cuda:0" in _error_line(err) and "no usable CUDA GPU" in err
        for script in ("compute_complete_text_set.py", "compute_sparse_decomposition.py"):
            code, _, err = run_inprocess(script, "--device", "cuda", "--input_dir", str(tmp_path), *out)
            assert code == 2 and "--device cuda" in _error_line(err), (script, err)
        assert not (tmp_path / "out").exists()
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_inprocess(*base, "--device", "cpu", "--output_dir", str(tmp_path / "a_file" / "out"))
    assert code == 2 and "a_file is a file" in _error_line(err)
    if not os.access("/proc/sys", os.W_OK):  # a read-only file system
        code, _, err = run_inprocess(*base, "--device", "cpu", "--output_dir", "/proc/sys/prsclip_out")
        assert code == 2 and "/proc/sys is not writable" in _error_line(err)
    code, _, err = run_inprocess("compute_text_projection.py", *TINY_ARGS, "--dataset", "sample",
                                 "--output_dir", str(tmp_path / "a_file"))
    assert code == 2 and "a_file" in _error_line(err)  # before the classifier is computed
    # CIFAR-10 not there, and the download fails (a URL that cannot be fetched: no network needed)
    monkeypatch.setattr(utils.datasets._CIFAR10Files, "url", (tmp_path / "nowhere" / "cifar.tar.gz").as_uri())
    code, _, err = run_inprocess(*base, "--device", "cpu", "--dataset", "CIFAR10", "--data_path",
                                 str(tmp_path / "cifar"), *out)
    line = _error_line(err)
    assert code == 2 and "cifar-10-batches-py" in line and "tar xzf" in line, line
    # a truncated .npy input
    work = tmp_path / "work"
    work.mkdir()
    for f in (GOLDEN / "prs").iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    attn = work / "golden_attn_prsclip-tiny.npy"
    attn.write_bytes(attn.read_bytes()[:-100])
    code, _, err = run_inprocess("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden",
                                 "--input_dir", str(work), "--figures_dir", str(tmp_path / "figs"))
    line = _error_line(err)
    assert code == 2 and "golden_attn_prsclip-tiny.npy: truncated" in line and "bytes" in line, line
