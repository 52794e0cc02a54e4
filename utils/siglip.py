"""SigLIP's attention-pooling head, decomposed exactly (compute_siglip.py; the original repository's last commit).

A SigLIP image tower ends with a multihead attention-pooling (MAP) head: transformers'
``SiglipMultiheadAttentionPoolingHead`` (a ``SiglipVisionModel``, or the vision half of a ``SiglipModel``) or
timm's ``AttentionPoolLatent`` (open_clip's SigLIP: a ``TimmModel``). A learned query attends over the
post-LayerNorm tokens ``x`` [B, T, d], then ``mlp(norm(.))`` is added to the result:

    a = sum_h W_o[:, h] sum_t p[b, h, t] (W_v,h x_t + b_v,h) + b_o        p = softmax_t(q_h . k_h,t / sqrt(d_h))
    pooled = post(a + mlp(norm(a)))

(``post``: the linear maps after the pool, if any: timm's head, open_clip's projection; none in transformers.)
The attention output is a sum over the pooling heads ``h`` (and over the tokens ``t``) of
``p[b, h, t] W_o[:, h] (W_v,h x_t + b_v,h)``: exactly, with no frozen statistics, since the pattern ``p`` is part of
each term. So per image

    pooled = sum_h heads[h] + mlp + constant,        constant = post(b_o) (the out-projection's bias, mapped)

with ``heads`` [B, H, d] (each head's output summed over tokens, its value bias included, as the original's hook
``pooling_head.attention.out.post`` summed over tokens), ``mlp`` [B, d] (the pooling MLP's output, its ``fc2``
bias included) and the image-independent ``constant`` [d]; ``post``'s linear part maps each term, its biases go
into the constant. The MLP stays one lumped term, as in the original. One function computes the terms
(``pooling_terms``) from one record of weights (``PoolingWeights``), read from either library
(``pooling_weights``).

Everything here takes tensors, paths and values and returns records; compute_siglip.py prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import InputError, UnsupportedModelError
from utils.metrics import hits

__all__ = ["PoolingTerms", "PoolingWeights", "pooling_weights", "pooling_terms", "pooling_head_terms",
           "pooling_head_of", "SiglipParts", "load_siglip", "SiglipImageTransform", "SiglipTextEncoder",
           "SiglipTokenize", "PooledImageModel", "open_clip_pooled_model", "is_open_clip_model",
           "decompose_siglip_dataset", "ACCURACIES", "pooling_accuracies", "head_orthogonality",
           "pooling_head_stats"]


# ----------------------------------------------------------------------------- the decomposition
@dataclass(frozen=True)
class PoolingTerms:
    """The exact parts of a SigLIP pooled output (module docstring), float32 (float64 for a float64 model).

    ``heads`` [B, H, D] per pooling head, summed over tokens (``spatial``: [B, T, H, D], per token);
    ``mlp`` [B, D] the pooling MLP's output; ``constant`` [D] the out-projection's bias (and the biases of any linear
    maps after the pool); ``pooled`` [B, D] their sum as computed here (the model's pooled output up to float
    rounding).
    """
    heads: torch.Tensor
    mlp: torch.Tensor
    constant: torch.Tensor
    pooled: torch.Tensor

    def total(self) -> torch.Tensor:
        """``heads`` summed (over tokens and heads) + ``mlp`` + ``constant``: [B, D], equal to ``pooled``."""
        heads = self.heads.sum(1) if self.heads.ndim == 4 else self.heads
        return heads.sum(1) + self.mlp + self.constant


@dataclass(frozen=True)
class PoolingWeights:
    """An attention-pooling head's weights, whichever library holds them (``pooling_weights``; tensors as the model
    keeps them, cast by ``pooling_terms``). W: the token width, E = H * dh: the attention width, D: the output width.

    ``query`` [H, dh]: the projected (and q-normed) learned query, image-independent; ``w_k``, ``w_v`` [E, W],
    ``b_k``, ``b_v`` [E]; ``k_norm``: a module on each head's keys [..., dh] or None; ``scale``: of the scores;
    ``w_o`` [D, E], ``b_o`` [D]; ``norm`` and ``mlp``: ``a + mlp(norm(a))``; ``post``: linear maps applied after
    the pool, in order, ``(A [D', D], c [D'] or None)`` (``y = A x + c``: timm's head, open_clip's projection).
    """
    query: torch.Tensor
    w_k: torch.Tensor
    b_k: torch.Tensor
    w_v: torch.Tensor
    b_v: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    norm: torch.nn.Module
    mlp: torch.nn.Module
    scale: float
    k_norm: Optional[torch.nn.Module] = None
    post: tuple = ()

    @property
    def num_heads(self) -> int:
        return self.query.shape[0]

    @property
    def dim(self) -> int:
        """D': the width of the pooled output (after ``post``)."""
        return self.post[-1][0].shape[0] if self.post else self.w_o.shape[0]

    def out(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``post`` applied to ``x`` [..., D] (its biases only with ``bias``): [..., D']."""
        for a, c in self.post:
            x = x @ a.to(x.dtype).T + (c.to(x.dtype) if bias and c is not None else 0)
        return x

    @property
    def constant(self) -> torch.Tensor:
        """[D']: the image-independent term, ``post(b_o)`` (float32)."""
        return self.out(self.b_o.detach().float())

    @property
    def mlp_bias(self) -> torch.Tensor:
        """[D']: the MLP's output bias (``fc2.bias``) through ``post``'s linear part (float32)."""
        b = self.mlp.fc2.bias
        return self.out(b.detach().float() if b is not None else self.b_o.new_zeros(self.b_o.shape).float(),
                        bias=False)


def _zeros_if_none(b: Optional[torch.Tensor], n: int, like: torch.Tensor) -> torch.Tensor:
    return b.detach() if b is not None else like.new_zeros(n)


def _hf_weights(head: torch.nn.Module) -> PoolingWeights:
    """transformers' ``SiglipMultiheadAttentionPoolingHead``: a ``probe`` and a ``torch.nn.MultiheadAttention``."""
    attention = head.attention
    d, H = attention.embed_dim, attention.num_heads
    if not getattr(attention, "_qkv_same_embed_dim", False) or attention.in_proj_weight is None:
        raise UnsupportedModelError("the pooling head's attention has separate q/k/v projections "
                                    "(kdim/vdim != embed_dim); not supported")
    if attention.bias_k is not None or attention.add_zero_attn:
        raise UnsupportedModelError("the pooling head's attention adds key/value biases or zero attention "
                                    "(add_bias_kv / add_zero_attn); not supported")
    w_q, w_k, w_v = attention.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = _zeros_if_none(attention.in_proj_bias, 3 * d, w_q).chunk(3)
    probe = head.probe.detach().reshape(-1, d)
    if probe.shape[0] != 1:
        raise UnsupportedModelError(f"the pooling head has {probe.shape[0]} probes; one is supported")
    return PoolingWeights(query=(probe[0] @ w_q.T + b_q).view(H, d // H), w_k=w_k, b_k=b_k, w_v=w_v, b_v=b_v,
                          w_o=attention.out_proj.weight.detach(),
                          b_o=_zeros_if_none(attention.out_proj.bias, d, w_q), norm=head.layernorm, mlp=head.mlp,
                          scale=(d // H) ** -0.5)


def _timm_weights(pool: torch.nn.Module, post: Sequence[torch.nn.Module] = ()) -> PoolingWeights:
    """timm's ``AttentionPoolLatent`` (one latent, no position embedding, with its MLP), then the linear modules
    ``post`` (``nn.Linear``; ``nn.Identity`` and ``nn.Dropout`` are skipped)."""
    if pool.latent_len != 1 or pool.pos_embed is not None or pool.mlp is None:
        raise UnsupportedModelError(f"AttentionPoolLatent with latent_len={pool.latent_len}, "
                                    f"pos_embed={'set' if pool.pos_embed is not None else None}, mlp="
                                    f"{type(pool.mlp).__name__}: one latent, no position embedding and an MLP "
                                    f"are supported")
    H, dh = pool.num_heads, pool.head_dim
    E = H * dh
    q = pool.q(pool.latent.detach()).reshape(1, 1, H, dh).transpose(1, 2)  # timm's own q, then q_norm
    w_kv = pool.kv.weight.detach()
    b_kv = _zeros_if_none(pool.kv.bias, 2 * E, w_kv)
    maps = []
    for m in post:
        if isinstance(m, torch.nn.Linear):
            maps.append((m.weight.detach(), None if m.bias is None else m.bias.detach()))
        elif not isinstance(m, (torch.nn.Identity, torch.nn.Dropout)):
            raise UnsupportedModelError(f"{type(m).__name__} after the attention pool (only linear maps keep the "
                                        f"decomposition exact)")
    return PoolingWeights(query=pool.q_norm(q)[0, :, 0].detach(), w_k=w_kv[:E], b_k=b_kv[:E], w_v=w_kv[E:],
                          b_v=b_kv[E:], w_o=pool.proj.weight.detach(),
                          b_o=_zeros_if_none(pool.proj.bias, pool.proj.out_features, w_kv), norm=pool.norm,
                          mlp=pool.mlp, scale=pool.scale,
                          k_norm=None if isinstance(pool.k_norm, torch.nn.Identity) else pool.k_norm,
                          post=tuple(maps))


def pooling_weights(module: torch.nn.Module) -> PoolingWeights:
    """The ``PoolingWeights`` of transformers' ``SiglipMultiheadAttentionPoolingHead`` (or a ``SiglipVisionModel``),
    timm's ``AttentionPoolLatent``, or open_clip's ``TimmModel`` (its trunk's ``attn_pool``, then the trunk's
    ``head`` and open_clip's ``head``: identities, dropouts or linear maps). ``UnsupportedModelError`` otherwise."""
    if type(module).__name__ == "TimmModel":
        trunk = module.trunk
        pool = getattr(trunk, "attn_pool", None)
        if type(pool).__name__ != "AttentionPoolLatent":
            raise UnsupportedModelError(f"open_clip timm tower {type(trunk).__name__} pooled by "
                                        f"{type(pool).__name__ if pool is not None else trunk.global_pool!r}: "
                                        f"needs a MAP head (timm AttentionPoolLatent, SigLIP's)")
        if not isinstance(trunk.fc_norm, torch.nn.Identity):
            raise UnsupportedModelError(f"a {type(trunk.fc_norm).__name__} (fc_norm) after the attention pool")
        return _timm_weights(pool, (trunk.head, *module.head.children()))
    if type(module).__name__ == "AttentionPoolLatent":
        return _timm_weights(module)
    return _hf_weights(module if hasattr(module, "probe") else pooling_head_of(module))


def pooling_head_of(vision: torch.nn.Module) -> torch.nn.Module:
    """The ``SiglipMultiheadAttentionPoolingHead`` of a SigLIP vision tower (``SiglipVisionModel``, whose head is
    ``.head`` in transformers 5 and ``.vision_model.head`` in 4)."""
    head = getattr(vision, "head", None) or getattr(getattr(vision, "vision_model", None), "head", None)
    if head is None or not hasattr(head, "probe"):
        raise UnsupportedModelError(f"{type(vision).__name__}: no attention-pooling head (vision_use_head is "
                                    f"False?); nothing to decompose")
    return head


def _call_in(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters cast to ``x``'s dtype (the module itself is left as it is)."""
    params = {k: v.to(x.dtype) for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


@torch.no_grad()
def pooling_terms(w: PoolingWeights, tokens: torch.Tensor, spatial: bool = False) -> PoolingTerms:
    """Decompose an attention-pooling head (``w``) applied to ``tokens`` [B, T, W] (what the pool reads: the
    tower's tokens after its final LayerNorm) into per-pooling-head terms, the MLP term and the constant.

    The attention is recomputed from the weights (its pattern from q and k, since fused kernels do not return it
    per head), in float32 whatever the model's dtype (float64 stays float64). ``spatial`` keeps the token axis:
    ``heads`` [B, T, H, D] (memory B*T*H*D floats: meant for a few images). The linear maps ``w.post`` act on each
    term; their biases go into the constant.
    """
    dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    x = tokens.to(dtype)
    B, T, W = x.shape
    if w.w_k.shape[1] != W:
        raise InputError(f"tokens of width {W}, the pooling head expects {w.w_k.shape[1]}")
    H, dh = w.query.shape
    cast = lambda t: t.to(x.device, dtype)  # noqa: E731
    k = (x @ cast(w.w_k).T + cast(w.b_k)).view(B, T, H, dh)
    if w.k_norm is not None:
        k = _call_in(w.k_norm, k)
    v = (x @ cast(w.w_v).T + cast(w.b_v)).view(B, T, H, dh)
    p = torch.softmax(torch.einsum("hc,bthc->bht", cast(w.query), k) * w.scale, dim=-1)  # [B, H, T]
    w_o = cast(w.w_o).view(-1, H, dh)
    b_o = cast(w.b_o)
    if spatial:
        heads = torch.einsum("bht,bthc,ehc->bthe", p, v, w_o)  # [B, T, H, D]
        attn = heads.sum((1, 2)) + b_o
    else:
        heads = torch.einsum("bhc,ehc->bhe", torch.einsum("bht,bthc->bhc", p, v), w_o)  # [B, H, D]
        attn = heads.sum(1) + b_o
    mlp = _call_in(w.mlp, _call_in(w.norm, attn))
    return PoolingTerms(heads=w.out(heads, bias=False), mlp=w.out(mlp, bias=False), constant=w.out(b_o),
                        pooled=w.out(attn + mlp))


def pooling_head_terms(head: torch.nn.Module, hidden: torch.Tensor, spatial: bool = False) -> PoolingTerms:
    """``pooling_terms`` of a pooling head (anything ``pooling_weights`` reads: transformers' head, timm's
    ``AttentionPoolLatent``, open_clip's ``TimmModel``) on ``hidden`` [B, T, W]: the tokens the pool reads
    (transformers: ``last_hidden_state``; timm: ``forward_features`` without the prefix tokens it leaves out)."""
    return pooling_terms(pooling_weights(head), hidden, spatial)


# ----------------------------------------------------------------------------- the model, from transformers
@dataclass
class SiglipParts:
    """A loaded SigLIP: the ``SiglipModel`` (both towers, eval mode, on the device), its image processor, its
    tokenizer, and the text length it was trained with (``max_length``: its text position embeddings)."""
    model: Any
    image_processor: Any
    tokenizer: Any
    max_length: int

    @property
    def pooling_head(self) -> torch.nn.Module:
        return pooling_head_of(self.model.vision_model)

    @property
    def num_heads(self) -> int:
        return self.pooling_head.attention.num_heads

    @property
    def dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    def pooled_model(self) -> "PooledImageModel":
        """The ``PooledImageModel`` compute_siglip.py runs: tokens ``last_hidden_state``, pooled ``pooler_output``,
        the processor's pixels, the text tower padded to ``max_length``."""
        vision = self.model.vision_model

        def features(pixels: torch.Tensor) -> tuple:
            out = vision(pixel_values=pixels)
            return out.last_hidden_state, out.pooler_output

        return PooledImageModel(vision, features, pooling_weights(self.pooling_head),
                                SiglipImageTransform(self.image_processor), SiglipTextEncoder(self.model),
                                SiglipTokenize(self.tokenizer, self.max_length), self.max_length)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise InputError(f"SigLIP needs transformers, sentencepiece and protobuf: pip install -e '.[siglip]' ({e})") \
            from None
    return transformers


def load_siglip(model_id: str, device: str | torch.device = "cpu") -> SiglipParts:
    """A Hugging Face SigLIP (``google/siglip-so400m-patch14-384``, ``google/siglip-base-patch16-224``, or a local
    folder written by ``save_pretrained``): ``SiglipModel`` in float32, ``AutoImageProcessor``, ``AutoTokenizer``.

    One ``SiglipModel`` load gives both towers from the one checkpoint (the original loads the checkpoint twice,
    as a ``SiglipVisionModel`` and a ``SiglipTextModel``; the weights are the same). ``InputError`` naming the model
    when it is neither a folder nor in the Hugging Face cache (offline), or has no attention-pooling head.
    """
    tf = _transformers()
    try:
        kind = tf.AutoConfig.from_pretrained(model_id).model_type
        if kind != "siglip":
            raise UnsupportedModelError(f"--model {model_id}: a '{kind}' model; this script reads SigLIP checkpoints "
                                        f"(model_type 'siglip'), such as google/siglip-so400m-patch14-384")
        model = tf.SiglipModel.from_pretrained(model_id, dtype=torch.float32)
        image_processor = tf.AutoImageProcessor.from_pretrained(model_id)
        tokenizer = tf.AutoTokenizer.from_pretrained(model_id)
    except UnsupportedModelError:
        raise
    except (OSError, ValueError) as e:
        where = "folder" if Path(model_id).is_dir() else "Hugging Face id (not in the local cache, or offline?)"
        raise InputError(f"--model {model_id}: cannot load a SigLIP model from this {where}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        pooling_head_of(model.vision_model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"--model {model_id}: {e}") from None
    model.to(device).eval()
    return SiglipParts(model, image_processor, tokenizer, int(model.config.text_config.max_position_embeddings))


def is_open_clip_model(model: str, pretrained: Optional[str]) -> bool:
    """Which library compute_siglip.py loads ``model`` with: open_clip when ``pretrained`` is given, the name
    starts with ``hf-hub:`` or ``local-dir:``, or it is an open_clip model name (``open_clip.list_models()``,
    registered configs included); transformers (``load_siglip``) otherwise: a Hugging Face id or a
    ``save_pretrained`` folder."""
    if pretrained is not None or model.startswith(("hf-hub:", "local-dir:")):
        return True
    if Path(model).is_dir():
        return False
    import open_clip

    return model in open_clip.list_models()


class SiglipImageTransform:
    """A dataset transform: a PIL image -> the processor's ``pixel_values`` [3, H, W] (picklable for workers)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class SiglipTokenize:
    """``tokenizer(texts)`` as SigLIP was trained: padded to ``max_length`` (the tokenizer's output, a
    ``BatchEncoding`` with ``.to(device)``); longer texts are cut at ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")


class SiglipTextEncoder(torch.nn.Module):
    """The text tower with open_clip's ``encode_text`` (so ``utils.text.embeddings`` works on it): a
    ``SiglipTokenize`` batch -> ``pooler_output`` [n, d] (not normalised)."""

    def __init__(self, model: Any):
        super().__init__()
        self.text_model = model.text_model

    def encode_text(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.text_model(**batch).pooler_output


# ----------------------------------------------------------------------------- either library, as the script sees it
@dataclass
class PooledImageModel:
    """What compute_siglip.py needs of a SigLIP, from either library (``SiglipParts.pooled_model``,
    ``open_clip_pooled_model``).

    ``vision``: the image tower (eval, on its device); ``features(pixels [B, 3, H, W]) -> (tokens [B, T, W],
    pooled [B, D])``: the tokens the pool reads and the model's own pooled output (not normalised), from one
    forward; ``pool``: its ``PoolingWeights``; ``transform``: a PIL image -> [3, H, W] (picklable, for workers);
    ``text_encoder`` (with ``encode_text``) and ``tokenize``: the text tower and its tokenizer, as
    ``utils.text.embeddings`` takes them; ``text_length``: the tokens per text.
    """
    vision: torch.nn.Module
    features: Callable[[torch.Tensor], tuple]
    pool: PoolingWeights
    transform: Callable
    text_encoder: torch.nn.Module
    tokenize: Callable
    text_length: int


def open_clip_pooled_model(model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                           name: str = "") -> PooledImageModel:
    """An open_clip SigLIP (``utils.models.load_model``'s ``(model, preprocess, tokenizer)``): a ``TimmModel`` image
    tower whose timm trunk pools with ``AttentionPoolLatent``. The tokens are the trunk's ``forward_features``
    (after its final norm) less the prefix tokens the trunk's pool leaves out; the pooled output is the tower's
    (``encode_image`` before normalisation). ``UnsupportedModelError`` naming ``name`` for any other tower."""
    visual = model.visual
    if type(visual).__name__ != "TimmModel":
        raise UnsupportedModelError(f"model '{name}': image tower {type(visual).__name__}, not a timm tower with a "
                                    f"MAP head (SigLIP's); compute_prs.py decomposes it")
    try:
        pool = pooling_weights(visual)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"model '{name}': {e}") from None
    trunk = visual.trunk
    start = 0 if getattr(trunk, "pool_include_prefix", True) else trunk.num_prefix_tokens  # timm's pool()

    def features(pixels: torch.Tensor) -> tuple:
        x = trunk.forward_features(pixels)
        return x[:, start:], visual.head(trunk.forward_head(x))

    return PooledImageModel(visual, features, pool, preprocess, model, tokenizer,
                            int(getattr(tokenizer, "context_length", 0) or 0))


# ----------------------------------------------------------------------------- a dataset, streamed
def decompose_siglip_dataset(pm: PooledImageModel, dataset, paths: Mapping[str, str | Path], *, record: Mapping,
                             device: str | torch.device = "cpu", batch_size: int = 256, num_workers: int = 0,
                             resume: bool = False, desc: str = "compute_siglip") -> dict[str, Path]:
    """Decompose every image of ``dataset`` (yielding ``(pixels [3, H, W], label)``, with ``.labels``) and
    stream the terms to ``paths`` (``utils.files.names.siglip_paths``; resumable, torchrun-aware):

    ``heads`` [N, H, D], ``mlp`` [N, D], ``pooled`` [N, D] (the model's own pooled output), and, written
    first, ``labels`` [N] and ``constant`` [D] (``PoolingWeights.constant``). Per image
    ``heads.sum(0) + mlp + constant == pooled`` up to float32 rounding. Returns name -> path of the files.
    """
    from utils.files.provenance import save_output
    from utils.files.streaming import Output, is_main_process, stream_dataset

    pool = pm.pool
    H, d = pool.num_heads, pool.dim
    record = dict(record)
    if is_main_process():
        save_output(paths["labels"], np.asarray(dataset.labels), dict(record, num_images=len(dataset)))
        save_output(paths["constant"], pool.constant.cpu().numpy(), record)
    outputs = {"heads": Output(paths["heads"], (H, d)), "mlp": Output(paths["mlp"], (d,)),
               "pooled": Output(paths["pooled"], (d,))}

    @torch.no_grad()
    def compute(images, labels, start):
        tokens, pooled = pm.features(images.to(device))
        terms = pooling_terms(pool, tokens)
        return {"heads": terms.heads.cpu().numpy(), "mlp": terms.mlp.cpu().numpy(),
                "pooled": pooled.float().cpu().numpy()}

    stream_dataset(dataset, outputs, compute, record=record, resume=resume, batch_size=batch_size,
                   num_workers=num_workers, desc=desc)
    return {"labels": Path(paths["labels"]), "constant": Path(paths["constant"]),
            **{k: o.path for k, o in outputs.items()}}


# ----------------------------------------------------------------------------- the studies on the stored terms
ACCURACIES = ("representation", "mlp", "attention", "attention + mlp")


def _block(rows, dtype=np.float32) -> torch.Tensor:
    """Rows of a (memory-mapped) array as a tensor of its own (a copy)."""
    return torch.from_numpy(np.array(rows, dtype=dtype))


def _chunks(num: int, chunk: int):
    for s in range(0, num, chunk):
        yield slice(s, min(num, s + chunk))


@torch.no_grad()
def pooling_accuracies(heads: np.ndarray, mlp: np.ndarray, pooled: np.ndarray, labels: np.ndarray,
                       classifier: np.ndarray, constant: np.ndarray, mlp_bias: np.ndarray,
                       chunk: int = 4096) -> dict[str, int]:
    """Top-1 hits of the four representations of the original (``ACCURACIES``), read in chunks of images:

    ``representation`` the model's pooled output; ``mlp`` the MLP term + ``constant``; ``attention`` the heads'
    sum + ``constant`` + ``mlp_bias`` (the MLP's ``fc2`` bias); ``attention + mlp`` the heads' sum + the MLP term +
    ``constant`` (= the pooled output: the sanity check).

    Args: heads [N, H, d], mlp [N, d], pooled [N, d] (memory-mapped is fine), labels [N], classifier [C, d]
    (rows: classes, as the original's zero-shot weights), constant [d], mlp_bias [d].
    Returns: name -> number of correct images (of N).
    """
    n = len(labels)
    if not (len(heads) == len(mlp) == len(pooled) == n):
        raise InputError(f"{len(heads)} head rows, {len(mlp)} MLP rows, {len(pooled)} pooled rows and {n} labels")
    w = _block(classifier).T  # [d, C]
    const, bias = _block(constant), _block(mlp_bias)
    counts = dict.fromkeys(ACCURACIES, 0)
    for s in _chunks(n, chunk):
        attn, m, y = _block(heads[s]).sum(1), _block(mlp[s]), _block(labels[s], np.int64)
        features = {"representation": _block(pooled[s]), "mlp": m + const,
                    "attention": attn + const + bias, "attention + mlp": m + attn + const}
        for k, f in features.items():
            counts[k] += hits(f @ w, y)
    return counts


@torch.no_grad()
def head_orthogonality(heads: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """How orthogonal the pooling heads' outputs are: ``[H, H]``, the mean over images of
    ``|cos(heads[n, h] - mean_h, heads[n, g] - mean_g)|`` (each head centred by its mean over the images; the
    diagonal is 1 except for images where a head's centred output is zero). ``heads`` [N, H, d], read in chunks."""
    n, h, _ = heads.shape
    mean = torch.zeros(heads.shape[1:], dtype=torch.float64)
    for s in _chunks(n, chunk):
        mean += _block(heads[s], np.float64).sum(0)
    mean /= n
    total = torch.zeros(h, h, dtype=torch.float64)
    for s in _chunks(n, chunk):
        x = F.normalize(_block(heads[s], np.float64) - mean, dim=-1)
        total += (x @ x.transpose(1, 2)).abs().sum(0)
    return (total / n).numpy()


def pooling_head_stats(heads: np.ndarray, device: str | torch.device = "cpu", chunk: int = 4096):
    """``utils.text.textspan.HeadStats`` of every pooling head (``heads`` [N, H, d], read in chunks), for
    ``textspan_from_stats``."""
    from utils.text.textspan import HeadStatsAccumulator

    n, h, d = heads.shape
    acc = HeadStatsAccumulator(h, d, device)
    for s in _chunks(n, chunk):
        acc.update(_block(heads[s]).transpose(0, 1))
    return acc.finalize()
