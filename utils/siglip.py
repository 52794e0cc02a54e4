"""SigLIP's attention-pooling head, decomposed exactly (compute_siglip.py; the original repository's last commit).

A SigLIP image tower (transformers' ``SiglipVisionModel``, or the vision half of a ``SiglipModel``) ends with a
multihead attention-pooling head (``SiglipMultiheadAttentionPoolingHead``): a learned query (``probe``) attends
over the post-LayerNorm tokens ``x`` [B, T, d], then ``mlp(layernorm(.))`` is added to the result:

    a = sum_h W_o[:, h] sum_t p[b, h, t] (W_v,h x_t + b_v,h) + b_o        p = softmax_t(q_h . k_h,t / sqrt(d_h))
    pooled = a + mlp(layernorm(a))

The attention output is a sum over the pooling heads ``h`` (and over the tokens ``t``) of
``p[b, h, t] W_o[:, h] (W_v,h x_t + b_v,h)``: exactly, with no frozen statistics, since the pattern ``p`` is part of
each term. So per image

    pooled = sum_h heads[h] + mlp + constant,        constant = b_o (the out-projection's bias)

with ``heads`` [B, H, d] (each head's output summed over tokens, its value bias included, as the original's hook
``pooling_head.attention.out.post`` summed over tokens), ``mlp`` [B, d] (the pooling MLP's output, its ``fc2``
bias included) and the image-independent ``constant`` [d]. The MLP stays one lumped term, as in the original.

Everything here takes tensors, paths and values and returns records; compute_siglip.py prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import InputError, UnsupportedModelError
from utils.metrics import hits

__all__ = ["PoolingTerms", "pooling_head_terms", "pooling_head_of", "SiglipParts", "load_siglip",
           "SiglipImageTransform", "SiglipTextEncoder", "decompose_siglip_dataset", "SiglipTokenize", "ACCURACIES", "pooling_accuracies", "head_orthogonality",
           "pooling_head_stats"]


# ----------------------------------------------------------------------------- the decomposition
@dataclass(frozen=True)
class PoolingTerms:
    """The exact parts of a SigLIP pooled output (module docstring), float32 (float64 for a float64 model).

    ``heads`` [B, H, d] per pooling head, summed over tokens (``spatial``: [B, T, H, d], per token);
    ``mlp`` [B, d] the pooling MLP's output; ``constant`` [d] the out-projection's bias; ``pooled`` [B, d] their
    sum as computed here (the model's ``pooler_output`` up to float rounding).
    """
    heads: torch.Tensor
    mlp: torch.Tensor
    constant: torch.Tensor
    pooled: torch.Tensor

    def total(self) -> torch.Tensor:
        """``heads`` summed (over tokens and heads) + ``mlp`` + ``constant``: [B, d], equal to ``pooled``."""
        heads = self.heads.sum(1) if self.heads.ndim == 4 else self.heads
        return heads.sum(1) + self.mlp + self.constant


def pooling_head_of(vision: torch.nn.Module) -> torch.nn.Module:
    """The ``SiglipMultiheadAttentionPoolingHead`` of a SigLIP vision tower (``SiglipVisionModel``, whose head is
    ``.head`` in transformers 5 and ``.vision_model.head`` in 4)."""
    head = getattr(vision, "head", None) or getattr(getattr(vision, "vision_model", None), "head", None)
    if head is None or not hasattr(head, "probe"):
        raise UnsupportedModelError(f"{type(vision).__name__}: no attention-pooling head (vision_use_head is "
                                    f"False?); nothing to decompose")
    return head


def _attention_parts(attention: torch.nn.MultiheadAttention, d: int):
    """``(W_q, W_k, W_v, b_q, b_k, b_v)`` of a ``torch.nn.MultiheadAttention`` with one fused in-projection."""
    if not getattr(attention, "_qkv_same_embed_dim", False) or attention.in_proj_weight is None:
        raise UnsupportedModelError("the pooling head's attention has separate q/k/v projections "
                                    "(kdim/vdim != embed_dim); not supported")
    if attention.bias_k is not None or attention.add_zero_attn:
        raise UnsupportedModelError("the pooling head's attention adds key/value biases or zero attention "
                                    "(add_bias_kv / add_zero_attn); not supported")
    w = attention.in_proj_weight
    b = attention.in_proj_bias if attention.in_proj_bias is not None else w.new_zeros(3 * d)
    return (*w.chunk(3), *b.chunk(3))


def _call_in(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters cast to ``x``'s dtype (the module itself is left as it is)."""
    params = {k: v.to(x.dtype) for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


@torch.no_grad()
def pooling_head_terms(head: torch.nn.Module, hidden: torch.Tensor, spatial: bool = False) -> PoolingTerms:
    """Decompose a ``SiglipMultiheadAttentionPoolingHead`` applied to ``hidden`` [B, T, d] (the tower's tokens after
    its final LayerNorm, ``last_hidden_state``) into per-pooling-head terms, the MLP term and the constant.

    The attention is recomputed from the head's weights (its pattern from q and k, since the fused kernel does not
    return it per head), in float32 whatever the model's dtype (float64 stays float64). ``spatial`` keeps the token
    axis: ``heads`` [B, T, H, d] (memory B*T*H*d floats: meant for a few images).
    """
    attention = head.attention
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(dtype)
    B, T, d = x.shape
    H = attention.num_heads
    dh = d // H
    if attention.embed_dim != d:
        raise InputError(f"hidden states of width {d}, the pooling head expects {attention.embed_dim}")
    w_q, w_k, w_v, b_q, b_k, b_v = (p.to(dtype) for p in _attention_parts(attention, d))
    probe = head.probe.to(dtype).reshape(-1, d)
    if probe.shape[0] != 1:
        raise UnsupportedModelError(f"the pooling head has {probe.shape[0]} probes; one is supported")
    q = (probe[0] @ w_q.T + b_q).view(H, dh)  # the query does not depend on the image
    k = (x @ w_k.T + b_k).view(B, T, H, dh)
    v = (x @ w_v.T + b_v).view(B, T, H, dh)
    p = torch.softmax(torch.einsum("hc,bthc->bht", q, k) / math.sqrt(dh), dim=-1)  # [B, H, T]
    w_o = attention.out_proj.weight.to(dtype).view(d, H, dh)
    b_o = attention.out_proj.bias
    constant = b_o.to(dtype) if b_o is not None else x.new_zeros(d)
    if spatial:
        heads = torch.einsum("bht,bthc,ehc->bthe", p, v, w_o)  # [B, T, H, d]
        attn = heads.sum((1, 2)) + constant
    else:
        heads = torch.einsum("bhc,ehc->bhe", torch.einsum("bht,bthc->bhc", p, v), w_o)  # [B, H, d]
        attn = heads.sum(1) + constant
    mlp = _call_in(head.mlp, _call_in(head.layernorm, attn))
    return PoolingTerms(heads=heads, mlp=mlp, constant=constant, pooled=attn + mlp)


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


# ----------------------------------------------------------------------------- a dataset, streamed
def decompose_siglip_dataset(parts: SiglipParts, dataset, paths: Mapping[str, str | Path], *, record: Mapping,
                             device: str | torch.device = "cpu", batch_size: int = 256, num_workers: int = 0,
                             resume: bool = False, desc: str = "compute_siglip") -> dict[str, Path]:
    """Decompose every image of ``dataset`` (yielding ``(pixel_values [3, H, W], label)``, with ``.labels``) and
    stream the terms to ``paths`` (``utils.files.names.siglip_paths``; resumable, torchrun-aware):

    ``heads`` [N, H, d], ``mlp`` [N, d], ``pooled`` [N, d] (the model's own ``pooler_output``), and, written
    first, ``labels`` [N] and ``constant`` [d] (the out-projection's bias). Per image
    ``heads.sum(0) + mlp + constant == pooled`` up to float32 rounding. Returns name -> path of the files.
    """
    from utils.files.provenance import save_output
    from utils.files.streaming import Output, is_main_process, stream_dataset

    head, vision = parts.pooling_head, parts.model.vision_model
    H, d = parts.num_heads, parts.dim
    record = dict(record)
    if is_main_process():
        save_output(paths["labels"], np.asarray(dataset.labels), dict(record, num_images=len(dataset)))
        constant = head.attention.out_proj.bias
        save_output(paths["constant"], (constant.detach().float().cpu().numpy() if constant is not None
                                        else np.zeros(d, np.float32)), record)
    outputs = {"heads": Output(paths["heads"], (H, d)), "mlp": Output(paths["mlp"], (d,)),
               "pooled": Output(paths["pooled"], (d,))}

    @torch.no_grad()
    def compute(images, labels, start):
        out = vision(pixel_values=images.to(device))
        terms = pooling_head_terms(head, out.last_hidden_state)
        return {"heads": terms.heads.cpu().numpy(), "mlp": terms.mlp.cpu().numpy(),
                "pooled": out.pooler_output.float().cpu().numpy()}

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
