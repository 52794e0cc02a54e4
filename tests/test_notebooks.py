"""demo.ipynb and nns.ipynb run top to bottom (nbclient, parameters injected after the `parameters` cell) on the
tiny golden model and the bundled sample photos, on the CPU, without the network, and produce their figures."""
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
