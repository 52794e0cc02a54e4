"""Second-order neuron effects (utils.neurons.effects): golden match, the frozen-forward identity, a naive loop,
PCA, the ablation arithmetic, and the file / input helpers."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, GOLDEN_WEIGHTS, tiny_model

from utils.files.names import find_classifier, find_input, find_text_set, second_order_paths
from utils.files.readers import load_second_order_files
from utils.neurons.ablations import ablation_logits
from utils.neurons.effects import SecondOrderEffects, check_mlp_layer
from utils.neurons.pca import neuron_means, neuron_pcas

SO = GOLDEN / "second_order"
STEM = "golden_train_mlps_prsclip-tiny-quickgelu_golden_1"


@pytest.fixture(scope="module")
def golden_quickgelu():
    model, _, _ = open_clip.create_model_and_transforms("prsclip-tiny-quickgelu", pretrained=str(GOLDEN_WEIGHTS))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / "inputs" / "preprocessed.npy"))


# ----------------------------------------------------------------------------- golden
def test_merged_matches_golden(golden_quickgelu, images):
    effects, representation = SecondOrderEffects(golden_quickgelu, 1, "cpu")(images)
    expected = np.load(SO / f"{STEM}_merged.npy")
    assert effects.shape == expected.shape == (6, 256, 32)
    np.testing.assert_allclose(effects.numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(representation.numpy(), np.load(SO / "encode_image_quickgelu.npy"), atol=1e-5)


def test_per_head_matches_golden_and_sums_to_merged(golden_quickgelu, images):
    so = SecondOrderEffects(golden_quickgelu, 1, "cpu")
    per_head, _ = so(images[:1], per_head=True)  # [1, J, K, d], J = (layer - 2) * H + head
    expected = np.load(SO / "per_head_img0.npy")  # [2, H, K, d]
    np.testing.assert_allclose(per_head[0].reshape(expected.shape).numpy(), expected, atol=1e-5, rtol=0)
    merged, _ = so(images[:1])
    np.testing.assert_allclose(per_head.sum(1).numpy(), merged.numpy(), atol=2e-6, rtol=0)


def test_uncached_maps_give_the_same_numbers(golden_quickgelu, images):
    cached, _ = SecondOrderEffects(golden_quickgelu, 1, "cpu")(images[:2])
    uncached_so = SecondOrderEffects(golden_quickgelu, 1, "cpu", cache_bytes=0)
    assert not uncached_so._cache
    uncached, _ = uncached_so(images[:2])
    torch.testing.assert_close(uncached, cached, atol=0, rtol=0)


def test_enclosing_autocast_changes_nothing(golden_quickgelu, images):
    expected, _ = SecondOrderEffects(golden_quickgelu, 1, "cpu")(images[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        effects, _ = SecondOrderEffects(golden_quickgelu, 1, "cpu")(images[:2])
    assert effects.dtype == torch.float32
    torch.testing.assert_close(effects, expected, atol=1e-6, rtol=0)


def test_pcas_and_norms_match_golden():
    merged = np.load(SO / f"{STEM}_merged.npy")
    pcas, norms = neuron_pcas(merged, 3, progress=False)
    np.testing.assert_allclose(pcas, np.load(SO / f"{STEM}_3_pca.npy"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(norms, np.load(SO / f"{STEM}_3_norm.npy"), atol=1e-5, rtol=0)
    assert (np.diff(norms, axis=1) >= 0).all()
    chunked = neuron_pcas(merged, 3, chunk=7, progress=False)  # several neuron chunks, a ragged last one
    np.testing.assert_array_equal(chunked[0], pcas)
    np.testing.assert_array_equal(chunked[1], norms)


def test_pca_sign_rule_and_top_k_selection():
    rng = np.random.default_rng(0)
    B, d = 9, 5
    direction = np.eye(d)[0]
    # neuron 0: 3 images far along -direction, the rest near the mean -> PC must point to -direction
    x = rng.normal(scale=0.01, size=(B, 2, d))
    x[:3, 0] -= 5 * direction
    x[:3, 1] += 5 * direction
    pcas, norms = neuron_pcas(x.astype(np.float32), 3, progress=False)
    assert pcas[0] @ direction < -0.99 and pcas[1] @ direction > 0.99
    centred = x - x.mean(0)
    np.testing.assert_allclose(norms[0], np.sort(np.linalg.norm(centred[:, 0], axis=-1))[-3:], rtol=1e-5)
    with pytest.raises(ValueError, match="top_k_pca 10"):
        neuron_pcas(x, 10, progress=False)


def test_neuron_means_chunked():
    x = np.random.default_rng(1).normal(size=(7, 11, 3)).astype(np.float32)
    np.testing.assert_allclose(neuron_means(x, chunk=4), x.mean(0), atol=1e-6)


# ----------------------------------------------------------------------------- independent checks
def frozen_forward_through_later_attention(model, images, mlp_layer, coefficient=100.0):
    """The sum over neurons, computed independently: open_clip's own forward (hooks) supplies the residuals,
    layer m's MLP output and the ln_post input; nn.MultiheadAttention supplies the attention maps. The MLP output
    goes through each later layer's ln_1 (frozen statistics, share 1/(1+2l) of mean and bias), the full value /
    attention / out_proj (biases shared 1/(1+2l)) and the frozen ln_post; later MLPs are skipped. [b, d]"""
    visual = model.visual
    blocks = visual.transformer.resblocks
    L = len(blocks)
    cap, hooks = {}, []
    for l, blk in enumerate(blocks):
        hooks.append(blk.register_forward_pre_hook(lambda mod, inp, l=l: cap.__setitem__(l, inp[0])))
    hooks.append(blocks[mlp_layer].mlp.register_forward_hook(lambda mod, inp, out: cap.__setitem__("mlp", out)))
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda mod, inp: cap.__setitem__("post", inp[0])))
    with torch.no_grad():
        r = model.encode_image(images)
        for h in hooks:
            h.remove()
        mlp_out = blocks[mlp_layer].ls_2(cap["mlp"])  # [b, N, W]
        total, share = 0.0, 0.0
        for l in range(mlp_layer + 1, L):
            blk, x = blocks[l], cap[l]
            t = 1 + 2 * l
            mu = x.mean(-1, keepdim=True)
            sd = (x.var(-1, unbiased=False, keepdim=True) + blk.ln_1.eps).sqrt()
            z = blk.ln_1.weight * (mlp_out - mu / t) / sd + blk.ln_1.bias / t
            h_in = blk.ln_1(x)
            _, maps = blk.attn(h_in, h_in, h_in, need_weights=True, average_attn_weights=False)  # [b, H, N, N]
            W, H = x.shape[-1], blk.attn.num_heads
            v = F.linear(z, blk.attn.in_proj_weight[2 * W:], blk.attn.in_proj_bias[2 * W:] / t)
            v = v.view(*v.shape[:2], H, W // H)  # [b, N, H, dh]
            o = torch.einsum("bhn,bnhc->bhc", maps[:, :, 0], v).reshape(len(x), W)
            total = total + blk.ls_1(F.linear(o, blk.attn.out_proj.weight, blk.attn.out_proj.bias / t))
            share += 1.0 / (t * (1 + 2 * L))
        post = cap["post"][:, 0] if cap["post"].dim() == 3 else cap["post"]
        mu = post.mean(-1, keepdim=True)
        sd = (post.var(-1, unbiased=False, keepdim=True) + visual.ln_post.eps).sqrt()
        out = (visual.ln_post.weight * (total - share * mu) / sd + share * visual.ln_post.bias) @ visual.proj
        return out * coefficient / r.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("name,mlp_layer", [("prsclip-tiny-quickgelu", 0), ("prsclip-tiny-quickgelu", 2),
                                            ("tiny-ls", 1)])
def test_identity_sum_over_neurons_is_frozen_forward(name, mlp_layer):
    model, _ = tiny_model(name, seed=3)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    effects, _ = SecondOrderEffects(model, mlp_layer, "cpu")(x)
    expected = frozen_forward_through_later_attention(model, x, mlp_layer)
    assert expected.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(effects.sum(1), expected, atol=1e-5, rtol=0)


def naive_loop(so: SecondOrderEffects, images: torch.Tensor) -> np.ndarray:
    """Q1 taken literally, one (later layer, head, source token) at a time, in float64: [b, J, K, d]."""
    rec, engine = so.decompose(images), so.engine
    r = rec.representation.double().numpy()
    f64 = lambda t: t.detach().double().numpy()  # noqa: E731
    blocks = so.visual.transformer.resblocks
    src = blocks[so.mlp_layer]
    post = f64(rec.post_activations[so.mlp_layer])  # [b, N, K]
    b, N, K = post.shape
    L, H, W, dh = engine.num_layers, engine.num_heads, engine.width, engine.head_dim
    ls2 = f64(src.ls_2.gamma) if hasattr(src.ls_2, "gamma") else np.ones(W)
    w_c, b_c = f64(src.mlp.c_proj.weight) * ls2[:, None], f64(src.mlp.c_proj.bias) * ls2
    gamma, beta, proj = f64(so.visual.ln_post.weight), f64(so.visual.ln_post.bias), f64(so.visual.proj)
    attn, mu, sd = f64(rec.attention_maps), f64(rec.ln_1_mean), f64(rec.ln_1_std)
    mu_p, sd_p = f64(rec.ln_post_mean), f64(rec.ln_post_std)
    out = np.zeros((b, so.num_terms, K, proj.shape[1]))
    for i in range(b):
        j = 0
        for l in so.later_layers:
            blk = blocks[l]
            ls1 = f64(blk.ls_1.gamma) if hasattr(blk.ls_1, "gamma") else np.ones(W)
            g1, b1 = f64(blk.ln_1.weight), f64(blk.ln_1.bias)
            w_v, b_v = f64(blk.attn.in_proj_weight)[2 * W:], f64(blk.attn.in_proj_bias)[2 * W:]
            w_o, b_o = f64(blk.attn.out_proj.weight), f64(blk.attn.out_proj.bias)
            T1, T2 = (1 + 2 * l) * K, (1 + 2 * l) * (1 + 2 * L) * H * K
            for h in range(H):
                cols = slice(h * dh, (h + 1) * dh)
                y = np.zeros((K, W))
                for n in range(N):
                    o = post[i, n][:, None] * w_c.T + b_c / K  # [K, W]
                    z = g1 * (o - mu[i, l, n] / T1) / sd[i, l, n] + b1 / T1
                    v = z @ w_v[cols].T + b_v[cols] / T1  # [K, dh]
                    y += attn[i, l, h, n] * (v @ w_o[:, cols].T)
                y = ls1 * (y + b_o / (T1 * H))
                p = gamma * (y - mu_p[i] / T2) / sd_p[i] + beta / T2
                out[i, j] = p @ proj * so.coefficient / np.linalg.norm(r[i])
                j += 1
    return out


@pytest.mark.parametrize("name,mlp_layer", [("prsclip-tiny-quickgelu", 1), ("tiny-ls", 0)])
def test_naive_loop_agrees_with_batched(name, mlp_layer):
    model, _ = tiny_model(name, seed=5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    so = SecondOrderEffects(model, mlp_layer, "cpu")
    expected = naive_loop(so, x)
    per_head, _ = so(x, per_head=True)
    merged, _ = so(x)
    np.testing.assert_allclose(per_head.numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged.numpy(), expected.sum(1), atol=1e-5, rtol=0)


def test_mlp_layer_errors(golden_quickgelu):
    for bad, msg in [(3, "last layer"), (4, "out of range"), (-1, "out of range")]:
        with pytest.raises(ValueError, match=msg):
            SecondOrderEffects(golden_quickgelu, bad, "cpu")
    check_mlp_layer(2, 4)


# ----------------------------------------------------------------------------- ablations
def original_style_ablations(effects, representation, mean, pcas, norms, classifier, coefficient=100.0):
    """The original ablation arithmetic, per image with boolean masks, in numpy: dict of [b, C] logits."""
    rep = coefficient * representation / np.linalg.norm(representation, axis=-1, keepdims=True)
    centred = effects - mean[None]
    norm = np.linalg.norm(centred, axis=-1)
    base = rep - effects.sum(1) + mean.sum(0)[None]
    wo_sig, wo_insig, pc = base.copy(), base.copy(), base.copy()
    for i in range(len(effects)):
        sig = norm[i] > norms[:, 0]
        wo_sig[i] += centred[i][~sig].sum(0)
        wo_insig[i] += centred[i][sig].sum(0)
        pc[i] += (np.einsum("nd,nd->n", centred[i], pcas)[:, None] * pcas).sum(0)
    reps = {"baseline": rep, "all_neurons_mean_ablated": base, "only_non_significant_kept": wo_sig,
            "only_significant_kept": wo_insig, "projected_to_first_pc": pc}
    return {k: v @ classifier for k, v in reps.items()}


def test_ablation_logits_match_original_arithmetic():
    merged = np.load(SO / f"{STEM}_merged.npy")
    pcas, norms = np.load(SO / f"{STEM}_3_pca.npy"), np.load(SO / f"{STEM}_3_norm.npy")
    rep = np.load(SO / "encode_image_quickgelu.npy")
    clf = np.load(GOLDEN / "ablations" / "classifier_random2.npy")
    mean = merged.mean(0)
    # evaluated effects away from the training ones: the top-k-th training image sits exactly on its threshold
    effects = (merged + np.random.default_rng(0).normal(scale=0.05, size=merged.shape)).astype(np.float32)
    got = ablation_logits(*(torch.from_numpy(a) for a in (effects, rep, mean, pcas,
                                                          np.ascontiguousarray(norms[:, 0]), clf)))
    want = original_style_ablations(effects, rep, mean, pcas, norms, clf)
    assert list(got) == list(want)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], atol=1e-4, rtol=0, err_msg=k)
    # a mix of significant and non-significant neurons, so the two partial ablations differ
    sig = np.linalg.norm(effects - mean, axis=-1) > norms[:, 0]
    assert 0 < sig.mean() < 1
    margin = np.abs(np.linalg.norm(effects - mean, axis=-1) - norms[:, 0]).min()
    assert margin > 1e-4  # no ties on the threshold


# ----------------------------------------------------------------------------- names and inputs
def test_paths_use_pretrained_name(tmp_path):
    p = second_order_paths(tmp_path, "imagenet", "train", "ViT-B-32", "openai", 9, 100)
    assert p["merged"].name == "imagenet_train_mlps_ViT-B-32_openai_9_merged.npy"
    assert p["pca"].name == "imagenet_train_mlps_ViT-B-32_openai_9_100_pca.npy"
    assert p["norm"].name == "imagenet_train_mlps_ViT-B-32_openai_9_100_norm.npy"
    local = second_order_paths(tmp_path, "golden", "train", "m", str(GOLDEN_WEIGHTS), 1)
    assert local["merged"].name == "golden_train_mlps_m_prsclip-tiny_seed0_1_merged.npy"


def test_find_input_prefers_paper2_names_and_falls_back(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        find_classifier([a, b], "imagenet", "ViT-B-32", "openai")
    for name in ("imagenet_classifier_ViT-B-32_openai.npy", "imagenet_classifier_ViT-B-32.npy"):
        assert str(a / name) in str(err.value) and str(b / name) in str(err.value)
    np.save(b / "imagenet_classifier_ViT-B-32.npy", np.zeros((2, 2)))
    assert find_classifier([a, b], "imagenet", "ViT-B-32", "openai") == b / "imagenet_classifier_ViT-B-32.npy"
    np.save(a / "imagenet_classifier_ViT-B-32.npy", np.zeros((2, 2)))
    assert find_classifier([a, b], "imagenet", "ViT-B-32", "openai") == a / "imagenet_classifier_ViT-B-32.npy"
    np.save(b / "imagenet_classifier_ViT-B-32_openai.npy", np.zeros((2, 2)))  # paper-2 name wins within a dir
    assert find_input(b, ["imagenet_classifier_ViT-B-32_openai.npy", "imagenet_classifier_ViT-B-32.npy"],
                      "x") == b / "imagenet_classifier_ViT-B-32_openai.npy"
    np.save(a / "texts_ViT-B-32.npy", np.zeros((2, 2)))
    assert find_text_set(a, "texts", "ViT-B-32", "openai") == a / "texts_ViT-B-32.npy"
    np.save(a / "texts_ViT-B-32_openai.npy", np.zeros((2, 2)))
    assert find_text_set(a, "texts", "ViT-B-32", "openai") == a / "texts_ViT-B-32_openai.npy"


def test_load_second_order_files_checks_shapes(tmp_path):
    p = second_order_paths(tmp_path, "ds", "train", "m", "openai", 1, 3)
    np.save(p["merged"], np.zeros((6, 8, 4), np.float32))
    np.save(p["pca"], np.zeros((8, 4), np.float32))
    np.save(p["norm"], np.zeros((8, 3), np.float32))
    files = load_second_order_files(tmp_path, "ds", "train", "m", "openai", 1, 3)
    assert files["merged"].shape == (6, 8, 4)
    np.save(p["pca"], np.zeros((8, 5), np.float32))
    with pytest.raises(ValueError, match="_3_pca.npy: shape"):
        load_second_order_files(tmp_path, "ds", "train", "m", "openai", 1, 3)
    np.save(p["pca"], np.zeros((8, 4), np.float32))
    np.save(p["norm"], np.zeros((7, 3), np.float32))
    with pytest.raises(ValueError, match="_3_norm.npy: shape"):
        load_second_order_files(tmp_path, "ds", "train", "m", "openai", 1, 3)
    p["merged"].unlink()
    with pytest.raises(FileNotFoundError, match="compute_second_order_neuron_prs.py"):
        load_second_order_files(tmp_path, "ds", "train", "m", "openai", 1, 3)


def test_subsampled_imagenet_sizes():
    from utils.datasets import subsample_imagenet

    class Fake(torch.utils.data.Dataset):
        def __init__(self, n):
            self.labels = np.arange(n) % 1000

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return i, int(self.labels[i])

    train, val = subsample_imagenet(Fake(1_281_167), "train"), subsample_imagenet(Fake(50_000), "val")
    assert len(train) == 5124 and len(val) == 5000
    assert train[1] == (250, 250) and val[4999] == (49990, 990)
    np.testing.assert_array_equal(val.labels, np.arange(0, 50_000, 10) % 1000)
    with pytest.raises(ValueError, match="--split test"):
        subsample_imagenet(Fake(10), "test")
