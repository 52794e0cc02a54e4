"""End-to-end runs of compute_prs.py, compute_text_projection.py and compute_ablations.py on fixtures in each
dataset format, plus bad input and crash/resume."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, TINY_ARGS
from conftest import cifar_fixture as _cifar_fixture
from conftest import run_inprocess, run_script


class _Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


def cli(script: str, *args, check: bool = True) -> _Result:
    """The script's command line, run in-process (see conftest.run_inprocess); subprocess runs are kept for a few."""
    res = _Result(*run_inprocess(script, *args))
    if check and res.returncode != 0:
        raise AssertionError(f"{script} {args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res

GOLDEN_PRS = GOLDEN / "prs"
PRS_FILES = ["attn", "mlp", "cls_attn"]


def _load_prs(out: Path, dataset: str, model: str = "prsclip-tiny") -> dict:
    return {k: np.load(out / f"{dataset}_{k}_{model}.npy") for k in PRS_FILES}


# ----------------------------------------------------------------------------- compute_prs
def test_compute_prs_imagefolder_matches_golden(tmp_path):
    res = run_script("compute_prs.py", *TINY_ARGS, "--dataset", "golden", "--data_path", GOLDEN / "images",
                     "--batch_size", "4", "--num_workers", "0", "--output_dir", tmp_path)
    arrays = _load_prs(tmp_path, "golden")
    for k in PRS_FILES:
        ref = np.load(GOLDEN_PRS / f"golden_{k}_prsclip-tiny.npy")
        assert arrays[k].dtype == np.float32 and arrays[k].shape == ref.shape, k
        np.testing.assert_allclose(arrays[k], ref, atol=1e-6, err_msg=k)
    labels = np.load(tmp_path / "golden_labels.npy")
    np.testing.assert_array_equal(labels, np.load(GOLDEN_PRS / "golden_labels.npy"))
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.progress.json"))
    assert "compute_prs" in res.stderr  # the progress bar


def test_compute_prs_float16_storage(tmp_path):
    cli("compute_prs.py", *TINY_ARGS, "--dataset", "golden", "--data_path", GOLDEN / "images",
               "--num_workers", "0", "--output_dir", tmp_path, "--dtype", "float16")
    attn = np.load(tmp_path / "golden_attn_prsclip-tiny.npy")
    assert attn.dtype == np.float16
    np.testing.assert_allclose(attn.astype(np.float32), np.load(GOLDEN_PRS / "golden_attn_prsclip-tiny.npy"),
                               atol=2e-4)


def test_compute_prs_sample_images(tmp_path):
    cli("compute_prs.py", *TINY_ARGS, "--dataset", "sample", "--batch_size", "3", "--num_workers", "0",
               "--output_dir", tmp_path)
    a = _load_prs(tmp_path, "sample")
    assert a["attn"].shape == (8, 4, 4, 32) and a["mlp"].shape == (8, 5, 32) and a["cls_attn"].shape == (8, 4, 32)
    total = a["attn"].sum((1, 2)) + a["mlp"].sum(1)
    np.testing.assert_allclose(np.linalg.norm(total, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.load(tmp_path / "sample_labels.npy"), np.arange(8))


def test_compute_prs_imagenet_layout(tmp_path, imagenet_root):
    cli("compute_prs.py", *TINY_ARGS, "--dataset", "imagenet", "--data_path", imagenet_root,
               "--num_workers", "0", "--output_dir", tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "imagenet_labels.npy"), [0, 0, 0, 1, 1, 1])
    arrays = _load_prs(tmp_path, "imagenet")
    for k in PRS_FILES:  # the golden images in ImageNet's layout and order: the golden numbers
        np.testing.assert_allclose(arrays[k], np.load(GOLDEN_PRS / f"golden_{k}_prsclip-tiny.npy"), atol=1e-6,
                                   rtol=0, err_msg=k)


def test_compute_prs_waterbirds(tmp_path, waterbirds_root):
    cli("compute_prs.py", *TINY_ARGS, "--dataset", "binary_waterbirds", "--data_path", waterbirds_root,
               "--num_workers", "0", "--output_dir", tmp_path)
    labels = np.load(tmp_path / "binary_waterbirds_labels.npy")
    test_rows = [0, 2, 4, 5]  # split == 2
    np.testing.assert_array_equal(labels, [[i % 2, (i // 2) % 2] for i in test_rows])
    assert np.load(tmp_path / "binary_waterbirds_attn_prsclip-tiny.npy").shape == (4, 4, 4, 32)


@pytest.mark.parametrize("name", ["CIFAR10", "CIFAR100"])
def test_compute_prs_cifar(tmp_path, name):
    labels = _cifar_fixture(tmp_path / "data", name)
    cli("compute_prs.py", *TINY_ARGS, "--dataset", name, "--data_path", tmp_path / "data",
               "--num_workers", "0", "--output_dir", tmp_path / "out")
    np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}_labels.npy"), labels)
    assert np.load(tmp_path / "out" / f"{name}_mlp_prsclip-tiny.npy").shape == (6, 5, 32)


def test_force_quick_gelu_gives_the_quickgelu_model(tmp_path):
    """--force_quick_gelu on the GELU config gives the QuickGELU model's numbers (checked via the sum rule)."""
    cli("compute_prs.py", *TINY_ARGS, "--force_quick_gelu", "--dataset", "golden", "--data_path",
               GOLDEN / "images", "--num_workers", "0", "--output_dir", tmp_path)
    a = _load_prs(tmp_path, "golden")
    r = np.load(GOLDEN / "second_order/encode_image_quickgelu.npy")
    np.testing.assert_allclose(a["attn"].sum((1, 2)) + a["mlp"].sum(1), r / np.linalg.norm(r, axis=1, keepdims=True),
                               atol=1e-5)


# ----------------------------------------------------------------------------- crash and resume
class _Crashing(torch.utils.data.Dataset):
    def __init__(self, ds, at):
        self.ds, self.at = ds, at
        self.labels = ds.labels

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.at:
            raise RuntimeError("simulated crash")
        return self.ds[i]

    def __setattr__(self, k, v):
        if k == "transform":
            self.ds.transform = v
        else:
            super().__setattr__(k, v)


def test_crash_leaves_no_final_file_and_resume_completes(tmp_path, monkeypatch):
    import compute_prs

    argv = [*TINY_ARGS, "--dataset", "golden", "--data_path", str(GOLDEN / "images"), "--batch_size", "2",
            "--num_workers", "0", "--output_dir", str(tmp_path)]
    real_build = compute_prs.build_dataset
    monkeypatch.setattr(compute_prs, "build_dataset", lambda *a, **k: _Crashing(real_build(*a, **k), at=4))
    with pytest.raises(RuntimeError, match="simulated crash"):
        compute_prs.main(compute_prs.get_args_parser().parse_args(argv))
    for k in PRS_FILES:
        assert not (tmp_path / f"golden_{k}_prsclip-tiny.npy").exists(), "a complete-looking file after a crash"
        assert (tmp_path / f"golden_{k}_prsclip-tiny.npy.partial").exists()
    progress = json.loads((tmp_path / "golden_attn_prsclip-tiny.npy.progress.json").read_text())
    assert progress["done"] == 4

    monkeypatch.setattr(compute_prs, "build_dataset", real_build)
    compute_prs.main(compute_prs.get_args_parser().parse_args(argv + ["--resume"]))
    for k in PRS_FILES:
        np.testing.assert_allclose(np.load(tmp_path / f"golden_{k}_prsclip-tiny.npy"),
                                   np.load(GOLDEN_PRS / f"golden_{k}_prsclip-tiny.npy"), atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_resume_refuses_a_different_run(tmp_path, monkeypatch):
    import compute_prs

    base = ["--dataset", "golden", "--data_path", str(GOLDEN / "images"), "--num_workers", "0",
            "--output_dir", str(tmp_path)]
    real_build = compute_prs.build_dataset
    monkeypatch.setattr(compute_prs, "build_dataset", lambda *a, **k: _Crashing(real_build(*a, **k), at=2))
    with pytest.raises(RuntimeError):
        compute_prs.main(compute_prs.get_args_parser().parse_args([*TINY_ARGS, *base]))
    monkeypatch.setattr(compute_prs, "build_dataset", real_build)
    with pytest.raises(ValueError, match="different run"):
        compute_prs.main(compute_prs.get_args_parser().parse_args([*TINY_ARGS, *base, "--resume",
                                                                   "--force_quick_gelu"]))


# ----------------------------------------------------------------------------- compute_text_projection
def test_text_projection_matches_golden(tmp_path):
    run_script("compute_text_projection.py", *TINY_ARGS, "--dataset", "golden", "--classnames",
               GOLDEN / "text/classnames.txt", "--output_dir", tmp_path)
    c = np.load(tmp_path / "golden_classifier_prsclip-tiny.npy")
    assert c.shape == (32, 3) and c.dtype == np.float32
    np.testing.assert_allclose(c, np.load(GOLDEN_PRS / "golden_classifier_prsclip-tiny.npy"), atol=1e-6)


def test_prompts_are_the_openai_templates_in_order():
    from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames

    names = get_classnames("golden", str(GOLDEN / "text/classnames.txt"))
    prompts = [t(c) for c in names for t in OPENAI_IMAGENET_TEMPLATES]
    assert prompts == (GOLDEN / "text/prompts.txt").read_text().splitlines()


@pytest.mark.parametrize("dataset,classes", [("binary_waterbirds", 2), ("CIFAR10", 10)])
def test_text_projection_builtin_names(tmp_path, dataset, classes):
    cli("compute_text_projection.py", *TINY_ARGS, "--dataset", dataset, "--output_dir", tmp_path)
    c = np.load(tmp_path / f"{dataset}_classifier_prsclip-tiny.npy")
    assert c.shape == (32, classes)
    np.testing.assert_allclose(np.linalg.norm(c, axis=0), 1.0, atol=1e-5)


def test_builtin_classname_tables():
    from utils.text.classnames import get_classnames

    assert len(get_classnames("imagenet")) == 1000
    assert len(get_classnames("cub")) == 200 and get_classnames("waterbirds")[0] == "Black footed Albatross"
    assert len(get_classnames("CIFAR100")) == 100 and get_classnames("CIFAR100")[1] == "aquarium fish"


# ----------------------------------------------------------------------------- compute_ablations
@pytest.fixture
def ablation_dir(tmp_path) -> Path:
    for f in GOLDEN_PRS.glob("golden_*"):
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(GOLDEN / "ablations/classifier_random2.npy", tmp_path / "golden_classifier_prsclip-tiny.npy")
    return tmp_path


def test_ablations_match_golden(ablation_dir):
    res = run_script("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir",
                     ablation_dir, "--figures_dir", ablation_dir / "fig")
    expected = (GOLDEN / "ablations/compute_ablations_random2_stdout.txt").read_text().splitlines()
    assert res.stdout.splitlines()[:5] == expected
    out = json.loads((ablation_dir / "fig/golden_ablations_prsclip-tiny.json").read_text())
    golden = json.loads((GOLDEN / "ablations/compute_ablations_random2.json").read_text())
    assert out["accuracy_percent"] == pytest.approx(golden["accuracy_percent"])
    assert (ablation_dir / "fig/golden_ablations_prsclip-tiny.png").stat().st_size > 1000


@pytest.mark.parametrize("tag", ["random2", "zeroshot3"])
def test_ablation_logits_match_golden(ablation_dir, tag):
    from utils.ablations import mean_ablation_study

    a = {k: np.load(GOLDEN_PRS / f"golden_{k}_prsclip-tiny.npy") for k in PRS_FILES}
    clf = np.load(GOLDEN / "ablations/classifier_random2.npy") if tag == "random2" else \
        np.load(GOLDEN_PRS / "golden_classifier_prsclip-tiny.npy")
    res = mean_ablation_study(a["attn"], a["mlp"], a["cls_attn"], clf, np.load(GOLDEN_PRS / "golden_labels.npy"),
                              chunk=4, return_logits=True)  # chunk < B exercises the streaming
    np.testing.assert_allclose(res["logits"], np.load(GOLDEN / f"ablations/compute_ablations_{tag}_logits.npy"),
                               atol=1e-6)


@pytest.mark.parametrize("chunk", ["1", "4"])
def test_ablations_chunk_gives_the_golden_numbers(ablation_dir, monkeypatch, chunk):
    """--chunk: the arrays are read that many images at a time (4: a partial last chunk of 2), same results."""
    import utils.ablations

    sizes, real_chunks = [], utils.ablations._chunks
    monkeypatch.setattr(utils.ablations, "_chunks", lambda B, size: sizes.append(size) or real_chunks(B, size))
    res = cli("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir", ablation_dir,
              "--figures_dir", ablation_dir / "fig", "--chunk", chunk)
    assert sizes and set(sizes) == {int(chunk)}
    expected = (GOLDEN / "ablations/compute_ablations_random2_stdout.txt").read_text().splitlines()
    assert res.stdout.splitlines()[:5] == expected
    out = json.loads((ablation_dir / "fig/golden_ablations_prsclip-tiny.json").read_text())
    golden = json.loads((GOLDEN / "ablations/compute_ablations_random2.json").read_text())
    assert out["accuracy_percent"] == pytest.approx(golden["accuracy_percent"])


def test_compute_prs_two_workers(tmp_path):
    """--num_workers 2: the golden numbers, in order."""
    cli("compute_prs.py", *TINY_ARGS, "--dataset", "golden", "--data_path", GOLDEN / "images", "--batch_size", "2",
        "--num_workers", "2", "--output_dir", tmp_path)
    arrays = _load_prs(tmp_path, "golden")
    for k in PRS_FILES:
        np.testing.assert_allclose(arrays[k], np.load(GOLDEN_PRS / f"golden_{k}_prsclip-tiny.npy"), atol=1e-6,
                                   rtol=0, err_msg=k)
    np.testing.assert_array_equal(np.load(tmp_path / "golden_labels.npy"), np.load(GOLDEN_PRS / "golden_labels.npy"))


def test_ablations_reject_mismatched_classifier(ablation_dir):
    np.save(ablation_dir / "golden_classifier_prsclip-tiny.npy", np.ones((64, 2), np.float32))
    res = cli("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir",
                     ablation_dir, "--figures_dir", ablation_dir, check=False)
    assert res.returncode == 2
    assert "golden_classifier_prsclip-tiny.npy" in res.stderr and "d=32" in res.stderr


def test_ablations_reject_wrong_label_count(ablation_dir):
    np.save(ablation_dir / "golden_labels.npy", np.zeros(5, np.int64))
    res = cli("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir",
                     ablation_dir, "--figures_dir", ablation_dir, check=False)
    assert res.returncode == 2 and "golden_labels.npy" in res.stderr and "5 labels but 6 images" in res.stderr


def test_ablations_missing_arrays_name_the_file(tmp_path):
    res = cli("compute_ablations.py", "--model", "prsclip-tiny", "--dataset", "golden", "--input_dir",
                     tmp_path, "--figures_dir", tmp_path, check=False)
    assert res.returncode == 2 and "golden_attn_prsclip-tiny.npy" in res.stderr and "compute_prs.py" in res.stderr


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,message", [
    (["--dataset", "golden", "--data_path", "/nonexistent/dir"], "no such directory"),
    (["--dataset", "myfolder"], "--data_path is required"),
    (["--dataset", "sample", "--model", "ViT-B16"], "unknown open_clip model"),
    (["--dataset", "sample", "--model", "tiny-resnet", "--pretrained", "none"], "no attention heads to split"),
    (["--dataset", "sample", "--pretrained", "/no/such/weights.pt"], "not found"),
])
def test_compute_prs_bad_input(tmp_path, extra, message):
    args = list(TINY_ARGS)
    for flag in ("--model", "--pretrained"):
        if flag in extra:
            i = args.index(flag)
            del args[i:i + 2]
    res = cli("compute_prs.py", *args, *extra, "--output_dir", tmp_path, check=False)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    res = run_script("compute_prs.py", *TINY_ARGS, "--dataset", "golden", "--data_path", tmp_path / "missing",
                     "--output_dir", tmp_path, check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"compute_prs.py: error: --data_path {tmp_path / 'missing'}: "
                                               f"no such directory (dataset 'golden')"]


def test_compute_prs_empty_data_path(tmp_path):
    (tmp_path / "empty").mkdir()
    res = cli("compute_prs.py", *TINY_ARGS, "--dataset", "x", "--data_path", tmp_path / "empty",
                     "--output_dir", tmp_path, check=False)
    assert res.returncode == 2 and "empty" in res.stderr


def test_text_projection_unknown_dataset(tmp_path):
    res = cli("compute_text_projection.py", *TINY_ARGS, "--dataset", "flowers", "--output_dir", tmp_path,
                     check=False)
    assert res.returncode == 2 and "--classnames" in res.stderr
