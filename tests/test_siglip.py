"""compute_siglip.py and utils/siglip.py on a tiny random-init transformers SigLIP built here (nothing downloaded).

The pooling head's terms are checked against the head's own modules (torch's MultiheadAttention with the other
heads' out-projection columns zeroed, the MLP's forward hook), and the script's printed accuracies and files against
an independent computation with the model's own forward.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from conftest import run_inprocess, run_killed  # noqa: E402
from tiny_siglip import HEADS, TEXT_LEN, TEXTS, D, randomize_, save_tiny_siglip, tiny_config  # noqa: E402

from utils.datasets import SampleImages  # noqa: E402
from utils.siglip import (SiglipImageTransform, head_orthogonality, pooling_accuracies, pooling_head_of,  # noqa: E402
                          pooling_head_terms)
from utils.text.classnames import OPENAI_IMAGENET_TEMPLATES, get_classnames  # noqa: E402
from utils.text.textspan import textspan_reference_numpy  # noqa: E402


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """The tiny SigLIP as a Hugging Face folder (``save_pretrained``)."""
    return save_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"))


def reference_terms(head, hidden):
    """Per pooling head, the head's own attention module with every other head's out-projection columns (and the
    bias) zeroed: [B, H, d]; the MLP's output through a forward hook: [B, d]; the head's output [B, d]."""
    H, d = head.attention.num_heads, hidden.shape[-1]
    per_head = []
    for h in range(H):
        attention = copy.deepcopy(head.attention)
        with torch.no_grad():
            keep = torch.zeros(d, dtype=hidden.dtype)
            keep[h * (d // H):(h + 1) * (d // H)] = 1
            attention.out_proj.weight.mul_(keep)
            attention.out_proj.bias.zero_()
        probe = head.probe.repeat(len(hidden), 1, 1)
        per_head.append(attention(probe, hidden, hidden)[0][:, 0])
    seen = []
    handle = head.mlp.register_forward_hook(lambda m, i, o: seen.append(o[:, 0]))
    pooled = head(hidden)
    handle.remove()
    return torch.stack(per_head, 1), seen[0], pooled


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_pooling_terms_are_the_heads_own_outputs(dtype, tol):
    torch.manual_seed(1)
    vision = randomize_(transformers.SiglipVisionModel(tiny_config().vision_config), seed=1).to(dtype)
    pixels = torch.randn(3, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        out = vision(pixel_values=pixels)
        heads, mlp, pooled = reference_terms(pooling_head_of(vision), out.last_hidden_state)
    terms = pooling_head_terms(pooling_head_of(vision), out.last_hidden_state)
    assert terms.heads.shape == (3, HEADS, D) and terms.mlp.shape == (3, D) and terms.heads.dtype == dtype
    assert (terms.heads - heads).abs().max() < tol
    assert (terms.mlp - mlp).abs().max() < tol
    assert (terms.total() - out.pooler_output).abs().max() < tol
    assert (terms.total() - pooled).abs().max() < tol
    # the spatial terms sum over tokens to the same heads
    spatial = pooling_head_terms(pooling_head_of(vision), out.last_hidden_state, spatial=True)
    assert spatial.heads.shape == (3, 16, HEADS, D)
    assert (spatial.heads.sum(1) - heads).abs().max() < tol


def test_orthogonality_matches_a_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 5)).astype(np.float32)
    xc = x - x.mean(0)
    ref = np.zeros((3, 3))
    for n in range(7):
        for h in range(3):
            for g in range(3):
                a, b = xc[n, h], xc[n, g]
                ref[h, g] += abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b) / 7
    np.testing.assert_allclose(head_orthogonality(x, chunk=3), ref, atol=1e-6)


def test_accuracies_match_a_loop():
    """The four representations of the original, on data where they disagree (labels from two of them)."""
    rng = np.random.default_rng(0)
    n, h, d, c = 40, 3, 6, 5
    heads, mlp = rng.normal(size=(n, h, d)), rng.normal(size=(n, d))
    constant, fc2, classifier = rng.normal(size=d), 3 * rng.normal(size=d), rng.normal(size=(c, d))
    pooled = heads.sum(1) + mlp + constant
    attention_term, mlp_term = heads.sum(1) + constant + fc2, mlp + constant
    labels = np.where(np.arange(n) < n // 2, (attention_term @ classifier.T).argmax(1),
                      (mlp_term @ classifier.T).argmax(1))
    expected = {}
    for name, f in [("representation", pooled), ("mlp", mlp_term), ("attention", attention_term),
                    ("attention + mlp", pooled)]:
        expected[name] = sum(int(np.argmax([f[i] @ classifier[k] for k in range(c)]) == labels[i]) for i in range(n))
    got = pooling_accuracies(heads.astype(np.float32), mlp.astype(np.float32), pooled.astype(np.float32), labels,
                             classifier, constant, fc2, chunk=7)
    assert got == expected
    assert got["attention"] >= n // 2 and got["mlp"] >= n // 2 and got["attention + mlp"] == got["representation"]


def independent_run(folder):
    """The original's computation with the model's own forward: pooled outputs, MLP outputs (hook), the zero-shot
    weights class by class, and the labels of the sample images."""
    model = transformers.SiglipModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ds = SampleImages(SiglipImageTransform(processor))
    pixels = torch.stack([ds[i][0] for i in range(len(ds))])
    head = pooling_head_of(model.vision_model)
    seen = []
    handle = head.mlp.register_forward_hook(lambda m, i, o: seen.append(o[:, 0]))
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        weights = []
        for c in get_classnames("sample"):
            tokens = tokenizer([t(c) for t in OPENAI_IMAGENET_TEMPLATES], padding="max_length",
                               max_length=TEXT_LEN, truncation=True, return_tensors="pt")
            e = F.normalize(model.text_model(**tokens).pooler_output, dim=-1).mean(0)
            weights.append(e / e.norm())
    handle.remove()
    return model, pooled, seen[0], torch.stack(weights), torch.as_tensor(ds.labels)


def assert_printed_accuracies(stdout, pooled, mlp, b_o, fc2, weights, labels):
    """The four accuracies printed in the original's wording, from the model's own pooled output [N, D], its MLP
    term [N, D], the constant ``b_o`` [D], the MLP's output bias ``fc2`` [D] and the zero-shot weights [C, D]."""
    n = len(labels)

    def expect(features):
        correct = int(((features @ weights.T).argmax(1) == labels).sum())
        return f"{correct / n * 100:.2f}% ({correct}/{n})"

    for what, features in [("representation", pooled), ("mlp", mlp + b_o), ("attention", pooled - mlp + fc2),
                           ("attention + mlp", pooled)]:
        assert f"Top-1 {what} accuracy: {expect(features)}" in stdout, (what, stdout)


def siglip_args(siglip_dir, texts, out, *extra):
    return ["--model", str(siglip_dir), "--dataset", "sample", "--device", "cpu", "--batch_size", "4",
            "--num_workers", "0", "--output_dir", str(out), "--text_descriptions", str(texts), *extra]


@pytest.fixture(scope="module")
def siglip_run(siglip_dir, tmp_path_factory):
    """compute_siglip.py run once on the tiny model and the sample photos: (output folder, stdout, texts file)."""
    tmp = tmp_path_factory.mktemp("siglip-run")
    texts = tmp / "descriptions.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp / "out"
    code, stdout, err = run_inprocess("compute_siglip.py", *siglip_args(siglip_dir, texts, out, "--save_everything",
                                                                       "--compute_text_spans"))
    assert code == 0, err + stdout
    return out, stdout, texts


def test_compute_siglip_end_to_end(siglip_dir, siglip_run):
    out, stdout, texts = siglip_run
    model, pooled, mlp, weights, labels = independent_run(siglip_dir)
    n = len(labels)
    name = siglip_dir.name

    # the original's file, keys and shapes
    prs = torch.load(out / f"siglip_{name}_prs.pt", weights_only=True)
    assert {"attention_records", "mlp_records"} <= set(prs)
    assert prs["attention_records"].shape == (n, 1, HEADS, D) and prs["mlp_records"].shape == (n, 1, D)
    torch.testing.assert_close(prs["mlp_records"][:, 0], mlp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(out / f"sample_siglip_pooled_{name}.npy"), pooled.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.load(out / "sample_labels.npy"), labels.numpy())
    b_o = pooling_head_of(model.vision_model).attention.out_proj.bias.detach()
    fc2 = pooling_head_of(model.vision_model).mlp.fc2.bias.detach()
    torch.testing.assert_close(prs["attention_records"][:, 0].sum(1) + b_o, pooled - mlp, atol=1e-5, rtol=0)
    zs = np.load(out / f"sample_zeroshot_weights_{name}.npy")
    np.testing.assert_allclose(zs, weights.numpy(), atol=1e-5)

    # the four accuracies, printed in the original's wording, against the model's own outputs
    assert_printed_accuracies(stdout, pooled, mlp, b_o, fc2, weights, labels)
    assert "Computing accuracy (attention + mlp for sanity check)..." in stdout

    # text features, orthogonality, TextSpan per pooling head
    feats = np.load(out / f"descriptions_{name}.npy")
    assert feats.shape == (len(TEXTS), D)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    heads = prs["attention_records"][:, 0].numpy()
    np.testing.assert_allclose(np.load(out / f"descriptions_{name}_orthogonalities.npy"),
                               head_orthogonality(heads), atol=1e-6)
    assert (out / f"descriptions_{name}_orthogonalities.pdf").is_file()
    sections = re.findall(r"-{32}\nHead (\d+)\n(.*?)\n-{32}", stdout, re.S)
    assert [int(h) for h, _ in sections] == list(range(HEADS))
    for h, block in sections:
        chosen = block.splitlines()
        assert len(chosen) == D  # the original's texts per head: d
        _, ref = textspan_reference_numpy(heads[:, int(h)], feats, 3, D, dtype=np.float64)
        assert chosen[:3] == [TEXTS[i] for i in ref], h
    assert (out / f"descriptions_{name}_text_spans.txt").read_text().count("Head ") == HEADS

    # --resume over finished outputs does nothing and prints the same numbers
    code, again, err = run_inprocess("compute_siglip.py", *siglip_args(siglip_dir, texts, out, "--resume"))
    assert code == 0, err
    assert "already complete" in again
    assert [l for l in again.splitlines() if l.startswith("Top-1")] == \
        [l for l in stdout.splitlines() if l.startswith("Top-1")]


def test_compute_siglip_resumes_after_a_kill(siglip_dir, siglip_run, tmp_path):
    fresh, stdout, texts = siglip_run
    out = tmp_path / "killed"
    res = run_killed("compute_siglip.py", 5, *siglip_args(siglip_dir, texts, out))
    assert res.returncode == -9, res.stderr
    name = siglip_dir.name
    assert not (out / f"sample_siglip_heads_{name}.npy").exists()
    code, again, err = run_inprocess("compute_siglip.py", *siglip_args(siglip_dir, texts, out, "--resume"))
    assert code == 0, err
    assert "Resuming at image 4 of 8" in again and "Loading zeroshot weights from" in again
    for k in ("heads", "mlp", "pooled"):
        np.testing.assert_allclose(np.load(out / f"sample_siglip_{k}_{name}.npy"),
                                   np.load(fresh / f"sample_siglip_{k}_{name}.npy"), atol=1e-6)
    assert [l for l in again.splitlines() if l.startswith("Top-1")] == \
        [l for l in stdout.splitlines() if l.startswith("Top-1")]


# ----------------------------------------------------------------------------- open_clip's SigLIP (timm MAP head)
OPEN_CLIP_TOWERS = ["tiny-map", "tiny-map-linear", "tiny-pe-core"]  # a linear projection after the pool; an Eva trunk


def open_clip_reference(model, pixels):
    """From the tower's own forward (``encode_image``): the tokens its ``AttentionPoolLatent`` reads (a pre-hook),
    per pooling head timm's own pool with the other heads' ``proj`` columns, ``proj``'s bias and the MLP removed,
    the MLP's output (a hook), each through the trunk's and open_clip's heads with their biases zeroed: [B, H, D],
    [B, D]; the pooled output [B, D]; the tokens [B, T, W]."""
    visual = model.visual
    pool = visual.trunk.attn_pool
    seen = {}
    hooks = [pool.register_forward_pre_hook(lambda m, a: seen.update(tokens=a[0])),
             pool.mlp.register_forward_hook(lambda m, i, o: seen.update(mlp=o[:, 0]))]
    with torch.no_grad():
        pooled = model.encode_image(pixels)
    for h in hooks:
        h.remove()
    linear = copy.deepcopy(torch.nn.Sequential(visual.trunk.head, visual.head))  # the linear part after the pool
    for m in linear.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
    H, dh = pool.num_heads, pool.head_dim
    per_head = []
    for h in range(H):
        one = copy.deepcopy(pool)
        one.mlp = None
        keep = torch.zeros(H * dh, dtype=pixels.dtype)
        keep[h * dh:(h + 1) * dh] = 1
        with torch.no_grad():
            one.proj.weight.mul_(keep)
            one.proj.bias.zero_()
            per_head.append(linear(one(seen["tokens"])))
    with torch.no_grad():
        return torch.stack(per_head, 1), linear(seen["mlp"]), pooled, seen["tokens"]


@pytest.mark.parametrize("name", OPEN_CLIP_TOWERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_open_clip_pooling_terms_are_the_towers_own(name, dtype, tol):
    import open_clip
    from conftest import tiny_model

    from utils.siglip import open_clip_pooled_model, pooling_terms

    model, preprocess = tiny_model(name, seed=2)
    model = model.to(dtype)
    pm = open_clip_pooled_model(model, preprocess, open_clip.get_tokenizer(name), name)
    pixels = torch.randn(3, 3, 32, 32, dtype=dtype)
    heads, mlp, pooled, tokens = open_clip_reference(model, pixels)
    with torch.no_grad():
        got_tokens, got_pooled = pm.features(pixels)
    assert (got_tokens - tokens).abs().max() == 0 and (got_pooled - pooled).abs().max() == 0
    terms = pooling_terms(pm.pool, tokens)
    H, D = pm.pool.num_heads, pooled.shape[1]
    assert terms.heads.shape == (3, H, D) and terms.mlp.shape == (3, D) and terms.heads.dtype == dtype
    assert (terms.total() - pooled).abs().max() < tol
    assert (terms.heads - heads).abs().max() < tol
    assert (terms.mlp - mlp).abs().max() < tol
    spatial = pooling_terms(pm.pool, tokens, spatial=True)
    assert spatial.heads.shape == (3, tokens.shape[1], H, D)
    assert (spatial.heads.sum(1) - heads).abs().max() < tol


def test_open_clip_other_towers_refused():
    import open_clip
    from conftest import tiny_model

    from utils.errors import UnsupportedModelError
    from utils.siglip import open_clip_pooled_model

    for name, why in [("prsclip-tiny", "not a timm tower"), ("tiny-eva02", "needs a MAP head")]:
        model, preprocess = tiny_model(name)
        with pytest.raises(UnsupportedModelError, match=why):
            open_clip_pooled_model(model, preprocess, open_clip.get_tokenizer(name), name)


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """tiny-map with random LayerNorm affines and biases, saved as a checkpoint file for --pretrained."""
    from conftest import tiny_model

    model, _ = tiny_model("tiny-map", seed=3)
    path = tmp_path_factory.mktemp("tiny-map") / "tiny-map-random.pt"
    torch.save(model.state_dict(), path)
    return path


def test_compute_siglip_open_clip_end_to_end(open_clip_checkpoint, tmp_path):
    """compute_siglip.py on an open_clip name (--model_config, --pretrained a checkpoint): the original's files and
    the four accuracies against the tower's own forward, and compute_prs.py's files beside them."""
    import open_clip
    from conftest import CONFIGS

    texts = tmp_path / "descriptions.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out"
    code, stdout, err = run_inprocess(
        "compute_siglip.py", "--model_config", str(CONFIGS), "--model", "tiny-map", "--pretrained",
        str(open_clip_checkpoint), "--dataset", "sample", "--device", "cpu", "--batch_size", "4", "--num_workers",
        "0", "--output_dir", str(out), "--text_descriptions", str(texts), "--save_everything")
    assert code == 0, err + stdout

    # independently: the model from the checkpoint, its own forward, zero-shot weights class by class
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-map", pretrained=str(open_clip_checkpoint))
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-map")
    ds = SampleImages(preprocess)
    pixels, labels = torch.stack([ds[i][0] for i in range(len(ds))]), torch.as_tensor(ds.labels)
    heads, mlp, pooled, _ = open_clip_reference(model, pixels)
    with torch.no_grad():
        weights = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer(
            [t(c) for t in OPENAI_IMAGENET_TEMPLATES])), dim=-1).mean(0), dim=0)
            for c in get_classnames("sample")])
    pool = model.visual.trunk.attn_pool
    b_o, fc2 = pool.proj.bias.detach(), pool.mlp.fc2.bias.detach()
    n, H, D = len(labels), pool.num_heads, pooled.shape[1]

    prs = torch.load(out / "siglip_tiny-map_prs.pt", weights_only=True)
    assert set(prs) == {"attention_records", "mlp_records"}
    assert prs["attention_records"].shape == (n, 1, H, D) and prs["mlp_records"].shape == (n, 1, D)
    torch.testing.assert_close(prs["attention_records"][:, 0], heads, atol=1e-5, rtol=0)
    torch.testing.assert_close(prs["mlp_records"][:, 0], mlp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(out / "sample_siglip_pooled_tiny-map.npy"), pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(out / "sample_siglip_constant_tiny-map.npy"), b_o.numpy(), atol=1e-7)
    np.testing.assert_allclose(np.load(out / "sample_zeroshot_weights_tiny-map.npy"), weights.numpy(), atol=1e-5)
    assert np.load(out / "descriptions_tiny-map.npy").shape == (len(TEXTS), D)
    assert np.load(out / "descriptions_tiny-map_orthogonalities.npy").shape == (H, H)

    assert_printed_accuracies(stdout, pooled, mlp, b_o, fc2, weights, labels)

    # compute_prs.py's decomposition beside it: its sum rule on the normalised embedding
    attn, mlp_all = np.load(out / "sample_attn_tiny-map.npy"), np.load(out / "sample_mlp_tiny-map.npy")
    assert attn.shape[:1] == (n,) and mlp_all.shape[1:] == (attn.shape[1] + 2, D)
    np.testing.assert_allclose(attn.sum((1, 2)) + mlp_all.sum(1), F.normalize(pooled, dim=-1).numpy(), atol=1e-5)


def test_compute_siglip_open_clip_name_needs_pretrained(tmp_path):
    from conftest import CONFIGS

    texts = tmp_path / "texts.txt"
    texts.write_text("a dog\n")
    code, out, err = run_inprocess("compute_siglip.py", "--model_config", str(CONFIGS), "--model", "tiny-map",
                                   "--dataset", "sample", "--device", "cpu", "--output_dir", str(tmp_path),
                                   "--text_descriptions", str(texts))
    assert code != 0 and "tiny-map: an open_clip name needs --pretrained" in err + out
