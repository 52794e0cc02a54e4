"""End-to-end: compute_text_set_projection, compute_complete_text_set and compute_use_specific_heads through
their command lines, on fixtures made with compute_prs.py / compute_text_projection.py and the golden model."""
import json
import shutil

import numpy as np
import pytest

from conftest import GOLDEN, GOLDEN_WEIGHTS, REPO, TINY_ARGS, run_script
from utils.textspan import svd_data_approx, text_span

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
    # row i is line i: the same text embedded in-process gives the same row
    import open_clip
    from utils.text import encode_texts

    model, _, _ = open_clip.create_model_and_transforms(MODEL, pretrained=str(GOLDEN_WEIGHTS))
    line = (workdir / "texts" / "small60.txt").read_text().splitlines()[17]
    row = encode_texts(model.eval(), open_clip.get_tokenizer(MODEL), [line], "cpu", progress=False)[0]
    np.testing.assert_allclose(emb[17], row.numpy(), atol=1e-5)


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
    from utils.visualization import parse_textspan_heads  # the notebooks' reader of this file

    assert parse_textspan_heads(stem.with_suffix(".txt")) == {(r["layer"], r["head"]): r["texts"]
                                                               for r in summary["heads"]}
    assert len(summary["accuracy_curve"]["accuracy"]) == 5
    # the texts of one head are those of the in-memory TextSpan on that head's column of the attn file
    attn = np.load(workdir / "out" / f"{DATASET}_attn_{MODEL}.npy")
    emb = np.load(workdir / "out" / f"small60_{MODEL}.npy")
    _, chosen = text_span(attn[:, 3, 1], emb, lines, 4, 5)
    assert summary["heads"][5]["texts"] == chosen
    # the final accuracy: MLPs + earlier layers mean-ablated + replaced heads, against the labels file
    W = np.load(workdir / "out" / f"{DATASET}_classifier_{MODEL}.npy")
    labels = np.load(workdir / "out" / f"{DATASET}_labels.npy")[:, 0]  # the class column of [B, 2]
    a = attn.copy()
    a[:, :2] = a[:, :2].mean(0)
    for i, rec in enumerate(summary["heads"]):
        a[:, rec["layer"], rec["head"]] = text_span(attn[:, rec["layer"], rec["head"]], emb, lines, 4, 5)[0]
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


def test_help_documents_original_flags_and_defaults():
    import compute_complete_text_set
    import compute_text_set_projection
    import compute_use_specific_heads

    h = " ".join(compute_complete_text_set.get_args_parser().format_help().split())
    for flag in ["--model", "--dataset", "--input_dir", "--output_dir", "--text_descriptions", "--text_dir",
                 "--num_of_last_layers", "--w_ov_rank", "--texts_per_head", "--device", "--algorithm"]:
        assert flag in h
    assert "default 4, as the paper commands; original default 8" in h and "original default 10" in h
    h = compute_text_set_projection.get_args_parser().format_help()
    assert all(f in h for f in ["--model", "--pretrained", "--data_path", "--batch_size", "--output_dir", "--device"])
    h = compute_use_specific_heads.get_args_parser().format_help()
    assert all(f in h for f in ["--heads", "--random_trials", "--seed", "--figures_dir", "--input_dir"])
