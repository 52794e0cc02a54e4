"""compute_segmentation.py (paper 2's zero-shot segmentation from neurons): the original's golden numbers at batch
size 1 and 3, --random with --seed, layer lists that are not consecutive (a hand-built check of the (neuron, layer)
mapping against an independent forward with open_clip's own modules), and bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, GOLDEN, GOLDEN_WEIGHTS, run_inprocess
from sklearn.metrics import precision_recall_curve

import utils.segmentation as seg
from utils.neurons.segmentation import NEURON_THRESHOLD

GN = GOLDEN / "neuron_segmentation"
GOLDEN_JSON = json.loads((GN / "neuron_segmentation.json").read_text())
MAT = GOLDEN / "segmentation" / "gtsegs_golden.mat"
PRETRAINED = "prsclip-tiny_seed0"  # {pretrained} in file names: the checkpoint's stem
MODEL = ["--model_config", str(CONFIGS), "--model", "prsclip-tiny-quickgelu", "--pretrained", str(GOLDEN_WEIGHTS),
         "--device", "cpu"]
COMMON = MODEL + ["--dataset", "golden", "--image_size", "64", "--data_path", str(MAT), "--num_workers", "0"]


def _inputs(folder: Path) -> Path:
    """The golden run's inputs under this checkpoint's names: layer 1's PCs (top_k_pca 3) and the classifier."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / "second_order" / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_3_pca.npy",
                folder / f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_1_3_pca.npy")
    shutil.copy(GN / "golden_classifier_prsclip-tiny-quickgelu_golden.npy",
                folder / f"golden_classifier_prsclip-tiny-quickgelu_{PRETRAINED}.npy")
    return folder


def _run(folder: Path, *extra: str) -> tuple[Path, dict]:
    code, out, err = run_inprocess("compute_segmentation.py", *COMMON, "--output_dir", folder, "--classifier_dir",
                                   folder, *extra)
    assert code == 0, err
    result = next(folder.glob("imagenet_seg_neuron_segmentation_*"))
    return result, json.loads((result / "segmentation.json").read_text())


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory):
    """The golden command line at --batch_size 1 and 3 (the second with --save_img)."""
    runs = {}
    for bs in (1, 3):
        folder = _inputs(tmp_path_factory.mktemp(f"b{bs}"))
        extra = ["--mlp_layers", "1", "--top_k_pca", "3", "--top_neurons", "8", "--batch_size", str(bs)]
        runs[bs] = _run(folder, *extra, *(["--save_img"] if bs == 3 else []))
    return runs


@pytest.mark.parametrize("bs", [1, 3])
def test_golden_numbers(golden_runs, bs):
    out, summary = golden_runs[bs]
    assert out.name == f"imagenet_seg_neuron_segmentation_prsclip-tiny-quickgelu_{PRETRAINED}_mlp_1_pca_3_top_8"
    golden = GOLDEN_JSON["per_image"]
    for ours, gold in zip(summary["per_image"], golden):  # pixel counts and classes: exactly
        assert (ours["correct"], ours["labeled"], ours["inter"], ours["union"], ours["chosen_class"]) == \
            (gold["correct"], gold["labeled"], gold["inter"], gold["union"], gold["chosen_class"])
    m = summary["metrics"]
    assert m["pixAcc"] == GOLDEN_JSON["pixAcc_full_precision"] and m["mIoU"] == GOLDEN_JSON["mIoU_full_precision"]
    assert (out / "result_mIoU_0.2505.txt").read_text().splitlines()[:2] == GOLDEN_JSON["result_txt"].splitlines()[:2]
    # float32 maps: ours and the original's differ by ~7e-7 (their forwards differ at 1e-6) ...
    np.testing.assert_allclose(np.load(out / "neuron_maps.npy"), np.load(GN / "neuron_maps.npy"), atol=1e-5)
    np.testing.assert_allclose(np.load(out / "heatmaps.npy"), np.load(GN / "heatmaps.npy"), atol=1e-5)
    # ... and AP ranks ~8k pixels with many (near-)ties: it moves by up to ~2e-5 with such changes
    np.testing.assert_allclose([p["ap"] for p in summary["per_image"]], [p["ap"] for p in golden], atol=5e-5)
    assert abs(m["mAP"] - GOLDEN_JSON["mAP_full_precision"]) < 5e-5
    # the neurons of every class, in the original's (ascending score) order, and each image's set
    pairs = np.load(out / "neurons_per_class.npy")
    assert pairs.tolist() == GOLDEN_JSON["max_per_class"]
    for gold in golden:
        assert pairs[gold["chosen_class"]].tolist() == gold["selected_neurons_neuron_layer"]
    # the precision-recall curve: the same curve (a few tied thresholds split differently)
    pr, rc = np.load(out / "precision.npy"), np.load(out / "recall.npy")
    gp, gr = np.load(GN / "precision.npy"), np.load(GN / "recall.npy")
    assert abs(len(pr) - len(gp)) <= 0.01 * len(gp)
    grid = np.linspace(0.01, 0.99, 99)
    np.testing.assert_allclose(np.interp(grid, rc[::-1], pr[::-1]), np.interp(grid, gr[::-1], gp[::-1]), atol=2e-3)
    record = json.loads((out / "provenance.json").read_text())
    assert record["mlp_layers"] == [1] and record["top_neurons"] == 8 and record["num_images"] == 3


def test_metrics_on_the_golden_maps_are_exact():
    """Fed the original's own heatmaps, the shared metric code (foreground > 0.5) gives its numbers exactly."""
    maps = torch.from_numpy(np.load(GN / "heatmaps.npy"))
    targets = torch.from_numpy(np.load(GOLDEN / "segmentation" / "targets.npy"))
    out = seg.segmentation_metrics(maps, targets, threshold=NEURON_THRESHOLD)
    golden = GOLDEN_JSON["per_image"]
    np.testing.assert_array_equal(out["inter"], [p["inter"] for p in golden])
    np.testing.assert_array_equal(out["union"], [p["union"] for p in golden])
    np.testing.assert_allclose(out["ap"], [p["ap"] for p in golden], atol=1e-12, rtol=0)
    pr, rc, _ = precision_recall_curve(targets.numpy().ravel(), maps.numpy().ravel())
    np.testing.assert_allclose(pr, np.load(GN / "precision.npy"), atol=1e-12)
    np.testing.assert_allclose(rc, np.load(GN / "recall.npy"), atol=1e-12)


def test_batch_sizes_agree(golden_runs):
    (o1, s1), (o3, s3) = golden_runs[1], golden_runs[3]
    m1, m3 = np.load(o1 / "per_image_metrics.npy"), np.load(o3 / "per_image_metrics.npy")
    np.testing.assert_array_equal(m1[:, [0, 1, 2, 3, 4, 5, 7]], m3[:, [0, 1, 2, 3, 4, 5, 7]])
    assert s1["metrics"]["pixAcc"] == s3["metrics"]["pixAcc"] and s1["metrics"]["mIoU"] == s3["metrics"]["mIoU"]
    # batched kernels differ from batch-1 ones by ~1e-7 (see test_segmentation.test_batch_sizes_agree)
    for name in ("heatmaps", "neuron_maps"):
        np.testing.assert_allclose(np.load(o1 / f"{name}.npy"), np.load(o3 / f"{name}.npy"), atol=1e-5)
    np.testing.assert_allclose(m1[:, 6], m3[:, 6], atol=1e-3)
    heat = np.load(o3 / "heatmaps.npy")
    np.testing.assert_allclose(heat.max((1, 2)), 1.0)  # each image normalised on its own
    import matplotlib.image as mpimg

    for i in range(3):  # --save_img: the predicted mask is the map above 0.5
        mask = mpimg.imread(o3 / f"images/{i:05d}_mask.png")
        np.testing.assert_array_equal(mask[..., 0] > 0.5, heat[i] > 0.5)


# ----------------------------------------------------------------------------- an independent forward
def independent_maps(model_name: str, layers: list[int], pairs: np.ndarray, classifier: np.ndarray,
                     images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own forward with hooks on ``mlp.gelu``: per image its class (argmax r @ classifier) and the
    min-max normalised, upsampled mean activation of that class's (neuron, layer) ``pairs`` [C, k, 2]."""
    model = open_clip.create_model(model_name, pretrained=str(GOLDEN_WEIGHTS)).eval()
    acts = {}
    hooks = [model.visual.transformer.resblocks[l].mlp.gelu.register_forward_hook(
        lambda m, i, o, l=l: acts.__setitem__(l, o.detach())) for l in layers]
    with torch.no_grad():
        r = model.encode_image(images)
    for h in hooks:
        h.remove()
    chosen = (r.numpy() @ classifier).argmax(1)
    maps = []
    for b, c in enumerate(chosen):
        a = np.mean([acts[int(layer)][b, 1:, int(n)].numpy() for n, layer in pairs[c]], 0).reshape(1, 1, 4, 4)
        up = F.interpolate(torch.from_numpy(a), scale_factor=16, mode="bilinear", align_corners=False)[0, 0].numpy()
        maps.append((up - up.min()) / (up.max() - up.min()))
    return chosen, np.stack(maps)


def _golden_images() -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / "segmentation" / "preprocessed.npy"))


def test_layers_not_consecutive(tmp_path):
    """--mlp_layers 2 0: hand-built PCs put class c's two neurons at known places in layers 2 and 0; the original's
    mapping (first layer + row // M) would call row M + 7 neuron 7 of layer 3 here."""
    rng = np.random.default_rng(0)
    classifier = np.linalg.qr(rng.normal(size=(32, 3)))[0].astype(np.float32)  # orthonormal columns
    pcs = {l: (1e-3 * rng.normal(size=(256, 32))).astype(np.float32) for l in (0, 2)}
    chosen_pairs = {0: [(7, 2), (5, 0)], 1: [(11, 0), (200, 2)], 2: [(3, 2), (3, 0)]}  # ascending score
    for c, pairs in chosen_pairs.items():
        for scale, (neuron, layer) in zip((9.0, 10.0), pairs):
            pcs[layer][neuron] = scale * classifier[:, c] * (-1) ** neuron  # the PC's sign does not matter
    for layer, p in pcs.items():
        np.save(tmp_path / f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_{layer}_3_pca.npy", p)
    np.save(tmp_path / f"golden_classifier_prsclip-tiny-quickgelu_{PRETRAINED}.npy", classifier)
    out, summary = _run(tmp_path, "--mlp_layers", "2", "0", "--top_k_pca", "3", "--top_neurons", "2",
                        "--batch_size", "2")
    assert out.name.endswith("_mlp_2_0_pca_3_top_2")
    pairs = np.load(out / "neurons_per_class.npy")
    assert pairs.tolist() == [[list(p) for p in chosen_pairs[c]] for c in range(3)]
    chosen, maps = independent_maps("prsclip-tiny-quickgelu", [0, 2], pairs, classifier, _golden_images())
    assert [p["chosen_class"] for p in summary["per_image"]] == chosen.tolist()
    np.testing.assert_allclose(np.load(out / "heatmaps.npy"), maps, atol=1e-5)


def test_random_neurons_with_seed(tmp_path):
    _inputs(tmp_path)
    runs = {}
    for seed in (3, 3, 4):
        folder = tmp_path / f"seed{seed}_{len(runs)}"
        for f in tmp_path.glob("*.npy"):
            (folder / f.name).parent.mkdir(exist_ok=True)
            shutil.copy(f, folder / f.name)
        out, _ = _run(folder, "--mlp_layers", "1", "--top_k_pca", "3", "--top_neurons", "8", "--random",
                      "--seed", str(seed))
        assert out.name.endswith(f"_top_8_random_{seed}")
        runs[len(runs)] = out
    a, b, c = (np.load(runs[i] / "neurons_per_class.npy") for i in range(3))
    assert a.shape == (3, 8, 2) and (a[..., 1] == 1).all()
    assert all(len(set(a[k, :, 0].tolist())) == 8 for k in range(3))  # distinct neurons per class
    np.testing.assert_array_equal(a, b)  # the same seed, the same neurons ...
    assert not np.array_equal(a, c)  # ... another seed, others
    assert a.tolist() != GOLDEN_JSON["max_per_class"]
    classifier = np.load(GN / "golden_classifier_prsclip-tiny-quickgelu_golden.npy")
    chosen, maps = independent_maps("prsclip-tiny-quickgelu", [1], a, classifier, _golden_images())
    np.testing.assert_allclose(np.load(runs[0] / "heatmaps.npy"), maps, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def _error(folder: Path, *extra: str) -> str:
    code, _, err = run_inprocess("compute_segmentation.py", *COMMON, "--output_dir", folder, "--classifier_dir",
                                 folder, "--top_k_pca", "3", "--top_neurons", "8", *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs(tmp_path):
    _inputs(tmp_path)
    err = _error(tmp_path, "--mlp_layers", "1", "2")  # no PCA file for layer 2
    assert f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_2_3_pca.npy: not found" in err
    assert "compute_pcas.py" in err
    assert "a layer is listed twice" in _error(tmp_path, "--mlp_layers", "1", "1")
    assert "--top_neurons 300" in _error(tmp_path, "--mlp_layers", "1", "--top_neurons", "300")
    assert "image_size 224" in _error(tmp_path, "--mlp_layers", "1", "--image_size", "224")
    # a classifier of the wrong dimension
    wrong = tmp_path / "wrong"
    _inputs(wrong)
    np.save(wrong / f"golden_classifier_prsclip-tiny-quickgelu_{PRETRAINED}.npy", np.ones((16, 3), np.float32))
    err = _error(wrong, "--mlp_layers", "1")
    assert f"golden_classifier_prsclip-tiny-quickgelu_{PRETRAINED}.npy: classifier of shape [16, 3]; expected [d=32" in err
    # PCs of another model (another width)
    np.save(wrong / f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_1_3_pca.npy",
            np.ones((128, 16), np.float32))
    err = _error(wrong, "--mlp_layers", "1")
    assert "_1_3_pca.npy: PCs of shape [128, 16], but prsclip-tiny-quickgelu layer 1 has [neurons, d] = [256, 32]" \
        in err
    # a layer the model does not have (its PCA file exists)
    shutil.copy(tmp_path / f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_1_3_pca.npy",
                tmp_path / f"golden_train_mlps_prsclip-tiny-quickgelu_{PRETRAINED}_7_3_pca.npy")
    assert "--mlp_layers: layer 7 out of range for prsclip-tiny-quickgelu (0..3)" in _error(tmp_path, "--mlp_layers",
                                                                                           "1", "7")


def test_help_says_what_was_fixed():
    import compute_segmentation

    text = compute_segmentation.get_args_parser().format_help()
    for s in ("not consecutive", "any --batch_size", "autograd", "one forward per batch", "--seed", "(default 8 9 10)"):
        assert s in text, s
