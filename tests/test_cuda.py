"""GPU checks: the golden numbers, the sum rule, OMP, ADMM and the active set, float16 storage and a multi-worker
DataLoader on CUDA, each against its CPU result or the golden files, and TF32 off by default in script runs.

Every test takes a ``device``: the ``cuda`` case is marked ``cuda`` and skipped without a GPU (run only those
with ``pytest -m cuda tests/test_cuda.py``; ``bench/gpu_check.sh`` runs this whole file). Where the check is
against golden files, a ``cpu`` case runs everywhere too, so its logic is exercised on machines without a GPU;
where it compares a device with the CPU, only the ``cuda`` case exists. Tolerances are the golden ones (float32 on
CPU): with TF32 off the GPU must meet them too.
"""
from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, GOLDEN_WEIGHTS, REPO, TINY_ARGS, run_inprocess, run_script, tiny_model

from prs_hook import Decomposer, hook_prs_logger
from utils.cli import configure_torch

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])
DEVICES = ["cpu", CUDA]
PRS = GOLDEN / "prs"
SO = GOLDEN / "second_order"
SEG = GOLDEN / "segmentation"


@pytest.fixture(autouse=True)
def exact_float32():
    """What every script does first (utils.cli.run): TF32 off; the previous settings are restored after."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    configure_torch(allow_tf32=False)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_float32_matmul_precision(before[2])


def golden_model(device: str, name: str = "prsclip-tiny") -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=str(GOLDEN_WEIGHTS)).eval().to(device)


def golden_images() -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / "inputs" / "preprocessed.npy"))


def decompose(model, x, device, spatial=False):
    """(logger, representation, attentions, mlps) on ``device``, copied to the CPU."""
    prs = hook_prs_logger(model, device, spatial=spatial)
    r = prs.encode_image(x)
    attn, mlps = prs.finalize(r)
    return prs, r.cpu(), attn.cpu(), mlps.cpu()


def float16_close(half: np.ndarray, ref: np.ndarray, atol: float = 1e-6) -> bool:
    """``half`` is ``ref`` rounded to float16: within half a float16 ulp (relative 2^-11, absolute 2^-25 among the
    subnormals) plus ``atol`` for the float32 difference between the two runs."""
    assert half.dtype == np.float16 and half.shape == ref.shape
    err = np.abs(half.astype(np.float64) - ref.astype(np.float64))
    return bool(np.all(err <= np.abs(ref) * 2.0 ** -11 + 2.0 ** -25 + atol))


def test_float16_close_is_tight():
    """The helper accepts a correct rounding and rejects one float16 step off (so it can fail)."""
    rng = np.random.default_rng(0)
    ref = (rng.standard_normal(1000) * np.logspace(-8, 1, 1000)).astype(np.float32)
    half = ref.astype(np.float16)
    assert float16_close(half, ref, atol=0)
    off = half.copy()
    off[500] = np.nextafter(off[500], np.float16(np.inf))  # one float16 ulp up
    assert not float16_close(off, ref, atol=0)


# ----------------------------------------------------------------------------- golden numbers and the sum rule
@pytest.mark.parametrize("device", DEVICES)
def test_golden_first_order(device):
    prs, r, attn, mlps = decompose(golden_model(device), golden_images(), device)
    np.testing.assert_allclose(r.numpy(), np.load(PRS / "encode_image.npy"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(attn.numpy(), np.load(PRS / "golden_attn_prsclip-tiny.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(mlps.numpy(), np.load(PRS / "golden_mlp_prsclip-tiny.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(prs.cls_attentions.cpu().numpy(), np.load(PRS / "golden_cls_attn_prsclip-tiny.npy"),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_golden_spatial(device):
    _, _, attn, mlps = decompose(golden_model(device), golden_images()[:1], device, spatial=True)
    np.testing.assert_allclose(attn[0].numpy(), np.load(PRS / "spatial_attn_img0.npy"), atol=1e-6, rtol=0)
    np.testing.assert_allclose(mlps[0].numpy(), np.load(PRS / "spatial_mlp_img0.npy"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_golden_second_order(device):
    from utils.neurons.effects import SecondOrderEffects

    effects, r = SecondOrderEffects(golden_model(device, "prsclip-tiny-quickgelu"), 1, device)(golden_images())
    merged = np.load(SO / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_merged.npy")
    np.testing.assert_allclose(effects.cpu().numpy(), merged, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.cpu().numpy(), np.load(SO / "encode_image_quickgelu.npy"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_golden_segmentation_heatmaps(device):
    import utils.segmentation as seg

    model = golden_model(device)
    engine = Decomposer(model, device)
    grid, patch = seg.grid_and_patch(model)
    x = torch.from_numpy(np.load(SEG / "preprocessed.npy"))
    t = torch.from_numpy(np.load(SEG / "targets.npy"))
    classifier = torch.from_numpy(np.load(PRS / "golden_classifier_prsclip-tiny.npy")).to(device)
    out = seg.evaluate_batch(engine, x, t, classifier, grid, patch, spatial="sum")
    np.testing.assert_allclose(out["pred"], np.load(SEG / "heatmaps.npy"), atol=1e-5, rtol=0)
    per_image = json.loads((SEG / "segmentation.json").read_text())["per_image"]
    np.testing.assert_array_equal(out["inter"], [p["inter"] for p in per_image])
    np.testing.assert_array_equal(out["union"], [p["union"] for p in per_image])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["prsclip-tiny-quickgelu", "tiny-ls", "tiny-noln-p8"])
@pytest.mark.parametrize("spatial", [False, True, "sum"])
def test_sum_rule(device, name, spatial):
    model, _ = tiny_model(name, seed=1)
    model = model.to(device)
    x = torch.randn(3, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(0))
    _, r, attn, mlps = decompose(model, x, device, spatial)
    with torch.no_grad():
        ref = model.encode_image(x.to(device)).cpu()
    total = (attn.sum(1) if spatial == "sum" else attn.flatten(1, -2).sum(1)) + mlps.sum(1)
    torch.testing.assert_close(total, F.normalize(ref, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(r, ref, atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def copy_warning(expected: bool):
    """Expect the logger's 'float32 copy' warning, or no warning at all."""
    if expected:
        with pytest.warns(UserWarning, match="float32 copy"):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield


@pytest.mark.parametrize("device", [CUDA])  # the cpu case would compare the CPU with itself
def test_model_on_the_other_device(device):
    """A model on the CPU with a logger on ``device`` (and the reverse): the numbers of a same-device run."""
    model = golden_model("cpu")
    x = golden_images()[:2]
    _, _, attn_ref, mlps_ref = decompose(model, x, "cpu")
    with copy_warning(device != "cpu"):
        _, _, attn, mlps = decompose(model, x, device)
    torch.testing.assert_close(attn, attn_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(mlps, mlps_ref, atol=1e-6, rtol=0)
    with copy_warning(device != "cpu"):
        _, _, attn_back, _ = decompose(golden_model(device), x, "cpu")
    torch.testing.assert_close(attn_back, attn_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_and_autocast(device, dtype):
    """A half-precision model on ``device`` is decomposed in float32 (its weights upcast), also inside autocast."""
    model = golden_model("cpu").to(dtype)
    x = golden_images()[:2]
    _, _, attn_ref, mlps_ref = decompose(copy.deepcopy(model).float(), x, "cpu")
    with copy_warning(True):
        _, _, attn, mlps = decompose(model.to(device), x, device)
    torch.testing.assert_close(attn, attn_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(mlps, mlps_ref, atol=1e-6, rtol=0)
    with torch.autocast(torch.device(device).type, dtype=dtype):  # a float32 model inside autocast
        _, _, attn_ac, _ = decompose(golden_model(device), x, device)
    assert attn_ac.dtype == torch.float32
    np.testing.assert_allclose(attn_ac.numpy(), np.load(PRS / "golden_attn_prsclip-tiny.npy")[:2], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- OMP and ADMM against the CPU
def _sparse_problem(dtype, T=600, d=48, n=64, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, d)) * rng.uniform(0.5, 2.0, (T, 1))
    return torch.from_numpy(D).to(dtype), torch.from_numpy(rng.standard_normal((n, d))).to(dtype)


@pytest.mark.parametrize("device", [CUDA])  # the cpu case would compare the CPU with itself
def test_omp_matches_cpu(device):
    from utils.solvers.omp import omp

    D, X = _sparse_problem(torch.float64)
    cpu = omp(D, X, 12, device="cpu")
    dev = omp(D, X, 12, device=device, batch_size=20)  # several chunks
    np.testing.assert_array_equal(dev.indices, cpu.indices)  # float64: the same greedy choices, in order
    np.testing.assert_allclose(dev.coefs, cpu.coefs, atol=1e-9, rtol=0)
    D32, X32 = D.float(), X.float()
    cpu32 = omp(D32, X32, 12, device="cpu").to_dense()
    dev32 = omp(D32, X32, 12, device=device).to_dense()
    same = [np.array_equal(a != 0, b != 0) for a, b in zip(cpu32, dev32)]
    assert np.mean(same) >= 0.95  # float32 near-ties may pick another atom on another device
    np.testing.assert_allclose(dev32[same], cpu32[same], atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", [CUDA])  # the cpu case would compare the CPU with itself
def test_admm_matches_cpu(device):
    from utils.solvers.nnlasso import nnlasso_admm

    D, X = _sparse_problem(torch.float64, T=200, d=24, n=16)
    kwargs = dict(l1_penalty=2.0, tol=1e-9, max_iter=20000, seed=3, batch_size=8)
    cpu, it_cpu = nnlasso_admm(D, X, device="cpu", return_iters=True, **kwargs)
    dev, it_dev = nnlasso_admm(D, X, device=device, return_iters=True, **kwargs)
    assert max(it_cpu) < 20000 and max(it_dev) < 20000  # both converged
    assert (cpu > 0).sum(1).mean() < 100  # sparse
    np.testing.assert_allclose(dev, cpu, atol=1e-7, rtol=0)
    cpu32 = nnlasso_admm(D.float(), X.float(), device="cpu", **{**kwargs, "tol": 1e-4})
    dev32 = nnlasso_admm(D.float(), X.float(), device=device, **{**kwargs, "tol": 1e-4})
    np.testing.assert_allclose(dev32, cpu32, atol=1e-3 * np.abs(cpu32).max(), rtol=0)


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_active_set_matches_cpu(device, tf32):
    """The exact active-set solver on the device (its batched torch QPs) = on the CPU (compiled QPs): float64 QPs,
    the same supports, weights to rounding, certified; with TF32 matmuls allowed the screening bound widens
    (gemm_roundoff) and the result is the same."""
    from utils.solvers.active_set import ActiveSetLasso
    from utils.splice import centre_concepts

    D, X = _sparse_problem(torch.float64, T=2000, d=64, n=40)
    D = centre_concepts(D)
    X = F.normalize(X, dim=1)
    cpu, rep_cpu = ActiveSetLasso(D).fit(X, 0.1, return_report=True)
    configure_torch(allow_tf32=tf32)
    dev, rep = ActiveSetLasso(D, device=device, initial=4, grow=3, small_solves="torch").fit(
        X.float(), 0.1, batch_size=16, return_report=True)
    assert rep_cpu.certified.all() and rep.certified.all() and rep.kkt.max() <= 1e-10
    np.testing.assert_array_equal(dev > 0, cpu > 0)
    np.testing.assert_allclose(dev, cpu, atol=1e-6, rtol=0)  # float32 output


# ----------------------------------------------------------------------------- script runs on the device
def _prs_run(tmp_path, device, *extra):
    """compute_prs.py on the golden images: on the GPU in a fresh process, as a user runs it; on the CPU in this
    one (the same command line, without the start-up cost)."""
    args = [*[a if a != "cpu" else device for a in TINY_ARGS], "--dataset", "golden", "--data_path",
            GOLDEN / "images", "--batch_size", 4, "--output_dir", tmp_path, *extra]  # TINY_ARGS: --device cpu
    if device == "cpu":
        code, out, err = run_inprocess("compute_prs.py", *args)
        assert code == 0, out + err
    else:
        run_script("compute_prs.py", *args)
    return {k: np.load(tmp_path / f"golden_{k}_prsclip-tiny.npy") for k in ("attn", "mlp", "cls_attn")}


@pytest.mark.parametrize("device", DEVICES)
def test_compute_prs_float16_storage(device, tmp_path):
    """--dtype float16: the stored values are the float32 results rounded to float16 (the golden numbers)."""
    arrays = _prs_run(tmp_path, device, "--dtype", "float16", "--num_workers", 0)
    for k, half in arrays.items():
        assert half.dtype == np.float16
        assert float16_close(half, np.load(PRS / f"golden_{k}_prsclip-tiny.npy")), k


@pytest.mark.parametrize("device", DEVICES)
def test_compute_prs_two_workers(device, tmp_path):
    """A multi-worker DataLoader feeding the device: the golden numbers, in order."""
    arrays = _prs_run(tmp_path, device, "--num_workers", 2)
    for k, a in arrays.items():
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, np.load(PRS / f"golden_{k}_prsclip-tiny.npy"), atol=1e-6, rtol=0, err_msg=k)
    np.testing.assert_array_equal(np.load(tmp_path / "golden_labels.npy"), np.load(PRS / "golden_labels.npy"))


_FLAGS = """
import argparse, torch
from utils.cli import run
show = lambda a: print(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                       torch.get_float32_matmul_precision())
run(show, argparse.ArgumentParser(), [])
run(show, argparse.ArgumentParser(), ["--allow_tf32"])
"""


def test_scripts_run_with_tf32_off():
    """utils.cli.run, in a fresh process (where PyTorch allows TF32 for cuDNN convolutions), turns TF32 off;
    --allow_tf32 turns it on."""
    res = subprocess.run([sys.executable, "-c", _FLAGS], cwd=REPO, capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == ["False False highest", "True True high"]


@pytest.mark.parametrize("device", DEVICES)
def test_convolution_is_exact_float32(device):
    """With TF32 off (as in the scripts) a float32 patch-embedding convolution matches float64 to float32
    precision; TF32 (PyTorch's cuDNN default on Ampere and later) would be ~1e-3 off."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 3, 224, 224, generator=g), torch.randn(768, 3, 16, 16, generator=g) / 28
    ref = F.conv2d(x.double(), w.double(), stride=16)
    out = F.conv2d(x.to(device), w.to(device), stride=16).cpu().double()
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5
