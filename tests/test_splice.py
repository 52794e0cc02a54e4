"""SpLiCE (utils/splice.py, utils.solvers.nnlasso.ScreenedADMM, the four scripts) against the original's golden outputs."""
import json
import logging
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, GOLDEN, GOLDEN_WEIGHTS, REPO, run_inprocess, run_killed
from sklearn.linear_model import Lasso

from utils.solvers.nnlasso import ScreenedADMM
from utils.splice import (SPLICE, centre_concepts, decompose_classes, decompose_dataset, decompose_image,
                          embed_concepts, get_preprocess, get_vocabulary, image_decomposition, load,
                          load_decompositions, read_image_mean, read_vocabulary, resolve_backbone)
from utils.text.sets import HashMismatchError

G = GOLDEN / "splice"
IMAGES = GOLDEN / "images"
INFO = json.loads((G / "splice.json").read_text())
L1 = INFO["l1_penalty"]  # 0.2
# the golden model through SpLiCE's scripts: any open_clip name, its weights, a vocabulary file and an image mean
MODEL_ARGS = ["-model", "open_clip:prsclip-tiny", "--model_config", str(CONFIGS), "--pretrained", str(GOLDEN_WEIGHTS),
              "-device", "cpu", "-vocab", str(G / "vocab.txt"), "-vocab_size", "0", "--image_mean",
              str(G / "image_mean.pt")]


@pytest.fixture(scope="module")
def golden(golden_model):
    model, preprocess = golden_model
    import open_clip

    dictionary = embed_concepts(model, open_clip.get_tokenizer("prsclip-tiny"),
                                (G / "vocab.txt").read_text().splitlines())
    mean = torch.from_numpy(np.load(G / "image_mean.npy"))
    return {"model": model, "preprocess": preprocess, "dictionary": dictionary, "mean": mean}


def splicemodel(golden, **kw) -> SPLICE:
    return SPLICE(golden["mean"], golden["dictionary"], clip=golden["model"], l1_penalty=L1, **kw)


def same_support(a: np.ndarray, b: np.ndarray, above: float = 1e-3) -> bool:
    """Every weight above ``above`` in one is non-zero in the other."""
    return bool((((a <= above) | (b > 0)) & ((b <= above) | (a > 0))).all())


# ----------------------------------------------------------------------------- numbers vs the original
def test_dictionary_and_embeddings_match_golden(golden, golden_images):
    np.testing.assert_allclose(golden["dictionary"].numpy(), np.load(G / "dictionary.npy"), atol=1e-6)
    with torch.no_grad():
        z = F.normalize(golden["model"].encode_image(golden_images), dim=1)
    np.testing.assert_allclose(z.numpy(), np.load(G / "image_embeddings.npy"), atol=1e-6)


@pytest.mark.parametrize("solver", ["skl", "admm", "active_set"])
def test_weights_l0_cosine_match_golden(golden, golden_images, solver):
    weights, cosine = image_decomposition(splicemodel(golden, solver=solver), golden_images)
    w, ref = weights.numpy(), np.load(G / "weights_skl.npy")
    np.testing.assert_allclose(w, ref, atol=3e-5 if solver == "admm" else 1e-5)
    assert same_support(w, ref) and ((w > 0) == (ref > 0)).all()
    assert (w >= 0).all()
    np.testing.assert_array_equal((w > 0).sum(1), [p["l0"] for p in INFO["per_image"]["skl"]])
    np.testing.assert_allclose(cosine.numpy(), [p["cosine"] for p in INFO["per_image"]["skl"]], atol=1e-6)
    np.testing.assert_allclose(w, np.load(G / "weights_admm.npy"), atol=3e-5)


@pytest.mark.parametrize("tol, max_iter", [(1e-6, 2000), (0.0, 7)])
def test_screened_admm_iterates_equal_splice_loop_from_zero(tol, max_iter):
    """ScreenedADMM = SpLiCE's ADMM (direct [T, T] Cholesky x-update) started at zero, each signal stopping at
    its own first iteration with both residuals < tol (or at max_iter): same stopping iteration, same z
    (float64)."""
    rng = np.random.default_rng(0)
    T, d, n, rho, l1 = 400, 20, 5, 5.0, 0.3
    C = rng.standard_normal((T, d)) / np.sqrt(np.arange(1, d + 1))
    C = centre_concepts(torch.from_numpy(C)).double()
    V = F.normalize(torch.from_numpy(rng.standard_normal((n, d))), dim=1)
    chol = torch.linalg.cholesky(2 * C @ C.T + rho * torch.eye(T, dtype=torch.float64))
    ref, ref_iters = [], []
    for v in V:  # SpLiCE's ADMM.step, one signal, columns
        x = z = u = torch.zeros(T, 1, dtype=torch.float64)
        Cb = C @ v[:, None]
        for k in range(max_iter):
            z_old = z
            x = torch.cholesky_solve(2 * Cb + rho * (z - u), chol)
            z = torch.clamp_min(x + u - l1 / rho, 0)
            u = u + x - z
            if (x - z).norm() < tol and (rho * (z - z_old)).norm() < tol:
                break
        ref.append(z[:, 0].numpy())
        ref_iters.append(k + 1)
    # few tracked concepts and candidates: the screening and the re-evaluations are exercised
    solver = ScreenedADMM(C, tol=tol, max_iter=max_iter, dtype=torch.float64, tracked=6, candidates=40)
    got, iters = solver.fit(V, l1, batch_size=2, return_iters=True)
    np.testing.assert_array_equal(iters, ref_iters)
    np.testing.assert_allclose(got, np.stack(ref), atol=1e-12)
    assert (got > 0).sum(1).max() < T and (tol == 0 or (got > 0).sum(1).min() > 0)


def test_screened_admm_matches_sklearn_float32():
    rng = np.random.default_rng(1)
    T, d, n, l1 = 600, 32, 7, 0.25
    C = centre_concepts(torch.from_numpy(rng.standard_normal((T, d)) / np.sqrt(np.arange(1, d + 1)))).float()
    V = F.normalize(torch.from_numpy(rng.standard_normal((n, d))).float(), dim=1)
    got = ScreenedADMM(C, tracked=8, candidates=64).fit(V, l1, batch_size=3)
    ref = np.stack([Lasso(alpha=l1 / (2 * d), positive=True, fit_intercept=False, max_iter=100000, tol=1e-10)
                    .fit(C.numpy().T.astype(np.float64), v).coef_ for v in V.numpy().astype(np.float64)])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert same_support(got, ref)


def test_recomposition_identity_and_cosine(golden, golden_images):
    """encode_image's recomposition = normalise(normalise(w C) + mu) (float64, by hand), cosine = <z_hat, z>."""
    model = splicemodel(golden, solver="skl", return_cosine=True)
    recon, cosine = model.encode_image(golden_images)
    w = torch.from_numpy(np.load(G / "weights_skl.npy")).double()
    C, mu = golden["dictionary"].double(), golden["mean"].double()
    by_hand = w @ C
    by_hand = by_hand / by_hand.norm(dim=1, keepdim=True) + mu
    by_hand = by_hand / by_hand.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(recon.numpy(), by_hand.numpy(), atol=1e-5)
    z = np.load(G / "image_embeddings.npy")
    np.testing.assert_allclose(cosine.numpy(), (by_hand.numpy() * z).sum(1), atol=1e-5)
    assert cosine.shape == (6,)  # per image (SpLiCE sums them over the batch)


def test_intervene_image_zeroes_only_the_chosen_concepts(golden, golden_images):
    model = splicemodel(golden, solver="skl", return_weights=True)
    full = model.encode_image(golden_images)
    chosen = [int(full[0].argmax()), int(full[3].argmax()), 5]
    cut = model.intervene_image(golden_images, chosen)
    assert (cut[:, chosen] == 0).all() and (full[:, chosen] > 0).any()
    keep = [j for j in range(full.shape[1]) if j not in chosen]
    torch.testing.assert_close(cut[:, keep], full[:, keep], rtol=0, atol=0)
    model.return_weights = False
    torch.testing.assert_close(model.intervene_image(golden_images, chosen), model.recompose_image(cut))


def test_image_mean_1xd_is_flattened(golden, golden_images, tmp_path):
    """SP2: a [1, d] mean would make SpLiCE's skl solver take d = 1; here it is read as [d]."""
    torch.save(golden["mean"][None], tmp_path / "m.pt")
    np.save(tmp_path / "m.npy", golden["mean"].numpy()[None])
    for f in ("m.pt", "m.npy"):
        assert read_image_mean(tmp_path / f).shape == golden["mean"].shape
    w = image_decomposition(SPLICE(golden["mean"][None], golden["dictionary"], clip=golden["model"],
                                   l1_penalty=L1, solver="skl"), golden_images)[0]
    np.testing.assert_allclose(w.numpy(), np.load(G / "weights_skl.npy"), atol=1e-5)
    torch.save(torch.zeros(2, 32), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"\[d\]"):
        read_image_mean(tmp_path / "bad.pt")


def test_api_dataset_functions(golden, golden_images):
    """decompose_image / decompose_dataset / decompose_classes = averages of the golden per-image numbers."""
    model = splicemodel(golden, solver="skl", return_weights=True)
    ref = np.load(G / "weights_skl.npy")
    cos = np.array([p["cosine"] for p in INFO["per_image"]["skl"]])
    w, l0, c = decompose_image(golden_images[1], model)
    np.testing.assert_allclose(w[0].numpy(), ref[1], atol=1e-5)
    assert l0 == float((ref[1] > 0).sum()) and abs(c - cos[1]) < 1e-6
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    loader = [(golden_images[:4], labels[:4]), (golden_images[4:], labels[4:])]
    w, l0, c = decompose_dataset(loader, model)
    np.testing.assert_allclose(w.numpy(), ref.mean(0), atol=1e-5)
    assert abs(l0 - (ref > 0).sum() / 6) < 1e-12 and abs(c - cos.mean()) < 1e-6
    classes, l0, c = decompose_classes(loader, 1, model)
    assert list(classes) == [1]
    np.testing.assert_allclose(classes[1].numpy(), ref[3:].mean(0), atol=1e-5)
    assert abs(c - cos[3:].mean()) < 1e-6
    classes, _, _ = decompose_classes(loader, None, model)
    np.testing.assert_allclose(classes[0].numpy(), ref[:3].mean(0), atol=1e-5)


def test_get_preprocess_matches_the_model_transform(golden):
    from PIL import Image

    img = Image.open(IMAGES / "1_object" / "rocket.png").convert("RGB")
    ours = get_preprocess("prsclip-tiny", str(GOLDEN_WEIGHTS))(img)
    torch.testing.assert_close(ours, golden["preprocess"](img), rtol=0, atol=0)
    np.testing.assert_allclose(ours.numpy(), np.load(GOLDEN / "inputs" / "preprocessed.npy")[5], atol=1e-6)


def test_load_api_with_cache(tmp_path, golden_images):
    model = load("open_clip:prsclip-tiny", str(G / "vocab.txt"), 0, "cpu", pretrained=str(GOLDEN_WEIGHTS),
                 model_config=str(CONFIGS), image_mean=G / "image_mean.pt", cache_dir=tmp_path, solver="skl",
                 l1_penalty=L1, return_weights=True, log=lambda s: None)
    np.testing.assert_allclose(model.encode_image(golden_images).numpy(), np.load(G / "weights_skl.npy"), atol=1e-5)
    cached = list(tmp_path.glob("splice_concepts_*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (40, 32)


# ----------------------------------------------------------------------------- backbones, vocabularies, means
def test_resolve_backbone():
    b = resolve_backbone("clip:ViT-B/32")
    assert (b.open_clip_name, b.pretrained, b.quick_gelu, b.mean_file) == \
        ("ViT-B-32", "openai", True, "clip_ViT-B-32_image.pt")
    assert resolve_backbone("clip:RN50").open_clip_name == "RN50"
    b = resolve_backbone("open_clip:ViT-B-32")
    assert (b.pretrained, b.quick_gelu, b.mean_file) == ("laion2b_s34b_b79k", False, "open_clip_ViT-B-32_image.pt")
    assert resolve_backbone("open_clip:ViT-B-32", "openai").mean_file == "clip_ViT-B-32_image.pt"
    assert resolve_backbone("open_clip:ViT-B-32", "laion400m_e32").mean_file is None
    assert resolve_backbone("ViT-L-14", "none").mean_file is None
    for bad in ("clip:ViT-L/14", "timm:foo", "ViT-L-14"):
        with pytest.raises(ValueError):
            resolve_backbone(bad)


def test_vocabulary_size_keeps_the_last_lines(tmp_path, caplog):
    f = tmp_path / "v.txt"
    f.write_text("".join(f"word{i}\n" for i in range(10)))
    assert read_vocabulary(f, 3) == ["word7", "word8", "word9"]
    for k in (0, -1, 10, 99):
        assert read_vocabulary(f, k) == [f"word{i}" for i in range(10)]
    assert read_vocabulary(f, 2, reverse=True) == ["word1", "word0"]
    f.write_text("a\n\n  b  \nc\n")
    with caplog.at_level(logging.INFO, logger="utils.splice"):
        assert read_vocabulary(f, 0) == ["a", "b", "c"]
    assert caplog.text.count("skipped 1 empty line") == 1
    assert get_vocabulary("words", 3) == (REPO / "text_descriptions" / "words_10000.txt").read_text().split()[2::-1]


def test_vocab_size_in_the_script(tmp_path, golden):
    """-vocab_size 12 decomposes over the last 12 lines: the cached dictionary is SpLiCE's recipe (one line at a
    time, float64 here) on lines 28..39, and only those concepts are named."""
    import open_clip

    lines = (G / "vocab.txt").read_text().splitlines()
    args = [a if a != "0" else "12" for a in MODEL_ARGS]
    code, out, err = run_inprocess("decompose_image.py", "-path", str(IMAGES / "0_living" / "chelsea.png"),
                                   "-out_path", f"{tmp_path}/", "-l1_penalty", "0.05", "--verbose", *args)
    assert code == 0, err
    cached = np.load(next(tmp_path.glob("splice_concepts_*_vocab_12.npy")))
    tok = open_clip.get_tokenizer("prsclip-tiny")
    with torch.no_grad():
        e = torch.cat([golden["model"].encode_text(tok([line])) for line in lines[-12:]]).double()
    e = e / e.norm(dim=1, keepdim=True)
    e = e - e.mean(0)
    np.testing.assert_allclose(cached, (e / e.norm(dim=1, keepdim=True)).numpy(), atol=2e-6)
    named = [line.split("\t")[1] for line in out.splitlines() if line.startswith("\t")]
    assert named and set(named) <= set(lines[-12:])


def test_fetch_refuses_a_wrong_hash(tmp_path, monkeypatch):
    from utils import splice as S

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "laion.txt").write_text("not\nthe\nreal\nfile\n")
    dest = tmp_path / "root"
    with pytest.raises(HashMismatchError, match="sha256"):
        S.fetch_splice_file("laion.txt", dest, mirror.as_uri(), log=lambda s: None)
    assert not any(dest.glob("*"))  # nothing written
    code, out, err = run_inprocess("decompose_image.py", "-path", str(IMAGES / "0_living" / "horse.png"),
                                   "-l1_penalty", "0.2", "-out_path", f"{tmp_path}/", "-vocab", "laion",
                                   "--download_root", str(dest), "--base_url", mirror.as_uri(), *MODEL_ARGS[:8],
                                   "--image_mean", str(G / "image_mean.pt"))
    assert code == 2 and "sha256" in err and len(err.strip().splitlines()) == 1
    # the same file with its hash pinned is accepted
    import hashlib

    from utils.text.sets import Source

    sha = hashlib.sha256((mirror / "laion.txt").read_bytes()).hexdigest()
    monkeypatch.setattr(S, "SPLICE_FILES", {"laion.txt": Source("AI4LIFE-GROUP/SpLiCE", "0" * 40, sha, "data/vocab")})
    assert S.get_vocabulary("laion", 2, dest, mirror.as_uri()) == ["real", "file"]
    assert (dest / "laion.txt").is_file()


# ----------------------------------------------------------------------------- the scripts
def run_decompose_image(tmp_path, monkeypatch, solver):
    monkeypatch.chdir(IMAGES)  # the golden files name the images relative to this folder
    for cls in ("0_living", "1_object"):
        paths = sorted(str(p.relative_to(IMAGES)) for p in (IMAGES / cls).glob("*.png"))
        code, out, err = run_inprocess("decompose_image.py", "-path", *paths, "-out_path", f"{tmp_path}/{cls}/",
                                       "-l1_penalty", str(L1), "-solver", solver, "--verbose", *MODEL_ARGS)
        assert code == 0, err
    return out


@pytest.mark.parametrize("solver", ["skl", "admm", "active_set"])
def test_decompose_image_script_reproduces_golden_text(tmp_path, monkeypatch, solver):
    out = run_decompose_image(tmp_path, monkeypatch, solver)
    for ref in (G / "decompose_image").glob("*/*_weights.txt"):
        got = tmp_path / ref.parent.name / ref.name
        assert got.read_text() == ref.read_text(), ref.name
        assert (got.parent / (got.name + ".provenance.json")).is_file()
    printed = {f["image"]: f["stdout"] for f in INFO["decompose_image_files"]}
    assert out == "".join(printed[p] for p in sorted(printed) if p.startswith("1_object"))
    assert len(list(tmp_path.glob("*/splice_concepts_*.npy"))) == 2


def test_decompose_image_output_names(tmp_path):
    import importlib

    sys.path.insert(0, str(REPO))
    di = importlib.import_module("decompose_image")
    assert di.output_file("prefix_", "a/b/000123.x.jpg", 1) == Path("prefix_000123_weights.txt")  # SpLiCE's
    assert di.output_file(f"{tmp_path}", "x.jpg", 2) == tmp_path / "x_weights.txt"  # an existing folder
    assert di.output_file("img_decomp.txt", "000000308175.jpg", 1) == Path("img_decomp.txt")  # README's intent


def test_readme_command_lines_parse():
    import importlib

    sys.path.insert(0, str(REPO))
    commands = [
        "decompose_image.py -path 000000308175.jpg -out_path image308175_decomp.txt -l1_penalty 0.25 --verbose",
        "decompose_data.py -dataset CIFAR10 -out_path cifar10_decomp.txt -l1_penalty 0.35 --verbose",
        "decompose_data.py -dataset CIFAR10 -out_path cifar10_decomp.txt -l1_penalty 0.35 -class_label 4 --verbose",
        "concept_distribution.py -dataset ImageNetVal -out_folder imagenet_jackolantern_decomp --verbose "
        "-l1_penalty 0.3 -class_label 607 -device \"cuda\"",
        "compute_image_mean.py --model clip:RN50 --dataset MSCOCO --data_path /data/coco/train2017",
    ]
    for cmd in commands:
        script, *argv = shlex.split(cmd)
        args = importlib.import_module(script[:-3]).get_args_parser().parse_args(argv)
        assert args.model == ("clip:RN50" if "RN50" in cmd else "open_clip:ViT-B-32")
        if script != "compute_image_mean.py":
            assert (args.vocab, args.vocab_size, args.solver) == ("laion", 10000, "active_set")
    assert args.data_path == "/data/coco/train2017"
    args = importlib.import_module("concept_distribution").get_args_parser().parse_args(shlex.split(commands[3])[1:])
    assert (args.class_label, args.device, args.l1_penalty, args.plot_topk, args.batch_size) == \
        (607, "cuda", 0.3, 10, 512)


def test_decompose_data_and_weights_file(tmp_path):
    """The average decomposition over the golden ImageFolder = the average of the golden per-image weights; the
    .npz holds the per-image weights; --from_weights answers a class query without the model."""
    out = tmp_path / "golden_decomp.txt"
    code, stdout, err = run_inprocess("decompose_data.py", "-dataset", "golden", "-data_path", str(IMAGES),
                                      "-out_path", str(out), "-l1_penalty", str(L1), "-solver", "skl",
                                      "--num_workers", "0", "-batch_size", "4", "--verbose", *MODEL_ARGS)
    assert code == 0, err
    ref = np.load(G / "weights_skl.npy")
    cos = np.array([p["cosine"] for p in INFO["per_image"]["skl"]])
    dec = load_decompositions(tmp_path / "golden_decomp_weights.npz")
    np.testing.assert_allclose(dec.weights.toarray(), ref, atol=1e-5)
    np.testing.assert_allclose(dec.cosine, cos, atol=1e-6)
    np.testing.assert_array_equal(dec.labels, [0, 0, 0, 1, 1, 1])
    import scipy.sparse as sp

    assert sp.load_npz(tmp_path / "golden_decomp_weights.npz").shape == (6, 40)
    text = out.read_text().splitlines()
    assert text[0] == "Concept Decomposition:" and stdout.splitlines()[0] == "Decomposing golden..."
    assert text[-2] == f"Average Decomposition L0 Norm: \t{(ref > 0).sum() / 6}"
    assert text[-1] == f"Average CLIP, SpLiCE Cosine Sim: \t{round(float(cos.mean()), 4)}"
    lines = vocab_weights(text)
    mean = ref.mean(0)
    top = np.argsort(-mean)[:len(lines)]
    concepts = (G / "vocab.txt").read_text().splitlines()
    assert [c for c, _ in lines] == [concepts[j] for j in top]
    np.testing.assert_allclose([w for _, w in lines], np.round(mean[top], 4), atol=1.01e-4)
    assert all(round(float(mean[j]), 4) == 0 for j in np.argsort(-mean)[len(lines):])
    # class 1 from the file, no model
    out1 = tmp_path / "class1.txt"
    code, _, err = run_inprocess("decompose_data.py", "-dataset", "golden", "-out_path", str(out1),
                                 "--from_weights", str(tmp_path / "golden_decomp_weights.npz"), "-class_label", "1")
    assert code == 0, err
    assert out1.read_text().splitlines()[-1] == f"Average CLIP, SpLiCE Cosine Sim: \t{round(float(cos[3:].mean()), 4)}"
    assert vocab_weights(out1.read_text().splitlines())[0][0] == concepts[int(np.argmax(ref[3:].mean(0)))]
    code, _, err = run_inprocess("decompose_data.py", "-dataset", "other", "-out_path", str(out1),
                                 "--from_weights", str(tmp_path / "golden_decomp_weights.npz"))
    assert code == 2 and "dataset" in err


def test_decompose_data_kill_and_resume_is_byte_identical(tmp_path):
    """decompose_data.py streams the weights batch by batch: killed (SIGKILL) at image 4 and resumed, its .npz and
    text file are byte-identical to an uninterrupted run's; what a killed run appended past its last recorded
    batch is cut off; a second --resume has nothing to do."""
    import filecmp
    import signal

    args = ["-dataset", "golden", "-data_path", str(IMAGES), "-l1_penalty", str(L1), "--num_workers", "0",
            "-batch_size", "2", *MODEL_ARGS]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    code, _, err = run_inprocess("decompose_data.py", *args, "-out_path", clean / "d.txt")
    assert code == 0, err
    res = run_killed("decompose_data.py", 4, *args, "-out_path", killed / "d.txt")
    assert res.returncode == -signal.SIGKILL, res.stderr
    parts = killed / "d_weights.npz.parts"
    assert not (killed / "d_weights.npz").exists() and not (killed / "d.txt").exists()
    assert json.loads((parts / "nnz.npy.progress.json").read_text())["done"] == 4
    for name, dtype in (("data.float32", np.float32), ("indices.int32", np.int32)):  # a batch past the record
        with open(parts / name, "ab") as f:
            f.write(np.arange(7, dtype=dtype).tobytes())
    code, _, err = run_inprocess("decompose_data.py", *args, "-out_path", killed / "d.txt", "--resume")
    assert code == 0, err
    assert "Resuming at image 4" in err
    assert filecmp.cmp(clean / "d_weights.npz", killed / "d_weights.npz", shallow=False)
    assert (clean / "d.txt").read_bytes() == (killed / "d.txt").read_bytes()
    assert not parts.exists()
    code, _, err = run_inprocess("decompose_data.py", *args, "-out_path", killed / "d.txt", "--resume")
    assert code == 0 and "already complete" in err
    other = [a if a != str(L1) else "0.3" for a in args]
    code, _, err = run_inprocess("decompose_data.py", *other, "-out_path", killed / "d.txt", "--resume")
    assert code == 2 and "another run" in err
    assert filecmp.cmp(clean / "d_weights.npz", killed / "d_weights.npz", shallow=False)
    np.testing.assert_allclose(load_decompositions(killed / "d_weights.npz").weights.toarray(),
                               np.load(G / "weights_skl.npy"), atol=1e-5)


def vocab_weights(lines):
    return [(line.split("\t")[1], float(line.split("\t")[2])) for line in lines if line.startswith("\t")]


def test_concept_distribution_smoke(tmp_path):
    code, out, err = run_inprocess("concept_distribution.py", "-dataset", "golden", "-data_path", str(IMAGES),
                                   "-out_folder", str(tmp_path / "dist"), "-l1_penalty", str(L1), "-class_label",
                                   "0", "-plot_topk", "4", "--num_workers", "0", *MODEL_ARGS)
    assert code == 0, err
    folder = tmp_path / "dist"
    summary = json.loads((folder / "golden_class_0_decomposition.json").read_text())
    ref = np.load(G / "weights_skl.npy")[:3].mean(0)
    concepts = (G / "vocab.txt").read_text().splitlines()
    assert [c for c, _ in summary["top"]] == [concepts[j] for j in np.argsort(-ref)[:4]]
    np.testing.assert_allclose([w for _, w in summary["top"]], np.sort(ref)[::-1][:4], atol=1e-4)
    assert summary["num_images"] == 3 and len(summary["concepts"]) == (ref > 0).sum()
    assert (folder / "golden_class_0_decomposition.png").stat().st_size > 1000
    assert (folder / "weights.txt").read_text().startswith("Concept Decomposition: \n\t")


def test_compute_image_mean_matches_golden(tmp_path):
    out = tmp_path / "m.npy"
    code, _, err = run_inprocess("compute_image_mean.py", "--model", "prsclip-tiny", "--model_config", str(CONFIGS),
                                 "--pretrained", str(GOLDEN_WEIGHTS), "--dataset", "golden", "--data_path",
                                 str(IMAGES), "--output", str(out), "--num_workers", "0", "--device", "cpu",
                                 "--batch_size", "4")
    assert code == 0, err
    np.testing.assert_allclose(np.load(out), np.load(G / "image_mean.npy"), atol=1e-6)
    assert json.loads((tmp_path / "m.npy.provenance.json").read_text())["num_images"] == 6
    assert not (tmp_path / "m_embeddings.npy").exists()


def test_flat_folder_dataset(tmp_path):
    import shutil

    from utils.datasets import build_dataset

    for p in IMAGES.glob("*/*.png"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("MSCOCO", str(tmp_path))
    assert len(ds) == 6 and (ds.labels == -1).all()
    assert pickle.loads(pickle.dumps(ds)).files == ds.files
    img, label = ds[0]
    assert img.mode == "RGB" and label == -1


# ----------------------------------------------------------------------------- bad input: exit 2, one line
def one_line_error(args, script="decompose_image.py"):
    code, out, err = run_inprocess(script, *args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error:"), err
    return lines[0]


def test_bad_inputs(tmp_path):
    image = str(IMAGES / "0_living" / "astronaut.png")
    base = ["-path", image, "-out_path", f"{tmp_path}/"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = [a if a != str(G / "vocab.txt") else str(empty) for a in MODEL_ARGS]
    assert "at least 2" in one_line_error([*base, "-l1_penalty", "0.2", *args])
    no_mean = MODEL_ARGS[:MODEL_ARGS.index("--image_mean")]
    msg = one_line_error([*base, "-l1_penalty", "0.2", *no_mean])
    assert "--image_mean" in msg and "compute_image_mean.py" in msg
    for bad in ("0", "-0.5"):
        assert "-l1_penalty" in one_line_error([*base, "-l1_penalty", bad, *MODEL_ARGS])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert "not an image" in one_line_error(["-path", str(text), "-l1_penalty", "0.2", *MODEL_ARGS])
    assert "not found" in one_line_error(["-path", str(tmp_path / "nope.jpg"), "-l1_penalty", "0.2", *MODEL_ARGS])
    assert "-l1_penalty" in one_line_error(["-dataset", "golden", "-data_path", str(IMAGES), "-out_path",
                                            str(tmp_path / "x.txt"), *MODEL_ARGS], "decompose_data.py")
    assert "-class_label 7" in one_line_error(["-dataset", "golden", "-data_path", str(IMAGES), "-out_path",
                                               str(tmp_path / "x.txt"), "-l1_penalty", "0.2", "-class_label", "7",
                                               "--num_workers", "0", *MODEL_ARGS], "decompose_data.py")


def test_bench_smoke():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_splice

    res = bench_splice.main(bench_splice.get_args_parser().parse_args(["--smoke"]))
    checks = res["checks_vs_skl"]
    assert res["same_support"] and res["max_abs_diff"] < 1e-3 and res["seconds"]["admm"]["median"] > 0
    assert checks["admm"]["same_support_above_1e-3"] and checks["active_set"]["kkt_max"] < 1e-12
    assert checks["active_set"]["objective_minus_skl_max"] <= 1e-12 and res["active_set"]["certified"] == 8
