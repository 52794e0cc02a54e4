"""Semantic adversarial images from neurons' sparse text decompositions (paper 2's application).

The attack pushes CLIP's image embedding of a true class ``class_1`` toward a wrong class ``class_0``. Each stage
is a function, run in order by ``generate_adversarial_images.py``:

1. ``class_direction``  Δ = t(class_0) - t(class_1) [d], t = normalised CLIP text embedding of the raw name.
2. ``load_layer_pcs`` + ``top_neurons``  the neurons' first PCs r_n of the listed layers, concatenated [N, d];
   s_n = <r_n, Δ>; the neurons with the largest |s_n|.
3. ``load_decompositions`` + ``weighted_words`` + ``filter_words`` + ``top_words``  each chosen neuron's sparse
   decomposition texts, weighted (OMP coefficient x s_n); texts too close to class_0 (sentence-embedding cosine),
   class_0 itself and its block list dropped; the highest-weighted distinct texts kept.
4. ``build_request`` + ``generate_reply`` + ``select_descriptions``  a chat LLM writes numbered image descriptions
   that use those words and mention class_1 but not class_0.
5. ``load_image_generator``  FLUX.1-schnell or DeepFloyd IF (I-XL, then II-L) renders each description.
6. ``score_images``  score = encode_image(image) . Δ (unnormalised image embedding, as the original); > 0 is a
   success: the image is closer to class_0 than to class_1.

The heavy libraries (transformers, diffusers, sentence-transformers, accelerate) are the optional extra
``adversarial`` and are imported inside the functions that need them; ``require_extra`` checks them up front.
"""
from __future__ import annotations

import gc
import importlib
import json
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from utils import DATA_DIR, LOG
from utils.errors import InputError
from utils.files import readers
from utils.files.atomic import atomic_write
from utils.files.names import sparse_decomposition_stem
from utils.files.readers import LayerSpan
from utils.neurons.explore import read_decomposition
from utils.text.embeddings import encode_texts

EXTRA_INSTALL = 'pip install -e ".[adversarial]"'
EXTRA_MODULES = ("transformers", "diffusers", "sentence_transformers", "accelerate")
BLOCK_WORDS_FILE = DATA_DIR / "adversarial_block_words.json"

DEFAULT_LLM = "meta-llama/Meta-Llama-3-8B-Instruct"
DEFAULT_SIMILARITY_MODEL = "sentence-transformers/all-distilroberta-v1"
DEFAULT_FLUX = "black-forest-labs/FLUX.1-schnell"
DEFAULT_IF_STAGE_1 = "DeepFloyd/IF-I-XL-v1.0"
DEFAULT_IF_STAGE_2 = "DeepFloyd/IF-II-L-v1.0"
IMAGE_MODELS = ("FLUX", "DeepFloyd")
NUM_DESCRIPTIONS = 50  # descriptions asked of the LLM
# the original's FLUX settings
FLUX_SETTINGS = dict(num_inference_steps=4, height=256, width=256, guidance_scale=4.0, max_sequence_length=256)
# the original's sampling settings for the LLM
LLM_SAMPLING = dict(do_sample=True, temperature=0.6, top_p=0.9)


def require_extra(modules: Sequence[str] = EXTRA_MODULES) -> None:
    """Raise ``InputError`` (one line naming the extra) unless every module of the ``adversarial`` extra imports."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise InputError(f"{name} is not installed; generate_adversarial_images.py needs the optional extra "
                             f"'adversarial': {EXTRA_INSTALL}") from e


def free_memory() -> None:
    """Collect garbage and release cached CUDA memory (after dropping the last reference to a big model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _half(device: str | torch.device, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` (bfloat16 / float16, as the original) on an accelerator; float32 on CPU, where half-precision
    kernels are slow or missing."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


def _offload(device: str | torch.device, cpu_offload: bool) -> bool:
    """CPU offload only makes sense with an accelerator to offload from."""
    return cpu_offload and torch.device(device).type != "cpu"


# ----------------------------------------------------------------------------- 1. the direction
def class_direction(model: torch.nn.Module, tokenizer: Callable, class_0: str, class_1: str,
                    device: str | torch.device) -> np.ndarray:
    """Δ = normalised text embedding of ``class_0`` minus that of ``class_1`` (raw names, no template): [d]."""
    emb = encode_texts(model, tokenizer, [class_0, class_1], device, progress=False)  # [2, d]
    return (emb[0] - emb[1]).cpu().numpy()


# ----------------------------------------------------------------------------- 2. the neurons
def load_layer_pcs(input_dir: str | Path, dataset: str, split: str, model: str, pretrained: Optional[str],
                   layers: Sequence[int], top_k: int, dim: int) -> tuple[np.ndarray, list[LayerSpan]]:
    """``utils.files.readers.load_layer_pcs``, each file checked to hold PCs of the model's dimension ``dim``."""
    pcs, spans = readers.load_layer_pcs(input_dir, dataset, split, model, pretrained, layers, top_k)
    if pcs.shape[1] != dim:
        raise InputError(f"{spans[0].pca_path}: shape {(spans[0].size, pcs.shape[1])}, expected [neurons, d={dim}] "
                         f"(the model's embedding dimension; PCs of another model?)")
    return pcs, spans


def check_layer_sizes(model: torch.nn.Module, spans: Sequence[LayerSpan]) -> None:
    """Each layer's PCA file has one row per neuron of that MLP layer of ``model`` (else ``InputError``)."""
    blocks = model.visual.transformer.resblocks
    for s in spans:
        if not 0 <= s.layer < len(blocks):
            raise InputError(f"--mlp_layers: layer {s.layer} is out of range for a {len(blocks)}-layer image tower")
        neurons = blocks[s.layer].mlp.c_proj.weight.shape[1]
        if s.size != neurons:
            raise InputError(f"{s.pca_path}: {s.size} rows but layer {s.layer} of the model has {neurons} neurons "
                             f"(PCs of another model or layer?)")


def top_neurons(pcs: np.ndarray, direction: np.ndarray, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``s = pcs @ direction`` [N] (float64) and the ``num`` neurons with the largest ``|s|``, largest first."""
    if num < 1:
        raise InputError(f"--neurons_num {num}: must be at least 1")
    scores = np.asarray(pcs, np.float64) @ np.asarray(direction, np.float64)
    order = np.argsort(-np.abs(scores), kind="stable")[:num]
    return order, scores


# ----------------------------------------------------------------------------- 3. the words
def decomposition_paths(input_dir: str | Path, dataset: str, model: str, pretrained: Optional[str],
                        spans: Sequence[LayerSpan], text_set: str, solver: str, penalty: float, components: int,
                        norm: str = "per_dimension") -> list[Path]:
    """The sparse-decomposition JSON of each layer, as compute_sparse_decomposition.py names it."""
    stems = [sparse_decomposition_stem(dataset, model, pretrained, s.layer, text_set, solver, penalty, components, norm)
             for s in spans]
    return [Path(input_dir) / f"{stem}.json" for stem in stems]


def load_decompositions(paths: Sequence[Path], spans: Sequence[LayerSpan]) -> dict[int, list[tuple[float, str]]]:
    """Global neuron index (row of the concatenated PCs) -> ``[(coefficient, text), ...]``.

    Each JSON is ``{neuron: [[text index, coefficient, text], ...]}`` for the neurons ``0..size-1`` of its layer;
    neuron ``k`` of a layer becomes ``start + k``. Every neuron must be there (compute_sparse_decomposition.py
    writes them all).
    """
    out: dict[int, list[tuple[float, str]]] = {}
    for path, span in zip(paths, spans):
        if not path.is_file():
            raise InputError(f"{path}: not found: no sparse decomposition for layer {span.layer} (write it with "
                             f"compute_sparse_decomposition.py --mlp_layer {span.layer}, or check --text_descriptions"
                             f", --neurons_texts, --solver, --transform_alpha)")
        try:
            entries = {k: [(float(c), str(t)) for _, c, t in v] for k, v in read_decomposition(path).items()}
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: not a decomposition {{neuron: [[text index, coefficient, text], ...]}} "
                             f"({type(e).__name__}: {e})") from e
        if set(entries) != set(range(span.size)):
            raise InputError(f"{path}: has {len(entries)} neurons (ids {min(entries, default=None)}.."
                             f"{max(entries, default=None)}) but layer {span.layer} has {span.size} "
                             f"({span.pca_path})")
        out.update({span.start + k: v for k, v in entries.items()})
    return out


def weighted_words(decompositions: dict[int, list[tuple[float, str]]], neurons: Sequence[int],
                   scores: np.ndarray) -> list[tuple[float, str]]:
    """``(coefficient * s_n, text)`` for every text of every neuron in ``neurons`` (texts stripped)."""
    return [(c * float(scores[n]), t.strip()) for n in neurons for c, t in decompositions[int(n)]]


def load_block_words(path: Optional[str | Path] = None) -> dict[str, list[str]]:
    """The shipped block lists (class -> words never to use for it), updated with ``path``'s when given.

    ``path`` is a JSON object of the same form; its classes replace or add to the shipped ones.
    """
    table = json.loads(BLOCK_WORDS_FILE.read_text())
    if path:
        try:
            extra = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"--block_words {path}: not valid JSON ({e})") from e
        if not isinstance(extra, dict) or not all(isinstance(v, list) and all(isinstance(w, str) for w in v)
                                                  for v in extra.values()):
            raise InputError(f"--block_words {path}: expected a JSON object {{class: [word, ...]}}")
        table.update(extra)
    return {k.lower(): [w.lower() for w in v] for k, v in table.items()}


def simple_plural(phrase: str) -> str:
    """English plural of the last word: cat -> cats, box -> boxes, puppy -> puppies, vacuum cleaner -> ...s."""
    if re.search(r"(s|x|z|ch|sh)$", phrase):
        return phrase + "es"
    if re.search(r"[^aeiou]y$", phrase):
        return phrase[:-1] + "ies"
    return phrase + "s"


def blocked_words(class_0: str, table: dict[str, list[str]], warn: Callable[[str], None] = LOG.warning) -> set[str]:
    """Lower-case words never to use for ``class_0``: the class, and its block list.

    A class without a list gets only its name and ``simple_plural`` of it, and a warning.
    """
    key = class_0.strip().lower()
    if key in table:
        return {key, *table[key]}
    warn(f"--class_0 '{class_0}' has no block list (known: {', '.join(sorted(table))}); blocking only "
         f"'{key}' and '{simple_plural(key)}'; pass --block_words FILE to block its synonyms too")
    return {key, simple_plural(key)}


def load_similarity(model_id: str, device: str | torch.device) -> Callable[[Sequence[str], str], np.ndarray]:
    """A sentence-transformers model as ``similarity(texts, reference) -> cosine [len(texts)]``."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model_id, device=str(device))

    def similarity(texts: Sequence[str], reference: str) -> np.ndarray:
        emb = encoder.encode([reference, *texts], convert_to_numpy=True, normalize_embeddings=True,
                             show_progress_bar=False)
        return np.asarray(emb[1:], np.float64) @ np.asarray(emb[0], np.float64)

    return similarity


def filter_words(candidates: Sequence[tuple[float, str]], class_0: str, blocked: set[str],
                 similarity: Callable[[Sequence[str], str], np.ndarray], threshold: float
                 ) -> tuple[list[tuple[float, str]], list[dict]]:
    """Drop candidates that are ``class_0``, on the block list, or whose cosine to ``class_0`` is ``>= threshold``.

    Returns ``(kept, removed)``: ``kept`` = the surviving ``(weight, text)``; ``removed`` = one record per
    distinct dropped text, ``{"word", "reason"}``. Block-list matching ignores case.
    """
    texts = sorted({t for _, t in candidates})
    cos = dict(zip(texts, similarity(texts, class_0))) if texts else {}
    reasons = {}
    for t in texts:
        if t.lower() == class_0.strip().lower():
            reasons[t] = "class_0"
        elif t.lower() in blocked:
            reasons[t] = "block list"
        elif cos[t] >= threshold:
            reasons[t] = f"cosine {cos[t]:.3f} to '{class_0}'"
    kept = [(w, t) for w, t in candidates if t not in reasons]
    return kept, [{"word": t, "reason": r} for t, r in reasons.items()]


def top_words(kept: Sequence[tuple[float, str]], num: int) -> list[tuple[str, float]]:
    """The ``num`` highest-weighted distinct texts, ``[(text, weight), ...]``, highest first (a text's weight
    is its largest; ties go to the later text in sort order, as the original's sort of (weight, text) pairs)."""
    out, seen = [], set()
    for w, t in sorted(kept, reverse=True):
        if t not in seen:
            seen.add(t)
            out.append((t, w))
            if len(out) == num:
                break
    return out


# ----------------------------------------------------------------------------- 4. the descriptions
SYSTEM_MESSAGE = "You are an assistant that follows instructions carefully and exactly."

REQUEST = """I am writing prompts for a text-to-image model and need your help.
Write {count} different image descriptions, numbered 1 to {count}, one per line.
Rules:
- Every description must contain the word "{yes}".
- No description may contain the word "{no}", its plural, or any synonym of it.
- Build each description almost only from words of this list, using as many of them as you can:
{words}
- Put as many of the listed objects and animals into each description as possible.
- Use names of people or places from the list only if they are famous and look distinctive. Describe a place or
  a person by what can be seen: rather than "in London", write "with Big Ben behind" or "beside a sign reading
  'London'".
- Leave out words that look like "{no}" even when they are in the list. For example, if the word were "car", you
  would not write "cars", "sedan" or "vehicle".
- Use only words whose meaning you know.
"""


def build_request(words: Sequence[str], class_1: str, class_0: str,
                  count: int = NUM_DESCRIPTIONS) -> list[dict[str, str]]:
    """The chat messages asking for ``count`` numbered descriptions (the words listed sorted, as the original)."""
    listed = "[" + ", ".join(sorted(set(words))) + "]"
    user = REQUEST.format(count=count, yes=class_1, no=class_0, words=listed)
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": user}]


NUMBERED = re.compile(r"^\s*(?:\*\*)?\d+\s*[.):]?(?:\*\*)?\s+(.*\S)\s*$")


def parse_descriptions(reply: str) -> list[str]:
    """The numbered lines of ``reply`` (``1. text``, ``2) text``, ``**3.** text``), number and quotes removed,
    whitespace collapsed (so no tab or newline reaches files.csv)."""
    out = []
    for line in reply.splitlines():
        m = NUMBERED.match(line)
        if m:
            text = " ".join(m.group(1).split())
            if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
                text = text[1:-1].strip()
            if text:
                out.append(text)
    return out


def usable(description: str, class_0: str, class_1: str) -> bool:
    """Mentions ``class_1`` and not ``class_0`` (substrings, ignoring case, as the original)."""
    d = description.lower()
    return class_1.lower() in d and class_0.lower() not in d


def select_descriptions(reply: str, class_0: str, class_1: str, num: int) -> list[str]:
    """The first ``num`` usable numbered descriptions of ``reply``; fewer is an ``InputError``."""
    found = [d for d in parse_descriptions(reply) if usable(d, class_0, class_1)]
    if len(found) < num:
        raise InputError(f"the LLM gave {len(found)} numbered description(s) that mention '{class_1}' and not "
                         f"'{class_0}', fewer than --results_per_generation {num} (its reply is printed above); "
                         f"rerun with another --seed, --llm or fewer --results_per_generation, or pass "
                         f"--prompts_file")
    return found[:num]


def read_prompts_file(path: str | Path) -> list[str]:
    """One description per non-empty line (a leading ``1.`` is removed; whitespace collapsed)."""
    lines = [" ".join(line.split()) for line in Path(path).read_text().splitlines()]
    prompts = [m.group(1) if (m := NUMBERED.match(line)) else line for line in lines if line]
    if not prompts:
        raise InputError(f"--prompts_file {path}: no descriptions (one per line expected)")
    return prompts


def load_llm(model_id: str, device: str | torch.device, cpu_offload: bool = True):
    """``(model, tokenizer)`` of a chat LLM in bfloat16 (float32 on CPU); with offload on an accelerator,
    accelerate's ``device_map="auto"`` places what does not fit on the CPU (the original's setting)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_id)
    dtype = _half(device, torch.bfloat16)
    if _offload(device, cpu_offload):
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, device_map="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype).to(device)
    return model.eval(), tokenizer


@torch.no_grad()
def generate_reply(model, tokenizer, messages: Sequence[dict[str, str]], seed: int,
                   max_new_tokens: int = 1024) -> str:
    """Sample one chat reply (temperature 0.6, top-p 0.9, seeded); stops at EOS or Llama 3's ``<|eot_id|>``."""
    inputs = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    stop = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        stop.add(eot)
    stop.discard(None)
    torch.manual_seed(seed)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop),
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else min(stop), **LLM_SAMPLING)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)


def describe(llm: str, messages: Sequence[dict[str, str]], device: str | torch.device, seed: int,
             max_new_tokens: int = 1024, cpu_offload: bool = True) -> str:
    """Load the LLM, sample the reply, and free the LLM again (so the image model gets the memory)."""
    model, tokenizer = load_llm(llm, device, cpu_offload)
    try:
        return generate_reply(model, tokenizer, messages, seed, max_new_tokens)
    finally:
        del model, tokenizer
        free_memory()


# ----------------------------------------------------------------------------- 5. the images
Render = Callable[[str, int, int], list]  # (prompt, number of images, seed) -> [PIL.Image]


def load_image_generator(kind: str, device: str | torch.device, cpu_offload: bool = True,
                         flux_model: str = DEFAULT_FLUX, if_stage_1: str = DEFAULT_IF_STAGE_1,
                         if_stage_2: str = DEFAULT_IF_STAGE_2) -> Render:
    """``render(prompt, n, seed) -> n PIL images`` for ``kind`` ``FLUX`` or ``DeepFloyd``.

    FLUX: FLUX.1-schnell in bfloat16, 4 steps, 256x256, guidance 4, max_sequence_length 256.
    DeepFloyd: IF-I-XL (64x64) then IF-II-L (256x256), float16 weights (the ``fp16`` variant), default steps.
    Half precision on an accelerator, float32 on CPU. ``cpu_offload`` moves each component to the accelerator
    only while it runs (``enable_model_cpu_offload``). One CPU generator per call, seeded with ``seed``.
    """
    from diffusers import DiffusionPipeline, FluxPipeline

    offload = _offload(device, cpu_offload)

    def place(pipe):
        if offload:
            pipe.enable_model_cpu_offload(device=torch.device(device))
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    if kind == "FLUX":
        pipe = place(FluxPipeline.from_pretrained(flux_model, dtype=_half(device, torch.bfloat16)))

        def render(prompt: str, n: int, seed: int) -> list:
            generator = torch.Generator("cpu").manual_seed(seed)
            return pipe(prompt=prompt, num_images_per_prompt=n, generator=generator, output_type="pil",
                        **FLUX_SETTINGS).images

        return render
    if kind != "DeepFloyd":
        raise InputError(f"--image_model {kind}: must be one of {', '.join(IMAGE_MODELS)}")
    dtype = _half(device, torch.float16)
    stage_1 = place(DiffusionPipeline.from_pretrained(if_stage_1, variant="fp16", dtype=dtype))
    stage_2 = place(DiffusionPipeline.from_pretrained(if_stage_2, text_encoder=None, variant="fp16", dtype=dtype))

    def render(prompt: str, n: int, seed: int) -> list:
        generator = torch.Generator("cpu").manual_seed(seed)
        embeds, negative = stage_1.encode_prompt(prompt, num_images_per_prompt=n)
        small = stage_1(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator,
                        output_type="pt").images  # [n, 3, 64, 64] in [-1, 1]
        images = stage_2(image=small, prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator,
                         output_type="pt", guidance_scale=4.0).images  # [n, 3, 256, 256] in [-1, 1]
        return signed_to_pil(images)

    return render


def signed_to_pil(images: torch.Tensor) -> list:
    """``[n, 3, h, w]`` in [-1, 1] -> n RGB PIL images (what IF's own ``pil`` output does, without its safety
    checker and watermark)."""
    from PIL import Image

    x = ((images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in x]


def save_png(image, path: str | Path) -> None:
    """Write one PIL image as PNG via ``utils.files.atomic.atomic_write`` (never a half-written file)."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


# ----------------------------------------------------------------------------- 6. scoring
@torch.no_grad()
def score_images(model: torch.nn.Module, preprocess: Callable, paths: Sequence[str | Path], direction: np.ndarray,
                 device: str | torch.device, batch_size: int = 32) -> np.ndarray:
    """``encode_image(preprocess(image)) . Δ`` per image file [n] (the image embedding is not normalised)."""
    from PIL import Image

    delta = torch.from_numpy(np.asarray(direction, np.float32)).to(device)
    out = []
    for i in range(0, len(paths), batch_size):
        batch = []
        for p in paths[i:i + batch_size]:
            with Image.open(p) as im:
                batch.append(preprocess(im))
        out.append((model.encode_image(torch.stack(batch).to(device)).float() @ delta).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- outputs and resuming
class Job(NamedTuple):
    """One prompt rendered ``len(files)`` times with one generator seed."""
    prompt: str
    seed: int
    files: list[str]


def image_name(counter: int, prefix: str = "") -> str:
    """``{counter:03}.png`` (the original's names); baseline images get ``prefix`` ``baseline_``."""
    return f"{prefix}{counter:03}.png"


def make_jobs(prompts: Sequence[str], seed: int, per_prompt: int, prefix: str = "") -> list[Job]:
    """Prompt i -> images ``i * per_prompt + x`` (x < per_prompt), generator seed ``seed + i``."""
    return [Job(p, seed + i, [image_name(i * per_prompt + x, prefix) for x in range(per_prompt)])
            for i, p in enumerate(prompts)]


def score_jobs(model: torch.nn.Module, preprocess: Callable, jobs: Sequence[Job], folder: Path,
               direction: np.ndarray, device: str | torch.device) -> list[tuple[str, str, float]]:
    """``(file, prompt, score)`` for every image of ``jobs`` in ``folder`` (see ``score_images``)."""
    files = [(f, j.prompt) for j in jobs for f in j.files]
    scores = score_images(model, preprocess, [folder / f for f, _ in files], direction, device)
    return [(f, p, float(s)) for (f, p), s in zip(files, scores)]


def files_csv(rows: Sequence[tuple[str, str, float]], class_0: str, class_1: str) -> str:
    """The original's files.csv: tab-separated ``file, prompt, class_0, class_1, score`` lines, no header."""
    return "".join(f"{name}\t{prompt}\t{class_0}\t{class_1}\t{str(np.float32(score))}\n"  # str: float32 digits
                   for name, prompt, score in rows)


def success_rates(scores: Sequence[float], per_prompt: int) -> tuple[list[float], float]:
    """Fraction of scores > 0 per prompt (consecutive groups of ``per_prompt``) and overall."""
    s = np.asarray(scores, np.float64).reshape(-1, per_prompt) > 0
    return [float(v) for v in s.mean(1)], float(s.mean())


def read_saved_prompts(path: Path, settings: dict) -> Optional[list[str]]:
    """The descriptions an earlier run saved in ``path`` (prompts.json), if its settings equal ``settings``.

    ``None`` when there is no such file; an ``InputError`` naming the first differing setting otherwise.
    """
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        saved_settings, prompts = saved["settings"], list(saved["prompts"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to start over") from e
    for key, value in settings.items():
        if saved_settings.get(key) != value:
            raise InputError(f"--dataset_path {path.parent} holds a run with {key}={saved_settings.get(key)!r} but "
                             f"this command has {value!r}; use another --dataset_path (or delete {path} and the "
                             f"images)")
    return prompts


def build_summary(class_0: str, class_1: str, spans: Sequence[LayerSpan], neurons: Sequence[int],
                  scores: np.ndarray, words: Sequence[tuple[str, float]], removed: Sequence[dict],
                  prompts: Sequence[str], rows: Sequence[tuple[str, str, float]], per_prompt: int,
                  baseline_rows: Sequence[tuple[str, str, float]] = ()) -> dict:
    """summary.json: neurons (layer, index, score), words with weights, prompts, image scores, success rates;
    with baseline rows also their rates and the attack's lift (success rate minus the baseline's)."""
    def layer_of(k: int) -> LayerSpan:
        return next(s for s in spans if s.start <= k < s.start + s.size)

    per, rate = success_rates([s for *_, s in rows], per_prompt)
    summary = {
        "class_0": class_0, "class_1": class_1,
        "neurons": [{"neuron": int(k), "layer": layer_of(k).layer, "index": int(k) - layer_of(k).start,
                     "score": float(scores[k])} for k in neurons],
        "words": [{"word": w, "weight": float(v)} for w, v in words], "removed_words": list(removed),
        "prompts": list(prompts),
        "images": [{"file": f, "prompt": p, "score": s, "success": s > 0} for f, p, s in rows],
        "success_rate_per_prompt": per, "success_rate": rate, "mean_score": float(np.mean([s for *_, s in rows])),
    }
    if baseline_rows:
        _, base_rate = success_rates([s for *_, s in baseline_rows], per_prompt)
        summary["baseline"] = {"prompt": baseline_rows[0][1], "success_rate": base_rate,
                               "mean_score": float(np.mean([s for *_, s in baseline_rows])),
                               "images": [{"file": f, "score": s, "success": s > 0} for f, _, s in baseline_rows]}
        summary["lift"] = rate - base_rate
    return summary
