"""End-to-end tests of compute_sparse_decomposition.py through its command line, on tiny fixtures made here.

Fixtures: the golden second-order files of the QuickGELU tiny model (merged [6, 256, 32] for MLP layer 1 and
its top-3 PCs [256, 32], renamed to this run's names), 60 random unit text embeddings [60, 32] with their
60 lines, and the golden random 2-class classifier. --evaluate runs the model on the 6 golden images (split
"train" = the images of the merged file), so the expected accuracies can be recomputed here from the golden
merged file and the golden embedding, independently of the script.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import CONFIGS, GOLDEN, GOLDEN_WEIGHTS, run_script
from sklearn.decomposition import SparseCoder
from sklearn.linear_model import Lasso

SCRIPT = "compute_sparse_decomposition.py"
MODEL, PRETRAINED = "prsclip-tiny-quickgelu", "prsclip-tiny_seed0"  # file-name parts
T = 60
LABELS = np.array([0, 0, 0, 1, 1, 1])


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    dirs = {k: root / k for k in ("inp", "out", "desc")}
    for d in dirs.values():
        d.mkdir()
    so = GOLDEN / "second_order"
    shutil.copy(so / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_merged.npy",
                dirs["inp"] / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_merged.npy")
    shutil.copy(so / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_3_pca.npy",
                dirs["out"] / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy")
    rng = np.random.default_rng(0)
    texts = rng.standard_normal((T, 32)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    np.save(dirs["inp"] / f"toy_{MODEL}.npy", texts)  # paper 1's name (the fallback)
    (dirs["desc"] / "toy.txt").write_text("".join(f"text number {i}\n" for i in range(T)))
    shutil.copy(GOLDEN / "ablations" / "classifier_random2.npy", dirs["inp"] / f"golden_classifier_{MODEL}.npy")
    return {**dirs, "texts": texts, "pcas": np.load(so / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_3_pca.npy"),
            "merged": np.load(so / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_merged.npy"),
            "r": np.load(so / "encode_image_quickgelu.npy"),
            "classifier": np.load(GOLDEN / "ablations" / "classifier_random2.npy")}


def args_for(fx, *extra, components=5, dirs=None):
    d = {**{k: fx[k] for k in ("inp", "out", "desc")}, **(dirs or {})}
    return ["--model_config", CONFIGS, "--model", MODEL, "--pretrained", GOLDEN_WEIGHTS, "--device", "cpu",
            "--dataset", "golden", "--data_path", GOLDEN / "images", "--split", "train", "--mlp_layer", "1",
            "--top_k_pca", "3", "--components", str(components), "--text_descriptions", "toy",
            "--input_dir", d["inp"], "--output_dir", d["out"], "--descriptions_dir", d["desc"],
            "--num_workers", "0", *extra]


def dictionary(texts: np.ndarray, norm: str) -> np.ndarray:
    """The dictionary, built here independently (float64): centred over texts, then rescaled, times 100."""
    c = texts.astype(np.float64) - texts.mean(0)
    if norm == "per_dimension":  # the original: each embedding dimension over the texts
        return 100 * c / np.linalg.norm(c, axis=0, keepdims=True)
    return 100 * np.sqrt(c.shape[1] / len(c)) * c / np.linalg.norm(c, axis=1, keepdims=True)


def outputs(fx, stem):
    js = json.loads((fx["out"] / f"{stem}.json").read_text())
    return js, sp.load_npz(fx["out"] / f"{stem}.npz")


def check_json_matches_npz(js, codes, k):
    dense = codes.toarray()
    assert sorted(js, key=int) == [str(i) for i in range(dense.shape[0])]
    for i, row in js.items():
        nz = np.nonzero(dense[int(i)])[0]
        want = nz[np.argsort(-np.abs(dense[int(i), nz]), kind="stable")][:k]
        assert [e[0] for e in row] == want.tolist()
        assert [e[1] for e in row] == pytest.approx(dense[int(i), want].tolist(), rel=1e-6)
        assert [e[2] for e in row] == [f"text number {j}" for j in want]


def expected_accuracy(fx, js, norm):
    """The original's --evaluate, recomputed from the golden files (the merged file = these 6 images)."""
    D = dictionary(fx["texts"], norm)
    K = len(js)
    trunc = np.zeros((K, T))
    for i, row in js.items():
        for j, c, _ in row:
            trunc[int(i), j] = c
    rec = trunc @ D
    e, r, W = fx["merged"].astype(np.float64), fx["r"].astype(np.float64), fx["classifier"].astype(np.float64)
    mean = e.mean(0)
    rep = 100 * r / np.linalg.norm(r, axis=1, keepdims=True)
    abl = rep - e.sum(1) + mean.sum(0)
    coef = np.einsum("bkd,kd->bk", e - mean, rec)
    reps = {"baseline": rep, "all_neurons_mean_ablated": abl, "reconstructed": abl + coef @ rec,
            "reconstructed_projection": abl + (coef / (rec * rec).sum(1)) @ rec}
    acc = {}
    for k, v in reps.items():
        logits = v @ W
        assert np.abs(logits[:, 0] - logits[:, 1]).min() > 1e-3  # decisions well away from float error
        acc[k] = float((logits.argmax(1) == LABELS).mean() * 100)
    return acc


def test_omp_per_dimension_evaluate(fx):
    """The original's setting: files equal scikit-learn's SparseCoder on the original dictionary; --evaluate."""
    res = run_script(SCRIPT, *args_for(fx, "--evaluate"))
    stem = f"golden_mlps_{MODEL}_{PRETRAINED}_1_toy_decomposition_omp_1.0_5"
    js, codes = outputs(fx, stem)
    assert codes.format == "csc" and codes.shape == (256, T) and codes.dtype == np.float32
    D = dictionary(fx["texts"], "per_dimension").astype(np.float32)
    ref = SparseCoder(dictionary=D, transform_algorithm="omp", transform_alpha=1e-4,
                      transform_n_nonzero_coefs=5).transform(fx["pcas"])
    np.testing.assert_array_equal(codes.toarray() != 0, ref != 0)
    np.testing.assert_allclose(codes.toarray(), ref, atol=1e-5)
    check_json_matches_npz(js, codes, 5)
    assert all(len(row) == 5 for row in js.values())
    assert (fx["out"] / f"{stem}_fit.png").stat().st_size > 1000

    ev = json.loads((fx["out"] / f"{stem}_evaluation.json").read_text())
    want = expected_accuracy(fx, js, "per_dimension")
    assert ev["accuracy_percent"] == pytest.approx(want)
    assert ev["num_images"] == 6
    assert f"Reconstructed neurons: {want['reconstructed']}" in res.stdout
    assert not list(fx["out"].glob("*.partial*"))


def test_omp_per_text(fx):
    run_script(SCRIPT, *args_for(fx, "--dictionary_norm", "per_text", components=7))
    js, codes = outputs(fx, f"golden_mlps_{MODEL}_{PRETRAINED}_1_toy_decomposition_omp_1.0_7_per_text")
    D = dictionary(fx["texts"], "per_text").astype(np.float32)
    ref = SparseCoder(dictionary=D, transform_algorithm="omp", transform_n_nonzero_coefs=7).transform(fx["pcas"])
    np.testing.assert_array_equal(codes.toarray() != 0, ref != 0)
    np.testing.assert_allclose(codes.toarray(), ref, atol=1e-5)
    check_json_matches_npz(js, codes, 7)


@pytest.mark.parametrize("norm", ["per_dimension", "per_text"])
def test_nnlasso(fx, norm, tmp_path):
    l1 = 20.0
    extra = ["--solver", "nnlasso", "--l1_penalty", str(l1), "--seed", "3", "--dictionary_norm", norm]
    if norm == "per_text":
        extra.append("--evaluate")
    shutil.copy(fx["out"] / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy", tmp_path)
    run_script(SCRIPT, *args_for(fx, *extra, components=4, dirs={"out": tmp_path}))
    suffix = "_per_text" if norm == "per_text" else ""
    stem = f"golden_mlps_{MODEL}_{PRETRAINED}_1_toy_decomposition_nnlasso_{l1}_4{suffix}"
    js = json.loads((tmp_path / f"{stem}.json").read_text())
    codes = sp.load_npz(tmp_path / f"{stem}.npz")
    dense = codes.toarray()
    assert (dense >= 0).all()
    D = dictionary(fx["texts"], norm)
    d = D.shape[1]
    idx = range(0, 256, 16)  # a subset, checked against scikit-learn's Lasso(positive=True)
    ref = np.stack([Lasso(alpha=l1 / (2 * d), fit_intercept=False, positive=True, max_iter=100000, tol=1e-10)
                    .fit(D.T, fx["pcas"][i].astype(np.float64)).coef_ for i in idx])
    assert 1 < (ref > 0).sum(1).mean() < T / 2  # sparse but not trivial at this penalty
    np.testing.assert_allclose(dense[list(idx)], ref, atol=2e-4)
    check_json_matches_npz(js, codes, 4)
    assert max(len(r) for r in js.values()) == 4  # at most --components listed, never zeros
    if norm == "per_text":
        ev = json.loads((tmp_path / f"{stem}_evaluation.json").read_text())
        assert ev["accuracy_percent"] == pytest.approx(expected_accuracy(fx, js, norm))


def bad(fx, *extra, dirs=None, components=5):
    """Through the command line: exit status 2 and one clear line, no traceback."""
    res = run_script(SCRIPT, *args_for(fx, *extra, components=components, dirs=dirs), check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "error:" in res.stderr
    return res.stderr


def bad_in_process(fx, exc, *extra, dirs=None, components=5) -> str:
    """The same checks without a subprocess (main() raises what the command line prints)."""
    import compute_sparse_decomposition as script

    args = script.get_args_parser().parse_args(list(map(str, args_for(fx, *extra, components=components,
                                                                      dirs=dirs))))
    with pytest.raises(exc) as e:
        script.main(args)
    return str(e.value)


def test_bad_inputs_command_line(fx, tmp_path):
    # text dictionary of the wrong dimension (another model's texts): the file and both dimensions are named
    inp = tmp_path / "inp"
    shutil.copytree(fx["inp"], inp)
    np.save(inp / f"toy_{MODEL}_{PRETRAINED}.npy", np.ones((T, 16), np.float32))  # paper 2's name wins
    err = bad(fx, dirs={"inp": inp})
    assert f"toy_{MODEL}_{PRETRAINED}.npy" in err and "dimension 16" in err and "dimension 32" in err
    # --components larger than the dictionary
    err = bad(fx, components=T + 1)
    assert f"--components {T + 1}" in err and f"({T}," in err


def test_bad_inputs(fx, tmp_path):
    # missing PCA file: named, with the script that writes it
    err = bad_in_process(fx, FileNotFoundError, "--top_k_pca", "7")
    assert f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_7_pca.npy" in err and "compute_pcas.py" in err
    # missing text embeddings: both names tried are listed
    err = bad_in_process(fx, FileNotFoundError, "--text_descriptions", "nothere")
    assert f"nothere_{MODEL}_{PRETRAINED}.npy" in err and f"nothere_{MODEL}.npy" in err
    # lines and embeddings disagree
    desc = tmp_path / "desc"
    desc.mkdir()
    (desc / "toy.txt").write_text("".join(f"t{i}\n" for i in range(T - 1)))
    err = bad_in_process(fx, ValueError, dirs={"desc": desc})
    assert f"{T} embeddings but {T - 1} lines" in err
    err = bad_in_process(fx, ValueError, components=0)
    assert "--components 0" in err
    # --evaluate without the training merged file (checked before solving: nothing is written)
    inp2 = tmp_path / "inp2"
    shutil.copytree(fx["inp"], inp2)
    (inp2 / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_merged.npy").unlink()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(fx["out"] / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy", out)
    err = bad_in_process(fx, FileNotFoundError, "--evaluate", dirs={"inp": inp2, "out": out})
    assert f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_merged.npy" in err and "compute_second_order_neuron_prs" in err
    assert not list(out.glob("*decomposition*"))
    # --evaluate at the last layer (no later attention layers, so no second-order effects)
    shutil.copy(out / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy",
                out / f"golden_train_mlps_{MODEL}_{PRETRAINED}_3_3_pca.npy")
    err = bad_in_process(fx, ValueError, "--evaluate", "--mlp_layer", "3", dirs={"out": out})
    assert "--mlp_layer 3" in err and "last layer" in err
    # PCs that do not match the model's layer ([neurons, d] = [256, 32])
    np.save(out / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy", fx["pcas"][:100])
    err = bad_in_process(fx, ValueError, "--evaluate", dirs={"out": out})
    assert "[100, 32]" in err and "[256, 32]" in err


# ----------------------------------------------------------------------------- flags with a visible effect
def test_coefficient_scales_the_dictionary(fx, tmp_path):
    """--coefficient 50: the dictionary is half as long, so OMP picks the same texts with twice the coefficients
    (scikit-learn's SparseCoder on the dictionary built here with that coefficient)."""
    shutil.copy(fx["out"] / f"golden_train_mlps_{MODEL}_{PRETRAINED}_1_3_pca.npy", tmp_path)
    run_script(SCRIPT, *args_for(fx, "--coefficient", "50", dirs={"out": tmp_path}))
    _, codes = outputs({"out": tmp_path}, f"golden_mlps_{MODEL}_{PRETRAINED}_1_toy_decomposition_omp_1.0_5")
    D = (dictionary(fx["texts"], "per_dimension") / 2).astype(np.float32)
    ref = SparseCoder(dictionary=D, transform_algorithm="omp", transform_n_nonzero_coefs=5).transform(fx["pcas"])
    np.testing.assert_array_equal(codes.toarray() != 0, ref != 0)
    np.testing.assert_allclose(codes.toarray(), ref, atol=2e-5)
    assert np.abs(ref).max() > 1e-3  # so the default coefficient's codes (half of these) would fail the check


def test_train_split_names_the_training_files(fx, tmp_path):
    """--train_split: the PCs and (with --evaluate) the merged file are read from that split's names."""
    inp, out = tmp_path / "inp", tmp_path / "out"
    shutil.copytree(fx["inp"], inp)
    out.mkdir()
    train = f"golden_train_mlps_{MODEL}_{PRETRAINED}_1"
    other = train.replace("_train_", "_other_")
    (inp / f"{train}_merged.npy").rename(inp / f"{other}_merged.npy")
    shutil.copy(fx["out"] / f"{train}_3_pca.npy", out / f"{other}_3_pca.npy")
    err = bad_in_process(fx, FileNotFoundError, dirs={"inp": inp, "out": out})
    assert f"{train}_3_pca.npy" in err
    run_script(SCRIPT, *args_for(fx, "--train_split", "other", "--evaluate", dirs={"inp": inp, "out": out}))
    stem = f"golden_mlps_{MODEL}_{PRETRAINED}_1_toy_decomposition_omp_1.0_5"
    js, codes = outputs({"out": out}, stem)
    ref = SparseCoder(dictionary=dictionary(fx["texts"], "per_dimension").astype(np.float32),
                      transform_algorithm="omp", transform_n_nonzero_coefs=5).transform(fx["pcas"])
    np.testing.assert_allclose(codes.toarray(), ref, atol=1e-5)
    ev = json.loads((out / f"{stem}_evaluation.json").read_text())
    assert ev["accuracy_percent"] == pytest.approx(expected_accuracy(fx, js, "per_dimension"))
