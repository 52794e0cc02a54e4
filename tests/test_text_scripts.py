"""End-to-end: compute_text_set_projection, compute_complete_text_set and compute_use_specific_heads through
their command lines, on fixtures made with compute_prs.py / compute_text_projection.py and the golden model."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import GOLDEN, REPO, TINY_ARGS, run_inprocess, run_script

from utils.text.textspan import svd_data_approx, textspan_reference_numpy

IMAGES = GOLDEN / "images"
MODEL = "prsclip-tiny"
DATASET = "binary_waterbirds"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The 6 golden images as a binary_waterbirds test split -> compute_prs, compute_text_projection, and a
    60-line text set embedded by compute_text_set_projection."""
    wd = tmp_path_factory.mktemp("text_scripts")
    out = wd / "out"
    # a binary_waterbirds layout: metadata.csv (img_filename, y, split, place), all in the test split
    wbd = wd / "waterbirds"
    rows = ["img_filename,y,split,place"]
    for i, (img, y, place) in enumerate([("0_living/astronaut.png", 0, 0), ("0_living/chelsea.png", 0, 1),
                                         ("0_living/horse.png", 0, 0), ("1_object/coffee.png", 1, 1),
                                         ("1_object/motorcycle_left.png", 1, 0), ("1_object/rocket.png", 1, 1)]):
        (wbd / "imgs").mkdir(parents=True, exist_ok=True)
        shutil.copy(IMAGES / img, wbd / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{y},2,{place}")
    (wbd / "metadata.csv").write_text("\n".join(rows) + "\n")
    run_script("compute_prs.py", *TINY_ARGS, "--dataset", DATASET, "--data_path", wbd, "--output_dir", out,
               "--batch_size", 3, "--num_workers", 0)
    run_script("compute_text_projection.py", *TINY_ARGS, "--dataset", "binary_waterbirds", "--output_dir", out)
    texts = wd / "texts"
    texts.mkdir()
    lines = (REPO / "text_descriptions" / "image_descriptions_3500.txt").read_text().splitlines()[:60]
    (texts / "small60.txt").write_text("\n".join(lines) + "\n")
    res = run_script("compute_text_set_projection.py", *TINY_ARGS, "--data_path", texts / "small60.txt",
                     "--output_dir", out, "--batch_size", 25)
    assert "wrote" in res.stdout
    return wd


def test_text_set_projection_output(workdir):
    emb = np.load(workdir / "out" / f"small60_{MODEL}.npy")
    assert emb.shape == (60, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_text_set_projection_matches_golden(tmp_path):
    """The golden 240 prompts as a text set: row i is the original's encode_text of line i, normalised."""
    shutil.copy(GOLDEN / "text" / "prompts.txt", tmp_path / "prompts.txt")
    code, out, err = run_inprocess("compute_text_set_projection.py", *TINY_ARGS, "--data_path",
                                   tmp_path / "prompts.txt", "--output_dir", tmp_path, "--batch_size", 100)
    assert code == 0, out + err
    ref = np.load(GOLDEN / "text" / "encode_text.npy")
    np.testing.assert_allclose(np.load(tmp_path / f"prompts_{MODEL}.npy"),
                               ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5, rtol=0)


def test_text_set_projection_bad_input(workdir, tmp_path):
    (tmp_path / "gaps.txt").write_text("a photo\n\nanother photo\n")
    res = run_script("compute_text_set_projection.py", *TINY_ARGS, "--data_path", tmp_path / "gaps.txt",
                     "--output_dir", tmp_path, check=False)
    assert res.returncode == 2 and "empty line(s) at line 2" in res.stderr
    assert not (tmp_path / f"gaps_{MODEL}.npy").exists()
    import compute_text_set_projection as script

    args = script.get_args_parser().parse_args([*TINY_ARGS, "--data_path", str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="missing.txt: text set not found"):
        script.main(args)


def expected_textspan(data, features, lines, iters, rank):
    """The expected TextSpan of one head: the straightforward float64 port (checked against the golden run in
    test_textspan.py), not the batched code the script runs. Returns (reconstruction, texts)."""
    rec, idx = textspan_reference_numpy(data, features, iters, rank, dtype=np.float64)
    return rec, [lines[i] for i in idx]


@pytest.mark.parametrize("run", ["rank32", "rank5"])
def test_complete_text_set_golden(tmp_path, run):
    """The golden TextSpan case through the script: head (3, 0) of the golden attn file with the golden 40 texts
    picks the original's texts, in order."""
    for kind in ("attn", "mlp", "cls_attn", "classifier"):
        shutil.copy(GOLDEN / "prs" / f"golden_{kind}_{MODEL}.npy", tmp_path)
    shutil.copy(GOLDEN / "prs" / "golden_labels.npy", tmp_path)
    shutil.copy(GOLDEN / "textspan" / "text_features.npy", tmp_path / f"golden40_{MODEL}.npy")
    shutil.copy(GOLDEN / "textspan" / "texts.txt", tmp_path / "golden40.txt")
    spec = json.loads((GOLDEN / "textspan" / "textspan.json").read_text())["runs"][run]
    code, out, err = run_inprocess("compute_complete_text_set.py", "--model", MODEL, "--dataset", "golden",
                                   "--input_dir", tmp_path, "--output_dir", tmp_path, "--text_descriptions",
                                   "golden40", "--text_dir", tmp_path, "--device", "cpu", "--num_of_last_layers", 1,
                                   "--texts_per_head", 5, "--w_ov_rank", spec["w_ov_rank"])
    assert code == 0, out + err
    summary = json.loads((tmp_path / f"golden_completeness_golden40_top_5_heads_{MODEL}.json").read_text())
    head = summary["heads"][0]
    assert (head["layer"], head["head"]) == (3, 0)
    assert head["texts"] == spec["texts"] and head["text_indices"] == spec["text_indices"]


def _complete_args(workdir, *extra):
    return ["--model", MODEL, "--dataset", DATASET, "--input_dir", workdir / "out", "--output_dir",
            workdir / "res", "--text_descriptions", "small60", "--text_dir", workdir / "texts", "--device", "cpu",
            *extra]


def test_complete_text_set_textspan(workdir):
    res = run_script("compute_complete_text_set.py",
                     *_complete_args(workdir, "--num_of_last_layers", 2, "--texts_per_head", 4, "--w_ov_rank", 5))
    stem = workdir / "res" / f"{DATASET}_completeness_small60_top_4_heads_{MODEL}"
    text = stem.with_suffix(".txt").read_text()
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    # the original block format: a header per head, its texts, then the accuracy and the number of texts
    blocks = text.split("------------------\n")
    assert blocks[0] == ""
    heads = [(blocks[i], blocks[i + 1]) for i in range(1, len(blocks) - 1, 2)]
    assert [h for h, _ in heads] == [f"Layer {l}, Head {h}\n" for l in (2, 3) for h in range(4)]
    lines = (workdir / "texts" / "small60.txt").read_text().splitlines()
    for (_, body), rec in zip(heads, summary["heads"]):
        assert body.splitlines() == rec["texts"] and len(rec["texts"]) == 4
        assert set(rec["texts"]) <= set(lines)
    acc = summary["accuracy"]["final"]
    assert blocks[-1] == f"Current accuracy: {acc}\nNumber of texts: {summary['number_of_texts']}"
    assert f"Current accuracy: {acc}" in res.stdout
    from utils.plots import parse_textspan_heads  # the notebooks' reader of this file

    assert parse_textspan_heads(stem.with_suffix(".txt")) == {(r["layer"], r["head"]): r["texts"]
                                                               for r in summary["heads"]}
    assert len(summary["accuracy_curve"]["accuracy"]) == 5
    # the texts of one head are those of the in-memory TextSpan on that head's column of the attn file
    attn = np.load(workdir / "out" / f"{DATASET}_attn_{MODEL}.npy")
    emb = np.load(workdir / "out" / f"small60_{MODEL}.npy")
    for rec in summary["heads"]:
        _, chosen = expected_textspan(attn[:, rec["layer"], rec["head"]], emb, lines, 4, 5)
        assert rec["texts"] == chosen
    # the final accuracy: MLPs + earlier layers mean-ablated + replaced heads, against the labels file
    W = np.load(workdir / "out" / f"{DATASET}_classifier_{MODEL}.npy")
    labels = np.load(workdir / "out" / f"{DATASET}_labels.npy")[:, 0]  # the class column of [B, 2]
    a = attn.copy()
    a[:, :2] = a[:, :2].mean(0)
    for i, rec in enumerate(summary["heads"]):
        a[:, rec["layer"], rec["head"]] = expected_textspan(attn[:, rec["layer"], rec["head"]], emb, lines, 4, 5)[0]
    rep = a.sum((1, 2)) + np.load(workdir / "out" / f"{DATASET}_mlp_{MODEL}.npy").sum(1)
    assert acc == pytest.approx(((rep @ W).argmax(-1) == labels).mean() * 100)


@pytest.mark.parametrize("algorithm", ["pclens", "svd_data_approx"])
def test_complete_text_set_pclens(workdir, algorithm):
    run_script("compute_complete_text_set.py", *_complete_args(workdir, "--num_of_last_layers", 1,
                                                               "--texts_per_head", 2, "--algorithm", algorithm,
                                                               "--max_text", 3))
    stem = workdir / "res" / f"{DATASET}_completeness_small60_top_2_heads_{MODEL}_pclens"
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert len(summary["heads"]) == 4 and summary["algorithm"] == "pclens"
    attn = np.load(workdir / "out" / f"{DATASET}_attn_{MODEL}.npy")
    emb = np.load(workdir / "out" / f"small60_{MODEL}.npy")
    lines = (workdir / "texts" / "small60.txt").read_text().splitlines()
    for rec in summary["heads"]:
        assert 1 <= rec["rank"] <= 3  # 6 images (at most 5 centred components), capped at --max_text 3
        assert len(rec["components"]) == rec["rank"] == len(rec["texts"])
        _, info = svd_data_approx(attn[:, 3, rec["head"]], emb, lines, text_per_princ_comp=2, iters=3)
        for comp, ref in zip(rec["components"], info["embeddings_sort"]):
            assert len(comp["positive"]) == len(comp["negative"]) == 2
            assert comp["positive_cosines"][0] >= abs(comp["negative_cosines"][0])  # stronger pole first
            assert comp["positive"] + comp["negative"] == [list(t.values())[0] for t in ref["text"]]
            assert comp["strength_abs"] == pytest.approx(ref["strength_abs"], rel=1e-4)
    assert stem.with_suffix(".txt").read_text().startswith("------------------\nLayer 3, Head 0\n")


def test_complete_text_set_bad_inputs(workdir, tmp_path):
    import compute_complete_text_set as script

    def args(*extra):
        return script.get_args_parser().parse_args([str(a) for a in _complete_args(workdir, *extra)])

    with pytest.raises(ValueError, match="--num_of_last_layers 5: the model has 4 layers"):
        script.main(args("--num_of_last_layers", 5))
    # a text set embedded with another model's dimension
    np.save(workdir / "out" / f"wrongdim_{MODEL}.npy", np.ones((60, 16), np.float32))
    shutil.copy(workdir / "texts" / "small60.txt", workdir / "texts" / "wrongdim.txt")
    with pytest.raises(ValueError, match=r"shape \[60, 16\] do not match the model dimension d=32"):
        script.main(args("--text_descriptions", "wrongdim"))
    # lines and embeddings that disagree
    (workdir / "texts" / "short.txt").write_text("one\ntwo\n")
    shutil.copy(workdir / "out" / f"small60_{MODEL}.npy", workdir / "out" / f"short_{MODEL}.npy")
    with pytest.raises(ValueError, match="has 2 lines but .* has 60 rows"):
        script.main(args("--text_descriptions", "short"))
    # labels that disagree with the arrays
    bad = tmp_path / "in"
    shutil.copytree(workdir / "out", bad)
    np.save(bad / f"{DATASET}_labels.npy", np.zeros((5, 2), np.int64))
    with pytest.raises(ValueError, match="5 labels but 6 images"):
        script.main(script.get_args_parser().parse_args(
            [str(a) for a in _complete_args(workdir, "--input_dir", bad, "--output_dir", tmp_path)]))


def test_use_specific_heads(workdir):
    out = workdir / "out"
    res = run_script("compute_use_specific_heads.py", "--model", MODEL, "--input_dir", out, "--figures_dir",
                     workdir / "figs", "--heads", "3.1,2.0", "--num_of_last_layers", 2, "--random_trials", 3,
                     "--seed", 1)
    assert "Baseline:" in res.stdout and "worst group" in res.stdout
    summary = json.loads((workdir / "figs" / f"binary_waterbirds_specific_heads_{MODEL}.json").read_text())
    assert (workdir / "figs" / f"binary_waterbirds_specific_heads_{MODEL}.png").stat().st_size > 0
    assert summary["heads"] == ["3.1", "2.0"]
    assert sum(summary["baseline"]["group_sizes"].values()) == 6
    # recompute the original's ablation from the arrays
    attn = np.load(out / f"binary_waterbirds_attn_{MODEL}.npy")
    mlp = np.load(out / f"binary_waterbirds_mlp_{MODEL}.npy")
    W = np.load(out / f"binary_waterbirds_classifier_{MODEL}.npy")
    labels = np.load(out / "binary_waterbirds_labels.npy")
    assert labels.shape == (6, 2)
    a, m = attn.copy(), mlp.copy()
    for l, h in [(3, 1), (2, 0)]:
        a[:, l, h] = a[:, l, h].mean(0)
    a[:, :2] = a[:, :2].mean(0)
    m[:] = m.mean(0)
    hit = ((a.sum((1, 2)) + m.sum(1)) @ W).argmax(-1) == labels[:, 0]
    groups = 2 * labels[:, 0] + labels[:, 1]
    expect = [hit[groups == g].mean() * 100 for g in range(4)]
    assert list(summary["ablated"]["groups"].values()) == pytest.approx(expect)
    assert summary["ablated"]["worst_group"] == pytest.approx(min(expect))
    assert len(summary["random"]["worst_group_per_trial"]) == 3
    # the random sets as the report and the chart show them: the mean over the sets
    assert summary["random"]["mean"]["worst_group"] == pytest.approx(np.mean(summary["random"]["worst_group_per_trial"]))
    assert summary["random"]["mean_worst_group"] == summary["random"]["mean"]["worst_group"]
    assert max(summary["random"]["worst_group_per_trial"]) == summary["random"]["best"]["worst_group"]


def test_use_specific_heads_chunk(workdir, tmp_path, monkeypatch):
    """--chunk 4 (6 images: a partial last chunk): reads in chunks of 4, the same summary as the default."""
    import utils.waterbirds

    seen, real = [], utils.waterbirds.head_logits
    monkeypatch.setattr(utils.waterbirds, "head_logits", lambda *a: seen.append(a[4]) or real(*a))  # a[4]: chunk
    results = {}
    for chunk in ("1024", "4"):
        code, out, err = run_inprocess("compute_use_specific_heads.py", "--model", MODEL, "--input_dir",
                                       workdir / "out", "--figures_dir", tmp_path / chunk, "--heads", "3.1,2.0",
                                       "--num_of_last_layers", 2, "--random_trials", 3, "--seed", 1, "--chunk", chunk)
        assert code == 0, out + err
        results[chunk] = json.loads((tmp_path / chunk / f"binary_waterbirds_specific_heads_{MODEL}.json").read_text())
        results[chunk].pop("args", None)
    assert seen == [1024, 4]
    assert results["4"] == results["1024"]


def test_complete_text_set_chunk_and_stats_dtype(workdir, tmp_path, monkeypatch):
    """--chunk 4 reads the heads' statistics 4 images at a time: the same texts and accuracies (float64 sums);
    --stats_dtype float32 takes the per-chunk products in float32: the same texts (the picks have margins far
    above float32 error) and stds within float32 noise."""
    from utils.text.textspan import HeadStatsAccumulator

    seen, real_update = [], HeadStatsAccumulator.update
    monkeypatch.setattr(HeadStatsAccumulator, "update",
                        lambda self, x: seen.append((self.chunk_dtype, x.shape[1])) or real_update(self, x))
    summaries = {}
    for name, extra in [("default", []), ("chunk", ["--chunk", 4]), ("float32", ["--stats_dtype", "float32"])]:
        seen.clear()
        code, out, err = run_inprocess("compute_complete_text_set.py", *_complete_args(
            workdir, "--num_of_last_layers", 2, "--texts_per_head", 4, "--w_ov_rank", 5, "--output_dir",
            tmp_path / name, *extra))
        assert code == 0, out + err
        summaries[name] = json.loads((tmp_path / name / f"{DATASET}_completeness_small60_top_4_heads_{MODEL}.json")
                                     .read_text())
        chunks = [n for _, n in seen]
        assert {dt for dt, _ in seen} == {torch.float32 if name == "float32" else torch.float64}
        assert chunks == ([4, 2] if name == "chunk" else [6])
    base = summaries["default"]
    for name, rtol in [("chunk", 1e-9), ("float32", 1e-3)]:
        s = summaries[name]
        assert s["accuracy"] == base["accuracy"] and s["accuracy_curve"] == base["accuracy_curve"]
        for h, h0 in zip(s["heads"], base["heads"]):
            assert h["texts"] == h0["texts"]
            np.testing.assert_allclose(h["std"], h0["std"], rtol=rtol)


def test_use_specific_heads_bad_inputs(workdir):
    import compute_use_specific_heads as script

    def args(*extra):
        return script.get_args_parser().parse_args(
            ["--model", MODEL, "--input_dir", str(workdir / "out"), "--figures_dir", str(workdir / "figs"), *extra])

    with pytest.raises(ValueError, match="no default head list"):
        script.main(args())
    with pytest.raises(ValueError, match="head 4.0 is out of range for a model with 4 layers"):
        script.main(args("--heads", "4.0"))
    with pytest.raises(ValueError, match="head 1.7 is out of range"):
        script.main(args("--heads", "1.7"))
    # class-only labels [B] (any other dataset): no groups
    flat = workdir / "flat"
    shutil.copytree(workdir / "out", flat)
    np.save(flat / f"{DATASET}_labels.npy", np.load(flat / f"{DATASET}_labels.npy")[:, 0])
    res = run_script("compute_use_specific_heads.py", "--model", MODEL, "--input_dir", flat, "--heads", "3.1",
                     "--figures_dir", workdir / "figs", check=False)
    assert res.returncode == 2 and "need [B, 2]" in res.stderr


def test_cls_attn_file_is_not_needed(workdir, tmp_path):
    """compute_use_specific_heads.py and compute_complete_text_set.py do not read {dataset}_cls_attn_{model}.npy
    (nor does the original): without it they run, with the same numbers."""
    out = tmp_path / "out"
    shutil.copytree(workdir / "out", out)
    (out / f"{DATASET}_cls_attn_{MODEL}.npy").unlink()
    heads = ["--model", MODEL, "--heads", "3.1,2.0", "--num_of_last_layers", 2, "--random_trials", 0]
    for folder, figs in ((workdir / "out", tmp_path / "with"), (out, tmp_path / "without")):
        code, _, err = run_inprocess("compute_use_specific_heads.py", *heads, "--input_dir", folder,
                                     "--figures_dir", figs)
        assert code == 0, err
    name = f"{DATASET}_specific_heads_{MODEL}.json"
    with_, without = (json.loads((tmp_path / d / name).read_text()) for d in ("with", "without"))
    assert with_["ablated"] == without["ablated"] and with_["baseline"] == without["baseline"]
    code, _, err = run_inprocess("compute_complete_text_set.py", *_complete_args(
        workdir, "--input_dir", out, "--output_dir", tmp_path / "ts", "--num_of_last_layers", 2, "--texts_per_head", 4,
        "--w_ov_rank", 5))
    assert code == 0, err
