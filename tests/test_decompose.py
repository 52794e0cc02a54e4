"""The Python API of prs_hook.py: decompose() / Decomposer and the Decomposition record (sum rule, labels, shapes,
head logits, top heads), the PRSLogger adapter equal to it, and decompose_dataset."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.utils.data import Subset

from prs_hook import Decomposer, Decomposition, ViTTower, decompose, hook_prs_logger
from utils.datasets import SampleImages
from utils.decomposition import decompose_dataset
from utils.errors import InputError, UnsupportedModelError

CONFIGS = ["prsclip-tiny", "prsclip-tiny-quickgelu", "tiny-ls", "tiny-noln-p8"]
MODES = [dict(spatial=False), dict(spatial=True), dict(spatial="sum"), dict(layers=[1, 3]), dict(layers=[])]


def _images(model, n=3, seed=0):
    return torch.randn(n, 3, *model.visual.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_model("tiny-ls", seed=11)
    return model, _images(model), Decomposer(model, "cpu")


# ----------------------------------------------------------------------------- the sum rule
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_sum_rule_against_open_clip_float32_and_float64(name, mode):
    model, _ = tiny_model(name, seed=1)
    x = _images(model)
    d = decompose(model, x, **mode)
    with torch.no_grad():
        ref32 = model.encode_image(x)
        ref64 = copy.deepcopy(model).double().encode_image(x.double())
    torch.testing.assert_close(d.representation, ref32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.norm, ref32.norm(dim=-1), atol=1e-5, rtol=1e-5)
    total = d.total()
    assert total.dtype == torch.float32 and total.shape == ref32.shape
    torch.testing.assert_close(total, F.normalize(ref32, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(total.double(), F.normalize(ref64, dim=-1), atol=1e-5, rtol=0)
    # total() is the sum of the fields, written out
    by_hand = d.attn.reshape(len(x), -1, d.attn.shape[-1]).sum(1) + d.mlp.sum(1)
    by_hand = by_hand + d.attn_rest if d.attn_rest is not None else by_hand
    torch.testing.assert_close(total, by_hand, atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- shapes and labels
def test_shapes_of_every_mode(tiny):
    model, x, engine = tiny
    b, L, H, d, N = len(x), 4, 4, 32, 17
    full = engine(x)
    assert full.attn.shape == (b, L, H, d) and full.mlp.shape == (b, L + 1, d) and full.cls_attn.shape == (b, L, d)
    assert full.attn_rest is None and full.layers == (0, 1, 2, 3) and full.spatial is False
    assert full.representation.shape == (b, d) and full.norm.shape == (b,)
    assert full.ln_post_mean.shape == full.ln_post_std.shape == (b,)
    assert full.attention_maps is None and full.ln_1_mean is None and dict(full.post_activations) == {}
    spatial = engine(x, spatial=True)
    assert spatial.attn.shape == (b, L, N, H, d) and spatial.layers == (0, 1, 2, 3)
    summed = engine(x, spatial="sum")
    assert summed.attn.shape == (b, N, d) and summed.spatial == "sum"
    extras = engine(x, attention_maps=True, ln_stats=True, post_activations=[2, 0])
    assert extras.attention_maps.shape == (b, L, H, N)
    assert extras.ln_1_mean.shape == extras.ln_1_std.shape == (b, L, N)
    K = model.visual.transformer.resblocks[2].mlp.c_fc.out_features
    assert sorted(extras.post_activations) == [0, 2] and extras.post_activations[2].shape == (b, N, K)
    for rec in (full, spatial, summed, extras):
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (rec.attn, rec.mlp, rec.cls_attn))


def test_layers_keep_some_and_sum_the_rest(tiny):
    _, x, engine = tiny
    full = engine(x)
    part = engine(x, layers=[0, 2])
    assert part.attn.shape == (3, 2, 4, 32) and part.attn_rest.shape == (3, 32) and part.layers == (0, 2)
    torch.testing.assert_close(part.attn, full.attn[:, [0, 2]], atol=0, rtol=0)
    torch.testing.assert_close(part.attn_rest, full.attn[:, [1, 3]].sum((1, 2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(part.mlp, full.mlp, atol=0, rtol=0)
    torch.testing.assert_close(part.cls_attn, full.cls_attn, atol=0, rtol=0)
    none = engine(x, layers=[])
    assert none.attn.shape == (3, 0, 4, 32) and none.labels == ()
    torch.testing.assert_close(none.attn_rest, full.attn.sum((1, 2)), atol=1e-6, rtol=0)


def test_labels_follow_the_kept_heads(tiny):
    _, x, engine = tiny
    assert engine(x).labels[:6] == ("L0.H0", "L0.H1", "L0.H2", "L0.H3", "L1.H0", "L1.H1")
    part = engine(x, layers=[1, 3])
    assert part.labels == tuple(f"L{l}.H{h}" for l in (1, 3) for h in range(4))
    flat = part.attn.flatten(1, 2)  # [b, L'*H, d], in the labels' order
    for i, label in enumerate(part.labels):
        l, h = (int(s[1:]) for s in label.split("."))
        assert torch.equal(flat[:, i], part.attn[:, part.layers.index(l), h])
    assert len(engine(x, spatial=True).labels) == 16


@pytest.mark.parametrize("bad,message", [
    (dict(layers=[3, 1]), "distinct, ascending"), (dict(layers=[4]), "in 0..3"),
    (dict(spatial=True, layers=[3]), "only without spatial"), (dict(spatial="mean"), "spatial='mean'"),
    (dict(post_activations=[4]), "post_activations: layer 4 out of range"),
])
def test_bad_options_are_input_errors(tiny, bad, message):
    _, x, engine = tiny
    with pytest.raises(InputError, match=message):
        engine(x, **bad)


# ----------------------------------------------------------------------------- helpers of the record
def test_head_logits_against_a_direct_einsum(tiny):
    _, x, engine = tiny
    classifier = F.normalize(torch.randn(32, 5, generator=torch.Generator().manual_seed(1)), dim=0)
    for rec, pooled in [(engine(x), None), (engine(x, layers=[2, 3]), None), (engine(x, spatial=True), "tokens")]:
        attn = rec.attn.double().sum(2) if pooled else rec.attn.double()
        expected = torch.einsum("blhd,dc->blhc", attn, classifier.double())
        logits = rec.head_logits(classifier.numpy())  # a NumPy classifier too
        assert logits.shape == (3, len(rec.layers), 4, 5)
        torch.testing.assert_close(logits.double(), expected, atol=1e-6, rtol=0)
        # every head's share, plus the rest and the MLPs, is the whole logit
        rest = rec.mlp.sum(1) + (rec.attn_rest if rec.attn_rest is not None else 0)
        torch.testing.assert_close(logits.sum((1, 2)) + rest @ classifier, rec.total() @ classifier, atol=1e-5,
                                   rtol=0)
    with pytest.raises(InputError, match=r"classifier of shape \[16, 5\]"):
        engine(x).head_logits(torch.ones(16, 5))
    with pytest.raises(InputError, match="no head axis"):
        engine(x, spatial="sum").head_logits(classifier)



def test_head_logits_and_top_heads_of_a_float64_record(tiny):
    """A float64 engine's record keeps float64 through head_logits (the classifier follows the record's dtype)."""
    model, x, _ = tiny
    with pytest.warns(UserWarning, match="float64 copy"):  # the float32 tower is copied, 8 bytes a value
        engine = Decomposer(model, "cpu", dtype=torch.float64)
    rec = engine(x.double())
    classifier = torch.randn(32, 5, generator=torch.Generator().manual_seed(2))
    logits = rec.head_logits(classifier)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, torch.einsum("blhd,dc->blhc", rec.attn, classifier.double()), atol=1e-12,
                               rtol=0)
    top = rec.top_heads(classifier[:, 0], k=3)
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True) and len(top) == 3

def _hand_built(attn: torch.Tensor, layers: tuple) -> Decomposition:
    b, _, H, d = attn.shape
    zeros = torch.zeros(b, d)
    return Decomposition(attn=attn, mlp=torch.zeros(b, 1, d), cls_attn=torch.zeros(b, 0, d), attn_rest=None,
                         representation=zeros, norm=torch.ones(b), layers=layers, num_layers=8, num_heads=H,
                         spatial=False, ln_post_mean=torch.zeros(b), ln_post_std=torch.ones(b))


def test_top_heads_on_a_hand_built_case():
    attn = torch.zeros(2, 2, 3, 4)  # 2 images, kept layers 3 and 7, 3 heads, d = 4
    attn[0, 1, 2, 0], attn[0, 0, 1, 0], attn[0, 0, 0, 0] = 5.0, 3.0, -2.0
    attn[1, 0, 0, 0], attn[1, 1, 2, 0] = 4.0, 1.0
    attn[:, :, :, 1] = 100.0  # another direction: no part in the scores
    rec = _hand_built(attn, (3, 7))
    text = np.array([2.0, 0, 0, 0], np.float32)
    assert rec.top_heads(text, k=2, image=0) == [("L7.H2", 7, 2, 10.0), ("L3.H1", 3, 1, 6.0)]
    assert rec.top_heads(text, k=2, image=1) == [("L3.H0", 3, 0, 8.0), ("L7.H2", 7, 2, 2.0)]
    top = rec.top_heads(text, k=3)  # the mean over the images
    assert [(h.label, h.layer, h.head, h.score) for h in top] == [("L7.H2", 7, 2, 6.0), ("L3.H1", 3, 1, 3.0),
                                                                 ("L3.H0", 3, 0, 2.0)]
    assert len(rec.top_heads(text, k=100)) == 6
    with pytest.raises(InputError, match=r"text of shape \[4, 1\]"):
        rec.top_heads(text[:, None])


def test_top_heads_of_a_real_text_are_the_largest_logits(tiny):
    _, x, engine = tiny
    rec = engine(x[:1])
    text = F.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    scores = torch.einsum("lhd,d->lh", rec.attn[0].double(), text.double()).flatten()
    order = scores.argsort(descending=True)[:5].tolist()
    top = rec.top_heads(text, k=5)
    assert [h.label for h in top] == [rec.labels[i] for i in order]
    assert [(h.layer, h.head) for h in top] == [divmod(i, 4) for i in order]
    np.testing.assert_allclose([h.score for h in top], scores[order].numpy(), atol=1e-6)


def test_numpy_and_the_record_is_frozen(tiny):
    _, x, engine = tiny
    rec = engine(x, layers=[3])
    arrays = rec.numpy()
    assert list(arrays) == ["attn", "mlp", "cls_attn", "attn_rest", "representation", "norm"]
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays.values())
    np.testing.assert_array_equal(arrays["attn"], rec.attn.numpy())
    assert list(rec.numpy("mlp")) == ["mlp"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.attn = None


def test_each_call_is_a_new_record(tiny):
    model, x, engine = tiny
    first = engine(x)
    kept = first.attn.clone()
    second = engine(_images(model, seed=5))
    assert second is not first and second.attn.data_ptr() != first.attn.data_ptr()
    assert torch.equal(first.attn, kept)  # the later call leaves the earlier record as it was
    assert not torch.allclose(first.attn, second.attn)
    assert isinstance(engine.tower, ViTTower) and engine.visual is model.visual


def test_unsupported_towers_are_refused_by_the_engine():
    import open_clip

    with pytest.raises(UnsupportedModelError, match="ResNet"):
        Decomposer(open_clip.create_model("tiny-resnet", pretrained=None), model_name="tiny-resnet")


# ----------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_adapter_outputs_equal_decompose(mode):
    model, _ = tiny_model("prsclip-tiny-quickgelu", seed=4)
    x = _images(model, n=2)
    extras = dict(attention_maps=True, ln_stats=True)
    rec = decompose(model, x, post_activations=[1, 2], **extras, **mode)
    prs = hook_prs_logger(model, "cpu", post_gelu_layers=[1, 2], **extras, **mode)
    prs.reinit()
    r = prs.encode_image(x)
    attn, mlps = prs.finalize(r)
    pairs = [(r, rec.representation), (attn, rec.attn), (mlps, rec.mlp), (prs.cls_attentions, rec.cls_attn),
             (prs.attention_maps, rec.attention_maps), (prs.ln_1_mean, rec.ln_1_mean), (prs.ln_1_std, rec.ln_1_std),
             (prs.post_ln_mean, rec.ln_post_mean), (prs.post_ln_std, rec.ln_post_std)]
    pairs += [(prs.post_gelu[l], rec.post_activations[l]) for l in (1, 2)]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs)
    assert (prs.attn_rest is None) == (rec.attn_rest is None)
    if rec.attn_rest is not None:
        assert torch.equal(prs.attn_rest, rec.attn_rest)
    assert sorted(prs.post_gelu) == [1, 2] and prs.num_layers == 4 and prs.out_dim == 32


# ----------------------------------------------------------------------------- a dataset to files
def test_decompose_dataset_writes_the_records_of_its_images(tmp_path, golden_model):
    model, preprocess = golden_model
    ds = SampleImages(preprocess)
    sub = Subset(ds, [1, 3, 4])
    sub.labels = ds.labels[[1, 3, 4]]
    paths = {k: tmp_path / f"mine_{k}.npy" for k in ("attn", "mlp", "cls_attn", "attn_rest", "labels")}
    written = decompose_dataset(model, sub, paths, record={"model": "prsclip-tiny"}, device="cpu", layers=[0, 3],
                                batch_size=2)
    assert written == {k: paths[k] for k in ("labels", "attn", "mlp", "cls_attn", "attn_rest")}
    images = torch.stack([sub[i][0] for i in range(3)])
    rec = Decomposer(model, "cpu")(images, layers=[0, 3])
    for k in ("attn", "mlp", "cls_attn", "attn_rest"):
        np.testing.assert_allclose(np.load(paths[k]), getattr(rec, k).numpy(), atol=1e-6, rtol=0, err_msg=k)
    np.testing.assert_array_equal(np.load(paths["labels"]), [1, 3, 4])
    # every layer listed: the full files, no rest
    full = {k: tmp_path / f"all_{k}.npy" for k in ("attn", "mlp", "cls_attn", "labels")}
    assert "attn_rest" not in decompose_dataset(model, sub, full, record={}, layers=[0, 1, 2, 3], batch_size=3)
    assert np.load(full["attn"]).shape == (3, 4, 4, 32)
    with pytest.raises(InputError, match="no output path for attn_rest"):
        decompose_dataset(model, sub, full, record={}, layers=[1])


def test_the_worked_example_of_docs_api_runs(monkeypatch, capsys):
    from conftest import REPO

    doc = (REPO / "docs" / "api.md").read_text()
    code = doc.split("## A worked example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/api.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("L") and ".H" in line for line in lines[:3])
