"""compute_prs.py --layers: only some attention layers stored, the others summed into attn_rest.

The sum rule with the rest term is checked against open_clip's own encode_image; the kept layers against a full
run; every downstream script against its result on the full files; missing layers and bad --layers values give
exit 2 with one line; a 2-process torchrun run is byte-identical to a single-process one.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_WEIGHTS, REPO, TINY_ARGS, free_port, run_inprocess
from test_robustness import _error_line

from utils.cli import layer_list
from utils.files.names import format_layers

MODEL, DATASET = "prsclip-tiny", "binary_waterbirds"
KEPT = [0, 2, 3]  # layer 0 kept but not replaced (--num_of_last_layers 2), layer 1 in attn_rest
TEXTS = ["--text_descriptions", "small60", "--device", "cpu"]


def _ok(script, *args):
    code, out, err = run_inprocess(script, *map(str, args))
    assert code == 0, f"{script} failed ({code}):\n{out}\n{err}"
    return out


def _prs(data, out, *extra, pclens=False):
    if pclens:
        return _ok("utils/scripts/compute_activation_values.py", *TINY_ARGS, "--dataset", DATASET, "--data_path", data,
                   "--output_dir", out, "--num_workers", 0, "--batch_size", 2, *extra)
    return _ok("compute_prs.py", *TINY_ARGS, "--dataset", DATASET, "--data_path", data, "--output_dir", out,
               "--num_workers", 0, "--batch_size", 2, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 6 golden images as a Waterbirds test split; compute_prs full and with --layers 0,2-3 (both also under
    PCLens' names), the classifier and a 60-line text set beside both."""
    wd = tmp_path_factory.mktemp("layers")
    data = wd / "waterbirds"
    (data / "imgs").mkdir(parents=True)
    rows = ["img_filename,y,split,place"]
    for i, png in enumerate(sorted((GOLDEN / "images").rglob("*.png"))):
        shutil.copy(png, data / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{i // 3},2,{i % 2}")
    (data / "metadata.csv").write_text("\n".join(rows) + "\n")
    full, part = wd / "full", wd / "part"
    _prs(data, full)
    _prs(data, full, pclens=True)
    _prs(data, part, "--layers", "0,2-3")
    _prs(data, part, "--layers", "0,2-3", pclens=True)
    _ok("compute_text_projection.py", *TINY_ARGS, "--dataset", DATASET, "--output_dir", full)
    lines = (REPO / "text_descriptions" / "image_descriptions_3500.txt").read_text().splitlines()[:60]
    (wd / "small60.txt").write_text("\n".join(lines) + "\n")
    _ok("compute_text_set_projection.py", *TINY_ARGS, "--data_path", wd / "small60.txt", "--output_dir", full)
    for f in full.glob("*"):
        if f.name.startswith((f"{DATASET}_classifier", "small60")):
            shutil.copy(f, part / f.name)
    return {"wd": wd, "data": data, "full": full, "part": part, "texts": ["--text_dir", wd, *TEXTS]}


def _load(folder, kind, suffix=""):
    return np.load(folder / f"{DATASET}_{kind}_{MODEL}{suffix}.npy")


def _record(folder, name):
    return json.loads((folder / f"{name}.provenance.json").read_text())


# ----------------------------------------------------------------------------- the files
def test_sum_rule_with_the_rest_term_against_open_clip(runs):
    import open_clip

    from utils.datasets import build_dataset

    part, full = runs["part"], runs["full"]
    attn, rest, mlp = _load(part, "attn"), _load(part, "attn_rest"), _load(part, "mlp")
    assert attn.shape == (6, 3, 4, 32) and rest.shape == (6, 32) and mlp.shape == (6, 5, 32)
    assert _load(part, "cls_attn").shape == (6, 4, 32)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(GOLDEN_WEIGHTS))
    ds = build_dataset(DATASET, str(runs["data"]))
    ds.transform = preprocess
    with torch.no_grad():
        r = model.eval().encode_image(torch.stack([ds[i][0] for i in range(len(ds))]))
    r = (r / r.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(attn.sum((1, 2)) + rest + mlp.sum(1), r, atol=2e-6)
    # the kept layers, mlp and cls_attn are the full run's, bit for bit; the rest is the full run's layer 1
    a_full = _load(full, "attn")
    np.testing.assert_array_equal(attn, a_full[:, KEPT])
    for kind in ("mlp", "cls_attn"):
        np.testing.assert_array_equal(_load(part, kind), _load(full, kind))
    np.testing.assert_allclose(rest, a_full[:, 1].sum(1), atol=1e-6)
    assert np.abs(rest).max() > 1e-3
    # every output records the kept layers; a full run's records do not
    for name in [f"{DATASET}_{k}_{MODEL}.npy" for k in ("attn", "attn_rest", "mlp", "cls_attn")] + [
            f"{DATASET}_labels.npy"]:
        assert _record(part, name)["layers"] == KEPT, name
    assert "layers" not in _record(full, f"{DATASET}_attn_{MODEL}.npy")
    assert _record(part, f"{DATASET}_attn_rest_{MODEL}.npy")["shape"] == [6, 32]
    # PCLens' names: the same arrays
    for kind in ("attn", "attn_rest", "mlp"):
        np.testing.assert_array_equal(_load(part, kind, "_seed_0"), _load(part, kind))


def test_every_layer_listed_writes_the_full_files(runs, tmp_path):
    out = _prs(runs["data"], tmp_path, "--layers", "0-3")
    assert "every layer" in out and not list(tmp_path.glob("*attn_rest*"))
    assert filecmp.cmp(tmp_path / f"{DATASET}_attn_{MODEL}.npy", runs["full"] / f"{DATASET}_attn_{MODEL}.npy",
                       shallow=False)
    assert "layers" not in _record(tmp_path, f"{DATASET}_attn_{MODEL}.npy")


def test_layer_list_syntax():
    assert layer_list("28-31") == [28, 29, 30, 31]
    assert layer_list("5, 0,28-30,29") == [0, 5, 28, 29, 30]
    assert format_layers([0, 5, 28, 29, 30, 31]) == "0,5,28-31" and format_layers([3]) == "3"


@pytest.mark.parametrize("value,message", [
    ("2-9", "--layers 2-9: 4-9 out of range; prsclip-tiny has 4 layers (0-3)"),
    ("3-1", "argument --layers: '3-1' in '3-1': the range ends before it starts"),
    ("1,x", "argument --layers: 'x' in '1,x' is not a layer"),
    ("", "argument --layers: '' in '' is not a layer"),
    ("-1", "argument --layers: '-1' in '-1' is not a layer"),
])
def test_bad_layers_exit_2_with_one_line(runs, tmp_path, value, message):
    code, _, err = run_inprocess("compute_prs.py", *TINY_ARGS, "--dataset", DATASET, "--data_path", runs["data"],
                                 "--output_dir", tmp_path, "--num_workers", "0", "--layers", value)
    assert code == 2 and message in _error_line(err), err
    assert not list(tmp_path.glob("*.npy"))


def test_logger_refuses_layers_it_cannot_keep():
    from conftest import tiny_model

    from prs_hook import hook_prs_logger

    model, _ = tiny_model(MODEL)
    with pytest.raises(ValueError, match="distinct, ascending"):
        hook_prs_logger(model, "cpu", layers=[3, 1])
    with pytest.raises(ValueError, match="only without spatial"):
        hook_prs_logger(model, "cpu", spatial=True, layers=[3])


# ----------------------------------------------------------------------------- downstream: the same results
def _complete(runs, folder, out, *extra):
    _ok("compute_complete_text_set.py", "--model", MODEL, "--dataset", DATASET, "--input_dir", folder,
        "--output_dir", out, *runs["texts"], "--num_of_last_layers", 2, "--texts_per_head", 4, "--w_ov_rank", 5,
        *extra)
    stem = out / f"{DATASET}_completeness_small60_top_4_heads_{MODEL}{'' if extra[-1] == 'textspan' else '_pclens'}"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".txt").read_text()


@pytest.mark.parametrize("algorithm", ["textspan", "pclens"])
def test_complete_text_set_same_texts_and_accuracies(runs, tmp_path, algorithm):
    full, full_txt = _complete(runs, runs["full"], tmp_path / "full", "--algorithm", algorithm)
    part, part_txt = _complete(runs, runs["part"], tmp_path / "part", "--algorithm", algorithm)
    assert part["heads"] == full["heads"] and part_txt == full_txt
    assert part["accuracy"] == full["accuracy"] and part["accuracy_curve"] == full["accuracy_curve"]
    assert part["layers_replaced"] == [2, 3]
    assert len(full["accuracy_curve"]["accuracy"]) > 2 and len({h["texts"][0] for h in full["heads"]}) > 1


def test_text_explanations_same_jsonl(runs, tmp_path):
    rows = {}
    for name in ("full", "part"):
        _ok("utils/scripts/compute_text_explanations.py", "--model", MODEL, "--dataset", DATASET, "--input_dir",
            runs[name], "--output_dir", tmp_path / name, *runs["texts"], "--num_of_last_layers", 2)
        rows[name] = [json.loads(l) for l in next((tmp_path / name).glob("*.jsonl")).read_text().splitlines()]
    full, part = rows["full"], rows["part"]
    assert part[:-1] == full[:-1] and [(r["layer"], r["head"]) for r in full[:-1]] == [(l, h) for l in (2, 3)
                                                                                      for h in range(4)]
    # the whole embedding: the early layers' mean comes from attn_rest, a differently rounded sum
    assert (part[-1]["accuracy"], part[-1]["nr_texts"]) == (full[-1]["accuracy"], full[-1]["nr_texts"])
    texts = lambda row: [[list(t.values())[0] for t in c["text"]] for c in row["embeddings_sort"]]  # noqa: E731
    assert texts(part[-1]) == texts(full[-1]) and len(texts(full[-1])) > 1
    np.testing.assert_allclose(part[-1]["s"], full[-1]["s"], rtol=1e-5)
    np.testing.assert_allclose(part[-1]["mean_values_att"], full[-1]["mean_values_att"], atol=1e-6)


def test_use_specific_heads_same_groups(runs, tmp_path):
    summary = {}
    for name in ("full", "part"):
        _ok("compute_use_specific_heads.py", "--model", MODEL, "--input_dir", runs[name], "--figures_dir",
            tmp_path / name, "--heads", "3.1,2.0,0.2", "--num_of_last_layers", 2, "--random_trials", 3)
        summary[name] = json.loads((tmp_path / name / f"{DATASET}_specific_heads_{MODEL}.json").read_text())
    for key in ("baseline", "ablated", "random", "heads"):
        assert summary["part"][key] == summary["full"][key], key
    # the logits behind them (6 images rarely flip an argmax)
    from utils.files.readers import last_layers, load_decomposition
    from utils.waterbirds import head_logits

    parts = {}
    for name in ("full", "part"):
        a = load_decomposition(runs[name], DATASET, MODEL)
        parts[name] = head_logits(a["attn"], a["mlp"], a["classifier"], last_layers(a, 2), rest=a["attn_rest"])
    np.testing.assert_array_equal(parts["part"]["centred"], parts["full"]["centred"])
    for key in ("baseline", "ablated"):
        np.testing.assert_allclose(parts["part"][key], parts["full"][key], atol=1e-5)


# ----------------------------------------------------------------------------- downstream: what is missing
@pytest.mark.parametrize("script,extra", [
    ("compute_ablations.py", ["--figures_dir", "{tmp}"]),
    ("compute_complete_text_set.py", ["--output_dir", "{tmp}", "--text_dir", "{wd}", *TEXTS,
                                      "--num_of_last_layers", "3"]),
    ("compute_use_specific_heads.py", ["--figures_dir", "{tmp}", "--heads", "3.1", "--num_of_last_layers", "3"]),
    ("utils/scripts/compute_text_explanations.py", ["--output_dir", "{tmp}", "--text_dir", "{wd}", *TEXTS,
                                                    "--num_of_last_layers", "3"]),
])
def test_a_missing_layer_is_named_in_one_line(runs, tmp_path, script, extra):
    args = ["--model", MODEL, "--dataset", DATASET, "--input_dir", str(runs["part"]),
            *[a.format(tmp=tmp_path, wd=runs["wd"]) for a in extra]]
    code, _, err = run_inprocess(script, *args)
    line = _error_line(err)
    assert code == 2 and "layer 1 is not stored" in line and "--layers 0,2-3" in line, err
    assert "rerun compute_prs.py without --layers" in line
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_rest_file_missing_or_from_another_run(runs, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(runs["part"], folder)
    rest = folder / f"{DATASET}_attn_rest_{MODEL}.npy"
    args = ["--model", MODEL, "--dataset", DATASET, "--input_dir", str(folder), "--output_dir", str(tmp_path / "o"),
            "--text_dir", str(runs["wd"]), *TEXTS, "--num_of_last_layers", "2"]
    record = rest.with_name(rest.name + ".provenance.json")
    rec = json.loads(record.read_text())
    record.write_text(json.dumps(dict(rec, layers=[1, 2, 3])))
    code, _, err = run_inprocess("compute_complete_text_set.py", *args)
    assert code == 2 and "was made with --layers 1-3 but" in _error_line(err)
    rest.unlink()
    code, _, err = run_inprocess("compute_complete_text_set.py", *args)
    assert code == 2 and f"{rest}: not found (written by compute_prs.py --layers)" in _error_line(err)
    # an attn file of 3 layers without a record saying which
    (folder / f"{DATASET}_attn_{MODEL}.npy.provenance.json").unlink()
    code, _, err = run_inprocess("compute_complete_text_set.py", *args)
    assert code == 2 and "3 layers but the model has 4, and no provenance record" in _error_line(err)


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_with_layers_byte_identical(runs, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "compute_prs.py"), *TINY_ARGS, "--dataset", DATASET, "--data_path", str(runs["data"]),
           "--output_dir", str(tmp_path), "--num_workers", "0", "--batch_size", "2", "--layers", "0,2-3"]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [f"{DATASET}_{k}_{MODEL}.npy" for k in ("attn", "attn_rest", "mlp", "cls_attn")] + [f"{DATASET}_labels.npy"]
    for name in names:
        assert filecmp.cmp(runs["part"] / name, tmp_path / name, shallow=False), name
        assert _record(tmp_path, name)["layers"] == KEPT
    assert not list(tmp_path.glob("*.progress*")) and not list(tmp_path.glob("*.partial"))
