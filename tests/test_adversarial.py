"""generate_adversarial_images.py and utils/neurons/adversarial.py on tiny models built here (offline, CPU).

The LLM, FLUX and IF pipelines and the sentence-transformers model are random-init tiny models assembled from
configs, with tokenizers built by the ``tokenizers`` library, saved to temporary folders and passed to the script
by path, so the real loading and generation code runs. Two of them are wired by hand so their output is known:

* the LLM embeds token i as the i-th unit vector, its attention and MLP write nothing, and its output head maps
  each token to a fixed next one: sampling then spells out a fixed reply, one whole line per token;
* the sentence model's layers write nothing, so a word's embedding is its (layer-normalised) token vector:
  "hound" gets the vector of "dog" (cosine 1), every other word an orthogonal one (cosine 0).

CLIP is the golden tiny model; the PCs and decompositions are hand-made so that the chosen neurons and words are
known in advance.
"""
from __future__ import annotations

import gc
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("accelerate")

from conftest import GOLDEN_WEIGHTS, TINY_ARGS, run_inprocess  # noqa: E402

from utils.neurons import adversarial as adv  # noqa: E402

SCRIPT = "generate_adversarial_images.py"
PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar (transformers shows one while loading weights)
CLASS_0, CLASS_1 = "dog", "cat"
LAYERS, NEURONS, D = (1, 2), 256, 32  # prsclip-tiny: 4 layers of 256 neurons, embedding dimension 32
# the chosen neurons: (layer, neuron in layer) -> multiple of Δ in its PC, and its decomposition
CHOSEN = {(1, 5): 3.0, (2, 7): -2.0, (1, 9): 1.0}
DECOMPOSITION = {
    (1, 5): [(0, 0.5, "ball"), (1, 0.4, "dog"), (2, 0.3, "hound"), (3, -0.2, "leash"), (4, 0.1, "puppy")],
    (2, 7): [(5, -0.6, "grass"), (6, 0.9, "sofa"), (0, -0.1, "ball")],
    (1, 9): [(7, 0.45, "garden "), (8, 0.05, "Puppy")],
}
# weights in units of |Δ|: ball 1.5 and 0.2, grass 1.2, garden 0.45, leash -0.6, sofa -1.8; dog is class_0,
# hound is too similar to dog, puppy / Puppy are on dog's block list
EXPECTED_WORDS = [("ball", 1.5), ("grass", 1.2), ("garden", 0.45), ("leash", -0.6)]  # --overall_words 4
REPLY_LINES = ["Here are the descriptions:\n", "1. A cat chasing a red ball on the grass\n",
               "2. A cat asleep on a sofa beside a dog\n", "3) A cat with a leash in a garden\n",
               "Hope these cats help!\n"]
USABLE = ["A cat chasing a red ball on the grass", "A cat with a leash in a garden"]


# ----------------------------------------------------------------------------- tiny models
def word_tokenizer(words, specials=("<pad>", "<unk>", "</s>"), max_length=77, split_lines=False, **tokens):
    """A transformers fast tokenizer over a fixed word list, built offline with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(specials) + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    if split_lines:  # one token per line (newline included), decoded by plain concatenation
        tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="merged_with_previous")
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[1], pad_token=specials[0],
                                   model_max_length=max_length, **tokens), vocab


def build_llm(path: Path, reply_lines) -> None:
    """A 1-layer Llama whose sampled reply is ``reply_lines`` (see the module docstring), with a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    specials = ("<pad>", "<unk>", "<|begin|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>")
    tokenizer, vocab = word_tokenizer(reply_lines, specials, max_length=4096, split_lines=True,
                                      bos_token="<|begin|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(path)
    V = len(vocab) + len(vocab) % 2
    config = LlamaConfig(vocab_size=V, hidden_size=V, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=vocab["<|begin|>"], eos_token_id=vocab["<|eot_id|>"],
                         pad_token_id=vocab["<pad>"])
    model = LlamaForCausalLM(config)
    chain = [vocab["<|assistant|>"]] + [vocab[line] for line in reply_lines] + [vocab["<|eot_id|>"]]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        for a, b in zip(chain[:-1], chain[1:]):
            model.lm_head.weight[b, a] = 40.0  # logit gap 40 * sqrt(V) / temperature: sampling is deterministic
    model.save_pretrained(path)


def build_flux(path: Path) -> None:
    """A tiny FluxPipeline (1+1 transformer blocks, 4-level VAE, CLIP and T5 text encoders) saved to ``path``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    words = "a of photo cat red ball on the grass with leash in garden".split()
    tok, vocab = word_tokenizer(words, max_length=77, eos_token="</s>")
    tok_2, _ = word_tokenizer(words, max_length=512, eos_token="</s>")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4], guidance_embeds=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4] * 4, layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                 text_encoder_2=t5, tokenizer_2=tok_2, transformer=transformer).save_pretrained(path)


def build_deepfloyd(path_1: Path, path_2: Path) -> None:
    """Tiny DeepFloyd IF stage I (8x8) and stage II (16x16) pipelines, saved as the ``fp16`` variant."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    tok, vocab = word_tokenizer("a photo of cat".split(), eos_token="</s>")
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=2))

    def unet(superres: bool) -> UNet2DConditionModel:
        extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                     time_embedding_dim=32) if superres else {}
        return UNet2DConditionModel(
            sample_size=16 if superres else 8, layers_per_block=1, block_out_channels=[32, 64],
            down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"], in_channels=6 if superres else 3,
            out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
            addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
            resnet_time_scale_shift="scale_shift", act_fn="gelu", **extra)

    def scheduler() -> DDPMScheduler:
        return DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, dynamic_thresholding_ratio=0.95,
                             sample_max_value=1.0, variance_type="learned_range")

    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    IFPipeline(tokenizer=tok, text_encoder=t5, unet=unet(False), scheduler=scheduler(), **none).save_pretrained(
        path_1, variant="fp16")
    IFSuperResolutionPipeline(tokenizer=tok, text_encoder=t5, unet=unet(True), scheduler=scheduler(),
                              image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                              **none).save_pretrained(path_2, variant="fp16")


def build_sentence_model(path: Path) -> None:
    """A 1-layer BERT + mean pooling sentence-transformers model with hand-set word vectors (see the docstring)."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer

    words = ["dog", "hound", "ball", "grass", "sofa", "leash", "puppy", "garden", "zebra", "cat"]
    tok, vocab = word_tokenizer(words, specials=("[PAD]", "[UNK]"), max_length=16)
    H = 2 * len(vocab)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=8, max_position_embeddings=16, type_vocab_size=1))
    vectors = torch.zeros(len(vocab), H)
    for i in range(len(vocab)):  # zero-mean and mutually orthogonal: layer norm keeps them orthogonal
        vectors[i, i], vectors[i, len(vocab) + i] = 1.0, -1.0
    vectors[vocab["hound"]] = vectors[vocab["dog"]]
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight.copy_(vectors)
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
        for layer in bert.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
    base = path.parent / (path.name + "_base")
    bert.save_pretrained(base)
    tok.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=16)
    SentenceTransformer(modules=[transformer, Pooling(H, "mean")]).save(str(path))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP barriers, which stall for seconds on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Paths of the tiny LLMs, FLUX pipeline and sentence model (built once for this module)."""
    root = tmp_path_factory.mktemp("adversarial_models")
    paths = {"llm": root / "llm", "flux": root / "flux", "similarity": root / "similarity"}
    build_llm(paths["llm"], REPLY_LINES)
    build_flux(paths["flux"])
    build_sentence_model(paths["similarity"])
    return paths


@pytest.fixture(scope="module")
def direction() -> np.ndarray:
    """Δ of the golden tiny CLIP for dog vs cat, computed here with open_clip directly."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms("prsclip-tiny", pretrained=str(GOLDEN_WEIGHTS))
    tokenizer = open_clip.get_tokenizer("prsclip-tiny")
    with torch.no_grad():
        emb = model.eval().encode_text(tokenizer([CLASS_0, CLASS_1]), normalize=True).numpy()
    return emb[0] - emb[1]


def make_inputs(folder: Path, direction: np.ndarray, layers=LAYERS, neurons=NEURONS) -> Path:
    """Hand-made PCA files and decomposition JSONs (the original's names, written out here) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    unit = direction / np.linalg.norm(direction)
    for layer in layers:
        noise = rng.normal(size=(neurons, D))
        noise -= np.outer(noise @ unit, unit)  # orthogonal to Δ: no effect on the scores
        multiple = rng.uniform(-0.1, 0.1, size=neurons)
        for (l, k), c in CHOSEN.items():
            if l == layer:
                multiple[k] = c
        pcs = (multiple[:, None] * direction[None] + 0.5 * noise).astype(np.float32)
        np.save(folder / f"imagenet_train_mlps_prsclip-tiny_prsclip-tiny_seed0_{layer}_100_pca.npy", pcs)
        table = {str(k): DECOMPOSITION.get((layer, k), [(100 + k, 0.3, f"other{k}")]) for k in range(neurons)}
        name = f"imagenet_mlps_prsclip-tiny_prsclip-tiny_seed0_{layer}_30k_decomposition_omp_1.0_128.json"
        (folder / name).write_text(json.dumps(table))
    return folder


def script_args(inputs: Path, out: Path, tiny: dict, *extra: str) -> list[str]:
    return [*TINY_ARGS, "--input_dir", str(inputs), "--dataset_path", str(out), "--class_0", CLASS_0,
            "--class_1", CLASS_1, "--mlp_layers", *map(str, LAYERS), "--neurons_num", "3", "--overall_words", "4",
            "--similarity_model", str(tiny["similarity"]), "--llm", str(tiny["llm"]),
            "--flux_model", str(tiny["flux"]), "--results_per_generation", "2", "--batch_size", "2", *extra]


def one_error_line(err: str) -> str:
    """The one line of stderr that is not a library's progress bar: the error."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{SCRIPT}: error: ")
    return lines[0]


# ----------------------------------------------------------------------------- stages 1-3 on hand-made inputs
def stub_similarity(texts, reference):
    """Cosine 0.9 for 'hound', 0.59 for 'grass' (just under 0.6), 0 otherwise."""
    return np.array([{"hound": 0.9, "grass": 0.59}.get(t, 0.0) for t in texts])


def test_stages_1_to_3_exact_words(tmp_path):
    direction = np.zeros(D, np.float32)
    direction[:2] = [0.6, -0.8]  # |Δ| = 1
    make_inputs(tmp_path, direction)
    pcs, spans = adv.load_layer_pcs(tmp_path, "imagenet", "train", "prsclip-tiny", str(GOLDEN_WEIGHTS), LAYERS, 100, D)
    assert [(s.layer, s.start, s.size) for s in spans] == [(1, 0, 256), (2, 256, 256)]
    neurons, scores = adv.top_neurons(pcs, direction, 3)
    assert neurons.tolist() == [5, 256 + 7, 9]
    np.testing.assert_allclose(scores[[5, 263, 9]], [3.0, -2.0, 1.0], rtol=1e-6)
    paths = adv.decomposition_paths(tmp_path, "imagenet", "prsclip-tiny", str(GOLDEN_WEIGHTS), spans, "30k", "omp",
                                    1.0, 128)
    words = adv.weighted_words(adv.load_decompositions(paths, spans), neurons, scores)
    kept, removed = adv.filter_words(words, CLASS_0, adv.blocked_words(CLASS_0, adv.load_block_words()),
                                     stub_similarity, 0.6)
    assert {r["word"]: r["reason"].split()[0] for r in removed} == {
        "dog": "class_0", "hound": "cosine", "puppy": "block", "Puppy": "block"}
    top = adv.top_words(kept, 4)
    assert [w for w, _ in top] == [w for w, _ in EXPECTED_WORDS]
    np.testing.assert_allclose([v for _, v in top], [v for _, v in EXPECTED_WORDS], rtol=1e-6)
    assert [w for w, _ in adv.top_words(kept, 10)] == ["ball", "grass", "garden", "leash", "sofa"]


def test_block_words_and_plural(tmp_path):
    table = adv.load_block_words()
    assert len(table) == 16 and table["vacuum cleaner"] == ["vacuum", "vacuum cleaner", "vacuums"]
    assert adv.blocked_words("Dog", table) == {"dog", "puppies", "pug", "puppy"}
    warnings = []
    assert adv.blocked_words("fox", table, warnings.append) == {"fox", "foxes"}
    assert len(warnings) == 1 and "'fox' has no block list" in warnings[0]
    assert [adv.simple_plural(w) for w in ("cat", "bus", "puppy", "day", "stop sign")] == \
        ["cats", "buses", "puppies", "days", "stop signs"]
    extra = tmp_path / "block.json"
    extra.write_text(json.dumps({"fox": ["Vixen"]}))
    assert adv.blocked_words("fox", adv.load_block_words(extra), warnings.append) == {"fox", "vixen"}
    extra.write_text(json.dumps({"fox": "vixen"}))
    with pytest.raises(adv.InputError, match="--block_words"):
        adv.load_block_words(extra)


# ----------------------------------------------------------------------------- stage 4: the LLM's reply
def test_parse_descriptions():
    reply = ("Sure! Here are 50 descriptions:\n\n1. A cat on a sofa\n2) **A cat** with a\tball\n**3.** \"A cat "
             "near a dog\"\n4: a kitten\n  5. Cats in the Garden  \n10 A CAT, a leash\nThe 7 cats above are fun.\n"
             "6.\n")
    assert adv.parse_descriptions(reply) == ["A cat on a sofa", "**A cat** with a ball", "A cat near a dog",
                                             "a kitten", "Cats in the Garden", "A CAT, a leash"]
    assert adv.select_descriptions(reply, "dog", "cat", 4) == ["A cat on a sofa", "**A cat** with a ball",
                                                               "Cats in the Garden", "A CAT, a leash"]
    with pytest.raises(adv.InputError, match="gave 4 numbered description.*--results_per_generation 5"):
        adv.select_descriptions(reply, "dog", "cat", 5)


def test_request_lists_sorted_words():
    messages = adv.build_request(["sofa", "ball", "sofa"], "cat", "vacuum cleaner")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "[ball, sofa]" in user and '"cat"' in user and '"vacuum cleaner"' in user and "50" in user


def test_llm_generates_and_is_freed(tiny):
    """The real load + chat template + sampling path; the reply is the hand-wired one; nothing of it stays alive."""
    from transformers import LlamaForCausalLM

    reply = adv.describe(str(tiny["llm"]), adv.build_request(["ball"], "cat", "dog"), "cpu", seed=0)
    assert reply == "".join(REPLY_LINES)
    assert adv.select_descriptions(reply, "dog", "cat", 2) == USABLE
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is LlamaForCausalLM]


# ----------------------------------------------------------------------------- stage 5: image adapters
def test_deepfloyd_adapter(tmp_path):
    build_deepfloyd(tmp_path / "if1", tmp_path / "if2")
    render = adv.load_image_generator("DeepFloyd", "cpu", True, if_stage_1=str(tmp_path / "if1"),
                                      if_stage_2=str(tmp_path / "if2"))
    a, b = render("a photo of a cat", 2, 0), render("a photo of a cat", 2, 0)
    assert len(a) == 2 and a[0].size == (16, 16) and a[0].mode == "RGB"
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))  # seeded
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_signed_to_pil():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert np.asarray(adv.signed_to_pil(x)[0])[0, :, 0].tolist() == [0, 64, 128, 255, 255]


# ----------------------------------------------------------------------------- end to end
def clip_scores(paths, direction) -> np.ndarray:
    """image embedding . Δ with open_clip directly (independent of utils.neurons.adversarial.score_images)."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms("prsclip-tiny", pretrained=str(GOLDEN_WEIGHTS))
    with torch.no_grad():
        return np.array([float(model.eval().encode_image(preprocess(Image.open(p))[None])[0].numpy() @ direction)
                         for p in paths])


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_end_to_end_and_resume(tmp_path, tiny, direction):
    from PIL import Image

    inputs, out = make_inputs(tmp_path / "in", direction), tmp_path / "out"
    args = script_args(inputs, out, tiny, "--baseline", "1")
    code, stdout, err = run_inprocess(SCRIPT, *args)
    assert code == 0, err
    assert "LLM reply:" in stdout and "3 of 3 prompts to render" in stdout
    pngs = ["000.png", "001.png", "002.png", "003.png"]
    assert sorted(p.name for p in out.glob("*.png")) == [*pngs, "baseline_000.png", "baseline_001.png"]
    assert not list(out.glob("*.partial"))

    rows = [line.split("\t") for line in (out / "files.csv").read_text().splitlines()]
    assert [r[0] for r in rows] == pngs
    assert [r[1] for r in rows] == [USABLE[0]] * 2 + [USABLE[1]] * 2
    assert all(r[2:4] == [CLASS_0, CLASS_1] for r in rows)
    expected = clip_scores([out / p for p in pngs], direction)
    np.testing.assert_allclose([float(r[4]) for r in rows], expected, rtol=1e-4, atol=1e-5)
    assert all(r[4] == str(np.float32(r[4])) for r in rows)  # printed as the original's float32 scores

    summary = json.loads((out / "summary.json").read_text())
    assert [(w["word"], round(w["weight"] / np.linalg.norm(direction) ** 2, 5)) for w in summary["words"]] == \
        EXPECTED_WORDS
    assert [(n["layer"], n["index"]) for n in summary["neurons"]] == list(CHOSEN)
    np.testing.assert_allclose([n["score"] for n in summary["neurons"]],
                               np.array(list(CHOSEN.values())) * np.linalg.norm(direction) ** 2, rtol=1e-5)
    assert summary["prompts"] == USABLE
    assert summary["success_rate"] == np.mean(expected > 0)
    assert summary["success_rate_per_prompt"] == [np.mean(expected[:2] > 0), np.mean(expected[2:] > 0)]
    base = clip_scores([out / "baseline_000.png", out / "baseline_001.png"], direction)
    np.testing.assert_allclose([i["score"] for i in summary["baseline"]["images"]], base, rtol=1e-4, atol=1e-5)
    assert summary["lift"] == pytest.approx(np.mean(expected > 0) - np.mean(base > 0))
    assert (out / "files.csv.provenance.json").is_file() and (out / "summary.json.provenance.json").is_file()
    # FLUX images as the pipeline returns them: the original's [-1, 1] conversion of [0, 1] output never goes
    # below 127
    assert min(np.asarray(Image.open(out / p)).min() for p in pngs) < 100

    # a rerun renders nothing, calls no LLM, and rebuilds the same files.csv / summary.json
    before = snapshot(out)
    code, stdout, err = run_inprocess(SCRIPT, *args)
    assert code == 0, err
    assert "reusing the 2 descriptions" in stdout and "0 of 3 prompts to render" in stdout
    assert "LLM reply:" not in stdout
    after = snapshot(out)
    assert set(after) == set(before)
    assert all(after[f] == before[f] for f in after if f.endswith(".png"))
    assert after["files.csv"][1] == before["files.csv"][1] and after["summary.json"][1] == before["summary.json"][1]

    # a lost image is rendered again, identically (one generator seed per description)
    (out / "003.png").unlink()
    code, stdout, err = run_inprocess(SCRIPT, *args)
    assert code == 0 and "1 of 3 prompts to render" in stdout, err
    assert (out / "003.png").read_bytes() == before["003.png"][1]
    assert (out / "002.png").stat().st_mtime_ns == before["002.png"][0]

    # another run's settings in the same folder: one clear line
    code, _, err = run_inprocess(SCRIPT, *script_args(inputs, out, tiny, "--seed", "1"))
    assert code == 2 and "holds a run with seed=0" in one_error_line(err)


def test_prompts_file_and_too_few_descriptions(tmp_path, tiny, direction):
    inputs = make_inputs(tmp_path / "in", direction)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1. A cat under a red umbrella\n\nA cat in a garden\n")
    out = tmp_path / "from_file"
    code, stdout, err = run_inprocess(SCRIPT, *script_args(inputs, out, tiny, "--prompts_file", str(prompts),
                                                           "--batch_size", "1"))
    assert code == 0, err
    assert [line.split("\t")[1] for line in (out / "files.csv").read_text().splitlines()] == \
        ["A cat under a red umbrella", "A cat in a garden"]
    # the real LLM path: its reply has 2 usable descriptions, 3 are asked for
    code, stdout, err = run_inprocess(SCRIPT, *script_args(inputs, tmp_path / "few", tiny,
                                                           "--results_per_generation", "3"))
    assert code == 2
    assert "gave 2 numbered description(s)" in one_error_line(err) and REPLY_LINES[1].strip() in stdout
    assert not list((tmp_path / "few").glob("*.png"))


README_COMMAND = ('python generate_adversarial_images.py --device cuda:0 --class_0 "vacuum cleaner" --class_1 "cat" '
                  '--model ViT-B-32 --pretrained openai --dataset_path $outputdir --text_descriptions 30k '
                  '--mlp_layers 9 --neurons_num 100 --overall_words 50 --results_per_generation 1')


def test_readme_command_parses_and_dry_runs(tmp_path, tiny, direction, monkeypatch):
    import importlib

    module = importlib.import_module("generate_adversarial_images")
    argv = shlex.split(README_COMMAND.replace("$outputdir", str(tmp_path / "out")))[2:]
    args = module.get_args_parser().parse_args(argv)
    assert (args.class_0, args.class_1, args.mlp_layers, args.neurons_num, args.overall_words,
            args.results_per_generation, args.image_model, args.cpu_offload, args.cosim_similarity) == \
        ("vacuum cleaner", "cat", [9], 100, 50, 1, "FLUX", True, 0.6)
    assert module.get_args_parser().parse_args(["--input_dir", "x", "--no-cpu_offload"]).output_dir == "x"
    # the same flags on the tiny inputs (tiny model, layer 2), stopping before the LLM
    inputs = make_inputs(tmp_path / "in", direction)
    overrides = {"--device": "cpu", "--model": "prsclip-tiny", "--pretrained": str(GOLDEN_WEIGHTS), "--mlp_layers": "2"}
    tiny_argv = [x for flag, value in zip(argv[::2], argv[1::2]) for x in (flag, overrides.get(flag, value))]
    code, stdout, err = run_inprocess(SCRIPT, *tiny_argv, "--model_config", TINY_ARGS[1], "--input_dir", str(inputs),
                                      "--similarity_model", str(tiny["similarity"]), "--dry_run")
    assert code == 0, err
    assert "words: [" in stdout and "LLM request:" in stdout and 'word "vacuum cleaner"' in stdout
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input: one line, exit 2
def test_unknown_class_warns_and_blocks_its_plural(tmp_path, tiny, direction):
    inputs = make_inputs(tmp_path / "in", direction)
    args = script_args(inputs, tmp_path / "out", tiny, "--dry_run")
    args[args.index("--class_0") + 1] = "ball"
    code, stdout, err = run_inprocess(SCRIPT, *args)
    assert code == 0, err
    warning = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "'ball' has no block list" in warning[0] and "'balls'" in warning[0]
    assert "LLM request:" in stdout


@pytest.mark.parametrize("case", ["missing_json", "layer_without_pca", "pca_rows", "incomplete_json",
                                  "extra_missing"])
def test_bad_inputs(tmp_path, tiny, direction, monkeypatch, case):
    inputs = make_inputs(tmp_path / "in", direction)
    args = script_args(inputs, tmp_path / "out", tiny, "--dry_run")
    stem = "prsclip-tiny_prsclip-tiny_seed0"
    if case == "missing_json":
        (inputs / f"imagenet_mlps_{stem}_2_30k_decomposition_omp_1.0_128.json").unlink()
        expected = f"imagenet_mlps_{stem}_2_30k_decomposition_omp_1.0_128.json: not found: no sparse " \
                   f"decomposition for layer 2"
    elif case == "layer_without_pca":
        args[args.index("--mlp_layers") + 2] = "3"
        expected = "--mlp_layers 1 3: no PCA file for layer 3"
    elif case == "pca_rows":
        np.save(inputs / f"imagenet_train_mlps_{stem}_2_100_pca.npy", np.zeros((100, D), np.float32))
        expected = "100 rows but layer 2 of the model has 256 neurons"
    elif case == "incomplete_json":
        path = inputs / f"imagenet_mlps_{stem}_1_30k_decomposition_omp_1.0_128.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "200"}))
        expected = "has 255 neurons (ids 0..255) but layer 1 has 256"
    else:
        monkeypatch.setitem(sys.modules, "sentence_transformers", None)
        expected = 'needs the optional extra \'adversarial\': pip install -e ".[adversarial]"'
    code, _, err = run_inprocess(SCRIPT, *args)
    assert code == 2
    assert expected in one_error_line(err)
    if case == "layer_without_pca":
        assert "PCA files for layers [1, 2]" in err
