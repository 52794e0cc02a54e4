"""The decomposition of prs_hook.py: golden numbers, a naive second route, captures, dtypes and devices, unsupported
towers. (The sum rule of every mode, and the adapter equal to decompose(): tests/test_decompose.py.)"""
import copy
import warnings

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, tiny_model

import prs_hook
import utils.models
from prs_hook import PRSLogger, UnsupportedModelError, check_supported, hook_prs_logger
from utils.errors import InputError
from utils.models import load_model

VARIANTS = ["prsclip-tiny", "prsclip-tiny-quickgelu", "tiny-ls", "tiny-noln-p8"]


def _images(model, n=3, seed=0):
    size = model.visual.image_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _decompose(model, x, spatial):
    prs = hook_prs_logger(model, "cpu", spatial=spatial)
    r = prs.encode_image(x)
    attn, mlps = prs.finalize(r)
    return prs, r, attn, mlps


def test_variants_really_differ():
    """The QuickGELU and layer-scale configs must change the numbers, or the parametrisation tests nothing."""
    base, _ = tiny_model("prsclip-tiny", seed=1)
    x = _images(base)
    outs = {}
    for name in ["prsclip-tiny", "prsclip-tiny-quickgelu", "tiny-ls"]:
        model, _ = tiny_model(name, seed=1)
        outs[name] = _decompose(model, x, False)[2]
    assert not torch.allclose(outs["prsclip-tiny"], outs["prsclip-tiny-quickgelu"], atol=1e-4)
    assert not torch.allclose(outs["prsclip-tiny"], outs["tiny-ls"], atol=1e-4)


def test_spatial_and_pooled_agree():
    model, _ = tiny_model("tiny-ls", seed=2)
    x = _images(model)
    prs_s, _, attn_s, mlps_s = _decompose(model, x, True)
    prs_p, _, attn_p, mlps_p = _decompose(model, x, False)
    torch.testing.assert_close(attn_s.sum(2), attn_p, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn_s[:, :, 0].sum(2), prs_p.cls_attentions, atol=1e-6, rtol=0)
    torch.testing.assert_close(prs_s.cls_attentions, prs_p.cls_attentions, atol=1e-6, rtol=0)
    torch.testing.assert_close(mlps_s, mlps_p, atol=0, rtol=0)


# ----------------------------------------------------------------------------- golden
def test_golden_first_order(golden_model, golden_images):
    model, _ = golden_model
    prs, r, attn, mlps = _decompose(model, golden_images, False)
    np.testing.assert_allclose(r.numpy(), np.load(GOLDEN / "prs/encode_image.npy"), atol=1e-5)
    np.testing.assert_allclose(attn.numpy(), np.load(GOLDEN / "prs/golden_attn_prsclip-tiny.npy"), atol=1e-6)
    np.testing.assert_allclose(mlps.numpy(), np.load(GOLDEN / "prs/golden_mlp_prsclip-tiny.npy"), atol=1e-6)
    np.testing.assert_allclose(prs.cls_attentions.numpy(), np.load(GOLDEN / "prs/golden_cls_attn_prsclip-tiny.npy"),
                               atol=1e-6)


def test_golden_spatial(golden_model, golden_images):
    model, _ = golden_model
    prs, _, attn, mlps = _decompose(model, golden_images[:1], True)
    np.testing.assert_allclose(attn[0].numpy(), np.load(GOLDEN / "prs/spatial_attn_img0.npy"), atol=1e-6)
    np.testing.assert_allclose(mlps[0].numpy(), np.load(GOLDEN / "prs/spatial_mlp_img0.npy"), atol=1e-6)


# ----------------------------------------------------------------------------- naive route
@torch.no_grad()
def _naive_decomposition(model, x):
    """Per head and per source token with open_clip's own modules, in float64: [b, L, N, H, d], [b, L+1, d]."""
    model = model.double()
    v = model.visual
    x = x.double()
    captured = {}
    hooks = [v.ln_post.register_forward_pre_hook(lambda m, a: captured.__setitem__("final", a[0]))]
    for l, block in enumerate(v.transformer.resblocks):
        hooks.append(block.ln_1.register_forward_hook(lambda m, a, o, l=l: captured.__setitem__(("ln1", l), o)))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o, l=l: captured.__setitem__(("mlp", l), o)))
    hooks.append(v.ln_pre.register_forward_hook(lambda m, a, o: captured.__setitem__("x0", o)))
    with torch.no_grad():
        r = model.encode_image(x)
    for h in hooks:
        h.remove()
    xf = captured["final"][:, 0]
    mu = xf.mean(-1)
    sigma = (xf.var(-1, unbiased=False) + v.ln_post.eps).sqrt()
    gamma, beta, proj = v.ln_post.weight, v.ln_post.bias, v.proj
    norm = r.norm(dim=-1)
    L = len(v.transformer.resblocks)
    T = 2 * L + 1

    def project(c, t):  # c [b, W]
        return ((gamma * (c - mu[:, None] / t) / sigma[:, None] + beta / t) @ proj) / norm[:, None]

    b, N, W = captured["x0"].shape
    H = v.transformer.resblocks[0].attn.num_heads
    dh = W // H
    attn_terms = torch.zeros(b, L, N, H, proj.shape[1], dtype=torch.float64)
    mlp_terms = torch.zeros(b, L + 1, proj.shape[1], dtype=torch.float64)
    mlp_terms[:, 0] = project(captured["x0"][:, 0], T)
    for l, block in enumerate(v.transformer.resblocks):
        h_in = captured[("ln1", l)]
        mha = block.attn
        _, weights = mha(h_in, h_in, h_in, need_weights=True, average_attn_weights=False)  # [b, H, N, N]
        w_v = mha.in_proj_weight[2 * W:]
        b_v = mha.in_proj_bias[2 * W:]
        ls1 = block.ls_1.gamma if hasattr(block.ls_1, "gamma") else torch.ones(W, dtype=torch.float64)
        ls2 = block.ls_2.gamma if hasattr(block.ls_2, "gamma") else torch.ones(W, dtype=torch.float64)
        for head in range(H):
            cols = slice(head * dh, (head + 1) * dh)
            for n in range(N):
                value = h_in[:, n] @ w_v[cols].t() + b_v[cols]  # [b, dh]
                out = weights[:, head, 0, n, None] * value @ mha.out_proj.weight[:, cols].t()
                out = ls1 * (out + mha.out_proj.bias / (N * H))
                attn_terms[:, l, n, head] = project(out, T * N * H)
        mlp_terms[:, l + 1] = project(ls2 * captured[("mlp", l)][:, 0], T)
    model.float()
    return attn_terms, mlp_terms


@pytest.mark.parametrize("name", ["prsclip-tiny", "tiny-ls"])
def test_matches_naive_per_head_per_token_loop(name):
    model, _ = tiny_model(name, seed=3)
    x = _images(model, n=2)
    naive_attn, naive_mlp = _naive_decomposition(model, x)
    _, _, attn, mlps = _decompose(model, x, True)
    np.testing.assert_allclose(attn.numpy(), naive_attn.numpy(), atol=2e-6)
    np.testing.assert_allclose(mlps.numpy(), naive_mlp.numpy(), atol=2e-6)


# ----------------------------------------------------------------------------- captures
def test_captures_match_open_clip_modules():
    model, _ = tiny_model("prsclip-tiny-quickgelu", seed=4)
    x = _images(model, n=2)
    L = len(model.visual.transformer.resblocks)
    prs = hook_prs_logger(model, "cpu", attention_maps=True, ln_stats=True, post_gelu_layers=[1, 3])
    prs.encode_image(x)
    ref = {}
    hooks = []
    for l, block in enumerate(model.visual.transformer.resblocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, l=l: ref.__setitem__(("in", l), a[0])))
        hooks.append(block.mlp.gelu.register_forward_hook(lambda m, a, o, l=l: ref.__setitem__(("act", l), o)))
    with torch.no_grad():
        model.encode_image(x)
    for h in hooks:
        h.remove()
    for l, block in enumerate(model.visual.transformer.resblocks):
        x_in = ref[("in", l)]
        h_in = block.ln_1(x_in)
        with torch.no_grad():
            _, w = block.attn(h_in, h_in, h_in, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(prs.attention_maps[:, l], w[:, :, 0].detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(prs.ln_1_mean[:, l], x_in.mean(-1), atol=1e-6, rtol=0)
        std = (x_in.var(-1, unbiased=False) + block.ln_1.eps).sqrt()
        torch.testing.assert_close(prs.ln_1_std[:, l], std, atol=1e-6, rtol=1e-6)
    assert sorted(prs.post_gelu) == [1, 3]
    for l in (1, 3):
        torch.testing.assert_close(prs.post_gelu[l], ref[("act", l)], atol=1e-5, rtol=1e-5)
    assert prs.attention_maps.shape == (2, L, 4, 17)
    torch.testing.assert_close(prs.attention_maps.sum(-1), torch.ones(2, L, 4), atol=1e-6, rtol=0)


def test_finalize_before_forward_is_an_error():
    model, _ = tiny_model("prsclip-tiny")
    with pytest.raises(RuntimeError, match="encode_image"):
        hook_prs_logger(model, "cpu").finalize()


# ----------------------------------------------------------------------------- float32 whatever the context
def test_enclosing_autocast_changes_nothing():
    """CPU autocast to bfloat16 around construction, forward and finalize: the same float32 numbers."""
    model, _ = tiny_model("tiny-ls", seed=5)
    x = _images(model, n=2)
    _, r, attn, mlps = _decompose(model, x, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prs, r_ac, attn_ac, mlps_ac = _decompose(model, x, False)
    assert attn_ac.dtype == mlps_ac.dtype == r_ac.dtype == torch.float32
    torch.testing.assert_close(attn_ac, attn, atol=1e-7, rtol=0)
    torch.testing.assert_close(mlps_ac, mlps, atol=1e-7, rtol=0)
    torch.testing.assert_close(r_ac, r, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_is_upcast_not_modified(dtype):
    """A half-precision model is decomposed exactly in float32: the terms are those of its weights in float32."""
    model, _ = tiny_model("tiny-ls", seed=6)
    half = copy.deepcopy(model).to(dtype)
    x = _images(model, n=2)
    with pytest.warns(UserWarning, match="float32 copy"):
        prs = hook_prs_logger(half, "cpu", spatial=True)
    r = prs.encode_image(x)
    attn, mlps = prs.finalize(r)
    assert next(half.parameters()).dtype == dtype  # the caller's model is left as it was
    _, r32, attn32, mlps32 = _decompose(half.float(), x, True)  # the same weights, converted by the test
    torch.testing.assert_close(attn, attn32, atol=1e-7, rtol=0)
    torch.testing.assert_close(mlps, mlps32, atol=1e-7, rtol=0)
    ref = F.normalize(half.float().encode_image(x).detach(), dim=-1)
    torch.testing.assert_close(attn.flatten(1, -2).sum(1) + mlps.sum(1), ref, atol=1e-5, rtol=0)


def _lossy_sdpa(q, k, v, *args, **kwargs):
    """A fused-attention kernel with bfloat16 internals, as a stand-in for reduced-precision GPU kernels."""
    out = torch.ops.aten.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args, **kwargs)
    return out.to(q.dtype)


@pytest.mark.parametrize("spatial", [False, True, "sum"])
def test_terms_come_from_one_float32_softmax(monkeypatch, spatial):
    """Whatever the fused kernel does, every logged term comes from one float32 CLS-row softmax: the terms
    sum to the logged representation, and the pooled, spatial and CLS terms agree with each other."""
    model, _ = tiny_model("prsclip-tiny", seed=7)
    x = _images(model, n=2)
    monkeypatch.setattr(prs_hook.F, "scaled_dot_product_attention", _lossy_sdpa)
    prs = hook_prs_logger(model, "cpu", spatial=spatial, attention_maps=True)
    r = prs.encode_image(x)
    attn, mlps = prs.finalize(r)
    total = attn.flatten(1, -2).sum(1) + mlps.sum(1)
    torch.testing.assert_close(total, F.normalize(r, dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(prs.attention_maps.sum(-1), torch.ones(2, 4, 4), atol=1e-6, rtol=0)
    full = hook_prs_logger(model, "cpu", spatial=True)  # per head and token, from the same patched run
    full_attn, _ = full.finalize(full.encode_image(x))
    expected = {False: full_attn.sum(2), True: full_attn, "sum": full_attn.sum((1, 3))}[spatial]
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(prs.cls_attentions, full_attn[:, :, 0].sum(2), atol=1e-6, rtol=0)


def test_other_device_gets_a_copy():
    """A logger on another device than the model runs a copy there (meta: shapes only, no second device here)."""
    model, _ = tiny_model("prsclip-tiny")
    with pytest.warns(UserWarning, match="copy on meta"):
        prs = hook_prs_logger(model, "meta")
    r = prs.encode_image(_images(model, n=2))
    attn, mlps = prs.finalize(r)
    assert r.device.type == attn.device.type == mlps.device.type == "meta"
    assert attn.shape == (2, 4, 4, 32) and mlps.shape == (2, 5, 32)
    assert prs.visual is not model.visual and next(model.parameters()).device.type == "cpu"


def test_same_dtype_and_device_uses_the_model_itself():
    model, _ = tiny_model("prsclip-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no copy, so no warning
        assert hook_prs_logger(model, "cpu").visual is model.visual
    assert PRSLogger(model).device == torch.device("cpu")


def test_finalize_follows_the_representation_it_is_given():
    model, _ = tiny_model("prsclip-tiny", seed=8)
    x = _images(model, n=2)
    prs = hook_prs_logger(model, "cpu")
    r = prs.encode_image(x)
    attn1, mlps1 = prs.finalize(r)
    first = attn1.clone(), mlps1.clone(), prs.cls_attentions.clone()
    assert prs.finalize(r)[0] is attn1  # same norm: the same tensors
    scale = torch.tensor([2.0, 0.5])[:, None]
    attn2, mlps2 = prs.finalize(r * scale)  # norms x2 and x0.5: terms /2 and x2
    torch.testing.assert_close(attn2, first[0] / scale[:, :, None, None], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(mlps2, first[1] / scale[:, :, None], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(prs.cls_attentions, first[2] / scale[:, :, None], atol=1e-7, rtol=1e-6)
    assert torch.equal(attn1, first[0])  # the earlier result is left as it was
    attn3, _ = prs.finalize()  # back to the logged representation
    torch.testing.assert_close(attn3, first[0], atol=1e-7, rtol=1e-6)
    with pytest.raises(InputError, match=r"shape \[3, 32\]"):
        prs.finalize(torch.ones(3, 32))


# ----------------------------------------------------------------------------- unsupported towers
@pytest.mark.parametrize("name,feature", [
    ("tiny-qknorm", "qk_norm"),
    ("tiny-resnet", "ResNet"),
])
def test_unsupported_architectures_fail_fast(name, feature):
    with pytest.raises(UnsupportedModelError, match=feature) as e:
        load_model(name, "none", "cpu")
    assert name in str(e.value)
    # and on an already-built model
    model = open_clip.create_model(name, pretrained=None)
    with pytest.raises(UnsupportedModelError) as e:
        check_supported(model, name)
    assert name in str(e.value)


def test_openai_tag_turns_on_quickgelu(monkeypatch):
    """The QuickGELU trap: a tag trained with QuickGELU must get it even on the plain config name."""
    seen = {}
    real_create = open_clip.create_model_and_transforms

    def fake_create(name, pretrained=None, force_quick_gelu=False, device="cpu", **kwargs):  # no download: tiny
        seen["force_quick_gelu"] = force_quick_gelu
        return real_create("prsclip-tiny", pretrained=None, force_quick_gelu=force_quick_gelu)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    monkeypatch.setattr(utils.models, "check_weights_available", lambda *args, **kwargs: None)  # as if cached
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda name: None)
    model, _, _ = load_model("ViT-B-32", "openai", "cpu")
    assert seen["force_quick_gelu"] is True
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    load_model("ViT-B-16", "laion2b_s34b_b88k", "cpu")
    assert seen["force_quick_gelu"] is False


def test_quickgelu_config_is_bit_identical_to_forced():
    a = open_clip.create_model("prsclip-tiny", pretrained=str(GOLDEN / "prsclip-tiny_seed0.safetensors"),
                               force_quick_gelu=True).eval()
    b = open_clip.create_model("prsclip-tiny-quickgelu",
                               pretrained=str(GOLDEN / "prsclip-tiny_seed0.safetensors")).eval()
    x = torch.from_numpy(np.load(GOLDEN / "inputs/preprocessed.npy"))
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
    np.testing.assert_allclose(b.encode_image(x).detach().numpy(),
                               np.load(GOLDEN / "second_order/encode_image_quickgelu.npy"), atol=1e-5)


# ----------------------------------------------------------------------------- real configs (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32-quickgelu"])
@pytest.mark.parametrize("spatial", [False, True])
def test_real_configs_sum_rule(name, spatial):
    model, _ = tiny_model(name, seed=0)
    x = _images(model, n=2)
    _, _, attn, mlps = _decompose(model, x, spatial)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1)
    torch.testing.assert_close(attn.flatten(1, -2).sum(1) + mlps.sum(1), ref, atol=1e-5, rtol=0)


def test_golden_files_are_the_golden_case():
    """Every file of tests/golden/ listed in golden.json has its recorded size and SHA-256 (no fixture drifted)."""
    import hashlib
    import json

    files = json.loads((GOLDEN / "golden.json").read_text())["files"]
    assert len(files) > 50
    for name, meta in files.items():
        data = (GOLDEN / name).read_bytes()
        assert len(data) == meta["bytes"] and hashlib.sha256(data).hexdigest() == meta["sha256"], name
