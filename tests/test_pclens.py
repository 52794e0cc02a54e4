"""PCLens' svd_data_approx (utils/text/textspan.py) and PCLens' command lines (utils/scripts/), end to end on the tiny model.

The reference is written here from PCLens' description, in float64 NumPy: SVD of the centred head, components
up to 99 % of the singular-value sum (+1, capped), texts centred by their mean and unit-normalised, ranked by
cosine, the stronger pole made positive, least-squares projection onto the span of the components' top texts.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_WEIGHTS, REPO, TINY_ARGS, run_inprocess

from utils.errors import InputError
from utils.text.textspan import (head_stats, pclens_from_stats, pclens_record, reconstruct, svd_data_approx,
                                 textspan_reference_numpy)

GOLDEN_PRS = GOLDEN / "prs"
MODEL = "prsclip-tiny"
PCLENS_SET = "top_1500_nouns_5_sentences_imagenet_bias_clean"


def pclens_reference(data: np.ndarray, texts: np.ndarray, n: int, cap=None) -> dict:
    """PCLens' svd_data_approx in float64 NumPy, with the stronger pole of each component made positive."""
    x = np.asarray(data, np.float64)
    mu = x.mean(0)
    xc = x - mu
    _, s, vh = np.linalg.svd(xc, full_matrices=False)
    r = int((np.cumsum(s) / s.sum() < 0.99).sum()) + 1
    r = min(r, cap) if cap else r
    vh, s = vh[:r].copy(), s[:r]
    t = np.asarray(texts, np.float64)
    t = t - t.mean(0)
    cos = (t / np.linalg.norm(t, axis=1, keepdims=True)) @ vh.T  # [T, r]
    flip = np.abs(cos.min(0)) > np.abs(cos.max(0))
    vh[flip] *= -1
    cos[:, flip] *= -1
    order = np.argsort(-cos, axis=0, kind="stable")
    top, bottom = order[:n].T, order[::-1][:n].T  # [r, n]
    P = cos[top[:, 0]]  # [r, r]: each component's top text in component coordinates
    coef, *_ = np.linalg.lstsq(P.T, (xc @ vh.T).T, rcond=None)  # least squares: xc vh^T ~ coef^T P
    return {"rank": r, "s2": s ** 2, "rel": 100 * s ** 2 / (s ** 2).sum(), "vh": vh, "top": top, "bottom": bottom,
            "top_cos": np.take_along_axis(cos.T, top, 1), "bottom_cos": np.take_along_axis(cos.T, bottom, 1),
            "rec": mu + (coef.T @ P) @ vh}


def _planted(g, B, d, sv, mean_scale=1.0):
    """Data [B, d] with centred singular values exactly ``sv`` along the components U [len(sv), d]."""
    z = g.normal(size=(B, len(sv)))
    z = np.linalg.qr(z - z.mean(0))[0]  # orthonormal, zero-mean columns
    u = np.linalg.qr(g.normal(size=(d, len(sv))))[0].T
    return (z * sv) @ u + mean_scale * g.normal(size=d), u


# ----------------------------------------------------------------------------- the algorithm
def test_hand_built_head_cosine_ranking_cap_strengths_poles_and_reconstruction():
    d, B = 8, 40
    g = np.random.default_rng(0)
    z = g.normal(size=(B, 4))
    z = np.linalg.qr(z - z.mean(0))[0]
    sv = np.array([8.0, 4.0, 2.0, 1.0])
    mu = np.arange(d, dtype=np.float64)
    data = np.zeros((B, d))
    data[:, :4] = z * sv  # components e0..e3
    data += mu
    e = np.eye(d)
    rows = {  # centred texts (the offset below is removed by PCLens' centring)
        "pure e0": 0.4 * e[0] + 0.1 * e[5],  # cosine 0.97 on e0, small coordinate
        "long e0": 3.0 * e[0] + 2.0 * e[6],  # the largest coordinate on e0, cosine 0.83
        "anti e1": -1.0 * e[1] + 0.05 * e[7],  # the stronger pole of e1 is negative
        "weak e1": 0.6 * e[1] + 0.5 * e[5],
        "e2 text": 0.7 * e[2] + 0.2 * e[4],
        "anti e2": -0.5 * e[2] + 0.45 * e[4],
        "e3 text": 0.9 * e[3] + 0.3 * e[4],
        "mixed": 0.5 * e[0] - 0.5 * e[2] + 0.5 * e[3] + 0.5 * e[4],
    }
    names = list(rows)
    a = np.array([rows[k] for k in names]) + 0.01 * g.normal(size=(len(names), d))  # no ties among cosines
    a = np.vstack([a, -a.sum(0)])  # a balancing text: the centred texts are exactly a
    names.append("balance")
    texts = a + 0.3 + 0.05 * np.arange(d)  # any common offset
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    assert np.argmax(a[:, 0]) == names.index("long e0") and np.argmax(unit[:, 0]) == names.index("pure e0")

    res = pclens_from_stats(head_stats(data[None]), texts, 3)[0]
    assert res.rank == 4  # cumulative 8/15, 12/15, 14/15 < 0.99, then + 1
    res = pclens_from_stats(head_stats(data[None]), texts, 3, max_components=3)[0]
    assert res.rank == 3  # the cap
    # components e0, -e1 (its stronger pole is "anti e1"), e2 (|0.96| beats |-0.74|), in order of strength
    expected_sign = []
    for j in range(3):
        c = unit[:, j]
        sign = -1.0 if abs(c.min()) > abs(c.max()) else 1.0
        expected_sign.append(sign)
        np.testing.assert_allclose(res.components[j].numpy(), sign * e[j], atol=1e-12)
        order = np.argsort(-sign * c, kind="stable")
        assert res.top[j].tolist() == order[:3].tolist()
        assert res.bottom[j].tolist() == order[::-1][:3].tolist()
        np.testing.assert_allclose(res.top_values[j], sign * c[order[:3]], atol=1e-12)
        np.testing.assert_allclose(res.bottom_values[j], sign * c[order[::-1][:3]], atol=1e-12)
    assert expected_sign == [1.0, -1.0, 1.0]
    assert [names[i] for i in res.indices] == ["pure e0", "anti e1", "e2 text"]
    np.testing.assert_allclose(res.singular_values, sv[:3], rtol=1e-12)
    np.testing.assert_allclose(res.strength, sv[:3] ** 2, rtol=1e-12)
    np.testing.assert_allclose(res.strength_rel, 100 * sv[:3] ** 2 / (sv[:3] ** 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(res.variance_explained, sv[:3] ** 2 / (sv ** 2).sum(), rtol=1e-12)
    # three independent top texts within the 3 kept components: the rank-3 truncation of the head, exactly
    rec, record = svd_data_approx(data, texts.astype(np.float32), names, text_per_princ_comp=3, iters=3)
    expect = mu + (data - mu) @ np.diag([1.0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(rec, expect, atol=1e-5)  # float32 in and out
    exact = reconstruct(torch.from_numpy(data)[None], res.mean[None], res.basis[None])[0].numpy()
    np.testing.assert_allclose(exact, expect, atol=1e-12)
    # PCLens' JSON fields: s holds s^2, the stronger pole's texts first, cosine of the reconstruction text
    assert list(record) == ["mean_values_att", "mean_values_text", "project_matrix", "vh", "s", "embeddings_sort"]
    np.testing.assert_allclose(record["s"], sv[:3] ** 2, rtol=1e-5)
    np.testing.assert_allclose(record["project_matrix"], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(record["mean_values_text"], texts.mean(0), atol=1e-5)
    comp1 = record["embeddings_sort"][1]
    assert list(comp1["text"][0]) == ["text_max_0", "corr_max_0"] and comp1["text"][0]["text_max_0"] == "anti e1"
    assert [list(t)[0] for t in comp1["text"]] == [f"text_max_{k}" for k in range(3)] + [f"text_min_{k}" for k in range(3)]
    assert comp1["cosine_similarity"] == comp1["correlation"] == pytest.approx(-unit[2, 1], abs=1e-6)
    assert comp1["strength_abs"] == pytest.approx(16.0) and comp1["strength_rel"] == pytest.approx(1600 / 84)


def test_repeated_texts_reconstruct_onto_the_span_of_the_distinct_texts():
    """Few texts, many components: top texts repeat and new ones follow; the reconstruction must still be the
    least-squares projection onto the span of the distinct top texts (the old Householder basis lost part of it)."""
    g = np.random.default_rng(3)
    d, B = 14, 80
    data, _ = _planted(g, B, d, np.geomspace(10, 0.5, 9))
    texts = g.normal(size=(6, d)) + 2.0
    ref = pclens_reference(data, texts, 2)
    top = ref["top"][:, 0].tolist()
    first_seen = [top.index(t) for t in top]
    repeats = [j for j, f in enumerate(first_seen) if f != j]
    assert ref["rank"] == 9 and repeats and any(first_seen[j] == j for j in range(min(repeats), len(top)))
    res = pclens_from_stats(head_stats(data[None]), texts, 2)[0]
    assert res.indices.tolist() == top
    rec = reconstruct(torch.from_numpy(data)[None], res.mean[None], res.basis[None])[0].numpy()
    scale = np.abs(data - data.mean(0)).max()
    assert np.abs(rec - ref["rec"]).max() < 1e-10 * scale
    # the basis: orthonormal rows, zero rows exactly where a text repeats, spanning the distinct texts' projections
    q = res.basis.numpy()
    nonzero = np.linalg.norm(q, axis=1) > 0.5
    assert (~nonzero).nonzero()[0].tolist() == repeats
    np.testing.assert_allclose(q[nonzero] @ q[nonzero].T, np.eye(nonzero.sum()), atol=1e-12)
    assert np.linalg.matrix_rank(q[nonzero]) == len(set(top))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_reference_on_random_heads(seed):
    g = np.random.default_rng(10 + seed)
    d, B = 24, 120
    data, _ = _planted(g, B, d, np.r_[np.geomspace(6, 0.2, 16), np.full(8, 0.02)] + 0.001 * np.arange(24)[::-1])
    data = data.astype(np.float32).astype(np.float64)  # the same float32 values for both
    texts = (g.normal(size=(200, d)) + 1.5 * g.normal(size=d)).astype(np.float32)
    for cap in (None, 5):
        ref = pclens_reference(data, texts, 4, cap)
        res = pclens_from_stats(head_stats(data[None]), texts, 4, cap)[0]
        assert res.rank == ref["rank"]
        assert res.top.tolist() == ref["top"].tolist() and res.bottom.tolist() == ref["bottom"].tolist()
        np.testing.assert_allclose(res.top_values, ref["top_cos"], atol=1e-5)
        np.testing.assert_allclose(res.bottom_values, ref["bottom_cos"], atol=1e-5)
        np.testing.assert_allclose(res.strength, ref["s2"], rtol=1e-5)
        np.testing.assert_allclose(res.strength_rel, ref["rel"], rtol=1e-5)
        np.testing.assert_allclose(np.abs((res.components.numpy() * ref["vh"]).sum(1)), 1, atol=1e-6)
        np.testing.assert_allclose((res.components.numpy() * ref["vh"]).sum(1), 1, atol=1e-6)  # same sign
        rec, _ = svd_data_approx(data, texts, [str(i) for i in range(200)], text_per_princ_comp=4, iters=cap)
        np.testing.assert_allclose(rec, ref["rec"], atol=1e-5 * np.abs(data).max())


def test_single_component_head():
    g = np.random.default_rng(5)
    d, B = 6, 10
    u = np.linalg.qr(g.normal(size=(d, 1)))[0][:, 0]
    data = np.outer(g.normal(size=B), u) + g.normal(size=d)  # one component (PCLens: IndexError here)
    texts = g.normal(size=(7, d))
    rec, record = svd_data_approx(data, texts, [f"t{i}" for i in range(7)], text_per_princ_comp=2)
    assert len(record["s"]) == 1 and len(record["embeddings_sort"]) == 1 and len(record["vh"]) == 1
    np.testing.assert_allclose(record["project_matrix"], [[1.0]], atol=1e-6)
    np.testing.assert_allclose(rec, data, atol=1e-5)  # one text spans the one component
    ref = pclens_reference(data, texts, 2)
    assert ref["rank"] == 1 and record["embeddings_sort"][0]["text"][0] == {
        "text_max_0": f"t{ref['top'][0, 0]}", "corr_max_0": pytest.approx(ref["top_cos"][0, 0], abs=1e-6)}


def test_bad_inputs():
    g = np.random.default_rng(0)
    st = head_stats(g.normal(size=(1, 10, 8)))
    with pytest.raises(ValueError, match=r"text features of shape \[5, 4\] do not match the heads' dimension d=8"):
        pclens_from_stats(st, g.normal(size=(5, 4)), 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        pclens_from_stats(st, g.normal(size=(5, 8)), 2, max_components=0)


def test_record_of_a_tie_lists_the_negative_pole_first():
    """PCLens lists the positive pole first only when its top |cosine| is strictly larger."""
    d = 4
    e = np.eye(d)
    z = np.linalg.qr(np.random.default_rng(1).normal(size=(20, 1)) - 0.0)[0]
    z -= z.mean(0)
    data = z * 5 @ e[:1]
    texts = np.array([e[0], -e[0], e[1], -e[1]])  # zero mean; cosines +-1 on the component: a tie
    res = pclens_from_stats(head_stats(data[None]), texts, 1)[0]
    rec = pclens_record(res, ["a", "b", "c", "d"])
    assert list(rec["embeddings_sort"][0]["text"][0])[0] == "text_min_0"


# ----------------------------------------------------------------------------- PCLens' command lines
def run_module(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m utils.scripts.<name> ...`` from the repository root, as PCLens' README runs it."""
    cmd = [sys.executable, "-m", f"utils.scripts.{name}", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{name} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def pclens_run(tmp_path_factory):
    """PCLens' three command lines on the golden images (an ImageFolder dataset 'golden') and the tiny model."""
    wd = tmp_path_factory.mktemp("pclens")
    out = wd / "output_dir"
    tiny = ["--model", MODEL, "--pretrained", GOLDEN_WEIGHTS, "--model_config", REPO / "tests" / "configs"]
    run_module("compute_activation_values", "--dataset", "golden", "--device", "cpu", *tiny,
               "--data_path", GOLDEN / "images", "--output_dir", out, "--seed", 12, "--num_workers", 0)
    run_module("compute_classes_embeddings", "--dataset", "golden", "--device", "cpu", *tiny,
               "--classnames", GOLDEN / "text" / "classnames.txt", "--output_dir", out)
    # PCLens' text set is not shipped: the command says how to get it ...
    explain = ["--device", "cpu", "--model", MODEL, "--algorithm", "svd_data_approx", "--seed", 12,
               "--num_of_last_layers", 4, "--text_descriptions", PCLENS_SET, "--dataset", "golden",
               "--input_dir", out, "--output_dir", out, "--text_dir", wd / "texts"]
    missing = run_inprocess("utils/scripts/compute_text_explanations.py", *explain)
    # ... and runs once a file of that name is there (a stand-in: 60 lines of our own set), embedded
    (wd / "texts").mkdir()
    lines = (REPO / "text_descriptions" / "image_descriptions_3500.txt").read_text().splitlines()[:60]
    (wd / "texts" / f"{PCLENS_SET}.txt").write_text("\n".join(lines) + "\n")
    code, _, err = run_inprocess("compute_text_set_projection.py", *TINY_ARGS, "--data_path",
                                 wd / "texts" / f"{PCLENS_SET}.txt", "--output_dir", out)
    assert code == 0, err
    res = run_module("compute_text_explanations", *explain)
    return {"wd": wd, "out": out, "missing": missing, "explain": explain, "stdout": res.stdout, "lines": lines}


def test_activation_values_are_the_golden_decomposition_under_pclens_names(pclens_run):
    out = pclens_run["out"]
    for k in ("attn", "mlp", "cls_attn"):
        a = np.load(out / f"golden_{k}_{MODEL}_seed_12.npy")
        np.testing.assert_allclose(a, np.load(GOLDEN_PRS / f"golden_{k}_{MODEL}.npy"), atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(np.load(out / f"golden_labels_{MODEL}_seed_12.npy"),
                                  np.load(GOLDEN_PRS / "golden_labels.npy"))
    np.testing.assert_allclose(np.load(out / f"golden_classifier_{MODEL}.npy"),
                               np.load(GOLDEN_PRS / f"golden_classifier_{MODEL}.npy"), atol=1e-6)


def test_text_explanations_jsonl(pclens_run):
    out, lines = pclens_run["out"], pclens_run["lines"]
    code, _, err = pclens_run["missing"]
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{PCLENS_SET}.txt: text set not found" in err and "fetch_original.py" in err
    path = out / f"golden_completeness_{PCLENS_SET}_{MODEL}_algo_svd_data_approx_seed_12.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["layer"], r["head"]) for r in rows] == [(l, h) for l in range(4) for h in range(4)] + [(-1, -1)]
    attn = np.load(out / f"golden_attn_{MODEL}_seed_12.npy").astype(np.float64)
    mlp = np.load(out / f"golden_mlp_{MODEL}_seed_12.npy").astype(np.float64)
    emb = np.load(out / f"{PCLENS_SET}_{MODEL}.npy")
    replaced = attn.copy()
    for r in rows[:-1]:
        assert list(r)[:2] == ["layer", "head"] and list(r)[2:] == ["mean_values_att", "mean_values_text",
                                                                  "project_matrix", "vh", "s", "embeddings_sort"]
        ref = pclens_reference(attn[:, r["layer"], r["head"]], emb, 5, 80)
        assert len(r["s"]) == ref["rank"] <= 5  # 6 images
        np.testing.assert_allclose(r["s"], ref["s2"], rtol=1e-4)
        for c, comp in enumerate(r["embeddings_sort"]):
            texts = [list(t.values())[0] for t in comp["text"]]
            assert texts == [lines[i] for i in ref["top"][c]] + [lines[i] for i in ref["bottom"][c]]
            assert comp["strength_rel"] == pytest.approx(ref["rel"][c], rel=1e-4)
        replaced[:, r["layer"], r["head"]] = ref["rec"]
    final = rows[-1]
    rep = replaced.sum((1, 2)) + mlp.sum(1)
    W = np.load(out / f"golden_classifier_{MODEL}.npy")
    labels = np.load(out / f"golden_labels_{MODEL}_seed_12.npy")
    assert final["accuracy"] == pytest.approx(((rep @ W).argmax(-1) == labels).mean() * 100)
    assert f"Current accuracy: {final['accuracy']}" in pclens_run["stdout"]
    assert final["nr_texts"] == len({list(comp["text"][0].values())[0] for r in rows[:-1]
                                     for comp in r["embeddings_sort"]})
    ref = pclens_reference(rep, emb, 5)  # the whole embedding: no cap
    np.testing.assert_allclose(final["s"], ref["s2"], rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(final["mean_values_att"], rep.mean(0), atol=1e-6)
    assert json.loads(path.with_name(path.name + ".provenance.json").read_text())["num_images"] == 6


def test_text_explanations_text_span(pclens_run):
    out = pclens_run["out"]
    args = [a for a in pclens_run["explain"]]
    args[args.index("svd_data_approx")] = "text_span"
    code, _, err = run_inprocess("utils/scripts/compute_text_explanations.py", *args, "--max_text", 3,
                                 "--num_of_last_layers", 1)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / f"golden_completeness_{PCLENS_SET}_{MODEL}_algo_text_span_seed_12"
                                                 f".jsonl").read_text().splitlines()]
    assert [(r["layer"], r["head"]) for r in rows] == [(3, h) for h in range(4)] + [(-1, -1)]
    attn = np.load(out / f"golden_attn_{MODEL}_seed_12.npy")
    emb = np.load(out / f"{PCLENS_SET}_{MODEL}.npy")
    tc = emb - emb.mean(0)
    for r in rows[:-1]:
        x = attn[:, 3, r["head"]].astype(np.float64)
        _, chosen = textspan_reference_numpy(x - x.mean(0), tc, 3, 80, dtype=np.float64)  # centred SVD and texts
        texts = [t["text"] for t in r["embeddings_sort"]]
        # the first pick; later ones also depend on the 6th singular vector, arbitrary here (5 centred dimensions)
        assert len(texts) == 3 and texts[0] == pclens_run["lines"][chosen[0]]
        assert np.asarray(r["project_matrix"]).shape == (6, 32)  # min(80, B, d) right singular vectors
    assert len(rows[-1]["embeddings_sort"]) == 80 and "accuracy" in rows[-1]


def test_subset_of_images_as_pclens_draws_it(pclens_run, tmp_path):
    code, _, err = run_inprocess("utils/scripts/compute_activation_values.py", *TINY_ARGS, "--dataset", "golden",
                                 "--data_path", GOLDEN / "images", "--output_dir", tmp_path, "--seed", 3,
                                 "--samples_per_class", 2, "--tot_samples_per_class", 3, "--num_workers", 0,
                                 "--quantization", "fp16", "--batch_size", 4)
    assert code == 0, err
    random.seed(3)  # PCLens' draw: per class block of 3 consecutive images, 2 of them
    index = [i for c in range(2) for i in random.sample(list(range(6))[3 * c:3 * c + 3], 2)]
    full = np.load(pclens_run["out"] / f"golden_attn_{MODEL}_seed_12.npy")
    sub = np.load(tmp_path / f"golden_attn_{MODEL}_seed_3.npy")
    assert sub.dtype == np.float16 and sub.shape == (4, 4, 4, 32)
    np.testing.assert_allclose(sub.astype(np.float32), full[index], atol=2e-4)
    np.testing.assert_array_equal(np.load(tmp_path / f"golden_labels_{MODEL}_seed_3.npy"), [0, 0, 1, 1])


@pytest.mark.parametrize("module,extra,message", [
    ("compute_activation_values", ["--vision_proj", "False"], "--vision_proj False: not supported"),
    ("compute_activation_values", ["--full_output", "true"], "--full_output True: not supported"),
    ("compute_activation_values", ["--samples_per_class", "2"], "--samples_per_class needs --tot_samples_per_class"),
    ("compute_activation_values", ["--samples_per_class", "4", "--tot_samples_per_class", "3"],
     "--samples_per_class 4: must be between 1 and --tot_samples_per_class 3"),
    ("compute_text_explanations", ["--seed", "99"], "golden_attn_prsclip-tiny_seed_99.npy: not found (written by "
                                                    "python -m utils.scripts.compute_activation_values)"),
])
def test_refused_flags_and_missing_inputs(pclens_run, tmp_path, module, extra, message):
    if module == "compute_text_explanations":
        args = [*pclens_run["explain"], *extra]
    elif module == "compute_classes_embeddings":
        args = [*TINY_ARGS, "--dataset", "golden", "--output_dir", tmp_path, *extra]
    else:
        args = [*TINY_ARGS, "--dataset", "golden", "--data_path", GOLDEN / "images", "--output_dir", tmp_path, *extra]
    code, out, err = run_inprocess(f"utils/scripts/{module}.py", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.npy"))


def test_missing_text_embeddings_say_how_to_make_them(pclens_run, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(pclens_run["wd"] / "texts" / f"{PCLENS_SET}.txt", texts / "other.txt")
    args = [*pclens_run["explain"], "--text_dir", texts, "--text_descriptions", "other"]
    code, _, err = run_inprocess("utils/scripts/compute_text_explanations.py", *args)
    assert code == 2 and "other_prsclip-tiny.npy: text embeddings not found" in err
    assert "compute_text_set_projection.py --model prsclip-tiny" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", [PCLENS_SET, "top_1500_nouns_5_sentences_imagenet_clean"])
def test_pclens_text_set_is_pinned_to_pclens_repository(tmp_path, name):
    import io

    from utils.text.sets import HashMismatchError, fetch_original

    seen = []

    def opener(url):
        seen.append(url)
        return io.BytesIO(b"not PCLens' file\n")

    with pytest.raises(HashMismatchError):
        fetch_original([f"{name}.txt"], tmp_path, opener=opener)
    assert seen == ["https://raw.githubusercontent.com/vstrozzi/PCLens-spectral-explainability-in-CLIP-ViT-encoder/"
                    f"44f190fd5c8e940ab9ddb9a3786cbd12b2ccf236/utils/text_descriptions/{name}.txt"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- PCLens' notebook flags
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An open_clip tag of the tiny model whose weights (the golden ones) are only in a Hugging Face cache folder
    of their own: found there through --cache_dir, nowhere else (offline)."""
    import open_clip.pretrained as pretrained

    monkeypatch.setitem(pretrained._PRETRAINED, MODEL, {"cachetest": pretrained._pcfg(hf_hub="prsclip/tiny-test/")})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "cache" / "models--prsclip--tiny-test"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copy(GOLDEN_WEIGHTS, repo / "snapshots" / ("0" * 40) / "open_clip_model.safetensors")
    return tmp_path / "cache"


@pytest.mark.parametrize("module", ["compute_activation_values", "compute_classes_embeddings",
                                    "compute_text_embeddings"])
def test_cache_dir_is_where_open_clip_finds_the_weights(hub_cache, tmp_path, module):
    tiny = ["--model_config", REPO / "tests" / "configs", "--model", MODEL, "--device", "cpu"]
    extra = {"compute_activation_values": ["--dataset", "golden", "--data_path", GOLDEN / "images", "--seed", 12,
                                           "--num_workers", 0, "--samples_per_class", "None"],
             "compute_classes_embeddings": ["--dataset", "golden", "--classnames", GOLDEN / "text" / "classnames.txt"],
             "compute_text_embeddings": ["--data_path", GOLDEN / "text" / "classnames.txt"]}[module]
    out = tmp_path / "out"
    code, _, err = run_inprocess(f"utils/scripts/{module}.py", *tiny, "--pretrained", "cachetest", *extra,
                                 "--output_dir", out)
    assert code == 2 and "not cached and HF_HUB_OFFLINE is set" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_inprocess(f"utils/scripts/{module}.py", *tiny, "--pretrained", "cachetest", *extra,
                                 "--output_dir", out, "--cache_dir", hub_cache, "--full_output", "False",
                                 "--vision_proj", "True") if module == "compute_activation_values" else \
        run_inprocess(f"utils/scripts/{module}.py", *tiny, "--pretrained", "cachetest", *extra, "--output_dir", out,
                      "--cache_dir", hub_cache)
    assert code == 0, err
    if module == "compute_activation_values":  # the golden weights: the golden decomposition
        np.testing.assert_allclose(np.load(out / f"golden_attn_{MODEL}_seed_12.npy"),
                                   np.load(GOLDEN_PRS / f"golden_attn_{MODEL}.npy"), atol=1e-6)
    elif module == "compute_classes_embeddings":
        np.testing.assert_allclose(np.load(out / f"golden_classifier_{MODEL}.npy"),
                                   np.load(GOLDEN_PRS / f"golden_classifier_{MODEL}.npy"), atol=1e-6)
    else:
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(GOLDEN_WEIGHTS))
        names = (GOLDEN / "text" / "classnames.txt").read_text().splitlines()
        with torch.no_grad():
            ref = model.eval().encode_text(open_clip.get_tokenizer(MODEL)(names), normalize=True).numpy()
        np.testing.assert_allclose(np.load(out / f"classnames_{MODEL}.npy"), ref, atol=1e-5)


def test_missing_pclens_text_set_names_the_fetch_command(tmp_path):
    from utils.text.sets import TEXT_DIR

    name = "top_1500_nouns_5_sentences_imagenet_clean.txt"
    if (TEXT_DIR / "external" / name).exists():
        pytest.skip(f"{name} is fetched on this machine")
    code, _, err = run_inprocess("utils/scripts/compute_text_embeddings.py", *TINY_ARGS, "--output_dir", tmp_path,
                                 "--data_path", tmp_path / "utils" / "text_descriptions" / name)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"text set not found (nor {tmp_path / 'utils' / 'text_descriptions' / 'external' / name}, " in err
    assert f"fetch it with `python text_descriptions/fetch_original.py {name}`" in err


def test_images_embedding_adds_the_layers_left_out(tmp_path):
    """compute_images_embedding on a decomposition of compute_activation_values --layers 2-3: attn_rest joins."""
    code, _, err = run_inprocess("utils/scripts/compute_activation_values.py", *TINY_ARGS, "--dataset", "golden",
                                 "--data_path", GOLDEN / "images", "--output_dir", tmp_path, "--num_workers", 0,
                                 "--layers", "2-3")
    assert code == 0, err
    code, _, err = run_inprocess("utils/scripts/compute_images_embedding.py", "--dataset", "golden", "--model", MODEL,
                                 "--output_dir", tmp_path)
    assert code == 0, err
    full = np.load(GOLDEN_PRS / f"golden_attn_{MODEL}.npy").astype(np.float64)
    mlp = np.load(GOLDEN_PRS / f"golden_mlp_{MODEL}.npy").astype(np.float64)
    np.testing.assert_allclose(np.load(tmp_path / f"golden_embeddings_{MODEL}_seed_0.npy"),
                               full.sum((1, 2)) + mlp.sum(1), atol=1e-5)



def test_images_embedding_of_a_pooled_tower(tmp_path):
    """compute_images_embedding on a tower read out by pooling (its mlp file holds L + 2 terms): the sum is the
    normalised embedding."""
    from conftest import REPO

    args = ["--model_config", str(REPO / "tests" / "configs"), "--model", "tiny-map", "--pretrained", "none"]
    code, _, err = run_inprocess("utils/scripts/compute_activation_values.py", *args, "--dataset", "golden",
                                 "--data_path", GOLDEN / "images", "--output_dir", tmp_path, "--num_workers", 0)
    assert code == 0, err
    assert np.load(tmp_path / "golden_mlp_tiny-map_seed_0.npy").shape[1] == 3 + 2
    code, _, err = run_inprocess("utils/scripts/compute_images_embedding.py", "--dataset", "golden", "--model",
                                 "tiny-map", "--output_dir", tmp_path)
    assert code == 0, err
    emb = np.load(tmp_path / "golden_embeddings_tiny-map_seed_0.npy")
    assert emb.shape == (len(np.load(tmp_path / "golden_labels_tiny-map_seed_0.npy")), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

def test_component_intervention_against_a_direct_computation():
    """Removing one principal component of one head: the accuracy and the text cosines recomputed by hand from the
    edited head array (float64), on a decomposition built so that the removal changes predictions."""
    from utils.intervention import component_intervention, remove_component

    g = np.random.default_rng(0)
    B, L, H, d, C = 60, 3, 2, 8, 3
    attn = 0.1 * g.normal(size=(B, L, H, d))
    mlp = 0.1 * g.normal(size=(B, L + 1, d))
    labels = g.integers(0, C, B)
    W = g.normal(size=(d, C))
    v = W[:, 0] - W[:, 1]  # a direction that moves class 0 against class 1
    attn[:, 2, 1] += np.outer(g.normal(size=B) + 2 * (labels == 0), v)  # head (2, 1) carries it
    text = g.normal(size=d)
    res = component_intervention(attn.astype(np.float32), mlp.astype(np.float32), W, labels, 2, 1, 3 * v, text)
    edited = attn.copy()
    u = v / np.linalg.norm(v)
    x = edited[:, 2, 1]
    edited[:, 2, 1] = x - np.outer((x - x.mean(0)) @ u, u)
    before, after = attn.sum((1, 2)) + mlp.sum(1), edited.sum((1, 2)) + mlp.sum(1)
    acc = [((e @ W).argmax(1) == labels).mean() * 100 for e in (before, after)]
    assert acc[0] - acc[1] > 10  # the removal matters here
    assert (res.accuracy_before, res.accuracy_after) == pytest.approx(acc)
    cos = [e @ text / np.linalg.norm(e, axis=1) / np.linalg.norm(text) for e in (before, after)]
    np.testing.assert_allclose(res.similarity_before, cos[0], atol=1e-5)
    np.testing.assert_allclose(res.similarity_after, cos[1], atol=1e-5)
    np.testing.assert_allclose(res.embeddings, after, atol=1e-5)
    whole, coef = remove_component(attn, mlp, 2, 1, v, centre=False)
    np.testing.assert_allclose(coef, attn[:, 2, 1] @ u)
    np.testing.assert_allclose(whole, before - np.outer(attn[:, 2, 1] @ u, u))
    with pytest.raises(InputError, match="expected a non-zero"):
        remove_component(attn, mlp, 2, 1, np.zeros(d))
    with pytest.raises(InputError, match=r"head \(3, 0\)"):
        remove_component(attn, mlp, 3, 0, v)
