"""Shared test fixtures: tiny open_clip configs (registered here), the golden case, script runners."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
CONFIGS = TESTS / "configs"
GOLDEN = TESTS / "golden"  # a copy of the original code's outputs on prsclip-tiny (see golden/README.md)
GOLDEN_WEIGHTS = GOLDEN / "prsclip-tiny_seed0.safetensors"

sys.path.insert(0, str(REPO))
import open_clip  # noqa: E402

open_clip.add_model_config(CONFIGS)  # prsclip-tiny(-quickgelu), tiny-ls, tiny-noln-p8, and unsupported ones

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter of the model non-trivial random values (LayerNorm gains ~1, biases ~0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and ("ln" in name or "gamma" in name) and name.endswith(("weight", "gamma")):
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


def run_script(script: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a top-level script through its command line (with the tests' configs registered)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def run_inprocess(script: str, *args: str) -> tuple[int, str, str]:
    """Run a script's command line in this process (argv parsing, ``main``, error handling): (code, out, err).

    Same path as the command line (``utils.cli.run``) without paying Python + torch start-up per call.
    """
    import contextlib
    import importlib.util
    import io

    from utils.cli import run

    spec = importlib.util.spec_from_file_location(Path(script).stem, REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
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
