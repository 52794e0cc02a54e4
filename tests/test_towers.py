"""The image towers read out by pooling (prs_hook.PooledTower): SigLIP-style MAP heads (timm ViT), PE-Core and
EVA (timm Eva: RoPE, SwiGLU, inner LayerNorm), MobileCLIP's timm ViT, CLIPA (average pooling) and CoCa (attentional
pool) on tiny random configs (tests/configs): the sum rule against open_clip's encode_image in float32 and
float64, the modes against each other, an independent float64 loop for the MAP head, the scripts on their files,
the refusals, and the coverage page (docs/towers.md)."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN, REPO, run_inprocess, tiny_model

from prs_hook import Decomposer, OpenClipPooledTower, TimmTower
from utils.errors import UnsupportedModelError

TOWERS = ["tiny-map", "tiny-map-tanh", "tiny-map-linear", "tiny-pe-core", "tiny-eva02", "tiny-eva01",
          "tiny-mobileclip-l", "tiny-clipa", "tiny-avgpool", "tiny-attnpool"]
MODES = [dict(), dict(spatial=True), dict(spatial="sum"), dict(layers=[0, 2])]


def _images(model, n=2, seed=0):
    size = getattr(model.visual, "image_size", None)
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=TOWERS)
def tower(request):
    model, _ = tiny_model(request.param, seed=3)
    return request.param, model, _images(model)


# ----------------------------------------------------------------------------- the sum rule
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_sum_rule_float32_and_float64(tower, mode):
    name, model, x = tower
    with torch.no_grad():
        ref32 = F.normalize(model.encode_image(x), dim=-1)
        m64 = copy.deepcopy(model).double()
        ref64 = F.normalize(m64.encode_image(x.double()), dim=-1)
    d = Decomposer(model, "cpu", model_name=name)(x, **mode)
    assert d.total().dtype == torch.float32
    torch.testing.assert_close(d.total(), ref32, atol=1e-5, rtol=0)
    d64 = Decomposer(m64, "cpu", model_name=name, dtype=torch.float64)(x.double(), **mode)
    assert d64.total().dtype == torch.float64
    torch.testing.assert_close(d64.total(), ref64, atol=1e-10, rtol=0)
    L = len(model.visual.trunk.blocks) if hasattr(model.visual, "trunk") else len(model.visual.transformer.resblocks)
    assert d.mlp.shape[1] == L + 2 and d.mlp_labels == ("embedding", *(f"mlp.{l}" for l in range(L)), "pool")



def test_grid_and_patch_of_a_conv_stem():
    """timm's HybridEmbed (MobileCLIP-B's conv stem) reports patch_size 1 on its 14 x 14 grid of a 224 image: the
    pixels per token are 16, as segmentation needs them."""
    from types import SimpleNamespace

    from utils.segmentation import grid_and_patch

    stem = SimpleNamespace(img_size=(224, 224), grid_size=(14, 14), patch_size=(1, 1))
    model = SimpleNamespace(visual=SimpleNamespace(trunk=SimpleNamespace(patch_embed=stem)))
    assert grid_and_patch(model) == ((14, 14), (16, 16))

def test_modes_agree(tower):
    """Token-summed = spatial summed over tokens; "sum" = spatial summed over layers and heads; layers= keeps and
    sums; cls_attn is the same in every mode."""
    name, model, x = tower
    engine = Decomposer(model, "cpu")
    full, spatial, summed, part = engine(x), engine(x, spatial=True), engine(x, spatial="sum"), engine(x, layers=[1])
    torch.testing.assert_close(spatial.attn.sum(2), full.attn, atol=1e-6, rtol=0)
    torch.testing.assert_close(summed.attn, spatial.attn.sum((1, 3)), atol=1e-6, rtol=0)
    torch.testing.assert_close(part.attn[:, 0], full.attn[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.attn_rest, full.attn.sum((1, 2)) - full.attn[:, 1].sum(1), atol=1e-6, rtol=0)
    for other in (spatial, summed, part):
        torch.testing.assert_close(other.cls_attn, full.cls_attn, atol=1e-6, rtol=0)
        torch.testing.assert_close(other.mlp, full.mlp, atol=1e-6, rtol=0)
    assert spatial.attn.shape[2] == summed.attn.shape[1] == spatial.num_prefix_tokens + 16  # a 4x4 patch grid


def test_cls_attn_is_cls_to_cls_for_token_pooled_towers():
    """EVA02 reads out token 0 (CLS): its self term is the CLS->CLS entry of the spatial terms."""
    model, _ = tiny_model("tiny-eva02", seed=4)
    x = _images(model)
    engine = Decomposer(model, "cpu")
    spatial = engine(x, spatial=True)
    assert isinstance(engine.tower, TimmTower) and spatial.num_prefix_tokens == 1
    torch.testing.assert_close(spatial.cls_attn, spatial.attn[:, :, 0].sum(2), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- an independent float64 loop
def _map_reference(model, x):
    """The terms of a timm ViT with a MAP head, by hand in float64: every residual write kept per token and head,
    then read out through the final LayerNorm and the pooling attention with their statistics and pattern frozen.
    Returns (attn [b, L, H, d], mlp [b, L+2, d]), divided by the embedding's norm."""
    t = model.visual.trunk
    b = len(x)
    X = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(x))))
    writes = {"emb": X}
    for l, blk in enumerate(t.blocks):
        a = blk.attn
        H, dh = a.num_heads, a.head_dim
        q, k, v = a.qkv(blk.norm1(X)).reshape(b, -1, 3, H, dh).permute(2, 0, 3, 1, 4)
        total = 0
        for h in range(H):
            pattern = torch.softmax(q[:, h] @ k[:, h].transpose(1, 2) * dh ** -0.5, dim=-1)
            w = a.proj.weight[:, h * dh:(h + 1) * dh]
            writes[l, h] = blk.ls1((pattern @ v[:, h]) @ w.T + a.proj.bias / H)
            total = total + writes[l, h]
        X = X + total
        writes["mlp", l] = blk.ls2(blk.mlp(blk.norm2(X)))
        X = X + writes["mlp", l]
    ln, ap = t.norm, t.attn_pool
    sd = (X.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    Hp, dp = ap.num_heads, ap.head_dim
    W = X.shape[-1]
    query = ap.q(ap.latent)[0, 0].view(Hp, dp)
    keys = (ln(X) @ ap.kv.weight[:W].T + ap.kv.bias[:W]).view(b, -1, Hp, dp)
    P = torch.softmax(torch.einsum("pk,btpk->bpt", query, keys) * dp ** -0.5, dim=-1)  # [b, Hp, N]

    def readout(c):  # a residual term [b, N, W] -> [b, d]: frozen LN (no beta), frozen pattern, no biases
        cn = ln.weight * (c - c.mean(-1, keepdim=True)) / sd
        vals = (cn @ ap.kv.weight[W:].T).view(b, -1, Hp, dp)
        return torch.einsum("bpt,btpk->bpk", P, vals).reshape(b, -1) @ ap.proj.weight.T

    pooled = ap.proj(torch.einsum("bpt,btpk->bpk", P, (ln(X) @ ap.kv.weight[W:].T + ap.kv.bias[W:]).view(
        b, -1, Hp, dp)).reshape(b, -1))
    m_pool = ap.mlp(ap.norm(pooled))
    r = pooled + m_pool
    L, H = len(t.blocks), t.blocks[0].attn.num_heads
    attn = torch.stack([torch.stack([readout(writes[l, h]) for h in range(H)], 1) for l in range(L)], 1)
    mlp = [readout(writes["emb"])] + [readout(writes["mlp", l]) for l in range(L)]
    mlp.append(r - attn.sum((1, 2)) - sum(mlp))  # the constants and the pooling MLP: what is left
    const = (ln.bias @ ap.kv.weight[W:].T + ap.kv.bias[W:]) @ ap.proj.weight.T + ap.proj.bias
    torch.testing.assert_close(mlp[-1], const + m_pool, atol=1e-12, rtol=0)  # ... is exactly those
    norm = r.norm(dim=-1)
    return attn / norm[:, None, None, None], torch.stack(mlp, 1) / norm[:, None, None]


@pytest.mark.parametrize("name", ["tiny-map", "tiny-map-tanh"])
def test_map_head_terms_against_a_float64_loop(name):
    model, _ = tiny_model(name, seed=5)
    model = model.double()
    x = _images(model).double()
    with torch.no_grad():
        attn, mlp = _map_reference(model, x)
        d = Decomposer(model, "cpu", dtype=torch.float64)(x)
    torch.testing.assert_close(d.attn, attn, atol=1e-12, rtol=0)
    torch.testing.assert_close(d.mlp, mlp, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name,feature", [("tiny-resnet", "ModifiedResNet"), ("tiny-qknorm", "qk_norm")])
def test_other_towers_refused_in_one_line(name, feature):
    from utils.models import load_model

    with pytest.raises(UnsupportedModelError, match=feature) as e:
        load_model(name, "none", "cpu")
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("model,reason", [("convnext_base_w", "ConvNeXt"), ("ViTamin-B", "ViTamin"),
                                          ("MobileCLIP-S1", "FastViT"), ("RN50", "ModifiedResNet")])
def test_conv_and_hybrid_configs_refused_with_the_reason(model, reason):
    import open_clip

    from utils.models import unsupported_reason

    assert reason in unsupported_reason(open_clip.get_model_config(model))


def test_engine_refuses_a_convolutional_timm_trunk():
    import open_clip

    model = open_clip.create_model("tiny-convnext", pretrained=None)
    with pytest.raises(UnsupportedModelError, match="timm trunk ConvNeXt .convolutional: no attention heads"):
        Decomposer(model, "cpu", model_name="tiny-convnext")


def test_second_order_effects_refuse_pooled_towers():
    from utils.neurons.effects import SecondOrderEffects

    model, _ = tiny_model("tiny-map", seed=0)
    with pytest.raises(UnsupportedModelError, match="second-order effects need a CLS-token"):
        SecondOrderEffects(model, 1, "cpu", model_name="tiny-map")


def test_extras_refused_for_pooled_towers():
    model, _ = tiny_model("tiny-clipa", seed=0)
    engine = Decomposer(model, "cpu")
    assert isinstance(engine.tower, OpenClipPooledTower)
    with pytest.raises(UnsupportedModelError, match="second-order extras"):
        engine(_images(model), attention_maps=True)


# ----------------------------------------------------------------------------- coverage
def test_coverage_page_is_current():
    """docs/towers.md is coverage_table(): regenerate it with
    ``python -c "from utils.models import coverage_table; open('docs/towers.md', 'w').write(coverage_table())"``."""
    from utils.models import coverage, coverage_table

    import open_clip

    rows = coverage()
    assert sum(r is None for *_, r in rows) >= 147
    page = (REPO / "docs" / "towers.md").read_text()
    if f"open_clip {open_clip.__version__}'s configs" not in page:  # a newer open_clip: its list, not the page's
        pytest.skip(f"docs/towers.md was generated with another open_clip than {open_clip.__version__}")
    assert page == coverage_table()


# ----------------------------------------------------------------------------- the scripts on a tiny MAP model
def test_scripts_run_on_a_map_tower(tmp_path):
    base = ["--model_config", str(REPO / "tests" / "configs"), "--model", "tiny-map", "--pretrained", "none",
            "--device", "cpu"]
    for script, *args in [
        ("compute_prs.py", "--dataset", "golden", "--data_path", GOLDEN / "images", "--output_dir", tmp_path),
        ("compute_text_projection.py", "--dataset", "golden", "--classnames", GOLDEN / "text/classnames.txt",
         "--output_dir", tmp_path),
        ("compute_segmentations.py", "--classifier_dir", tmp_path, "--classifier_dataset", "golden", "--image_size",
         "32", "--num_workers", "0", "--data_path", GOLDEN / "segmentation/gtsegs_golden.mat", "--output_dir",
         tmp_path / "seg", "--batch_size", "2"),
    ]:
        code, out, err = run_inprocess(script, *base, *args)
        assert code == 0, err
    code, out, err = run_inprocess("compute_ablations.py", "--model", "tiny-map", "--dataset", "golden",
                                   "--input_dir", tmp_path, "--figures_dir", tmp_path)
    assert code == 0 and "Baseline" in out, err
    attn, mlp = np.load(tmp_path / "golden_attn_tiny-map.npy"), np.load(tmp_path / "golden_mlp_tiny-map.npy")
    assert attn.shape == (6, 3, 4, 64) and mlp.shape == (6, 5, 64)
    np.testing.assert_allclose(np.linalg.norm(attn.sum((1, 2)) + mlp.sum(1), axis=-1), 1.0, atol=1e-5)
    record = json.loads((tmp_path / "golden_mlp_tiny-map.npy.provenance.json").read_text())
    assert record["mlp_terms"] == ["embedding", "mlp.0", "mlp.1", "mlp.2", "pool"] and record["num_layers"] == 3
    assert list((tmp_path / "seg").glob("*/heatmaps.npy"))
    # TextSpan and PCLens on the last layer's heads, over the golden 40 texts embedded by this model
    shutil.copy(GOLDEN / "textspan" / "texts.txt", tmp_path / "golden40.txt")
    code, out, err = run_inprocess("compute_text_set_projection.py", *base, "--data_path", tmp_path / "golden40.txt",
                                   "--output_dir", tmp_path)
    assert code == 0, err
    classifier, labels = np.load(tmp_path / "golden_classifier_tiny-map.npy"), np.load(tmp_path / "golden_labels.npy")
    baseline = 100 * float(((attn.sum((1, 2)) + mlp.sum(1)) @ classifier).argmax(1).__eq__(labels).mean())
    for algorithm in ("textspan", "pclens"):
        code, out, err = run_inprocess("compute_complete_text_set.py", "--model", "tiny-map", "--dataset", "golden",
                                       "--input_dir", tmp_path, "--output_dir", tmp_path / algorithm,
                                       "--text_descriptions", "golden40", "--text_dir", tmp_path, "--device", "cpu",
                                       "--num_of_last_layers", 1, "--texts_per_head", 3, "--w_ov_rank", 8,
                                       "--algorithm", algorithm)
        assert code == 0, err
        found = [p for p in (tmp_path / algorithm).glob("*.json") if not p.name.endswith(".provenance.json")]
        summary = json.loads(found[0].read_text())
        assert [(h["layer"], h["head"]) for h in summary["heads"]] == [(2, h) for h in range(4)]
        assert summary["accuracy"]["baseline"] == pytest.approx(baseline)
    code, out, err = run_inprocess("compute_prs.py", *base, "--dataset", "golden", "--data_path", GOLDEN / "images",
                                   "--output_dir", tmp_path / "gate", "--map_mlp", "gate")
    assert code == 0, err
    gate = np.load(tmp_path / "gate" / "golden_attn_tiny-map.npy")
    assert gate.shape == attn.shape and not np.allclose(gate, attn)
    assert json.loads((tmp_path / "gate" / "golden_attn_tiny-map.npy.provenance.json").read_text())["map_mlp"] == "gate"


# ----------------------------------------------------------------------------- real sizes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP-384", "EVA02-L-14", "PE-Core-B-16",
                                  "MobileCLIP-B", "coca_ViT-B-32", "ViT-L-14-CLIPA"])
def test_sum_rule_real_size_random_init(name):
    model, _ = tiny_model(name, seed=0)
    x = _images(model, n=1)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1)
    d = Decomposer(model, "cpu", model_name=name)(x)
    torch.testing.assert_close(d.total(), ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- map_mlp="gate"
@pytest.mark.parametrize("name", ["tiny-map", "tiny-map-tanh", "tiny-pe-core"])
def test_gate_split_of_the_pooling_mlp(name):
    """Every term t becomes t + J t with J = W2 diag(g) W1 diag(gamma / sigma) C, built here by hand per image;
    the sum rule holds in float64."""
    model, _ = tiny_model(name, seed=6)
    model = model.double()
    x = _images(model).double()
    lumped = Decomposer(model, "cpu", dtype=torch.float64)(x, spatial=True)
    gate = Decomposer(model, "cpu", dtype=torch.float64, map_mlp="gate")(x, spatial=True)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1)
    torch.testing.assert_close(gate.total(), ref, atol=1e-10, rtol=0)
    if name != "tiny-map":
        return  # the hand-built J below is for a tower without a head after the pool
    t, ap = model.visual.trunk, model.visual.trunk.attn_pool
    D = ref.shape[-1]
    for i in range(len(x)):
        # a_i: the pooled vector before the MLP = every term but the pool entry, plus the constants
        C = torch.eye(D, dtype=torch.float64) - 1.0 / D
        with torch.no_grad():
            a_i = (lumped.total()[i] - lumped.mlp[i, -1]) * lumped.norm[i]
            const = (t.norm.bias @ ap.kv.weight[D:].T + ap.kv.bias[D:]) @ ap.proj.weight.T + ap.proj.bias
            a_i = a_i + const
            u = ap.mlp.fc1(ap.norm(a_i))
            g = ap.mlp.act(u) / u
            sd = (a_i.var(unbiased=False) + ap.norm.eps).sqrt()
            J = ap.mlp.fc2.weight @ torch.diag(g) @ ap.mlp.fc1.weight @ torch.diag(ap.norm.weight / sd) @ C
        expect = lumped.attn[i] + lumped.attn[i] @ J.T
        torch.testing.assert_close(gate.attn[i], expect, atol=1e-12, rtol=0)
        torch.testing.assert_close(gate.mlp[i, :-1], lumped.mlp[i, :-1] + lumped.mlp[i, :-1] @ J.T, atol=1e-12,
                                   rtol=0)


def test_gate_refused_without_a_map_head():
    model, _ = tiny_model("tiny-eva02", seed=0)
    with pytest.raises(UnsupportedModelError, match="map_mlp='gate' needs a MAP head"):
        Decomposer(model, "cpu", map_mlp="gate")
