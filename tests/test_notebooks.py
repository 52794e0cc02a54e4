"""demo.ipynb and nns.ipynb run top to bottom (nbclient, parameters injected after the `parameters` cell) on the
tiny golden model and the bundled sample photos, on the CPU, without the network, and produce their figures."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, GOLDEN_WEIGHTS, REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TINY = {"model_name": "prsclip-tiny", "pretrained": str(GOLDEN_WEIGHTS), "device": "cpu",
        "model_config": str(CONFIGS)}


def execute(name: str, params: dict, tmp: Path):
    """Run notebook ``name`` with ``params`` injected (papermill style); returns the executed notebook."""
    nb = nbformat.read(REPO / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
    env_backup = dict(os.environ)
    # no GPU, no network, repo importable from the kernel
    os.environ.update({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                       "PYTHONPATH": str(REPO), "MPLBACKEND": "module://matplotlib_inline.backend_inline"})
    try:
        client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                         resources={"metadata": {"path": str(REPO)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    nbformat.write(nb, tmp / name)
    return nb


def _png_outputs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _stream(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")


def _check_png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.is_file(), f"missing figure {path}"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0.01, f"{path} is blank"
    return img


def test_demo_notebook_with_textspan_file(tmp_path):
    spans = tmp_path / "spans"
    spans.mkdir()
    # a heads file in compute_complete_text_set.py's format, for the tiny model's last layers
    (spans / "golden_completeness_texts_top_3_heads_prsclip-tiny.txt").write_text(
        "------------------\nLayer 2, Head 1\n------------------\nstripes\ngreen grass\na red car\n"
        "------------------\nLayer 3, Head 0\n------------------\nwater\nsnow\nsky at night\n"
        "------------------\nCurrent accuracy: 50.0\nNumber of texts: 6")
    figs = tmp_path / "figs"
    nb = execute("demo.ipynb", {**TINY, "textspan_dir": str(spans), "figures_dir": str(figs),
                                "image_indices": [1, 7]}, tmp_path)
    for f in ["demo_inputs.png", "demo_text_heatmaps.png", "demo_head_heatmaps.png"]:
        _check_png(figs / f)
    assert _png_outputs(nb) >= 3
    out = _stream(nb)
    assert "L2.H1: stripes; green grass; a red car" in out and "L3.H0: water; snow; sky at night" in out
    errs = [float(line.split("=")[-1]) for line in out.splitlines() if line.startswith("sum rule")]
    assert len(errs) == 2 and max(errs) < 1e-5


def test_nns_notebook(tmp_path):
    nb = execute("nns.ipynb", {**TINY, "figures_dir": str(tmp_path), "layer": 3, "head": 1, "top_k": 4,
                               "query_index": 2}, tmp_path)
    _check_png(tmp_path / "nns_sample_L3_H1.png")
    assert _png_outputs(nb) >= 1
    out = _stream(nb)
    head_line = next(l for l in out.splitlines() if l.startswith("head top-k:"))
    ranked = eval(head_line.split(":", 1)[1])
    assert len(ranked) == 4 and 2 not in ranked  # the query itself is excluded


# ----------------------------------------------------------------------------- paper 2's notebooks
SO = Path(__file__).parent / "golden" / "second_order"
GOLDEN_MERGED = SO / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_merged.npy"  # [6, 256, 32], layer 1


def _decomposition(path: Path, neurons: int = 256, per_neuron: int = 3, seed: int = 0) -> dict:
    """A decomposition JSON in compute_sparse_decomposition.py's format, words shared between neurons."""
    rng = np.random.default_rng(seed)
    words = [f"word {i}" for i in range(20)]
    table = {str(k): [[int(j), float(rng.normal()), words[j]] for j in rng.choice(20, per_neuron, replace=False)]
             for k in range(neurons)}
    path.write_text(json.dumps(table))
    return table


def test_visualize_neurons_notebook(tmp_path):
    import shutil

    merged = np.load(GOLDEN_MERGED)
    shutil.copy(GOLDEN_MERGED, tmp_path / GOLDEN_MERGED.name)
    table = _decomposition(tmp_path / "golden_mlps_prsclip-tiny-quickgelu_golden_1_words_decomposition_omp_1.0_3.json")
    figs = tmp_path / "figs"
    nb = execute("visualize_neurons.ipynb", {
        "model_name": "prsclip-tiny-quickgelu", "pretrained": "golden", "mlp_layer": 1, "neurons": [4, 200],
        "top_k": 4, "dataset": "golden", "data_path": str(Path(__file__).parent / "golden" / "images"),
        "split": "train", "input_dir": str(tmp_path), "text_descriptions": "words", "components": 3,
        "decomposition_dir": str(tmp_path), "figures_dir": str(figs)}, tmp_path)
    for n in (4, 200):
        _check_png(figs / f"neuron_1_{n}.png")
    assert _png_outputs(nb) >= 2
    out = _stream(nb)
    for n in (4, 200):  # the top images: an independent argsort of the centred norms, largest first
        norms = np.linalg.norm(merged[:, n].astype(np.float64) - merged.astype(np.float64).mean(0)[n], axis=-1)
        expected = np.argsort(norms)[::-1][:4].tolist()
        assert f"neuron {n}: top images {expected}" in out
        words = "; ".join(f"{t} {c:+.4f}" for _, c, t in table[str(n)])
        assert f"neuron {n}: words {words}" in out
    cache = tmp_path / "golden_train_mlps_prsclip-tiny-quickgelu_golden_1_mean.npy"
    np.testing.assert_allclose(np.load(cache), merged.mean(0), atol=1e-6)


def test_concept_discovery_notebook(tmp_path):
    """Image 0 of the golden set against the other five as the 'training' set; the word scores by hand from the
    original code's effects of image 0 (golden), not from ours."""
    merged = np.load(GOLDEN_MERGED).astype(np.float64)
    train, query = merged[1:], merged[0]
    stem = "golden_train_mlps_prsclip-tiny-quickgelu_prsclip-tiny_seed0_1"  # {pretrained}: the checkpoint's stem
    np.save(tmp_path / f"{stem}_merged.npy", train.astype(np.float32))
    centred = np.linalg.norm(train - train.mean(0), axis=-1)  # [5, 256]
    np.save(tmp_path / f"{stem}_3_norm.npy", np.sort(centred, 0)[-3:].T.astype(np.float32))  # top 3, ascending
    table = _decomposition(tmp_path / ("golden_mlps_prsclip-tiny-quickgelu_prsclip-tiny_seed0_1_words_"
                                       "decomposition_omp_1.0_4.json"), per_neuron=4, seed=1)
    # by hand
    norms = np.linalg.norm(query - train.mean(0), axis=-1)
    thresholds = np.sort(centred, 0)[-3]
    assert np.abs(norms - thresholds).min() > 1e-4  # no activity decision within float error (~1e-5)
    scores = {}
    for k in np.nonzero(norms > thresholds)[0]:
        for _, c, t in table[str(k)]:
            scores[t] = scores.get(t, 0.0) + c * norms[k]
    expected = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
    assert min(a[1] - b[1] for a, b in zip(expected, expected[1:])) > 1e-3  # a well-defined order

    figs = tmp_path / "figs"
    nb = execute("concept_discovery.ipynb", {
        **TINY, "model_name": "prsclip-tiny-quickgelu", "mlp_layer": 1, "top_k_pca": 3, "dataset": "golden",
        "input_dir": str(tmp_path), "text_descriptions": "words", "components": 4, "decomposition_dir": str(tmp_path),
        "image_path": str(Path(__file__).parent / "golden" / "images" / "0_living" / "astronaut.png"),
        "top_words": 5, "figures_dir": str(figs)}, tmp_path)
    _check_png(figs / "concepts_astronaut_1.png")
    assert _png_outputs(nb) >= 1
    out = _stream(nb).splitlines()
    active = eval(next(l for l in out if "active neurons of 256" in l).split(": ", 2)[2])
    assert active == np.nonzero(norms > thresholds)[0].tolist()
    printed = [l.split("\t") for l in out if "\t" in l]
    assert [t for _, t in printed] == [t for t, _ in expected]
    np.testing.assert_allclose([float(s) for s, _ in printed], [s for _, s in expected], atol=1e-3)


def test_demo_siglip_notebook(tmp_path):
    """demo_siglip.ipynb on a tiny random SigLIP folder: its figures, and its per-token, per-head scores summed
    equal to the pooled output's attention part (the model's own forward, less the MLP and the out-projection
    bias) against the texts, computed here without the notebook's code."""
    pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import torch
    import torch.nn.functional as F
    from tiny_siglip import save_tiny_siglip

    from utils.datasets import SampleImages

    folder = tmp_path / "tiny-siglip"
    folder.mkdir()
    save_tiny_siglip(folder)
    figs = tmp_path / "figs"
    texts = ["a photo of a cat", "a photo of a dog"]
    nb = execute("demo_siglip.ipynb", {"model_name": str(folder), "device": "cpu", "image_index": 1,
                                       "texts": texts, "figures_dir": str(figs)}, tmp_path)
    for f in ["demo_siglip_text_maps.png", "demo_siglip_head_maps.png"]:
        _check_png(figs / f)
    assert _png_outputs(nb) >= 2
    error = float(_stream(nb).split("max |diff| ")[1].split()[0])
    assert error < 1e-5
    scores = np.load(figs / "demo_siglip_scores.npy")  # [T, H, texts]
    model = transformers.SiglipModel.from_pretrained(folder).eval()
    pixels = transformers.SiglipImageProcessor.from_pretrained(folder)(images=SampleImages().load(1),
                                                                       return_tensors="pt")["pixel_values"]
    head = model.vision_model.head
    seen = []
    hook = head.mlp.register_forward_hook(lambda m, i, o: seen.append(o[0, 0]))
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output[0]
        tokens = transformers.AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", truncation=True,
                                                                    max_length=16, return_tensors="pt")
        text = F.normalize(model.text_model(**tokens).pooler_output, dim=-1)
    hook.remove()
    attention_part = pooled - seen[0] - head.attention.out_proj.bias.detach()
    expected = (attention_part @ text.T / pooled.norm()).numpy()
    assert scores.shape == (16, 4, 2)
    np.testing.assert_allclose(scores.sum((0, 1)), expected, atol=1e-5)


# ----------------------------------------------------------------------------- PCLens' notebooks
PCLENS_TEXTS = "tiny_pclens_set"  # the text set's name, in utils/text_descriptions/ of the working folder


@pytest.fixture(scope="module")
def pclens_prepared(tmp_path_factory, waterbirds_root):
    """prepare_data.ipynb in a working folder laid out as PCLens expects (./datasets/<PCLens' folder>,
    ./utils/text_descriptions/), on binary_waterbirds (its built-in class names) and the tiny model."""
    wd = tmp_path_factory.mktemp("pclens_wd")
    (wd / "datasets").mkdir()
    (wd / "datasets" / "waterbird_complete95_forest2water2").symlink_to(waterbirds_root)
    texts = wd / "utils" / "text_descriptions"
    texts.mkdir(parents=True)
    lines = (REPO / "text_descriptions" / "image_descriptions_3500.txt").read_text().splitlines()[:40]
    (texts / f"{PCLENS_TEXTS}.txt").write_text("\n".join(lines) + "\n")
    params = {"dataset": "binary_waterbirds", "device": "cpu", "model_name": "prsclip-tiny",
              "pretrained": str(GOLDEN_WEIGHTS), "seed": 3, "dataset_text_name": PCLENS_TEXTS,
              "model_flags": f"--model_config {CONFIGS}", "workdir": str(wd)}
    nb = execute("prepare_data.ipynb", params, wd)
    return {"wd": wd, "out": wd / "output_dir", "nb": nb, "lines": lines}


def test_prepare_data_notebook_runs_pclens_five_command_lines(pclens_prepared, waterbirds_root):
    import open_clip
    import torch

    from utils.datasets import build_dataset

    out, lines = pclens_prepared["out"], pclens_prepared["lines"]
    stem = "prsclip-tiny_seed_3"
    attn = np.load(out / f"binary_waterbirds_attn_{stem}.npy").astype(np.float64)
    mlp = np.load(out / f"binary_waterbirds_mlp_{stem}.npy").astype(np.float64)
    # step 1: the decomposition sums to the model's normalised image embeddings
    model, _, preprocess = open_clip.create_model_and_transforms("prsclip-tiny", pretrained=str(GOLDEN_WEIGHTS))
    ds = build_dataset("binary_waterbirds", str(waterbirds_root), preprocess)
    with torch.no_grad():
        direct = model.eval().encode_image(torch.stack([ds[i][0] for i in range(len(ds))]), normalize=True).numpy()
    assert attn.shape[0] == len(ds) >= 2
    # step 2: the image embeddings are that sum
    emb = np.load(out / f"binary_waterbirds_embeddings_{stem}.npy")
    np.testing.assert_allclose(emb, attn.sum((1, 2)) + mlp.sum(1), atol=1e-6)
    np.testing.assert_allclose(emb, direct, atol=1e-4)
    # step 3: two classes; step 4: the text set, one unit embedding per line, as open_clip embeds it
    assert np.load(out / "binary_waterbirds_classifier_prsclip-tiny.npy").shape == (32, 2)
    tokenizer = open_clip.get_tokenizer("prsclip-tiny")
    with torch.no_grad():
        ref = model.encode_text(tokenizer(lines), normalize=True).numpy()
    np.testing.assert_allclose(np.load(out / f"{PCLENS_TEXTS}_prsclip-tiny.npy"), ref, atol=1e-5)
    # step 5 and the print-out of its JSONL
    path = out / f"binary_waterbirds_completeness_{PCLENS_TEXTS}_prsclip-tiny_algo_svd_data_approx_seed_3.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["layer"], r["head"]) for r in rows] == [(l, h) for l in range(4) for h in range(4)] + [(-1, -1)]
    printed = _stream(pclens_prepared["nb"])
    assert f"final embedding: accuracy {rows[-1]['accuracy']} %, {rows[-1]['nr_texts']} distinct texts" in printed
    for r in rows[:-1]:
        assert f"Layer: {r['layer']}, Head: {r['head']}, {len(r['s'])} components" in printed
    comp = rows[0]["embeddings_sort"][0]
    first = {k: v for t in comp["text"] for k, v in t.items() if k in ("text_max_0", "text_min_0")}
    assert f"PC 0 ({comp['strength_rel']:.1f} %): + {first['text_max_0']} | - {first['text_min_0']}" in printed


def test_playground_notebook(pclens_prepared, tmp_path):
    """The component, its top images and the intervention checked against the JSONL of prepare_data.ipynb and a
    direct float64 computation (the component's projection removed from the head's array, the sum recomputed)."""
    out, lines = pclens_prepared["out"], pclens_prepared["lines"]
    figs = tmp_path / "figs"
    nb = execute("playground.ipynb", {
        "dataset": "binary_waterbirds", "model_name": "prsclip-tiny", "seed": 3, "dataset_text_name": PCLENS_TEXTS,
        "texts_per_head": 3, "layer": 3, "head": 1, "component": 0, "top_images": 3,
        "workdir": str(pclens_prepared["wd"]), "figures_dir": str(figs)}, tmp_path)
    for f in ["playground_accuracy.png", "playground_top_images_L3_H1_PC0.png", "playground_intervention.png"]:
        _check_png(figs / f)
    printed = _stream(nb)
    path = out / f"binary_waterbirds_completeness_{PCLENS_TEXTS}_prsclip-tiny_algo_svd_data_approx_seed_3.jsonl"
    rows = {(r["layer"], r["head"]): r for r in map(json.loads, path.read_text().splitlines())}
    assert f"svd_data_approx: accuracy {rows[(-1, -1)]['accuracy']:.4f} % with every head replaced" in printed
    assert "text_span: accuracy" in printed and "L0.H0: " in printed and "L3.H3: " in printed
    # the component: the JSONL's first component of head (3, 1), its top text
    rec = rows[(3, 1)]
    v = np.asarray(rec["vh"][0], np.float64)
    top_text = next(t["text_max_0"] for t in rec["embeddings_sort"][0]["text"] if "text_max_0" in t)
    assert f"L3.H1 PC 0: + {top_text}" in printed
    attn = np.load(out / "binary_waterbirds_attn_prsclip-tiny_seed_3.npy").astype(np.float64)
    mlp = np.load(out / "binary_waterbirds_mlp_prsclip-tiny_seed_3.npy").astype(np.float64)
    x = attn[:, 3, 1]
    projection = (x - x.mean(0)) @ v
    assert f"top images of L3.H1 PC 0: {np.argsort(-projection)[:3].tolist()}" in printed
    # the intervention, by hand
    W = np.load(out / "binary_waterbirds_classifier_prsclip-tiny.npy").astype(np.float64)
    labels = np.load(out / "binary_waterbirds_labels_prsclip-tiny_seed_3.npy")[:, 0]  # [B, 2]: class, place
    text = np.load(out / f"{PCLENS_TEXTS}_prsclip-tiny.npy")[lines.index(top_text)].astype(np.float64)
    edited = attn.copy()
    edited[:, 3, 1] = x - np.outer(projection, v)
    acc, cos = [], []
    for a in (attn, edited):
        e = a.sum((1, 2)) + mlp.sum(1)
        acc.append(((e @ W).argmax(1) == labels).mean() * 100)
        cos.append((e @ text / np.linalg.norm(e, axis=1) / np.linalg.norm(text)).mean())
    line = next(l for l in printed.splitlines() if l.startswith("intervention L3.H1 PC 0: accuracy"))
    assert [float(t) for t in line.split("accuracy ")[1].rstrip(" %").split(" -> ")] == pytest.approx(acc, abs=1e-6)
    line = next(l for l in printed.splitlines() if l.startswith(f"cosine with '{top_text}'"))
    got = [float(t) for t in line.rsplit(": ", 1)[1].split(" -> ")]
    assert got == pytest.approx(cos, abs=2e-6) and abs(cos[0] - cos[1]) > 1e-4  # the removal moves the cosine
