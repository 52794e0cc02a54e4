"""End to end: compute_second_order_neuron_prs.py, compute_pcas.py and compute_second_order_ablations.py on the
golden images (an ImageFolder), through their command lines; --resume after a crash; bad-input errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from conftest import CONFIGS, GOLDEN, GOLDEN_WEIGHTS, run_inprocess, run_script
from PIL import Image
from test_scripts import _Crashing as Crashing  # a dataset that raises at one item (a killed run)
from test_second_order import original_style_ablations

import compute_pcas
import compute_second_order_ablations
import compute_second_order_neuron_prs

SO = GOLDEN / "second_order"
GOLDEN_STEM = "golden_train_mlps_prsclip-tiny-quickgelu_golden_1"
STEM = "golden_train_mlps_prsclip-tiny-quickgelu_prsclip-tiny_seed0_1"  # {pretrained} = the checkpoint's stem
MODEL = ["--model_config", str(CONFIGS), "--model", "prsclip-tiny-quickgelu", "--pretrained", str(GOLDEN_WEIGHTS),
         "--device", "cpu"]
NEURONS = MODEL + ["--mlp_layer", "1", "--dataset", "golden", "--data_path", str(GOLDEN / "images"),
                   "--num_workers", "0", "--batch_size", "2"]
FILES = ["--model", "prsclip-tiny-quickgelu", "--pretrained", str(GOLDEN_WEIGHTS), "--mlp_layer", "1",
         "--dataset", "golden"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The train-split merged file and its PCA, written through the command lines."""
    d = tmp_path_factory.mktemp("second_order")
    res = run_script("compute_second_order_neuron_prs.py", *NEURONS, "--split", "train", "--output_dir", d)
    assert f"{STEM}_merged.npy" in res.stdout
    run_script("compute_pcas.py", *FILES, "--top_k_pca", "3", "--input_dir", d, "--output_dir", d)
    return d


def test_neuron_prs_script_matches_golden(out):
    merged = np.load(out / f"{STEM}_merged.npy")
    assert merged.dtype == np.float32
    np.testing.assert_allclose(merged, np.load(SO / f"{GOLDEN_STEM}_merged.npy"), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.load(out / "golden_train_labels.npy"), [0, 0, 0, 1, 1, 1])
    assert not list(out.glob("*.partial")) and not list(out.glob("*.progress.json"))


def test_pcas_script_matches_golden(out):
    np.testing.assert_allclose(np.load(out / f"{STEM}_3_pca.npy"), np.load(SO / f"{GOLDEN_STEM}_3_pca.npy"),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(out / f"{STEM}_3_norm.npy"), np.load(SO / f"{GOLDEN_STEM}_3_norm.npy"),
                               atol=1e-5, rtol=0)


def test_pcas_chunked_reads_agree(out, tmp_path):
    args = compute_pcas.get_args_parser().parse_args(
        FILES + ["--top_k_pca", "3", "--input_dir", str(out), "--output_dir", str(tmp_path), "--chunk_gb", "1e-5"])
    compute_pcas.main(args)  # 1e-5 GB = 10 KiB: 13 neurons per chunk of the 6 x 256 x 32 file
    for kind in ("pca", "norm"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{STEM}_3_{kind}.npy"), np.load(out / f"{STEM}_3_{kind}.npy"))


def test_resume_after_crash_equals_uninterrupted_run(out, tmp_path, monkeypatch):
    build = compute_second_order_neuron_prs.build_second_order_dataset
    monkeypatch.setattr(compute_second_order_neuron_prs, "build_second_order_dataset",
                        lambda *a, **k: Crashing(build(*a, **k), at=4))
    args = compute_second_order_neuron_prs.get_args_parser().parse_args(
        NEURONS + ["--split", "train", "--output_dir", str(tmp_path)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_second_order_neuron_prs.main(args)
    final = tmp_path / f"{STEM}_merged.npy"
    progress = tmp_path / f"{STEM}_merged.npy.progress.json"
    assert not final.exists() and (tmp_path / f"{STEM}_merged.npy.partial").exists()
    assert json.loads(progress.read_text())["done"] == 4
    monkeypatch.undo()
    # --resume of this real partial run with one setting changed (--coefficient) is refused, and leaves it as it was
    partial = (tmp_path / f"{STEM}_merged.npy.partial").read_bytes()
    args.coefficient, args.resume = 10.0, True
    with pytest.raises(ValueError, match="different run"):
        compute_second_order_neuron_prs.main(args)
    assert json.loads(progress.read_text())["done"] == 4
    assert (tmp_path / f"{STEM}_merged.npy.partial").read_bytes() == partial and not final.exists()
    # the same settings resume it, and give the uninterrupted run's file
    res = run_script("compute_second_order_neuron_prs.py", *NEURONS, "--split", "train", "--output_dir", tmp_path,
                     "--resume")
    assert "Resuming at image 4 of 6" in res.stdout
    np.testing.assert_array_equal(np.load(final), np.load(out / f"{STEM}_merged.npy"))


def test_float16_storage(out, tmp_path):
    args = compute_second_order_neuron_prs.get_args_parser().parse_args(
        NEURONS + ["--split", "train", "--output_dir", str(tmp_path), "--dtype", "float16"])
    compute_second_order_neuron_prs.main(args)
    half = np.load(tmp_path / f"{STEM}_merged.npy")
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, np.load(out / f"{STEM}_merged.npy"), atol=4e-3, rtol=0)


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    """The golden images mirrored left-right: an evaluation set different from the 'training' images."""
    root = tmp_path_factory.mktemp("val_images")
    for src in sorted((GOLDEN / "images").glob("*/*.png")):
        (root / src.parent.name).mkdir(exist_ok=True)
        Image.open(src).transpose(Image.FLIP_LEFT_RIGHT).save(root / src.parent.name / src.name)
    return root


def expected_ablation_accuracy(out, val_folder, tmp_path, clf) -> dict:
    """The original arithmetic on the evaluation images' effects (written by the first script)."""
    compute_second_order_neuron_prs.main(compute_second_order_neuron_prs.get_args_parser().parse_args(
        NEURONS + ["--split", "val", "--data_path", str(val_folder), "--output_dir", str(tmp_path)]))
    val = np.load(tmp_path / f"{STEM.replace('_train_', '_val_')}_merged.npy")
    model, _, preprocess = open_clip.create_model_and_transforms("prsclip-tiny-quickgelu",
                                                                 pretrained=str(GOLDEN_WEIGHTS))
    files = sorted(val_folder.glob("*/*.png"))
    with torch.no_grad():
        rep = model.eval().encode_image(torch.stack([preprocess(Image.open(f)) for f in files])).numpy()
    train = np.load(out / f"{STEM}_merged.npy")
    norms = np.load(out / f"{STEM}_3_norm.npy")
    logits = original_style_ablations(val, rep, train.mean(0), np.load(out / f"{STEM}_3_pca.npy"), norms, clf)
    labels = np.array([0, 0, 0, 1, 1, 1])
    centred_norm = np.linalg.norm(val - train.mean(0), axis=-1)
    assert np.abs(centred_norm - norms[:, 0]).min() > 1e-5  # no significance ties at float precision
    return {k: float((v.argmax(-1) == labels).mean() * 100) for k, v in logits.items()}


@pytest.mark.parametrize("script", ["compute_second_order_ablations.py", "compute_ablations.py"])
def test_ablation_script(script, out, val_folder, tmp_path):
    """compute_ablations.py with paper 2's flags is the same study (its paper-1 command lines: test_scripts.py)."""
    clf = np.load(GOLDEN / "ablations" / "classifier_random2.npy")  # [d, 2]
    np.save(out / "golden_classifier_prsclip-tiny-quickgelu.npy", clf)  # paper-1 name: the fallback
    code, stdout, stderr = run_inprocess(
        script, *MODEL, "--mlp_layer", "1", "--top_k_pca", "3", "--dataset", "golden",
        "--data_path", val_folder, "--split", "val", "--num_workers", "0", "--batch_size", "4", "--input_dir", out,
        "--output_dir", tmp_path)
    assert code == 0, stderr
    json_path = next(tmp_path.glob("golden_val_second_order_ablations_*_1_3.json"))
    result = json.loads(json_path.read_text())
    assert json_path.with_suffix(".png").stat().st_size > 1000
    assert result["classifier"].endswith("golden_classifier_prsclip-tiny-quickgelu.npy")
    assert "Without significant neurons:" in stdout and result["num_images"] == 6
    expected = expected_ablation_accuracy(out, val_folder, tmp_path, clf)
    assert result["accuracy_percent"] == pytest.approx(expected)
    if script == "compute_ablations.py":
        return

    # the paper-2 classifier name wins over the fallback
    np.save(out / "golden_classifier_prsclip-tiny-quickgelu_prsclip-tiny_seed0.npy", clf[:, ::-1].copy())
    try:
        args = compute_second_order_ablations.get_args_parser().parse_args(
            MODEL + ["--mlp_layer", "1", "--top_k_pca", "3", "--dataset", "golden", "--data_path", str(val_folder),
                     "--num_workers", "0", "--input_dir", str(out), "--output_dir", str(tmp_path)])
        swapped = compute_second_order_ablations.main(args)
    finally:
        (out / "golden_classifier_prsclip-tiny-quickgelu_prsclip-tiny_seed0.npy").unlink()
    assert swapped["classifier"].endswith("_prsclip-tiny_seed0.npy")
    assert swapped["accuracy_percent"]["baseline"] == pytest.approx(100 - expected["baseline"])


def test_last_layer_is_a_clear_cli_error(tmp_path):
    # the command-line path (argv parsing, main, utils.cli error handling), in this process
    code, _, stderr = run_inprocess("compute_second_order_neuron_prs.py", *NEURONS, "--mlp_layer", "3",
                                    "--output_dir", tmp_path)
    assert code == 2
    assert "error: --mlp_layer 3: the last layer" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.iterdir())


def test_bad_inputs(out, tmp_path):
    parse = compute_second_order_neuron_prs.get_args_parser().parse_args
    with pytest.raises(ValueError, match="--mlp_layer 9: out of range"):
        compute_second_order_neuron_prs.main(parse(NEURONS + ["--mlp_layer", "9", "--output_dir", str(tmp_path)]))
    pca = compute_pcas.get_args_parser().parse_args
    with pytest.raises(ValueError, match="--top_k_pca 7"):
        compute_pcas.main(pca(FILES + ["--top_k_pca", "7", "--input_dir", str(out), "--output_dir", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="compute_second_order_neuron_prs.py"):
        compute_pcas.main(pca(FILES + ["--mlp_layer", "2", "--input_dir", str(out), "--output_dir", str(tmp_path)]))

    # a PCA file that does not match the merged file
    for name in (f"{STEM}_merged.npy", f"{STEM}_3_norm.npy"):
        shutil.copy(out / name, tmp_path / name)
    np.save(tmp_path / f"{STEM}_3_pca.npy", np.zeros((255, 32), np.float32))
    np.save(tmp_path / "golden_classifier_prsclip-tiny-quickgelu.npy", np.zeros((32, 2), np.float32))
    abl = compute_second_order_ablations.get_args_parser().parse_args
    args = abl(MODEL + ["--mlp_layer", "1", "--top_k_pca", "3", "--dataset", "golden", "--data_path",
                        str(GOLDEN / "images"), "--num_workers", "0", "--input_dir", str(tmp_path),
                        "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="_3_pca.npy: shape \\(255, 32\\) does not match"):
        compute_second_order_ablations.main(args)
    # a classifier of the wrong dimension
    np.save(tmp_path / f"{STEM}_3_pca.npy", np.load(out / f"{STEM}_3_pca.npy"))
    np.save(tmp_path / "golden_classifier_prsclip-tiny-quickgelu.npy", np.zeros((16, 2), np.float32))
    with pytest.raises(ValueError, match="classifier_prsclip-tiny-quickgelu.npy: classifier of shape \\[16, 2\\]"):
        compute_second_order_ablations.main(args)
    # merged file of another layer width
    np.save(tmp_path / f"{STEM}_merged.npy", np.zeros((6, 128, 32), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        compute_second_order_ablations.main(args)


# ----------------------------------------------------------------------------- flags with a visible effect
def test_coefficient_scales_the_merged_file(out, tmp_path):
    """--coefficient 50 gives half the paper's (100) effects."""
    args = compute_second_order_neuron_prs.get_args_parser().parse_args(
        NEURONS + ["--split", "train", "--output_dir", str(tmp_path), "--coefficient", "50"])
    compute_second_order_neuron_prs.main(args)
    np.testing.assert_allclose(np.load(tmp_path / f"{STEM}_merged.npy"), np.load(out / f"{STEM}_merged.npy") / 2,
                               rtol=1e-6, atol=1e-8)


def test_two_workers_give_the_same_file(out, tmp_path):
    code, stdout, stderr = run_inprocess("compute_second_order_neuron_prs.py", *NEURONS, "--split", "train",
                                         "--output_dir", tmp_path, "--num_workers", "2")
    assert code == 0, stdout + stderr
    np.testing.assert_array_equal(np.load(tmp_path / f"{STEM}_merged.npy"), np.load(out / f"{STEM}_merged.npy"))


def _train_files(folder, dataset: str, split: str, classifier: np.ndarray):
    """The golden merged/PCA/norm files as {dataset}_{split}_mlps_... and a classifier for {dataset}."""
    folder.mkdir(exist_ok=True)
    for kind in ("merged", "3_pca", "3_norm"):
        shutil.copy(SO / f"{GOLDEN_STEM}_{kind}.npy", folder / f"{STEM.replace('golden_train', f'{dataset}_{split}')}"
                                                              f"_{kind}.npy")
    np.save(folder / f"{dataset}_classifier_prsclip-tiny-quickgelu.npy", classifier)


def test_ablations_train_dataset_and_train_split(tmp_path):
    """--train_dataset / --train_split pick the training files and classifier; by default they are --dataset
    (without a trailing '_r') and 'train'."""
    clf = np.load(GOLDEN / "ablations" / "classifier_random2.npy")

    def ablate(inp, *extra):
        args = compute_second_order_ablations.get_args_parser().parse_args(
            MODEL + ["--mlp_layer", "1", "--top_k_pca", "3", "--dataset", "golden", "--data_path",
                     str(GOLDEN / "images"), "--split", "val", "--num_workers", "0", "--input_dir", str(inp),
                     "--output_dir", str(tmp_path / "res"), *extra])
        return compute_second_order_ablations.main(args)["accuracy_percent"]

    _train_files(tmp_path / "std", "golden", "train", clf)
    expected = ablate(tmp_path / "std")
    assert expected["baseline"] != 50  # so that the swapped classifier below changes it
    assert ablate(tmp_path / "std", "--dataset", "golden_r") == expected  # golden_r -> golden's training files
    # another training set beside a decoy under the default name (classes swapped: other accuracies)
    _train_files(tmp_path / "two", "golden", "train", clf[:, ::-1].copy())
    _train_files(tmp_path / "two", "trainset", "train", clf)
    assert ablate(tmp_path / "two", "--train_dataset", "trainset") == expected
    assert ablate(tmp_path / "two")["baseline"] == pytest.approx(100 - expected["baseline"])
    # another split: only found with --train_split
    _train_files(tmp_path / "split", "golden", "other", clf)
    with pytest.raises(FileNotFoundError, match=f"{STEM}_merged.npy"):
        ablate(tmp_path / "split")
    assert ablate(tmp_path / "split", "--train_split", "other") == expected
