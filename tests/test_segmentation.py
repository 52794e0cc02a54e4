"""Zero-shot segmentation: the spatial-sum hook mode, the gtsegs_ijcv.mat reader, heatmaps and metrics against
the original's golden outputs and hand-made cases, batch-size independence, compute_segmentations.py end to end
(with --save_img), resume, and bad input."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import GOLDEN, TINY_ARGS, run_inprocess, run_script, tiny_model
from sklearn.metrics import average_precision_score, precision_recall_curve

import utils.segmentation as seg
from prs_hook import Decomposer
from utils.imagenet_segmentation import ImagenetSegmentation, SegmentationFileError, resize_mask
from utils.plots import find_textspan_file, parse_textspan_heads, topk_similar

GSEG = GOLDEN / "segmentation"
GOLDEN_CLASSIFIER = GOLDEN / "prs" / "golden_classifier_prsclip-tiny.npy"
GOLDEN_JSON = json.loads((GSEG / "segmentation.json").read_text())
MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."


# ----------------------------------------------------------------------------- the real HDF5 layout
def write_gtsegs_mat(path: Path, images: list, masks: list) -> Path:
    """A MATLAB v7.3 file in gtsegs_ijcv.mat's layout: 512-byte MATLAB user block; /value/img [n, 1] references to
    uint8 [3, W, H]; /value/gt [n, 1] references to [1, 1] reference datasets (cells) pointing to uint8 [W, H]."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        img_refs = np.empty((len(images), 1), dtype=object)
        gt_refs = np.empty((len(images), 1), dtype=object)
        for i, (img, mask) in enumerate(zip(images, masks)):
            d = refs.create_dataset(f"i{i}", data=np.ascontiguousarray(img.transpose(2, 1, 0)))
            d.attrs["MATLAB_class"] = np.bytes_("uint8")
            m = refs.create_dataset(f"m{i}", data=np.ascontiguousarray(mask.transpose(1, 0)))
            cell = refs.create_dataset(f"c{i}", shape=(1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            img_refs[i, 0], gt_refs[i, 0] = d.ref, cell.ref
        value = f.create_group("value")
        value.create_dataset("img", data=img_refs, dtype=h5py.ref_dtype)
        value.create_dataset("gt", data=gt_refs, dtype=h5py.ref_dtype)
    with open(path, "r+b") as fh:
        fh.write(MATLAB_HEADER.ljust(128, b" "))
    return path


def _synthetic(n: int = 5, seed: int = 0) -> tuple[list, list]:
    """Images of different sizes (landscape, portrait, square) with one bright ellipse each and its mask."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (48, 80), (90, 60), (64, 96), (70, 70), (40, 64)]
    images, masks = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        mask = (((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 < 1).astype(np.uint8)
        img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        img[mask == 1] = (200 + 20 * i % 50, 60, 30)
        images.append(img)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def synthetic_mat(tmp_path_factory):
    images, masks = _synthetic()
    path = write_gtsegs_mat(tmp_path_factory.mktemp("mat") / "gtsegs_ijcv.mat", images, masks)
    return path, images, masks


@pytest.fixture(scope="module")
def golden_prs(golden_model):
    return Decomposer(golden_model[0], "cpu")  # evaluate_batch's default: spatial="sum"


# ----------------------------------------------------------------------------- hook: spatial="sum"
@pytest.mark.parametrize("name", ["prsclip-tiny", "tiny-ls", "tiny-noln-p8"])
def test_spatial_sum_mode(name):
    model, _ = tiny_model(name, seed=3)
    x = torch.randn(2, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(0))
    engine = Decomposer(model, "cpu")
    full = engine(x, spatial=True)
    attn_full, mlps_full = full.attn, full.mlp  # [b, L, N, H, d]
    light = engine(x, spatial="sum")
    attn, mlps = light.attn, light.mlp
    b, L, N, H, d = attn_full.shape
    assert attn.shape == (b, N, d)
    # the same terms summed over layers and heads, and the same CLS terms and MLPs
    torch.testing.assert_close(attn, attn_full.sum((1, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(light.cls_attn, full.cls_attn, atol=1e-7, rtol=0)
    torch.testing.assert_close(mlps, mlps_full, atol=0, rtol=0)
    # sum rule against open_clip's own encode_image
    with torch.no_grad():
        ref = model.encode_image(x)
    torch.testing.assert_close(attn.sum(1) + mlps.sum(1), ref / ref.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    assert not torch.allclose(attn[:, 1:], attn[:, :1].expand_as(attn[:, 1:]))  # tokens differ


# ----------------------------------------------------------------------------- the .mat reader
def test_reader_golden_file(golden_model):
    _, preprocess = golden_model
    ds = ImagenetSegmentation(GSEG / "gtsegs_golden.mat", preprocess, image_size=64)
    assert len(ds) == 3
    x = torch.stack([ds[i][0] for i in range(3)])
    t = torch.stack([ds[i][1] for i in range(3)])
    np.testing.assert_array_equal(x.numpy(), np.load(GSEG / "preprocessed.npy"))
    np.testing.assert_array_equal(t.numpy(), np.load(GSEG / "targets.npy"))
    assert t.dtype == torch.int64
    np.testing.assert_array_equal(ds.mask(1), np.load(GSEG / "targets.npy")[1])


def test_reader_synthetic_layout(synthetic_mat):
    path, images, masks = synthetic_mat
    assert open(path, "rb").read(10) == b"MATLAB 7.3"  # user block as in real files
    ds = ImagenetSegmentation(path)
    assert len(ds) == len(images)
    for i in range(len(images)):
        img, gt = ds.raw(i)
        np.testing.assert_array_equal(img, images[i])  # HWC after the transpose
        np.testing.assert_array_equal(gt, masks[i])
        pil, mask = ds[i]
        assert pil.size == (images[i].shape[1], images[i].shape[0]) and pil.mode == "RGB"
        np.testing.assert_array_equal(mask.numpy(), masks[i])
    # the original's target transform: straight to S x S with nearest (S3), and the aligned variant
    ds = ImagenetSegmentation(path, image_size=32)
    h, w = masks[1].shape  # 48 x 80, landscape
    stretched = ds[1][1].numpy()
    assert stretched.shape == (32, 32)
    rows = np.floor((np.arange(32) + 0.5) * h / 32).astype(int)
    cols = np.floor((np.arange(32) + 0.5) * w / 32).astype(int)
    np.testing.assert_array_equal(stretched, masks[1][rows][:, cols])
    crop = resize_mask(masks[1], 32, "crop")
    assert crop.shape == (32, 32) and not np.array_equal(crop, stretched)
    scaled = resize_mask(masks[1], 32, "stretch")
    np.testing.assert_array_equal(scaled, stretched)


def test_reader_bad_files(tmp_path):
    bad = tmp_path / "gtsegs_ijcv.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5 at all" + bytes(300))
    with pytest.raises(SegmentationFileError, match="gtsegs_ijcv.mat: not an HDF5"):
        ImagenetSegmentation(bad)
    with pytest.raises(FileNotFoundError, match="missing.mat: not found"):
        ImagenetSegmentation(tmp_path / "missing.mat")
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(SegmentationFileError, match=r"other.mat: HDF5 file without /value/img, /value/gt"):
        ImagenetSegmentation(other)


# ----------------------------------------------------------------------------- golden numbers
def test_golden_heatmaps_and_metrics(golden_model, golden_prs):
    model, _ = golden_model
    x = torch.from_numpy(np.load(GSEG / "preprocessed.npy"))
    t = torch.from_numpy(np.load(GSEG / "targets.npy"))
    cls = torch.from_numpy(np.load(GOLDEN_CLASSIFIER))
    grid, patch = seg.grid_and_patch(model)
    out = seg.evaluate_batch(golden_prs, x, t, cls, grid, patch, thr=0.0)
    golden_maps = np.load(GSEG / "heatmaps.npy")
    np.testing.assert_allclose(out["pred"], golden_maps, atol=1e-5, rtol=0)
    per = GOLDEN_JSON["per_image"]
    np.testing.assert_array_equal(out["chosen_class"], [p["chosen_class_derived"] for p in per])
    np.testing.assert_array_equal(out["correct"], [p["correct"] for p in per])
    np.testing.assert_array_equal(out["labeled"], [p["labeled"] for p in per])
    np.testing.assert_array_equal(out["inter"], [p["inter"] for p in per])
    np.testing.assert_array_equal(out["union"], [p["union"] for p in per])
    m = seg.aggregate_metrics(out["correct"], out["labeled"], out["inter"], out["union"], out["ap"])
    assert abs(m["mIoU"] - GOLDEN_JSON["mIoU_full_precision_derived"]) < 1e-6
    assert abs(m["pixAcc"] - GOLDEN_JSON["pixAcc_full_precision_derived"]) < 1e-6
    # AP ranks ~8k pixels whose float32 heatmap values tie or nearly tie: it moves by up to ~3e-5 with
    # heatmap changes of 1e-6 (a float64 recomputation differs from the golden by 1e-5 as well) ...
    np.testing.assert_allclose(out["ap"], [p["ap"] for p in per], atol=5e-5, rtol=0)
    assert abs(m["mAP"] - GOLDEN_JSON["mAP_full_precision_derived"]) < 5e-5
    # ... while on the original's own heatmaps the metric code reproduces its AP exactly
    from_golden = seg.segmentation_metrics(torch.from_numpy(golden_maps), t)
    np.testing.assert_allclose(from_golden["ap"], [p["ap"] for p in per], atol=1e-12, rtol=0)
    np.testing.assert_array_equal(from_golden["inter"], [p["inter"] for p in per])
    mg = seg.aggregate_metrics(**{k: from_golden[k] for k in ("correct", "labeled", "inter", "union", "ap")})
    assert abs(mg["mAP"] - GOLDEN_JSON["mAP_full_precision_derived"]) < 1e-12
    assert seg.result_text(mg) == GOLDEN_JSON["result_txt"]
    # precision-recall arrays: exact on the golden heatmaps; close on ours (same curve, a few ties differ)
    pr, rc, _ = precision_recall_curve(t.numpy().ravel(), golden_maps.ravel())
    np.testing.assert_allclose(pr, np.load(GSEG / "precision.npy"), atol=1e-12)
    np.testing.assert_allclose(rc, np.load(GSEG / "recall.npy"), atol=1e-12)
    pr2, rc2, _ = precision_recall_curve(t.numpy().ravel(), out["pred"].ravel())
    assert abs(len(pr2) - len(pr)) <= 0.01 * len(pr)
    grid_r = np.linspace(0.01, 0.99, 99)
    interp = lambda p, r: np.interp(grid_r, r[::-1], p[::-1])  # noqa: E731
    np.testing.assert_allclose(interp(pr2, rc2), interp(pr, rc), atol=2e-3)


def test_batch_sizes_agree(golden_model, golden_prs, synthetic_mat):
    model, preprocess = golden_model
    path, _, _ = synthetic_mat
    ds = ImagenetSegmentation(path, preprocess, image_size=64)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    t = torch.stack([ds[i][1] for i in range(len(ds))])
    cls = torch.from_numpy(np.load(GOLDEN_CLASSIFIER))
    grid, patch = seg.grid_and_patch(model)
    ones = [seg.evaluate_batch(golden_prs, x[i:i + 1], t[i:i + 1], cls, grid, patch) for i in range(len(ds))]
    threes = [seg.evaluate_batch(golden_prs, x[i:i + 3], t[i:i + 3], cls, grid, patch) for i in range(0, len(ds), 3)]
    # A batch of 3 runs other BLAS kernels than a batch of 1 (embeddings differ by ~4e-7), so floats agree to
    # that noise and the pixel counts exactly. AP can move by up to ~1e-3: near-tied heatmap pixels of opposite
    # labels swap ranks.
    for key in ones[0]:
        a = np.concatenate([o[key] for o in ones])
        b = np.concatenate([o[key] for o in threes])
        if key == "ap":
            np.testing.assert_allclose(a, b, atol=1e-3, err_msg=key)
        elif a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)
        else:
            np.testing.assert_array_equal(a, b, err_msg=key)
    # every image is normalised on its own (the original normalised over the batch)
    np.testing.assert_allclose(np.concatenate([o["heatmap"] for o in threes]).max((1, 2)), 1.0)


# ----------------------------------------------------------------------------- hand-made metric cases
def _metrics(heat, mask):
    out = seg.segmentation_metrics(torch.as_tensor(heat, dtype=torch.float32)[None], torch.as_tensor(mask)[None])
    return out, seg.aggregate_metrics(out["correct"], out["labeled"], out["inter"], out["union"], out["ap"])


def test_metrics_hand_made():
    mask = np.zeros((8, 8), dtype=np.int64)
    mask[2:6, 1:5] = 1  # 16 object pixels of 64
    out, m = _metrics(mask.astype(np.float32), mask)  # perfect
    assert m["pixAcc"] == pytest.approx(1.0, abs=1e-12) and m["mIoU"] == pytest.approx(1.0, abs=1e-12)
    assert out["ap"][0] == pytest.approx(1.0)
    np.testing.assert_array_equal(out["inter"][0], [48, 16])
    np.testing.assert_array_equal(out["union"][0], [48, 16])
    out, m = _metrics(1.0 - mask, mask)  # inverted
    assert m["pixAcc"] == 0.0 and m["mIoU"] == 0.0
    np.testing.assert_array_equal(out["inter"][0], [0, 0])
    np.testing.assert_array_equal(out["union"][0], [64, 64])
    # a partial prediction, counted by hand: foreground = the left 4 columns (32 pixels)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:, :4] = 1.0
    out, m = _metrics(heat, mask)
    # object pixels in cols 0..3: rows 2..5 x cols 1..3 = 12; background predicted right: 32 - 4 = 28 (cols 4..7
    # minus the 4 object pixels in col 4)
    assert out["correct"][0] == 12 + 28 and out["labeled"][0] == 64
    np.testing.assert_array_equal(out["inter"][0], [28, 12])
    np.testing.assert_array_equal(out["union"][0], [32 + 48 - 28, 32 + 16 - 12])
    assert m["mIoU"] == pytest.approx((28 / 52 + 12 / 36) / 2)
    scores = np.concatenate([1 - heat.ravel(), heat.ravel()])
    onehot = np.concatenate([(mask == 0).ravel(), (mask == 1).ravel()])
    assert out["ap"][0] == pytest.approx(average_precision_score(onehot, scores), abs=1e-12)


def test_degenerate_heatmap_is_background():
    """Nothing above 0 after clipping: the original's NaNs become 0, every pixel background, AP on zero scores."""
    terms = torch.tensor([0.0, -1.0, 1.0]).expand(1, 16, 3)  # class 1 scores below the mean everywhere
    res, chosen, degenerate = seg.class_heatmaps(terms, torch.tensor([[0.0, 1.0, 0.0]]), torch.eye(3), (4, 4), (2, 2))
    assert chosen.tolist() == [1]
    assert bool(degenerate[0]) and float(res.abs().max()) == 0.0
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, :2] = 1
    out = seg.segmentation_metrics(res, mask, degenerate)
    np.testing.assert_array_equal(out["inter"][0], [48, 0])
    assert out["ap"][0] == pytest.approx(0.5)  # constant scores: AP = share of positives (64 of 128)
    assert np.isfinite(seg.curve_scores(res, 0.0).numpy()).all()


def test_average_precision_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    for levels in (3, 11, 1000, 0):
        s = torch.rand(4, 700, generator=g)
        if levels:
            s = (s * levels).round() / levels  # many ties
        y = torch.rand(4, 700, generator=g) > 0.7
        ours = seg.average_precision(s, y).numpy()
        ref = [average_precision_score(y[i].numpy(), s[i].numpy()) for i in range(4)]
        np.testing.assert_allclose(ours, ref, atol=1e-12, rtol=0)
    assert seg.average_precision(torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.bool)).item() == 0.0


# ----------------------------------------------------------------------------- compute_segmentations.py
def _out_dir(root: Path, pretrained: str = "prsclip-tiny_seed0") -> Path:
    return root / f"imagenet_seg_segmentation_prsclip-tiny_{pretrained}"


SEG_ARGS = ["--classifier_dir", str(GOLDEN / "prs"), "--classifier_dataset", "golden", "--image_size", "64",
            "--num_workers", "0"]


def test_compute_segmentations_end_to_end(tmp_path):
    res = run_script("compute_segmentations.py", *TINY_ARGS, *SEG_ARGS, "--data_path", str(GSEG / "gtsegs_golden.mat"),
                     "--output_dir", str(tmp_path), "--save_img", "--batch_size", "2")
    out = _out_dir(tmp_path)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    images = [f"images/{i:05d}_{k}.png" for i in range(3) for k in ("gt", "heatmap", "input", "mask")]
    assert files == sorted(["heatmaps.npy", "per_image_metrics.npy", "precision.npy", "recall.npy",
                            "result_mIoU_0.2622.txt", "segmentation.json", *images, "provenance.json",
                            "heatmaps.npy.provenance.json", "per_image_metrics.npy.provenance.json"])
    record = json.loads((out / "provenance.json").read_text())
    assert record["model"] == "prsclip-tiny" and record["num_images"] == 3 and record["image_size"] == 64
    text = (out / "result_mIoU_0.2622.txt").read_text()
    golden_lines = GOLDEN_JSON["result_txt"].splitlines()
    lines = text.splitlines()
    assert lines[:2] == golden_lines[:2]  # mIoU and pixAcc: exactly the original's lines
    assert lines[2].startswith("Mean AP over 2 classes: ") and abs(float(lines[2].split()[-1]) - 0.5705) <= 1.01e-4
    assert "Mean IoU over 2 classes: 0.2622" in res.stdout and "pixAcc" in res.stderr  # progress bar
    summary = json.loads((out / "segmentation.json").read_text())
    assert summary["model"] == "prsclip-tiny" and summary["num_images"] == 3
    assert summary["args"]["batch_size"] == 2 and summary["args"]["classifier_dataset"] == "golden"
    assert abs(summary["metrics"]["mIoU"] - GOLDEN_JSON["mIoU_full_precision_derived"]) < 1e-6
    assert abs(summary["metrics"]["pixAcc"] - GOLDEN_JSON["pixAcc_full_precision_derived"]) < 1e-6
    assert abs(summary["metrics"]["mAP"] - GOLDEN_JSON["mAP_full_precision_derived"]) < 5e-5
    for ours, gold in zip(summary["per_image"], GOLDEN_JSON["per_image"]):
        assert (ours["correct"], ours["inter"], ours["union"], ours["chosen_class"]) == \
            (gold["correct"], gold["inter"], gold["union"], gold["chosen_class_derived"])
    heat = np.load(out / "heatmaps.npy")
    np.testing.assert_allclose(heat, np.load(GSEG / "heatmaps.npy"), atol=1e-5)
    table = np.load(out / "per_image_metrics.npy")
    assert table.shape == (3, 8)
    np.testing.assert_array_equal(table[:, 0], [p["correct"] for p in GOLDEN_JSON["per_image"]])
    masks = np.load(GSEG / "targets.npy")
    pr, rc, _ = precision_recall_curve(masks.ravel(), heat.ravel())
    np.testing.assert_array_equal(np.load(out / "precision.npy"), pr)
    np.testing.assert_array_equal(np.load(out / "recall.npy"), rc)
    import matplotlib.image as mpimg

    for i in range(3):
        gt = mpimg.imread(out / f"images/{i:05d}_gt.png")
        np.testing.assert_array_equal(gt[..., 0] > 0.5, masks[i] == 1)
        pred = mpimg.imread(out / f"images/{i:05d}_mask.png")
        np.testing.assert_array_equal(pred[..., 0] > 0.5, heat[i] > heat[i].mean())
        inp = mpimg.imread(out / f"images/{i:05d}_input.png")
        assert inp.shape[:2] == (64, 64) and inp[..., :3].std() > 0.05
        over = mpimg.imread(out / f"images/{i:05d}_heatmap.png")
        assert over.shape[:2] == (64, 64) and not np.allclose(over[..., :3], inp[..., :3])


def test_cli_batch_one_and_three_agree(tmp_path, synthetic_mat):
    path, _, _ = synthetic_mat
    common = [*TINY_ARGS, *SEG_ARGS, "--data_path", str(path)]
    results = {}
    for bs in (1, 3):
        code, out, err = run_inprocess("compute_segmentations.py", *common, "--output_dir", str(tmp_path / f"b{bs}"),
                                       "--batch_size", str(bs))
        assert code == 0, err
        d = _out_dir(tmp_path / f"b{bs}")
        results[bs] = {k: np.load(d / f"{k}.npy") for k in ("heatmaps", "per_image_metrics", "precision", "recall")}
        results[bs]["json"] = json.loads((d / "segmentation.json").read_text())
    # equal up to the float noise of batched kernels (see test_batch_sizes_agree): counts exactly
    np.testing.assert_allclose(results[1]["heatmaps"], results[3]["heatmaps"], atol=1e-5)
    m1, m3 = results[1]["per_image_metrics"], results[3]["per_image_metrics"]
    np.testing.assert_array_equal(m1[:, :6], m3[:, :6])
    np.testing.assert_array_equal(m1[:, 7], m3[:, 7])
    np.testing.assert_allclose(m1[:, 6], m3[:, 6], atol=1e-3)
    for k in ("pixAcc", "mIoU"):
        assert results[1]["json"]["metrics"][k] == results[3]["json"]["metrics"][k]
    assert abs(results[1]["json"]["metrics"]["mAP"] - results[3]["json"]["metrics"]["mAP"]) < 1e-3
    assert results[1]["heatmaps"].shape == (5, 64, 64)


def test_cli_resume(tmp_path, synthetic_mat, monkeypatch):
    path, _, _ = synthetic_mat
    common = [*TINY_ARGS, *SEG_ARGS, "--data_path", str(path), "--batch_size", "2"]
    code, _, err = run_inprocess("compute_segmentations.py", *common, "--output_dir", str(tmp_path / "clean"))
    assert code == 0, err
    real = seg.evaluate_batch
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(seg, "evaluate_batch", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):  # a real error keeps its traceback
        run_inprocess("compute_segmentations.py", *common, "--output_dir", str(tmp_path / "crash"))
    d = _out_dir(tmp_path / "crash")
    assert not (d / "heatmaps.npy").exists() and (d / "heatmaps.npy.partial").exists()
    monkeypatch.setattr(seg, "evaluate_batch", real)
    code, out, err = run_inprocess("compute_segmentations.py", *common, "--output_dir", str(tmp_path / "crash"),
                                   "--resume")
    assert code == 0, err
    assert "Resuming at image 2 of 5" in out
    clean = _out_dir(tmp_path / "clean")
    for k in ("heatmaps", "per_image_metrics", "precision", "recall"):
        np.testing.assert_array_equal(np.load(d / f"{k}.npy"), np.load(clean / f"{k}.npy"), err_msg=k)


def test_cli_bad_input(tmp_path, synthetic_mat):
    path, _, _ = synthetic_mat
    base = [*TINY_ARGS, "--image_size", "64", "--num_workers", "0", "--output_dir", str(tmp_path / "out")]
    # missing classifier file
    code, _, err = run_inprocess("compute_segmentations.py", *base, "--data_path", str(path),
                                 "--classifier_dir", str(tmp_path), "--classifier_dataset", "nothing")
    assert code == 2 and "nothing_classifier_prsclip-tiny.npy: not found" in err and "compute_text_projection" in err
    # classifier of the wrong embedding size
    np.save(tmp_path / "wrong_classifier_prsclip-tiny.npy", np.ones((16, 3), dtype=np.float32))
    code, _, err = run_inprocess("compute_segmentations.py", *base, "--data_path", str(path),
                                 "--classifier_dir", str(tmp_path), "--classifier_dataset", "wrong")
    assert code == 2 and "wrong_classifier_prsclip-tiny.npy: classifier of shape [16, 3]" in err and "[32, classes]" in err
    np.save(tmp_path / "flat_classifier_prsclip-tiny.npy", np.ones(32, dtype=np.float32))
    code, _, err = run_inprocess("compute_segmentations.py", *base, "--data_path", str(path),
                                 "--classifier_dir", str(tmp_path), "--classifier_dataset", "flat")
    assert code == 2 and "expected [d, classes]" in err
    # a .mat that is not HDF5 (e.g. a MATLAB v5 file or a broken download)
    bad = tmp_path / "gtsegs_ijcv.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file" + bytes(1000))
    code, _, err = run_inprocess("compute_segmentations.py", *base, *SEG_ARGS[:4], "--data_path", str(bad))
    assert code == 2 and "gtsegs_ijcv.mat: not an HDF5" in err
    # --image_size that is not the model's
    code, _, err = run_inprocess("compute_segmentations.py", *TINY_ARGS, *SEG_ARGS[:4], "--image_size", "224",
                                 "--num_workers", "0", "--data_path", str(path), "--output_dir", str(tmp_path))
    assert code == 2 and "--image_size 224: prsclip-tiny takes 64x64 inputs" in err


# ----------------------------------------------------------------------------- notebook helpers
def test_textspan_file_parsing(tmp_path):
    f = tmp_path / "imagenet_completeness_texts_top_2_heads_ViT-B-16.txt"
    f.write_text("------------------\nLayer 10, Head 3\n------------------\nA photo of a dog\nstripes\n"
                 "------------------\nLayer 11, Head 0\n------------------\nred\nblue\n"
                 "------------------\nCurrent accuracy: 71.2\nNumber of texts: 4")
    assert parse_textspan_heads(f) == {(10, 3): ["A photo of a dog", "stripes"], (11, 0): ["red", "blue"]}
    assert find_textspan_file(tmp_path, "ViT-B-16") == f
    assert find_textspan_file(tmp_path, "ViT-L-14") is None
    assert find_textspan_file(tmp_path / "absent", "ViT-B-16") is None
    (tmp_path / "empty.txt").write_text("Current accuracy: 1\n")
    with pytest.raises(ValueError, match="empty.txt: no 'Layer L, Head H' sections"):
        parse_textspan_heads(tmp_path / "empty.txt")


def test_topk_similar_is_exact():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 8, generator=g)
    q = bank[7] + 0.01 * torch.randn(8, generator=g)
    scores, idx = topk_similar(q, bank, 5)
    assert idx[0].item() == 7
    sims = torch.nn.functional.cosine_similarity(q[None], bank)
    torch.testing.assert_close(scores, sims.sort(descending=True).values[:5])
    _, idx = topk_similar(bank[7], bank, 5, exclude=7)
    assert 7 not in idx.tolist() and len(idx) == 5


# ----------------------------------------------------------------------------- flags: --thr, --mask_resize, ...
OUTPUTS = ("heatmaps", "per_image_metrics", "precision", "recall")


def _seg_run(root: Path, synthetic_mat, *extra) -> dict:
    """compute_segmentations.py on the synthetic file (landscape, portrait and square images): its arrays."""
    path, _, _ = synthetic_mat
    code, out, err = run_inprocess("compute_segmentations.py", *TINY_ARGS, *SEG_ARGS, "--data_path", str(path),
                                   "--output_dir", str(root), "--batch_size", "2", *extra)
    assert code == 0, out + err
    folder = next(root.glob("*_segmentation_*"))
    return {"dir": folder, **{k: np.load(folder / f"{k}.npy") for k in OUTPUTS}}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, synthetic_mat):
    return _seg_run(tmp_path_factory.mktemp("seg_default"), synthetic_mat, "--save_img")


def test_cli_thr_clamps_the_curve_scores(tmp_path, synthetic_mat, default_run):
    """--thr 0.5: the saved heatmaps (the PR curve's scores) are the default ones clamped at 0.5 (the maps are
    min-max normalised, so their max is 1); the per-image counts and AP do not use it."""
    run = _seg_run(tmp_path, synthetic_mat, "--thr", "0.5")
    heat = default_run["heatmaps"]
    assert (heat < 0.5).mean() > 0.3  # the clamp changes many pixels
    np.testing.assert_array_equal(run["heatmaps"], np.maximum(heat, np.float32(0.5)))
    np.testing.assert_array_equal(run["per_image_metrics"], default_run["per_image_metrics"])
    masks = np.stack(_script_masks(default_run["dir"], len(heat)))
    pr, rc, _ = precision_recall_curve(masks.ravel(), np.maximum(heat, np.float32(0.5)).ravel())
    np.testing.assert_array_equal(run["precision"], pr)
    np.testing.assert_array_equal(run["recall"], rc)


def _script_masks(folder: Path, n: int) -> list:
    """The target masks and predicted foregrounds the script used, from its --save_img pictures."""
    import matplotlib.image as mpimg

    return [mpimg.imread(folder / f"images/{i:05d}_gt.png")[..., 0] > 0.5 for i in range(n)]


def _crop_mask(mask: np.ndarray, S: int) -> np.ndarray:
    """Written out: shorter side to S by nearest neighbour (pixel centres, as PIL), long side int(S * long /
    short) (torchvision's Resize), then the centre S x S with torchvision's CenterCrop offsets."""
    h, w = mask.shape
    nh, nw = (S, int(S * w / h)) if h <= w else (int(S * h / w), S)
    rows = np.floor((np.arange(nh) + 0.5) * h / nh).astype(int)
    cols = np.floor((np.arange(nw) + 0.5) * w / nw).astype(int)
    top, left = int(round((nh - S) / 2)), int(round((nw - S) / 2))
    return mask[rows][:, cols][top:top + S, left:left + S]


def test_cli_mask_resize_crop_and_train_dataset(tmp_path, synthetic_mat, default_run):
    """--mask_resize crop: the masks get the image's geometry (resize + centre crop), so on non-square images they
    differ from the default stretch, and the counts are taken against them. --train_dataset names the folder."""
    import matplotlib.image as mpimg

    _, _, masks = synthetic_mat
    run = _seg_run(tmp_path, synthetic_mat, "--mask_resize", "crop", "--train_dataset", "cropped", "--save_img")
    assert run["dir"].name == "cropped_segmentation_prsclip-tiny_prsclip-tiny_seed0"
    np.testing.assert_array_equal(run["heatmaps"], default_run["heatmaps"])  # the images are the same
    used = _script_masks(run["dir"], len(masks))
    stretched = _script_masks(default_run["dir"], len(masks))
    metrics = run["per_image_metrics"]
    for i, mask in enumerate(masks):
        expected = _crop_mask(mask, 64) == 1
        np.testing.assert_array_equal(used[i], expected, err_msg=f"image {i} {mask.shape}")
        square = mask.shape[0] == mask.shape[1]
        assert np.array_equal(used[i], stretched[i]) == square, i
        fg = mpimg.imread(run["dir"] / f"images/{i:05d}_mask.png")[..., 0] > 0.5  # the predicted foreground
        assert metrics[i, 3] == (fg & expected).sum() and metrics[i, 5] == (fg | expected).sum()  # inter, union fg
        assert metrics[i, 2] == (~fg & ~expected).sum() and metrics[i, 1] == 64 * 64


def test_cli_two_workers(tmp_path, synthetic_mat, default_run):
    """--num_workers 2 (the HDF5 file opened in each worker): the same outputs as in-process loading."""
    run = _seg_run(tmp_path, synthetic_mat, "--num_workers", "2")
    for k in OUTPUTS:
        np.testing.assert_array_equal(run[k], default_run[k], err_msg=k)
