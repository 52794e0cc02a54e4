"""Shared test fixtures: tiny open_clip configs (registered here), the golden case, script runners."""
from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
CONFIGS = TESTS / "configs"
GOLDEN = TESTS / "golden"  # a copy of the original code's outputs on prsclip-tiny (see golden/README.md)
GOLDEN_WEIGHTS = GOLDEN / "prsclip-tiny_seed0.safetensors"

sys.path.insert(0, str(REPO))
import open_clip  # noqa: E402

from utils.models import register_model_config  # noqa: E402

# prsclip-tiny(-quickgelu), tiny-ls, tiny-noln-p8, the pooled towers, ..., and the tiny timm trunks they name
register_model_config(str(CONFIGS))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter of the model non-trivial random values (LayerNorm gains ~1, biases ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("ln" in name or "norm" in name or "gamma" in name) and \
                    name.endswith(("weight", "gamma", "gamma_1", "gamma_2")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1 and not name.endswith(("class_embedding", "logit_scale")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("logit_scale"):
                p.fill_(np.log(1 / 0.07))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
    return model.eval()


def tiny_model(name: str, seed: int = 0, **kwargs):
    """A randomly initialised tiny registered model (model, preprocess) in eval mode."""
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kwargs)
    return randomize_(model, seed), preprocess


@pytest.fixture(scope="session")
def golden_model():
    """prsclip-tiny with the golden weights (GELU)."""
    model, _, preprocess = open_clip.create_model_and_transforms("prsclip-tiny", pretrained=str(GOLDEN_WEIGHTS))
    return model.eval(), preprocess


@pytest.fixture(scope="session")
def golden_images() -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / "inputs" / "preprocessed.npy"))


# ----------------------------------------------------------------------------- datasets in their real formats
@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """torchvision ImageNet val layout: meta.bin + val/<wnid>/*.JPEG (2 classes x 3 images). The files hold the
    golden images losslessly (PNG data under ImageNet's names; PIL reads by content), so the numbers must be the
    golden ones."""
    root = tmp_path_factory.mktemp("imagenet")
    wnids = ["n01440764", "n01443537"]
    torch.save(({wnids[0]: ("tench",), wnids[1]: ("goldfish",)}, wnids * 3), root / "meta.bin")
    for i, png in enumerate(sorted((GOLDEN / "images").rglob("*.png"))):
        d = root / "val" / wnids[i // 3]
        d.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(d / f"ILSVRC2012_val_{i + 1:08d}.JPEG", format="PNG")
    return root


@pytest.fixture(scope="session")
def waterbirds_root(tmp_path_factory) -> Path:
    """metadata.csv (img_id, img_filename, y, split, place, place_filename) with train/val/test rows."""
    root = tmp_path_factory.mktemp("waterbirds")
    rows = []
    for i, png in enumerate(sorted((GOLDEN / "images").rglob("*.png"))):
        rel = f"{i:03d}.Bird/img_{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(root / rel)
        rows.append({"img_id": i + 1, "img_filename": rel, "y": i % 2, "split": [2, 0, 2, 1, 2, 2][i],
                     "place": (i // 2) % 2, "place_filename": f"/x/{i}.jpg"})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def run_script(script: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a top-level script through its command line (with the tests' configs registered)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def script_module(script: str, name: Optional[str] = None):
    """The script at ``script`` (from the repository root) loaded as a module named ``name`` (default: its stem),
    registered in ``sys.modules`` unless that name is taken (dataclasses look their module up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def run_inprocess(script: str, *args: str) -> tuple[int, str, str]:
    """Run a script's command line in this process (argv parsing, ``main``, error handling): (code, out, err).

    Same path as the command line (``utils.cli.run``) without paying Python + torch start-up per call.
    """
    import contextlib
    import io

    from utils.cli import run

    module = script_module(script)
    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(module.main, module.get_args_parser())
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


TINY_ARGS = ["--model_config", str(CONFIGS), "--model", "prsclip-tiny", "--pretrained", str(GOLDEN_WEIGHTS),
             "--device", "cpu"]


def cifar_fixture(root: Path, name: str, train_labels=None) -> np.ndarray:
    """CIFAR10/100 files in torchvision's layout, made of the 6 golden photos at 32x32; returns the test labels.

    The train split holds the same images reversed, labelled ``train_labels`` (default: the test labels), so a
    run that reads the wrong split shows it.
    """
    from PIL import Image

    pngs = sorted((GOLDEN / "images").rglob("*.png"))
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in pngs])
    data = imgs.transpose(0, 3, 1, 2).reshape(len(imgs), -1)
    labels = [3, 1, 4, 1, 5, 9]
    train = {"data": data[::-1].copy(), "labels": list(train_labels if train_labels is not None else labels)}
    test = {"data": data, "labels": labels}
    if name == "CIFAR10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / f, "wb") as fh:
                pickle.dump(test if f == "test_batch" else train, fh)
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for f, part in [("train", train), ("test", test)]:
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": part["data"], "fine_labels": part["labels"]}, fh)
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, fh)
    return np.array(labels)


KILL_HARNESS = TESTS / "kill_harness.py"


def run_killed(script: str, at: int, *args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run ``script`` and SIGKILL it when the streaming loop reaches image ``at`` (tests/kill_harness.py);
    ``torchrun=N`` runs it as N processes under torchrun (gloo)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PRSCLIP_KILL_AT=str(at))
    cmd = [sys.executable, str(KILL_HARNESS), str(REPO / script), *map(str, args)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port",
               str(free_port()), *cmd[1:]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

