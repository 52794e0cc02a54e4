"""TextSpan / PCLens (utils/text/textspan.py), text sets and their fetch (utils/text/sets.py), Waterbirds helpers."""
import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, REPO, run_script

from utils import waterbirds as wb
from utils.text.sets import HashMismatchError, Source, fetch_original, read_text_set, resolve_text_file
from utils.text.textspan import (HeadStatsAccumulator, head_stats, pclens_from_stats, reconstruct, svd_data_approx,
                                 text_span, textspan_from_stats, textspan_reference_numpy)

TS = GOLDEN / "textspan"


@pytest.fixture(scope="module")
def golden_head():
    data = np.load(GOLDEN / "prs" / "golden_attn_prsclip-tiny.npy")[:, 3, 0]  # [6, 32]
    feats = np.load(TS / "text_features.npy")
    texts = (TS / "texts.txt").read_text().splitlines()
    return data, feats, texts, json.loads((TS / "textspan.json").read_text())


# ----------------------------------------------------------------------------- golden
@pytest.mark.parametrize("run", ["rank32", "rank5"])
def test_golden_texts_and_reconstruction(golden_head, run):
    data, feats, texts, meta = golden_head
    spec = meta["runs"][run]
    rec, chosen = text_span(data, feats, texts, meta["texts_per_head"], spec["w_ov_rank"])
    assert chosen == spec["texts"]
    gold = np.load(TS / spec["reconstruct_file"])
    np.testing.assert_allclose(rec, gold, atol=1e-6, rtol=0)
    # the CUDA behaviour (quirk T3): each row is its own image's reconstruction, not the last image's
    assert np.abs(rec[0] - rec[-1]).max() > 1e-3


@pytest.mark.parametrize("run", ["rank32", "rank5"])
def test_numpy_port_matches_golden(golden_head, run):
    """The straightforward port used as the benchmark's baseline is itself the original algorithm."""
    data, feats, _, meta = golden_head
    spec = meta["runs"][run]
    rec, idx = textspan_reference_numpy(data, feats, meta["texts_per_head"], spec["w_ov_rank"])
    assert idx == spec["text_indices"]
    np.testing.assert_allclose(rec, np.load(TS / spec["reconstruct_file"]), atol=1e-6, rtol=0)


def test_golden_through_streamed_stats_in_chunks(golden_head):
    """Statistics accumulated 2 images at a time give the same picks as the whole head at once."""
    data, feats, texts, meta = golden_head
    acc = HeadStatsAccumulator(1, data.shape[1])
    for s in range(0, 6, 2):
        acc.update(data[None, s:s + 2])
    res = textspan_from_stats(acc.finalize(), feats, 5, 5)
    assert res.indices[0].tolist() == meta["runs"]["rank5"]["text_indices"]


# ----------------------------------------------------------------------------- statistics
def test_head_stats_chunked_equals_direct_with_a_large_mean():
    g = np.random.default_rng(0)
    x = (g.normal(size=(3, 500, 8)) * 0.01 + 100.0).astype(np.float32)  # mean >> spread
    acc = HeadStatsAccumulator(3, 8)
    for s in range(0, 500, 37):
        acc.update(x[:, s:s + 37])
    st = acc.finalize()
    x64 = x.astype(np.float64)
    mu = x64.mean(1)
    xc = x64 - mu[:, None]
    np.testing.assert_allclose(st.mean.numpy(), mu, rtol=1e-7)
    np.testing.assert_allclose(st.scatter.numpy(), xc.transpose(0, 2, 1) @ xc, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(st.gram.numpy(), x64.transpose(0, 2, 1) @ x64, rtol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        acc.update(x[:2])


# ----------------------------------------------------------------------------- TextSpan properties
def _random_case(seed=0, B=60, d=16, T=50):
    g = np.random.default_rng(seed)
    data = (g.normal(size=(B, d)) * np.linspace(3, 0.1, d) + g.normal(size=d)).astype(np.float32)
    feats = g.normal(size=(T, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return data, feats


def test_batched_heads_equal_single_heads():
    heads = [_random_case(s) for s in range(3)]
    feats = heads[0][1]
    data = torch.from_numpy(np.stack([h[0] for h in heads]))
    res = textspan_from_stats(head_stats(data), feats, 6, 8)
    grouped = textspan_from_stats(head_stats(data), feats, 6, 8, max_bytes=1)  # one head at a time
    np.testing.assert_array_equal(grouped.indices, res.indices)
    np.testing.assert_allclose(grouped.directions.numpy(), res.directions.numpy(), atol=1e-12)
    rec = reconstruct(data.double(), res.mean, res.basis())
    for i, (x, _) in enumerate(heads):
        r1, idx = textspan_reference_numpy(x, feats, 6, 8, dtype=np.float64)
        assert res.indices[i].tolist() == idx
        np.testing.assert_allclose(rec[i].numpy(), r1, atol=2e-6)  # float32 statistics


@pytest.mark.parametrize("rank", [3, 7])
def test_m_equal_rank_gives_the_rank_m_projection(rank):
    """With m = w_ov_rank the chosen texts span the kept singular vectors: reconstruction = projection."""
    data, feats = _random_case(1)
    rec, _ = text_span(data, feats, [str(i) for i in range(len(feats))], rank, rank)
    _, _, vh = np.linalg.svd(data.astype(np.float64), full_matrices=False)
    v = vh[:rank]
    mu = data.mean(0, keepdims=True)
    expected = mu + (data - mu) @ v.T @ v
    np.testing.assert_allclose(rec, expected, atol=1e-5)


def test_m_equal_rank_of_low_rank_data_reconstructs_it():
    g = np.random.default_rng(2)
    basis = np.linalg.qr(g.normal(size=(16, 4)))[0].T  # 4 orthonormal rows
    data = (g.normal(size=(80, 4)) @ basis + basis[0] * 2).astype(np.float32)  # rank 4, mean inside the span
    feats = g.normal(size=(30, 16)).astype(np.float32)
    rec, _ = text_span(data, feats, [str(i) for i in range(30)], 4, 4)
    np.testing.assert_allclose(rec, data, atol=1e-5)


def test_planted_texts_are_picked_in_order_of_variance():
    g = np.random.default_rng(3)
    d, B = 64, 400
    u = np.linalg.qr(g.normal(size=(d, 4)))[0].T  # 4 orthonormal true directions of the head
    sd = np.array([10.0, 5.0, 2.0, 1.0])
    data = (g.normal(size=(B, 4)) * sd) @ u + 0.01 * g.normal(size=(B, d)) + g.normal(size=d)
    feats = g.normal(size=(200, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    slots = [150, 7, 93, 41]  # where the true directions are hidden, in order of decreasing variance
    for slot, vec in zip(slots, u):
        feats[slot] = vec
    res = textspan_from_stats(head_stats(data[None].astype(np.float32)), feats, 4, 10)
    assert res.indices[0].tolist() == slots
    # the std that won each pick is the planted one, and the fractions add up to ~ all of the variance
    np.testing.assert_allclose(res.std[0], sd, rtol=0.15)
    assert 0.99 < res.variance_explained[0].sum() <= 1.0 + 1e-9


def test_deflated_texts_are_orthogonal_to_every_chosen_direction():
    data, feats = _random_case(4, d=24, T=80)
    res = textspan_from_stats(head_stats(data[None]), feats, 8, 12, return_deflated=True)
    q = res.basis()[0]  # [8, 24], normalised chosen directions
    np.testing.assert_allclose((q @ q.T).numpy(), np.eye(8), atol=1e-10)  # chosen directions orthonormal
    dots = res.deflated_texts[0] @ q.T  # [T, 8]
    assert dots.abs().max() < 1e-10
    # and they are the projected texts minus their components on the chosen directions
    _, _, vh = np.linalg.svd(data.astype(np.float64), full_matrices=False)
    proj = feats.astype(np.float64) @ vh[:12].T @ vh[:12]
    expected = proj - proj @ q.numpy().T @ q.numpy()
    np.testing.assert_allclose(res.deflated_texts[0].numpy(), expected, atol=1e-6)


def test_textspan_bad_inputs():
    data, feats = _random_case(5)
    with pytest.raises(ValueError, match="do not match the heads' dimension d=16"):
        textspan_from_stats(head_stats(data[None]), feats[:, :8], 3, 4)
    with pytest.raises(ValueError, match="at least 2 images"):
        textspan_from_stats(head_stats(data[None, :1]), feats, 3, 4)


# ----------------------------------------------------------------------------- PCLens
def test_pclens_planted_components_one_text_per_component_both_poles():
    g = np.random.default_rng(6)
    d, B = 16, 40
    u = np.linalg.qr(g.normal(size=(d, 6)))[0].T
    data = (g.normal(size=(B, 3)) * [3.0, 2.0, 1.0]) @ u[:3] + g.normal(size=d)  # exactly 3 components
    distract = 0.1 * g.normal(size=(30, d))
    # rows 30..32: + poles along the components; 33..35: - poles, tilted off them (smaller |cosine|)
    feats = np.concatenate([distract, u[:3], -0.8 * u[:3] + 0.6 * u[3:]])
    texts = [f"d{i}" for i in range(30)] + ["pos0", "pos1", "pos2", "neg0", "neg1", "neg2"]
    res = pclens_from_stats(head_stats(data[None].astype(np.float32)), feats, 2)[0]
    assert res.rank == 3  # cumulative singular values pass 99 % at the third
    assert [texts[i] for i in res.top[:, 0]] == ["pos0", "pos1", "pos2"]
    assert [texts[i] for i in res.bottom[:, 0]] == ["neg0", "neg1", "neg2"]
    assert res.top.shape == res.bottom.shape == (3, 2)
    assert (res.top_values[:, 0] > 0.9).all() and (np.abs(res.bottom_values[:, 0]) < res.top_values[:, 0]).all()
    s = np.linalg.svd(data - data.mean(0), compute_uv=False)
    np.testing.assert_allclose(res.singular_values, s[:3], rtol=1e-4)
    np.testing.assert_allclose(res.strength, s[:3] ** 2, rtol=1e-4)  # PCLens' strength: s^2
    np.testing.assert_allclose(res.strength_rel, 100 * s[:3] ** 2 / (s[:3] ** 2).sum(), rtol=1e-4)
    rec, info = svd_data_approx(data, feats, texts, text_per_princ_comp=2)
    np.testing.assert_allclose(rec, data, atol=1e-4)  # the 3 texts span the 3 components
    assert [c["text"][0]["text_max_0"] for c in info["embeddings_sort"]] == ["pos0", "pos1", "pos2"]
    assert [c["text"][2]["text_min_0"] for c in info["embeddings_sort"]] == ["neg0", "neg1", "neg2"]


def test_pclens_rank_cut_at_99_percent_of_singular_values():
    g = np.random.default_rng(7)
    d = 12
    u = np.linalg.qr(g.normal(size=(d, d)))[0].T
    sv = np.array([50, 30, 10, 5, 3, 1.5, 0.3, 0.1, 0.05, 0.03, 0.01, 0.01])  # sums to 100
    z = g.normal(size=(200, d))
    z = np.linalg.qr(z - z.mean(0))[0]  # orthonormal, zero-mean columns: exact centred singular values
    data = (z * sv) @ u
    res = pclens_from_stats(head_stats(data[None]), g.normal(size=(20, d)), 1)[0]
    cum = np.cumsum(sv) / sv.sum()
    assert res.rank == int((cum < 0.99).sum()) + 1 == 6
    np.testing.assert_allclose(res.singular_values, sv[:6], rtol=1e-6)


# ----------------------------------------------------------------------------- text sets
def test_committed_text_sets():
    td = REPO / "text_descriptions"
    sizes = {"image_descriptions_3500.txt": 3500, "common_words_3500.txt": 3500, "words_10000.txt": 10000}
    sets = {}
    for name, n in sizes.items():
        lines = read_text_set(td / name)
        assert len(lines) == n == len(set(lines)), name
        sets[name] = lines
    assert sets["words_10000.txt"][:3500] == sets["common_words_3500.txt"]
    assert all(w.isalpha() and w.islower() and len(w) >= 2 for w in sets["words_10000.txt"])
    sys.path.insert(0, str(td))
    import make_text_sets

    assert not set(sets["words_10000.txt"]) & make_text_sets.BLOCKLIST
    assert make_text_sets.make_descriptions() == sets["image_descriptions_3500.txt"]  # regenerates exactly


def test_read_text_set_errors_and_external_fallback(tmp_path):
    (tmp_path / "ok.txt").write_bytes(b"a cat\r\na dog\n")
    assert read_text_set(tmp_path / "ok.txt") == ["a cat", "a dog"]
    (tmp_path / "gap.txt").write_text("a\n\nb\n   \nc\n")
    with pytest.raises(ValueError, match=r"empty line\(s\) at line 2, 4"):
        read_text_set(tmp_path / "gap.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_text_set(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="fetch_original"):
        read_text_set(tmp_path / "google_3498_english.txt")
    (tmp_path / "external").mkdir()
    (tmp_path / "external" / "google_3498_english.txt").write_text("the\nof\n")
    assert resolve_text_file(tmp_path / "google_3498_english.txt") == tmp_path / "external" / "google_3498_english.txt"


def test_pclens_text_folder_and_ours_stand_for_each_other(tmp_path):
    """PCLens keeps its text sets in utils/text_descriptions/, we in text_descriptions/ (fetched: its external/):
    a set named in either folder is found in the other, relative to the same root."""
    pclens, ours = tmp_path / "utils" / "text_descriptions", tmp_path / "text_descriptions"
    (ours / "external").mkdir(parents=True)
    pclens.mkdir(parents=True)
    (ours / "external" / "fetched.txt").write_text("a\n")
    (pclens / "copied.txt").write_text("b\n")
    assert resolve_text_file(pclens / "fetched.txt") == ours / "external" / "fetched.txt"
    assert resolve_text_file(ours / "copied.txt") == pclens / "copied.txt"
    (pclens / "fetched.txt").write_text("c\n")  # the folder named comes first
    assert resolve_text_file(pclens / "fetched.txt") == pclens / "fetched.txt"
    with pytest.raises(FileNotFoundError, match="elsewhere.txt: text set not found"):
        resolve_text_file(tmp_path / "other" / "copied.txt".replace("copied", "elsewhere"))
    with pytest.raises(FileNotFoundError):  # only those two folders stand for each other
        resolve_text_file(tmp_path / "other" / "copied.txt")


def test_fetch_accepts_good_hash_and_refuses_bad_offline(tmp_path):
    src = tmp_path / "mirror"
    src.mkdir()
    body = b"first\nsecond\n"
    (src / "a.txt").write_bytes(body)
    good = hashlib.sha256(body).hexdigest()
    table = {"a.txt": Source("x/y", "0" * 40, good)}
    out = fetch_original(["a.txt"], tmp_path / "dest", base_url=src.as_uri(), sources=table, log=lambda s: None)
    assert out["a.txt"].read_bytes() == body
    bad = {"a.txt": Source("x/y", "0" * 40, "f" * 64)}
    with pytest.raises(HashMismatchError, match="differs from the pinned"):
        fetch_original(["a.txt"], tmp_path / "dest2", base_url=src.as_uri(), sources=bad, log=lambda s: None)
    assert not (tmp_path / "dest2" / "a.txt").exists() and not (tmp_path / "dest2" / "a.txt.partial").exists()
    unpinned = {"a.txt": Source("x/y", "0" * 40, None)}
    with pytest.raises(HashMismatchError, match="allow-unpinned"):
        fetch_original(["a.txt"], tmp_path / "dest3", base_url=src.as_uri(), sources=unpinned)
    fetch_original(["a.txt"], tmp_path / "dest3", allow_unpinned=True, base_url=src.as_uri(), sources=unpinned,
                   log=lambda s: None)
    assert (tmp_path / "dest3" / "a.txt").read_bytes() == body


def test_fetch_uses_the_pinned_commit_url_with_a_patched_opener(tmp_path):
    import io

    seen = []

    def opener(url):
        seen.append(url)
        return io.BytesIO(b"not the authors' file\n")

    with pytest.raises(HashMismatchError):
        fetch_original(["google_3498_english.txt"], tmp_path, opener=opener)
    assert seen == ["https://raw.githubusercontent.com/yossigandelsman/clip_text_span/"
                    "49f70f31bb13437a870ff8de340626b225500a22/text_descriptions/google_3498_english.txt"]
    assert list(tmp_path.iterdir()) == []


def test_fetch_cli_offline(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "google_3498_english.txt").write_text("tampered\n")
    (mirror / "30k.txt").write_text("word\n")
    res = run_script("text_descriptions/fetch_original.py", "google_3498_english.txt", "--base_url",
                     mirror.as_uri(), "--dest", tmp_path / "out", check=False)
    assert res.returncode != 0 and "differs from the pinned" in res.stderr
    assert not (tmp_path / "out" / "google_3498_english.txt").exists()
    # every authors' set is pinned now: a wrong 30k.txt is refused even with --allow-unpinned
    for extra in ([], ["--allow-unpinned"]):
        res = run_script("text_descriptions/fetch_original.py", "30k.txt", *extra, "--base_url", mirror.as_uri(),
                         "--dest", tmp_path / "out", check=False)
        assert res.returncode != 0 and "differs from the pinned" in res.stderr
        assert not (tmp_path / "out" / "30k.txt").exists()
    # the right bytes (the pinned hash) are accepted
    (mirror / "30k.txt").write_bytes(b"right")
    pinned = {"30k.txt": Source("x/y", "0" * 40, hashlib.sha256(b"right").hexdigest())}
    fetch_original(["30k.txt"], tmp_path / "out", base_url=mirror.as_uri(), sources=pinned, log=lambda s: None)
    assert (tmp_path / "out" / "30k.txt").read_bytes() == b"right"


def test_every_original_text_set_is_pinned():
    from utils.text.sets import ORIGINAL_TEXT_SETS

    assert all(s.sha256 and len(s.sha256) == 64 for s in ORIGINAL_TEXT_SETS.values())
    assert ORIGINAL_TEXT_SETS["30k.txt"].sha256 == "b96dfed9d570daddcc461e03c6009b7de6f72e515cb0a9eab35a9e1f21546f7b"


# ----------------------------------------------------------------------------- Waterbirds helpers
def test_head_lists_and_parsing():
    assert wb.default_heads("ViT-B-16") == [(11, 6), (11, 0), (11, 3), (10, 11), (10, 10), (9, 8), (9, 6)]
    assert len(wb.default_heads("ViT-L-14")) == 15  # (22, 12) is in both of the original's lists
    assert len(wb.default_heads("ViT-H-14")) == 9
    with pytest.raises(ValueError, match="no default head list"):
        wb.default_heads("ViT-B-32")
    assert wb.parse_heads("11.3, 10.11,11.3") == [(11, 3), (10, 11)]
    with pytest.raises(ValueError, match="not LAYER.HEAD"):
        wb.parse_heads("11-3")
    with pytest.raises(ValueError, match="out of range"):
        wb.check_heads([(3, 4)], 4, 4)
    sets = wb.random_head_sets(3, 5, 2, 4, 4, seed=1)
    assert sets == wb.random_head_sets(3, 5, 2, 4, 4, seed=1) != wb.random_head_sets(3, 5, 2, 4, 4, seed=2)
    assert all(len(set(s)) == 3 and all(2 <= l < 4 and 0 <= h < 4 for l, h in s) for s in sets)


def test_group_accuracies_and_ablation_match_the_original_semantics():
    g = np.random.default_rng(8)
    B, L, H, d, C = 40, 4, 3, 8, 2
    attn = g.normal(size=(B, L, H, d)).astype(np.float32)
    mlp = g.normal(size=(B, L + 1, d)).astype(np.float32)
    W = g.normal(size=(d, C)).astype(np.float32)
    labels = np.stack([g.integers(0, 2, B), g.integers(0, 2, B)], 1)
    parts = wb.head_logits(attn, mlp, W, first_layer=2, chunk=7)
    heads = [(3, 1), (2, 0), (0, 2)]
    # the original: mean-ablate the listed heads, all layers but the last 2, and all MLP terms
    a, m = attn.copy(), mlp.copy()
    for l, h in heads:
        a[:, l, h] = a[:, l, h].mean(0)
    a[:, :2] = a[:, :2].mean(0)
    m[:] = m.mean(0)
    expected = (a.sum((1, 2)) + m.sum(1)) @ W
    np.testing.assert_allclose(wb.ablate(parts, heads, 2, H), expected, atol=1e-4)
    np.testing.assert_allclose(parts["baseline"], (attn.sum((1, 2)) + mlp.sum(1)) @ W, atol=1e-4)
    acc = wb.group_accuracies(expected, labels)
    hit = expected.argmax(-1) == labels[:, 0]
    for gi, name in enumerate(wb.GROUP_NAMES):
        sel = 2 * labels[:, 0] + labels[:, 1] == gi
        assert acc["groups"][name] == pytest.approx(hit[sel].mean() * 100)
    assert acc["worst_group"] == min(acc["groups"].values())
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        wb.group_accuracies(expected, labels[:, 0])
