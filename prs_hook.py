"""The decomposition engine: an explicit image-tower forward that records every direct contribution.

The CLS residual stream after the last block is a sum of ``2L + 1`` terms: the embedding term, L attention
outputs and L MLP outputs (docs/design.md section 1). Each attention output splits per head and per source token.
The engine runs the image tower of an unmodified ``open_clip`` model block by block, reading its weights by
name, records those terms already multiplied into the output space, and applies the frozen ``ln_post``
statistics at the end (docs/design.md section 2)::

    P(c) = (gamma * (c - mu / T) / sigma + beta / T) @ proj / ||r||

Nothing of size ``[batch, tokens, tokens, heads, width]`` is ever built: only the CLS query row of each
attention map is computed, and without ``spatial=True`` the source-token axis is reduced inside the forward.

The Python API (docs/api.md)::

    from prs_hook import Decomposer, decompose

    engine = Decomposer(model, "cuda")          # the fixed maps, built once per model
    d = engine(images)                          # a Decomposition, a new frozen record per call
    d.attn, d.mlp, d.cls_attn                   # [b, L, H, d], [b, L+1, d], [b, L, d]
    d.total()                                   # [b, d] = d.representation / d.norm, the sum rule
    d.head_logits(classifier)                   # [b, L, H, C]
    d.top_heads(text, k=5)                      # [HeadScore(label="L11.H3", layer=11, head=3, score=0.021), ...]
    d = engine(images, layers=[10, 11])         # attn [b, 2, H, d]; the other layers in d.attn_rest [b, d]
    d = engine(images, spatial=True)            # attn [b, L, N, H, d]
    d = engine(images, spatial="sum")           # attn [b, N, d]: summed over layers and heads (segmentation)
    d = decompose(model, images)                # one call: builds a Decomposer, then decomposes

Towers: ``Decomposer`` dispatches on the type of ``model.visual`` to a ``Tower`` implementation (``TOWERS``); a
tower holds the fixed maps of its architecture and runs the forward that records the raw terms, and the
``Decomposer`` projects them through the frozen final LayerNorm into a ``Decomposition``. ``ViTTower`` handles
open_clip's ``VisionTransformer`` with CLS-token pooling; the ``PooledTower``s handle the towers read out by
pooling (docs/design.md section 1b): ``TimmTower`` (open_clip's ``TimmModel`` with a timm ViT or Eva trunk:
SigLIP, SigLIP 2, PE-Core, EVA01/02, MobileCLIP's ViTs) and ``OpenClipPooledTower`` (CLIPA's average pooling,
CoCa's attentional pool); their ``mlp`` has one more entry, ``"pool"`` (the pooling MLP and the constants).
Every other tower raises ``UnsupportedModelError``.

The original ``hook_prs_logger`` API stays, as a thin adapter over a ``Decomposer`` (``PRSLogger``)::

    prs = hook_prs_logger(model, device, spatial=False)
    prs.reinit()
    representation = prs.encode_image(images)             # was: model.encode_image(..., attn_method='head')
    attentions, mlps = prs.finalize(representation)      # [b, L, H, d] (spatial: [b, L, N, H, d]), [b, L+1, d]
    cls_attn = prs.cls_attentions                        # [b, L, d]
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Iterable, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import InputError, UnsupportedModelError

__all__ = ["Decomposer", "Decomposition", "HeadScore", "OpenClipPooledTower", "PRSLogger", "PooledTower", "RawTerms",
           "Request", "TOWERS", "TimmTower", "Tower", "UnsupportedModelError", "ViTTower", "autocast_off",
           "check_supported", "decompose", "float32_tower", "hook_prs_logger"]

Spatial = Union[bool, str]  # False, True or "sum"


# ----------------------------------------------------------------------------- helpers
def _resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for CUDA (``cuda`` -> ``cuda:<current>``), comparable to a tensor's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def float32_tower(visual: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``visual`` itself if all its floating-point weights are ``dtype`` (float32) on ``device``; otherwise a copy
    in ``dtype`` on ``device`` (the model passed in is left untouched; the copy is made once, without a second copy
    in the original dtype or on the original device)."""
    tensors = list(visual.parameters()) + list(visual.buffers())
    if all(t.device == device and (t.dtype == dtype or not t.is_floating_point()) for t in tensors):
        return visual
    memo = {}
    for t in tensors:
        moved = t.detach().to(device, dtype if t.is_floating_point() else t.dtype)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(visual, memo).eval()


def autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which autocast is disabled for ``device``'s type (CPU, CUDA, ...): ops run in their inputs'
    dtype whatever an enclosing ``torch.autocast`` says."""
    device_type = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (biased variance + eps) over the last axis, in float32 (float64 stays): ``[...]``, ``[...]``."""
    x = x if x.dtype == torch.float64 else x.float()
    mean = x.mean(-1)
    std = (x.var(-1, unbiased=False) + eps).sqrt()
    return mean, std


def _layer_scale(module: nn.Module, width: int, device: torch.device) -> torch.Tensor:
    """The LayerScale vector of ``ls_1``/``ls_2`` (ones for ``nn.Identity``), in the weights' dtype, [width]."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, dtype=torch.float32, device=device)
    return gamma.detach() if gamma.dtype == torch.float64 else gamma.detach().float()


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` [b] viewed as ``[b, 1, ..., 1]`` to broadcast against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- the record
class HeadScore(NamedTuple):
    """One head's score (``Decomposition.top_heads``): its label ``"L{layer}.H{head}"``, layer, head, score."""

    label: str
    layer: int
    head: int
    score: float


@dataclasses.dataclass(frozen=True, eq=False)
class Decomposition:
    """The direct contributions of a batch of images to their normalised embeddings (docs/design.md section 2).

    Every tensor is float32 (or the engine's ``dtype``) on the engine's device. b images, L layers, H heads,
    N tokens (CLS first), d the embedding dimension, L' = ``len(layers)``. The sum rule: ``total()`` = attn summed over every axis but d
    + attn_rest + mlp summed over its layers = ``representation / norm`` (up to float32 rounding).

    Attributes:
        attn: per-head terms of the kept layers, summed over source tokens, ``[b, L', H, d]``; with
            ``spatial=True`` per source token, ``[b, L, N, H, d]``; with ``spatial="sum"`` summed over layers
            and heads instead, ``[b, N, d]``.
        mlp: ``[b, L+1, d]``: index 0 is the embedding term, then one per MLP; ``[b, L+2, d]`` for a tower read
            out by pooling (``PooledTower``): the last entry holds the pooling head's MLP and every constant.
            ``mlp_labels`` names the entries.
        cls_attn: ``[b, L, d]``: the CLS->CLS attention term of each layer, summed over heads (part of attn); for
            a ``PooledTower`` each layer's self term (every token's attention to itself, read out by the pool).
        attn_rest: ``[b, d]``: the attention layers not kept, summed over layers and heads; ``None`` when every
            layer is kept.
        representation: the unnormalised image embedding of the same forward, ``[b, d]``.
        norm: ``||representation||``, ``[b]``.
        layers: the layers on attn's layer axis, ascending (every layer unless ``layers=`` was given).
        num_layers, num_heads: L and H of the tower.
        spatial: ``False``, ``True`` or ``"sum"``: the mode that gave attn its shape.
        ln_post_mean, ln_post_std: the final LayerNorm's statistics of the CLS token, ``[b]`` (``PooledTower``:
            of every token, ``[b, N]``).
        mlp_labels: the entries of mlp's term axis (``Tower.mlp_labels``).
        num_prefix_tokens: the tokens before the patch grid on the spatial token axis (1: CLS; 0 for SigLIP).
        attention_maps: with ``attention_maps=True``: the CLS query's attention rows, ``[b, L, H, N]``.
        ln_1_mean, ln_1_std: with ``ln_stats=True``: every block's ``ln_1`` statistics per token, ``[b, L, N]``.
        post_activations: with ``post_activations=[...]``: ``{layer: [b, N, K]}``, the MLP's values after its
            activation (K neurons).
    """

    attn: torch.Tensor
    mlp: torch.Tensor
    cls_attn: torch.Tensor
    attn_rest: Optional[torch.Tensor]
    representation: torch.Tensor
    norm: torch.Tensor
    layers: tuple[int, ...]
    num_layers: int
    num_heads: int
    spatial: Spatial
    ln_post_mean: torch.Tensor
    ln_post_std: torch.Tensor
    attention_maps: Optional[torch.Tensor] = None
    ln_1_mean: Optional[torch.Tensor] = None
    ln_1_std: Optional[torch.Tensor] = None
    post_activations: Mapping[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    mlp_labels: tuple[str, ...] = ()
    num_prefix_tokens: int = 1

    @property
    def labels(self) -> tuple[str, ...]:
        """``"L{layer}.H{head}"`` for each kept head, in the order of attn's flattened ``[L', H]`` axes."""
        return tuple(f"L{l}.H{h}" for l in self.layers for h in range(self.num_heads))

    def head_terms(self) -> torch.Tensor:
        """The per-head terms summed over source tokens, ``[b, L', H, d]`` (attn itself unless spatial)."""
        if self.spatial == "sum":
            raise InputError('Decomposition: spatial="sum" has no head axis (decompose with spatial=False or True)')
        return self.attn.sum(2) if self.spatial else self.attn

    def head_logits(self, classifier: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Each head's direct share of the logits of ``classifier`` ``[d, C]``: ``[b, L', H, C]``.

        Summed over heads and layers, plus ``attn_rest`` and ``mlp`` times the classifier, it gives
        ``total() @ classifier``.
        """
        heads = self.head_terms()
        w = torch.as_tensor(classifier).detach().to(heads.device, heads.dtype)
        d = heads.shape[-1]
        if w.dim() != 2 or w.shape[0] != d:
            raise InputError(f"head_logits: classifier of shape {list(w.shape)}; expected [d={d}, classes]")
        return heads @ w

    def top_heads(self, text: torch.Tensor | np.ndarray, k: int = 5, image: Optional[int] = None
                  ) -> list[HeadScore]:
        """The ``k`` heads whose terms score highest on ``text`` ``[d]`` (e.g. a unit text embedding), strongest
        first, as ``HeadScore(label, layer, head, score)``. The score is ``head term · text``, each head's direct
        share of the image-text similarity; for ``image`` ``i`` of the batch, or (``None``) their mean over the
        batch."""
        w = torch.as_tensor(text).detach()
        if w.dim() != 1:
            raise InputError(f"top_heads: text of shape {list(w.shape)}; expected [d]")
        scores = self.head_logits(w[:, None])[..., 0]  # [b, L', H]
        scores = scores.mean(0) if image is None else scores[image]
        values, index = scores.flatten().topk(min(k, scores.numel()))
        H, labels = self.num_heads, self.labels
        return [HeadScore(labels[i], self.layers[i // H], i % H, v) for i, v in zip(index.tolist(), values.tolist())]

    def total(self) -> torch.Tensor:
        """The sum of every term, ``[b, d]``: equal to ``representation / norm`` (the sum rule)."""
        out = self.attn.flatten(1, -2).sum(1) + self.mlp.sum(1)
        return out if self.attn_rest is None else out + self.attn_rest

    def numpy(self, *fields: str) -> dict[str, np.ndarray]:
        """The named tensor fields (default: attn, mlp, cls_attn, attn_rest when set, representation, norm) as
        NumPy arrays on the host, for storage."""
        names = fields or [f for f in ("attn", "mlp", "cls_attn", "attn_rest", "representation", "norm")
                           if getattr(self, f) is not None]
        return {f: getattr(self, f).cpu().numpy() for f in names}


@dataclasses.dataclass(frozen=True)
class Request:
    """What one call asks for (validated by ``Decomposer.request``)."""

    spatial: Spatial = False
    layers: Optional[tuple[int, ...]] = None  # None: every layer, no rest term
    attention_maps: bool = False
    ln_stats: bool = False
    post_activations: tuple[int, ...] = ()

    def slots(self, num_layers: int) -> tuple[int, list[int]]:
        """``(kept, slot)``: how many layers ``attn`` keeps, and each layer's index in it (-1: into attn_rest)."""
        if self.layers is None:
            return num_layers, list(range(num_layers))
        slot = [-1] * num_layers
        for i, l in enumerate(self.layers):
            slot[l] = i
        return len(self.layers), slot


@dataclasses.dataclass
class RawTerms:
    """What a tower's forward records: name -> (terms in the output space before the frozen final LayerNorm,
    the share of its mean and bias each entry carries), the unnormalised ``representation`` [b, d], the final
    LayerNorm's statistics ``ln_mean``/``ln_std`` [b], and the extras asked for (``Decomposition`` fields)."""

    terms: dict[str, tuple[torch.Tensor, float]]
    representation: torch.Tensor
    ln_mean: torch.Tensor
    ln_std: torch.Tensor
    extras: dict


# ----------------------------------------------------------------------------- towers
class Tower:
    """One kind of image tower: its fixed maps, and the forward that records its raw terms.

    A subclass sets ``num_layers``, ``num_heads``, ``width``, ``head_dim``, ``out_dim``, ``ln_post_gain`` [d]
    and ``ln_post_bias`` [d] (the final LayerNorm's gain and bias folded with the output projection), and
    implements ``handles``, ``check`` and ``forward``. Register it in ``TOWERS``.
    """

    num_layers: int
    num_heads: int
    width: int
    head_dim: int
    out_dim: int
    ln_post_gain: torch.Tensor
    ln_post_bias: torch.Tensor
    extra_terms: tuple[str, ...] = ()  # the terms outside the backbone, in mlp's last slots
    num_prefix_tokens: int = 1  # tokens before the patch grid (CLS, registers)

    @property
    def mlp_labels(self) -> tuple[str, ...]:
        """The entries of ``mlp``'s term axis: ``"embedding"``, ``"mlp.{l}"`` per block, then ``extra_terms``."""
        return ("embedding", *(f"mlp.{l}" for l in range(self.num_layers)), *self.extra_terms)

    @classmethod
    def handles(cls, visual: nn.Module) -> bool:
        """Whether this implementation is the one for ``visual`` (by type)."""
        raise NotImplementedError

    @classmethod
    def check(cls, visual: nn.Module, name: str) -> None:
        """Raise ``UnsupportedModelError`` naming ``name`` and the feature unless ``visual`` decomposes exactly."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, request: Request) -> RawTerms:
        """Run the tower on ``x`` [b, 3, H, W] (float32, on the tower's device) and record the raw terms."""
        raise NotImplementedError

    def project_(self, terms: torch.Tensor, share: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """In place: the frozen final LayerNorm on ``terms`` already multiplied into the output space; ``share``
        = (number of terms summed in one entry) / T, ``mean``/``std`` [b]."""
        mean, std = _expand(mean, terms), _expand(std, terms)
        return terms.sub_(share * mean * self.ln_post_gain).div_(std).add_(share * self.ln_post_bias)


class ViTTower(Tower):
    """open_clip's ``VisionTransformer`` with CLS-token pooling: standard residual blocks
    (``nn.MultiheadAttention`` with packed ``in_proj``), any MLP activation, with or without layer scale.

    The fixed maps (float32, on the device; documented for code that builds on the decomposition, e.g.
    ``utils.neurons.effects``). "Output space" is the residual stream multiplied by ``ln_post_proj``:

    Attributes:
        visual: the float32 image tower.
        ln_post_proj: ``[W, d]``, ``ln_post``'s gain times ``proj`` (row i scaled by gamma_i).
        ln_post_gain: ``[d]``, ``gamma @ proj``; ln_post_bias: ``[d]``, ``beta @ proj``; ln_post_eps.
        ls_1, ls_2: per layer, the layer scale of the attention and MLP branches, ``[W]`` (ones without).
        head_out: per layer, ``[H, dh, d]``: head h's block of ``out_proj``, times ls_1, into the output space.
        head_bias: per layer, ``[d]``: ``out_proj``'s bias times ls_1, in the output space.
        mlp_out: per layer, ``[W, d]``: ls_2 times ``ln_post_proj`` (an MLP output into the output space).
    """

    @classmethod
    def handles(cls, visual: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None \
            and visual.pool_type == "tok"

    @classmethod
    def check(cls, visual: nn.Module, name: str) -> None:
        _check_open_clip_blocks(visual, name)

    @torch.no_grad()
    def __init__(self, visual: nn.Module, device: torch.device):
        """Fold ``ln_post``'s gain, ``proj``, layer scale and each head's ``out_proj`` block into [., d] maps."""
        self.visual, self.device = visual, device  # float32, on device
        blocks = visual.transformer.resblocks
        self.num_layers = len(blocks)
        self.num_heads = blocks[0].attn.num_heads
        self.width = W = blocks[0].attn.embed_dim
        self.head_dim = dh = W // self.num_heads
        H, dev = self.num_heads, device
        proj = visual.proj.detach() if visual.proj is not None else torch.eye(W, device=dev)
        ln = visual.ln_post
        gamma = ln.weight.detach() if ln.weight is not None else torch.ones(W, device=dev)
        beta = ln.bias.detach() if ln.bias is not None else torch.zeros(W, device=dev)
        self.ln_post_eps = ln.eps
        self.ln_post_proj = G = gamma[:, None] * proj  # [W, d]
        self.ln_post_gain = G.sum(0)  # [d]  = gamma @ proj
        self.ln_post_bias = beta @ proj  # [d]
        self.out_dim = d = G.shape[1]
        self.ls_1 = [_layer_scale(b.ls_1, W, dev) for b in blocks]
        self.ls_2 = [_layer_scale(b.ls_2, W, dev) for b in blocks]
        self.head_out, self.head_bias, self.mlp_out = [], [], []
        for block, ls1, ls2 in zip(blocks, self.ls_1, self.ls_2):
            w_o = block.attn.out_proj.weight.detach()  # [W_out, W_in]
            b_o = block.attn.out_proj.bias
            b_o = b_o.detach() if b_o is not None else torch.zeros(W, device=dev)
            # head h's value dims are columns h*dh:(h+1)*dh of out_proj.weight
            self.head_out.append(((w_o.t() * ls1) @ G).view(H, dh, d))  # [H, dh, d]
            self.head_bias.append((b_o * ls1) @ G)  # [d], split over (token, head) entries
            self.mlp_out.append(ls2[:, None] * G)  # [W, d]

    def forward(self, x: torch.Tensor, request: Request) -> RawTerms:
        v = self.visual
        # --- embeddings: x0 = ln_pre(patch_embed + cls + pos)                                   [b, N, W]
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        b, N, W = x.shape
        L, H, dh, d, dev = self.num_layers, self.num_heads, self.head_dim, self.out_dim, self.device
        spatial = request.spatial
        spatial_sum = spatial == "sum"
        kept, slot = request.slots(L)  # slot of each layer in attn; -1: into attn_rest

        def empty(*shape):
            return torch.empty(shape, dtype=x.dtype, device=dev)

        attn_shape = (b, N, d) if spatial_sum else (b, L, N, H, d) if spatial else (b, kept, H, d)
        attentions = torch.zeros(attn_shape, dtype=x.dtype, device=dev) if spatial_sum else empty(*attn_shape)
        attn_rest = torch.zeros((b, d), dtype=x.dtype, device=dev) if kept < L else None
        cls_attentions, mlps = empty(b, L, d), empty(b, L + 1, d)
        extras: dict = {"post_activations": {}}
        if request.attention_maps:
            extras["attention_maps"] = empty(b, L, H, N)
        if request.ln_stats:
            extras["ln_1_mean"], extras["ln_1_std"] = empty(b, L, N), empty(b, L, N)
        mlps[:, 0] = x[:, 0] @ self.ln_post_proj

        for l, block in enumerate(v.transformer.resblocks):
            if request.ln_stats:
                extras["ln_1_mean"][:, l], extras["ln_1_std"][:, l] = _ln_stats(x, block.ln_1.eps)
            h = block.ln_1(x)
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, val = qkv.view(b, N, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [b, H, N, dh]
            out = F.scaled_dot_product_attention(q, k, val)  # every query row, fused kernel      [b, H, N, dh]
            # the CLS query row again, with an explicit float32 softmax, A[b, h, n]: every recorded attention term
            # and the CLS row of the residual stream come from it, so the terms sum exactly to the representation
            attn_cls = ((q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) * dh ** -0.5).softmax(-1)  # [b, H, N]
            out_cls = (attn_cls.unsqueeze(2) @ val).squeeze(2)  # [b, H, dh]
            out[:, :, 0] = out_cls
            if request.attention_maps:
                extras["attention_maps"][:, l] = attn_cls
            w_og, b_og = self.head_out[l], self.head_bias[l]
            if spatial_sum:
                # sum_h A[b,h,n] v[b,h,n] W_O,h + b_O / N: one [b, N, H*dh] @ [H*dh, d] product       [b, N, d]
                weighted = (attn_cls.unsqueeze(-1) * val).transpose(1, 2).reshape(b, N, H * dh)
                terms = weighted @ w_og.reshape(H * dh, d) + b_og / N
                attentions += terms
                cls_attentions[:, l] = terms[:, 0]
            elif spatial:
                # A[b,h,n] * v[b,h,n] W_O,h  + b_O / (N H)                                          [b, N, H, d]
                terms = torch.einsum("bhn,bhnk,hkd->bnhd", attn_cls, val, w_og) + b_og / (N * H)
                attentions[:, l] = terms
                cls_attentions[:, l] = terms[:, 0].sum(1)
            else:
                # sum over source tokens is the CLS row of the attention output
                if slot[l] >= 0:
                    attentions[:, slot[l]] = torch.einsum("bhk,hkd->bhd", out_cls, w_og) + b_og / H
                else:  # a layer not kept: summed over heads as well, one [b, H*dh] @ [H*dh, d] product
                    attn_rest += out_cls.reshape(b, H * dh) @ w_og.reshape(H * dh, d) + b_og
                cls_term = torch.einsum("bh,bhk,hkd->bd", attn_cls[:, :, 0], val[:, :, 0], w_og)
                cls_attentions[:, l] = cls_term + b_og / N
            attn_out = F.linear(out.transpose(1, 2).reshape(b, N, W), block.attn.out_proj.weight,
                                block.attn.out_proj.bias)
            x = x + block.ls_1(attn_out)

            mlp = block.mlp
            act = mlp.gelu(mlp.c_fc(block.ln_2(x)))  # [b, N, K]
            if l in request.post_activations:
                extras["post_activations"][l] = act
            mlp_out = mlp.c_proj(act)
            mlps[:, l + 1] = mlp_out[:, 0] @ self.mlp_out[l]
            x = x + block.ls_2(mlp_out)

        x_cls = x[:, 0]
        ln_mean, ln_std = _ln_stats(x_cls, self.ln_post_eps)  # [b], [b]
        pooled = v.ln_post(x_cls)
        representation = pooled @ v.proj if v.proj is not None else pooled
        # the share of ln_post's mean and bias in one entry: T = 2L + 1 terms, each split as recorded
        T = 2 * L + 1
        share = L / (T * N) if spatial_sum else 1.0 / (T * N * H) if spatial else 1.0 / (T * H)
        terms = {"attn": (attentions, share), "cls_attn": (cls_attentions, 1.0 / (T * N)), "mlp": (mlps, 1.0 / T)}
        if attn_rest is not None:  # (L - kept) * H head terms of share 1/(T*H) each
            terms["attn_rest"] = (attn_rest, (L - kept) / T)
        return RawTerms(terms, representation, ln_mean, ln_std, extras)


# ----------------------------------------------------------------------------- towers read out by pooling
class _Layer(NamedTuple):
    """One transformer block of a ``PooledTower``, read once: ``qkv(h, rope)`` -> q, k, v ``[b, H, N, dh]`` (q and
    k after any qk-norm and RoPE), ``scale`` of the scores, ``norm1``, ``inner_ln`` (a LayerNorm on the heads'
    concatenated output before ``out``, EVA02's ``scale_attn_inner``, or ``None``), ``out`` (the output
    ``nn.Linear``), ``ls1`` ``[W]`` (layer scale) and ``mlp(x)``: the block's MLP write ``[b, N, W]``, layer scale
    included (one lumped term per layer)."""

    qkv: object
    scale: float
    norm1: nn.Module
    inner_ln: Optional[nn.Module]
    out: nn.Linear
    ls1: torch.Tensor
    mlp: object


def _ln_params(ln: Optional[nn.Module], width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma, beta)`` ``[width]`` of a LayerNorm (ones and zeros without affine, or for ``None``)."""
    w = getattr(ln, "weight", None)
    b = getattr(ln, "bias", None)
    return (w.detach() if w is not None else torch.ones(width, dtype=like.dtype, device=like.device),
            b.detach() if b is not None else torch.zeros(width, dtype=like.dtype, device=like.device))


def _as_ln(module: Optional[nn.Module], what: str, name: str) -> Optional[nn.LayerNorm]:
    """``module`` if a LayerNorm, ``None`` if absent or ``nn.Identity``; ``UnsupportedModelError`` otherwise."""
    if module is None or isinstance(module, nn.Identity):
        return None
    if isinstance(module, nn.LayerNorm):
        return module
    raise UnsupportedModelError(f"model '{name}': {what} is {type(module).__name__}; only LayerNorm is supported")


def _std(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm's std over the last axis (biased variance + eps), in x's dtype: ``[...]``."""
    return (x.var(-1, unbiased=False) + eps).sqrt()


class PooledTower(Tower):
    """The towers whose embedding is read out of every token by a pooling step (docs/design.md section 1b):
    a latent-query attention pool (SigLIP's MAP head, PE-Core, CoCa), an average over tokens (CLIPA) or one token
    of a tower built on another code base (timm's EVA and MobileCLIP ViTs).

    Residual stream -> per-token final LayerNorm (statistics frozen) -> pooling with its pattern
    ``P[pool_head, token]`` frozen (``token``: one-hot on token 0; ``avg``: uniform) -> value and output maps ->
    ``+ mlp(norm(.))`` of a MAP head (one lumped term) -> a chain of LayerNorms (frozen) and linear maps. Each
    residual term ``c[token, W]`` therefore reads out as ``sum_t alpha[p, t] c[t] @ V[:, p] -> @ O`` with
    ``alpha = P / sigma`` (sigma: the final LayerNorm's std of each token) and then through the chain.

    The record: ``attn`` per backbone layer and head (summed over tokens and pooling heads), ``mlp`` ``[b, L+2, d]``
    (``mlp_labels``: the embedding, each block's MLP, then ``"pool"``: the pooling head's MLP and every
    image-independent constant: value and output biases, LayerNorm betas), ``cls_attn`` ``[b, L, d]``: each
    layer's *self* term (every token's attention to itself, summed over heads, read out by the pooling; for a
    token-pooled tower the CLS->CLS term), ``ln_post_mean``/``ln_post_std`` ``[b, N]``: the final per-token
    LayerNorm's statistics (zeros and ones without one).

    A subclass sets, before ``_build``: ``layers`` (``_Layer`` per block), ``embed(x) -> (x0 [b, N, W], rope)``,
    ``tok_norm`` (LayerNorm or ``None``), ``pool`` (``"attn"``, ``"token"`` or ``"avg"``), ``pool_start`` (the
    first token the pool reads), for ``"attn"``: ``pool_query`` ``[Hp, dhp]``, ``pool_k`` / ``pool_v``
    (``(weight [Hp*dhp, W], bias)``), ``pool_k_norm`` (a module on ``[b, Hp, N, dhp]`` or ``None``), ``pool_o``
    (``(weight [D, Hp*dhp], bias)``), ``pool_scale``; ``pool_mlp`` (``a -> mlp(norm(a))`` or ``None``; for
    ``map_mlp="gate"`` also ``pool_mlp_parts``: ``(norm LayerNorm or None, fc1, act, fc2)``) and
    ``chain``: a list of ``("ln", LayerNorm)`` / ``("lin", matrix [in, out], bias or None)``.
    """

    extra_terms = ("pool",)
    pool_mlp = None
    pool_mlp_parts = None
    pool_k_norm = None
    map_mlp = "lumped"  # or "gate": the pooling MLP split linearly over the terms (set by Decomposer)

    def _gate(self, a: torch.Tensor):
        """``map_mlp="gate"``: the pooling MLP ``m = fc2(act(fc1(norm(a))))`` made linear in ``a`` by freezing
        ``norm``'s std and the activation's gate ``g = act(u) / u`` (u = fc1's output): ``m = J a + k``. Returns
        ``(lin, k)``: ``lin(t) = t + J t`` for terms ``t`` [b, ..., D] and ``k`` [b, D]."""
        norm, fc1, act, fc2 = self.pool_mlp_parts
        u = fc1(norm(a) if norm is not None else a)  # [b, K]
        g = torch.where(u == 0, torch.zeros_like(u), act(u) / torch.where(u == 0, torch.ones_like(u), u))
        gamma, beta = _ln_params(norm, a.shape[-1], a)
        sd = _std(a, norm.eps) if norm is not None else torch.ones_like(a[:, 0])

        def lin(t: torch.Tensor) -> torch.Tensor:
            view = (-1, *([1] * (t.dim() - 2)))
            c = t - t.mean(-1, keepdim=True) if norm is not None else t
            h = (gamma * c / sd.view(*view, 1)) @ fc1.weight.t()
            return t + (g.view(g.shape[0], *view[1:], -1) * h) @ fc2.weight.t()

        k = F.linear(g * (beta @ fc1.weight.t() + (fc1.bias if fc1.bias is not None else 0)), fc2.weight, fc2.bias)
        return lin, k

    def _build(self) -> None:
        """Fold the fixed maps: the pool's value map ``pool_value`` [W, Hp, dhp] (final LN's gain and centring
        folded in), ``pool_out`` [Hp*dhp, D], the constant ``pool_const`` [D], and per layer ``head_maps``
        [H, dh, Hp, dhp] (inner LN, out_proj, layer scale and pool_value folded) and ``layer_bias`` [W]."""
        first = self.layers[0]
        self.width = W = first.out.out_features
        ref = first.out.weight
        gamma, beta = _ln_params(self.tok_norm, W, ref)
        if self.pool == "attn":
            wv, bv = self.pool_v
            wo, bo = (t.detach() if t is not None else None for t in self.pool_o)
            Hp, dhp = self.pool_query.shape
            V0 = wv.view(Hp, dhp, W).permute(2, 0, 1)  # [W, Hp, dhp]
            O = wo.t()
            bv = bv if bv is not None else torch.zeros(Hp * dhp, dtype=ref.dtype, device=ref.device)
            bo = bo if bo is not None else torch.zeros(O.shape[1], dtype=ref.dtype, device=ref.device)
        else:
            Hp, dhp = 1, W
            V0 = torch.eye(W, dtype=ref.dtype, device=ref.device)[:, None, :]
            O, bv, bo = torch.eye(W, dtype=ref.dtype, device=ref.device), 0, 0
        V = gamma[:, None, None] * V0
        if self.tok_norm is not None:
            V = V - V.mean(0, keepdim=True)  # LayerNorm's centring, a linear map
        self.pool_heads, self.pool_value, self.pool_out = Hp, V, O
        self.pool_const = (beta @ V0.reshape(W, -1) + bv) @ O + bo  # [D]: sum_t P = 1 carries beta and the biases
        self.head_maps, self.layer_bias = [], []
        for layer in self.layers:
            E = layer.out.weight.detach().t()  # [H*dh, W]
            b_o = layer.out.bias.detach() if layer.out.bias is not None else torch.zeros_like(E[0])
            if layer.inner_ln is not None:
                g_in, be_in = _ln_params(layer.inner_ln, E.shape[0], E)
                b_o = b_o + be_in @ E
                E = g_in[:, None] * E
                E = E - E.mean(0, keepdim=True)
            E = E * layer.ls1
            self.head_maps.append((E @ V.reshape(W, -1)).view(self.num_heads, self.head_dim, Hp, dhp))
            self.layer_bias.append(b_o * layer.ls1)
        self.out_dim = self._chain_lin(O[:1]).shape[-1]
        self.ln_post_gain = self.ln_post_bias = None  # no single final LayerNorm to fold: see project_

    # --- the readout
    def _pattern(self, xn: torch.Tensor) -> torch.Tensor:
        """The pooling pattern ``P`` [b, Hp, N] of the final (normed) tokens ``xn`` [b, N, W]."""
        b, N, _ = xn.shape
        s = self.pool_start
        P = xn.new_zeros(b, self.pool_heads, N)
        if self.pool == "token":
            P[:, :, 0] = 1
        elif self.pool == "avg":
            P[:, :, s:] = 1.0 / (N - s)
        else:
            Hp, dhp = self.pool_query.shape
            wk, bk = self.pool_k
            k = F.linear(xn[:, s:], wk, bk).view(b, N - s, Hp, dhp).transpose(1, 2)  # [b, Hp, N', dhp]
            if self.pool_k_norm is not None:
                k = self.pool_k_norm(k)
            P[:, :, s:] = (torch.einsum("pk,bptk->bpt", self.pool_query, k) * self.pool_scale).softmax(-1)
        return P

    def _read(self, r: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """A per-token residual term ``r`` [b, N, W] read out by the pool: ``[b, D]`` (before the chain)."""
        y = torch.einsum("bpt,btw->bpw", alpha, r)
        return torch.einsum("bpw,wpj->bpj", y, self.pool_value).flatten(1) @ self.pool_out

    def _read_heads(self, o: torch.Tensor, alpha: torch.Tensor, l: int) -> torch.Tensor:
        """Layer ``l``'s per-head attention outputs ``o`` [b, N, H, dh] read out: ``[b, H, D]``."""
        y = torch.einsum("bpt,bthk->bphk", alpha, o)
        return torch.einsum("bphk,hkpj->bhpj", y, self.head_maps[l]).flatten(2) @ self.pool_out

    def _read_bias(self, alpha: torch.Tensor, l: int) -> torch.Tensor:
        """Layer ``l``'s output bias (at every token) read out: ``[b, D]``."""
        z = torch.einsum("bp,w,wpj->bpj", alpha.sum(-1), self.layer_bias[l], self.pool_value)
        return z.flatten(1) @ self.pool_out

    def _chain(self, pooled: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The chain applied to ``pooled`` [b, D]: the representation [b, d] and the chain's LayerNorm stds."""
        stds = []
        for op in self.chain:
            if op[0] == "ln":
                stds.append(_std(pooled, op[1].eps))
                pooled = op[1](pooled)
            else:
                pooled = pooled @ op[1] if op[2] is None else pooled @ op[1] + op[2]
        return pooled, stds

    def _chain_lin(self, t: torch.Tensor, stds: Optional[list] = None, const: bool = False) -> torch.Tensor:
        """The chain's linear part applied to terms ``t`` [b, ..., D] with the LayerNorms' stds ``stds`` frozen
        (``const``: the affine chain, biases and betas included)."""
        i = 0
        for op in self.chain:
            if op[0] == "ln":
                g, be = _ln_params(op[1], t.shape[-1], t)
                sd = stds[i].view(-1, *([1] * (t.dim() - 1))) if stds is not None else 1.0
                t = g * (t - t.mean(-1, keepdim=True)) / sd + (be if const else 0)
                i += 1
            else:
                t = t @ op[1] + (op[2] if const and op[2] is not None else 0)
        return t

    def project_(self, terms: torch.Tensor, share: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The terms are recorded in the output space already (the frozen LayerNorms are applied per term)."""
        return terms

    @torch.no_grad()
    def forward(self, x: torch.Tensor, request: Request) -> RawTerms:
        if request.attention_maps or request.ln_stats or request.post_activations:
            raise UnsupportedModelError(f"{type(self).__name__}: attention_maps, ln_stats and post_activations (the "
                                        f"second-order extras) need a CLS-token open_clip VisionTransformer")
        spatial = request.spatial
        L, H = self.num_layers, self.num_heads
        x, rope = self.embed(x)
        x0, records = x, []
        for layer in self.layers:
            h = layer.norm1(x)
            q, k, v = layer.qkv(h, rope)  # [b, H, N, dh]
            A = ((q * layer.scale) @ k.transpose(-1, -2)).softmax(-1)  # [b, H, N, N], explicit
            o = A @ v
            b, N = o.shape[0], o.shape[2]
            o_flat = o.transpose(1, 2).reshape(b, N, -1)
            inner = 1.0
            if layer.inner_ln is not None:
                inner = _std(o_flat, layer.inner_ln.eps)[..., None, None]  # [b, N, 1, 1]
                o_flat = layer.inner_ln(o_flat)
            x = x + layer.ls1 * layer.out(o_flat)
            if spatial:
                rec = (A / inner.transpose(1, 2) if layer.inner_ln is not None else A, v)
            else:
                diag = A.diagonal(dim1=-2, dim2=-1)[..., None]  # [b, H, N, 1]: each token's attention to itself
                rec = (o.transpose(1, 2) / inner, (diag * v).transpose(1, 2) / inner)  # [b, N, H, dh] each
            m = layer.mlp(x)
            x = x + m
            records.append((rec, m))

        # the readout: frozen final LayerNorm statistics and pooling pattern
        if self.tok_norm is not None:
            mean, std = x.mean(-1), _std(x, self.tok_norm.eps)  # [b, N]
            xn = self.tok_norm(x)
        else:
            mean, std, xn = torch.zeros_like(x[..., 0]), torch.ones_like(x[..., 0]), x
        P = self._pattern(xn)  # [b, Hp, N]
        alpha = P / std[:, None, :]
        if self.pool == "attn":
            Hp, dhp = self.pool_query.shape
            wv, bv = self.pool_v
            vals = F.linear(xn, wv, bv).view(b, N, Hp, dhp)
            a = torch.einsum("bpt,btpj->bpj", P, vals).flatten(1)
            a = F.linear(a, *self.pool_o)
        else:
            a = torch.einsum("bt,btw->bw", P[:, 0], xn)
        m_pool = self.pool_mlp(a) if self.pool_mlp is not None else torch.zeros_like(a)
        representation, stds = self._chain(a + m_pool)
        if self.map_mlp == "gate" and self.pool_mlp is not None:
            lin, k = self._gate(a)
            out = lambda t: self._chain_lin(lin(t), stds)  # noqa: E731
            const = lin(self.pool_const.expand_as(a)) + k
        else:
            out = lambda t: self._chain_lin(t, stds)  # noqa: E731
            const = self.pool_const + m_pool

        kept, slot = request.slots(L)
        d = self.out_dim
        mlps = x.new_empty(b, L + 2, d)
        cls_attn = x.new_empty(b, L, d)
        attn_rest = x.new_zeros(b, d) if kept < L else None
        attn = x.new_zeros(b, N, d) if spatial == "sum" else x.new_empty(b, L, N, H, d) if spatial \
            else x.new_empty(b, kept, H, d)
        mlps[:, 0] = out(self._read(x0, alpha))
        for l, (rec, m) in enumerate(records):
            mlps[:, l + 1] = out(self._read(m, alpha))
            bias = self._read_bias(alpha, l)  # [b, D]
            if spatial:
                A, v = rec
                Ahat = torch.einsum("bpt,bhts->bphs", alpha, A)
                z = torch.einsum("bphs,bhsk,hkpj->bshpj", Ahat, v, self.head_maps[l]).flatten(3) @ self.pool_out
                terms = out(z + bias[:, None, None] / (N * H))  # [b, N, H, d]
                if spatial == "sum":
                    attn += terms.sum(2)
                else:
                    attn[:, l] = terms
                self_o = (A.diagonal(dim1=-2, dim2=-1)[..., None] * v).transpose(1, 2)
            else:
                o, self_o = rec
                heads = out(self._read_heads(o, alpha, l) + bias[:, None] / H)  # [b, H, d]
                if slot[l] >= 0:
                    attn[:, slot[l]] = heads
                else:
                    attn_rest += heads.sum(1)
            cls_attn[:, l] = out(self._read_heads(self_o, alpha, l).sum(1) + bias / N)
        mlps[:, L + 1] = self._chain_lin(const, stds, const=True)
        terms = {"attn": (attn, 0.0), "cls_attn": (cls_attn, 0.0), "mlp": (mlps, 0.0)}
        if attn_rest is not None:
            terms["attn_rest"] = (attn_rest, 0.0)
        return RawTerms(terms, representation, mean, std, {})


def _check_open_clip_blocks(visual: nn.Module, name: str) -> None:
    """``UnsupportedModelError`` unless every block of an open_clip ``VisionTransformer`` is a standard
    ``ResidualAttentionBlock`` with packed ``in_proj`` weights."""
    from open_clip.transformer import ResidualAttentionBlock

    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            raise UnsupportedModelError(
                f"model '{name}': block {i} is {type(block).__name__} (qk-norm / scaled-cosine / head-scaling "
                f"attention); only the standard ResidualAttentionBlock is supported")
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"model '{name}': cross-attention blocks are not supported")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise UnsupportedModelError(f"model '{name}': attention without packed in_proj weights/bias")


def _open_clip_layer(block: nn.Module, width: int, device: torch.device) -> _Layer:
    """A ``_Layer`` of an open_clip ``ResidualAttentionBlock``."""
    a = block.attn
    H, dh = a.num_heads, a.embed_dim // a.num_heads

    def qkv(h, rope):
        b, N, _ = h.shape
        return F.linear(h, a.in_proj_weight, a.in_proj_bias).view(b, N, 3, H, dh).permute(2, 0, 3, 1, 4)

    return _Layer(qkv, dh ** -0.5, block.ln_1, None, a.out_proj, _layer_scale(block.ls_1, width, device),
                  lambda x: block.ls_2(block.mlp(block.ln_2(x))))


class OpenClipPooledTower(PooledTower):
    """open_clip's ``VisionTransformer`` read out by average pooling (``pool_type='avg'``: CLIPA, with
    ``final_ln_after_pool`` or not) or by CoCa's ``attentional_pool`` (the first query's output)."""

    @classmethod
    def handles(cls, visual: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(visual, VisionTransformer) and (visual.attn_pool is not None or visual.pool_type != "tok")

    @classmethod
    def check(cls, visual: nn.Module, name: str) -> None:
        _check_open_clip_blocks(visual, name)
        if visual.attn_pool is not None:
            if getattr(visual, "attn_pool_contrastive", None) is not None:
                raise UnsupportedModelError(f"model '{name}': attentional_pool='{visual.attn_pool_type}' (two "
                                            f"poolers) is not supported; only CoCa's single attentional pool")
            if visual.pool_type != "tok":
                raise UnsupportedModelError(f"model '{name}': attentional pool with pool_type='{visual.pool_type}';"
                                            f" only its first query ('tok') is supported")
        elif visual.pool_type != "avg":
            raise UnsupportedModelError(f"model '{name}': pool_type='{visual.pool_type}' is not supported")

    @torch.no_grad()
    def __init__(self, visual: nn.Module, device: torch.device):
        self.visual, self.device = visual, device
        blocks = visual.transformer.resblocks
        self.num_layers, self.num_heads = len(blocks), blocks[0].attn.num_heads
        W = blocks[0].attn.embed_dim
        self.head_dim = W // self.num_heads
        self.layers = [_open_clip_layer(b, W, device) for b in blocks]
        self.embed = lambda x: (visual._embeds(x), None)
        proj = [("lin", visual.proj.detach(), None)] if visual.proj is not None else []
        if visual.attn_pool is not None:  # CoCa: ln_k on every token, then one query of a MultiheadAttention
            pool = visual.attn_pool
            mha = pool.attn
            Dp, Hp = mha.embed_dim, mha.num_heads
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
            else:
                wq, wk, wv = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
            bq, bk, bv = mha.in_proj_bias.detach().chunk(3) if mha.in_proj_bias is not None else (None,) * 3
            self.tok_norm, self.pool, self.pool_start = _as_ln(pool.ln_k, "ln_k", "coca"), "attn", 0
            self.pool_query = F.linear(pool.ln_q(pool.query)[:1], wq, bq).view(Hp, Dp // Hp)
            self.pool_k, self.pool_v, self.pool_o = (wk, bk), (wv, bv), (mha.out_proj.weight, mha.out_proj.bias)
            self.pool_scale = (Dp // Hp) ** -0.5
            self.chain = [("ln", visual.ln_post)] + proj
        else:  # average of the patch tokens (open_clip leaves the CLS token out)
            self.pool, self.pool_start = "avg", 1
            after = visual.final_ln_after_pool
            self.tok_norm = None if after else visual.ln_post
            self.chain = ([("ln", visual.ln_post)] if after else []) + proj
        self._build()


def _timm_layer(block: nn.Module, width: int, device: torch.device) -> _Layer:
    """A ``_Layer`` of a timm ``Block`` (VisionTransformer) or ``EvaBlock`` (Eva: RoPE, SwiGLU, inner LN)."""
    a = block.attn
    H = a.num_heads

    def qkv(h, rope):
        b, N, _ = h.shape
        if getattr(a, "qkv", None) is not None:
            qkv = a.qkv(h)
            if getattr(a, "q_bias", None) is not None:
                qkv = qkv + torch.cat((a.q_bias, a.k_bias, a.v_bias))
            q, k, v = qkv.reshape(b, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (p(h).reshape(b, N, H, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = a.q_norm(q), a.k_norm(k)
        if rope is not None:  # RoPE rotates q and k of the patch tokens only
            from timm.layers import apply_rot_embed_cat

            n, half = a.num_prefix_tokens, getattr(a, "rotate_half", False)
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2).type_as(v)
        return q, k, v

    inner = a.norm if isinstance(a.norm, nn.LayerNorm) else None
    if hasattr(block, "gamma_1"):  # EvaBlock
        g1, g2 = block.gamma_1, block.gamma_2
        ls1 = g1.detach() if g1 is not None else torch.ones(width, device=device, dtype=a.proj.weight.dtype)
        mlp = (lambda x: block.mlp(block.norm2(x)) * g2) if g2 is not None else (lambda x: block.mlp(block.norm2(x)))
    else:
        ls1 = _layer_scale(block.ls1, width, device)
        mlp = lambda x: block.ls2(block.mlp(block.norm2(x)))  # noqa: E731
    return _Layer(qkv, a.scale, block.norm1, inner, a.proj, ls1, mlp)


class TimmTower(PooledTower):
    """open_clip's ``TimmModel`` with a timm ``VisionTransformer`` trunk (SigLIP, SigLIP 2, MobileCLIP's ViTs, the
    hybrid conv-stem ones included: the stem is the embedding term) or ``Eva`` trunk (EVA01/EVA02: RoPE, SwiGLU,
    inner LayerNorm, layer scale; PE-Core), read out by a MAP head (``AttentionPoolLatent``), the first token or
    the mean of the tokens, then ``fc_norm``, the trunk's head and open_clip's linear projection, if any."""

    @classmethod
    def handles(cls, visual: nn.Module) -> bool:
        return type(visual).__name__ == "TimmModel"

    @classmethod
    def check(cls, visual: nn.Module, name: str) -> None:
        from timm.layers import Attention, AttentionPoolLatent, AttentionRope
        from timm.models.eva import Eva, EvaAttention, EvaBlock
        from timm.models.vision_transformer import Block, VisionTransformer

        trunk = visual.trunk
        kind = type(trunk).__name__
        if type(trunk) not in (VisionTransformer, Eva):
            why = _TIMM_REASONS.get(kind, "not a plain ViT")
            raise UnsupportedModelError(f"model '{name}': timm trunk {kind} ({why}); supported: timm "
                                        f"VisionTransformer and Eva")
        for i, block in enumerate(trunk.blocks):
            attn = getattr(block, "attn", None)
            ok = (type(block) is Block and type(attn) is Attention) or \
                 (type(block) is EvaBlock and type(attn) in (EvaAttention, AttentionRope))
            if not ok:
                raise UnsupportedModelError(f"model '{name}': block {i} is {type(block).__name__} with "
                                            f"{type(attn).__name__}; only timm's Block/Attention and EvaBlock")
            kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
            if getattr(attn, "gate", None) is not None or kv_heads != attn.num_heads:
                raise UnsupportedModelError(f"model '{name}': block {i} has gated or grouped-query attention")
            _as_ln(attn.norm, f"block {i}'s inner attention norm", name)
        if getattr(trunk, "rope_mixed", False):
            raise UnsupportedModelError(f"model '{name}': mixed (per-layer) RoPE is not supported")
        _as_ln(trunk.norm, "the final norm", name)
        _as_ln(trunk.fc_norm, "fc_norm", name)
        if trunk.attn_pool is not None:
            ap = trunk.attn_pool
            if type(ap) is not AttentionPoolLatent or ap.latent_len != 1 or ap.pos_embed is not None:
                raise UnsupportedModelError(f"model '{name}': attention pool {type(ap).__name__} (needs "
                                            f"AttentionPoolLatent with one latent and no position embedding)")
            _as_ln(ap.norm, "the attention pool's norm", name)
        elif trunk.global_pool not in ("token", "avg"):
            raise UnsupportedModelError(f"model '{name}': timm global_pool='{trunk.global_pool}' is not supported")
        if not isinstance(trunk.head, (nn.Linear, nn.Identity)):
            raise UnsupportedModelError(f"model '{name}': timm head {type(trunk.head).__name__}")
        for child in visual.head.children():
            if not isinstance(child, (nn.Linear, nn.Dropout, nn.Identity)):
                raise UnsupportedModelError(f"model '{name}': open_clip timm projection {type(child).__name__} "
                                            f"(an MLP projection is not linear)")

    @torch.no_grad()
    def __init__(self, visual: nn.Module, device: torch.device):
        self.visual, self.device = visual, device
        trunk = visual.trunk
        eva = hasattr(trunk, "rope")
        blocks = list(trunk.blocks)
        self.num_layers, self.num_heads = len(blocks), blocks[0].attn.num_heads
        W = trunk.embed_dim
        self.head_dim = blocks[0].attn.head_dim
        self.layers = [_timm_layer(b, W, device) for b in blocks]

        def embed(x):
            x = trunk.patch_embed(x)
            x, rope = trunk._pos_embed(x) if eva else (trunk._pos_embed(x), None)
            if not eva:
                x = trunk.patch_drop(x)
            return trunk.norm_pre(x), rope

        self.embed = embed
        self.tok_norm = _as_ln(trunk.norm, "norm", "timm")
        self.num_prefix_tokens = prefix = trunk.num_prefix_tokens
        if trunk.attn_pool is not None:
            ap = trunk.attn_pool
            self.pool = "attn"
            self.pool_start = 0 if eva or getattr(trunk, "pool_include_prefix", False) else prefix
            q = ap.q(ap.latent).reshape(1, 1, ap.num_heads, ap.head_dim).transpose(1, 2)
            self.pool_query = ap.q_norm(q)[0, :, 0]  # [Hp, dhp]
            E = ap.num_heads * ap.head_dim
            wkv, bkv = ap.kv.weight.detach(), ap.kv.bias
            bkv = bkv.detach() if bkv is not None else None
            self.pool_k = (wkv[:E], None if bkv is None else bkv[:E])
            self.pool_v = (wkv[E:], None if bkv is None else bkv[E:])
            self.pool_k_norm = None if isinstance(ap.k_norm, nn.Identity) else ap.k_norm
            self.pool_o, self.pool_scale = (ap.proj.weight, ap.proj.bias), ap.scale
            if ap.mlp is not None:
                self.pool_mlp = lambda a: ap.mlp(ap.norm(a))
                mlp = ap.mlp
                if type(mlp).__name__ == "Mlp" and isinstance(mlp.norm, nn.Identity) and \
                        float(mlp.act(torch.zeros(1, dtype=mlp.fc1.weight.dtype, device=device))) == 0:
                    self.pool_mlp_parts = (_as_ln(ap.norm, "the attention pool's norm", "timm"), mlp.fc1, mlp.act,
                                           mlp.fc2)
        else:
            self.pool = trunk.global_pool
            self.pool_start = 0 if self.pool == "token" or getattr(trunk, "pool_include_prefix", False) else prefix
        chain = []
        if isinstance(trunk.fc_norm, nn.LayerNorm):
            chain.append(("ln", trunk.fc_norm))
        for lin in [trunk.head, *visual.head.children()]:
            if isinstance(lin, nn.Linear):
                chain.append(("lin", lin.weight.detach().t(), None if lin.bias is None else lin.bias.detach()))
        self.chain = chain
        self._build()


_TIMM_REASONS = {"ConvNeXt": "convolutional: no attention heads to split",
                 "FastVit": "hybrid convolutional/attention: no attention heads in most stages",
                 "MbConvLMHT": "hybrid convolutional/attention (ViTamin)",
                 "SwinTransformer": "windowed attention with relative position bias",
                 "VisionTransformerRelPos": "relative position bias in attention"}


# the tower implementations, tried in order; add a Tower subclass here to support another image tower
TOWERS: list[type[Tower]] = [ViTTower, OpenClipPooledTower, TimmTower]
_HINTS = {"ModifiedResNet": "ResNet: convolutional, no attention heads to split"}


def _tower_class(model: nn.Module, name: str) -> type[Tower]:
    """The ``Tower`` implementation of ``model.visual``, checked; ``UnsupportedModelError`` otherwise."""
    visual = getattr(model, "visual", None)
    if visual is None:
        raise UnsupportedModelError(f"model '{name}': has no image tower (`model.visual`)")
    for tower in TOWERS:
        if tower.handles(visual):
            tower.check(visual, name)
            return tower
    kind = type(visual).__name__
    raise UnsupportedModelError(f"model '{name}': unsupported image tower {kind} ({_HINTS.get(kind, kind)}); only "
                                f"transformer towers are supported")


def check_supported(model: nn.Module, model_name: Optional[str] = None) -> None:
    """Raise ``UnsupportedModelError`` unless ``model.visual`` is an image tower we can decompose exactly.

    Supported (``TOWERS``): ``open_clip.transformer.VisionTransformer`` with CLS-token pooling, average pooling
    or CoCa's attentional pool, standard residual blocks (``nn.MultiheadAttention``), any MLP activation (GELU,
    QuickGELU, ...), with or without layer scale; open_clip's ``TimmModel`` with a timm ``VisionTransformer`` or
    ``Eva`` trunk (MAP head, token or average pooling). docs/towers.md lists every pretrained model.
    """
    _tower_class(model, model_name or type(model).__name__)


# ----------------------------------------------------------------------------- the engine
class Decomposer:
    """The decomposition engine of one model: its fixed maps are built once; each call returns a new record.

    ``Decomposer(model, device)(images, ...)`` -> ``Decomposition``. Nothing of a call is kept on the engine.

    Numerics: the decomposition runs in float32 (``dtype=torch.float64``: in float64, for checks).

    - Autocast (CPU or CUDA) is disabled inside the constructor and the call, so an enclosing
      ``torch.autocast`` changes nothing.
    - A float16 or bfloat16 model is **upcast**: the engine decomposes a float32 copy of ``model.visual`` (made
      once, here; the model passed in is not modified). Half-precision weights are exactly representable in
      float32, so this is the decomposition of the model's own weights, computed exactly: its terms sum to
      ``model.float().encode_image``. They do not sum to the half-precision forward, which differs from it by
      half-precision rounding (~1e-3). A warning gives the size of the copy; to avoid it, pass a float32 model.
    - Every attention term (``attn`` in all modes, ``cls_attn``, ``attention_maps``) comes from one explicit
      float32 softmax of the CLS query row, and the CLS row of the residual stream is computed from the same
      softmax, so the terms sum to the representation up to float32 rounding. The other query rows use
      ``F.scaled_dot_product_attention`` (the fused kernel, as open_clip does).
    - ``device``: if the image tower is elsewhere (or spread over devices), a float32 copy is made on ``device``.

    Args:
        model: an open_clip CLIP model (unmodified, from ``open_clip.create_model_and_transforms``).
        device: where the computation runs and the results live (default: the model's device).
        model_name: used in error messages.
        dtype: ``torch.float32`` (default) or ``torch.float64`` (a float64 copy of the tower: checks to 1e-10).
        map_mlp: for a MAP head (SigLIP, PE-Core), ``"lumped"`` (default): its MLP is one term, the last ``mlp``
            entry; ``"gate"``: the MLP's input LayerNorm std and its activation's gate ``act(u)/u`` frozen, so that
            it is linear, ``J a + k``, and ``J`` goes into every term (docs/design.md section 1b).

    Attributes:
        tower: the ``Tower`` implementation for ``model.visual`` (a ``ViTTower``: its fixed maps are public).
        visual: the float32 image tower it runs (``model.visual`` itself when that is float32 on ``device``).
        device, num_layers (L), num_heads (H), width (W), head_dim, out_dim (d).
    """

    def __init__(self, model: nn.Module, device: Optional[torch.device | str] = None,
                 model_name: Optional[str] = None, dtype: torch.dtype = torch.float32, map_mlp: str = "lumped"):
        tower_class = _tower_class(model, model_name or type(model).__name__)
        if map_mlp not in ("lumped", "gate"):
            raise InputError(f"map_mlp={map_mlp!r}: expected 'lumped' or 'gate'")
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"Decomposer: dtype {dtype}; expected torch.float32 or torch.float64")
        self.dtype = dtype
        self.device = _resolve_device(device if device is not None else next(model.visual.parameters()).device)
        self.visual = float32_tower(model.visual, self.device, dtype)
        if self.visual is not model.visual:
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.visual.parameters()})
            devices = sorted({str(p.device) for p in model.visual.parameters()})
            gib = sum(p.numel() * p.element_size() for p in self.visual.parameters()) / 2 ** 30
            warnings.warn(f"Decomposer: the image tower is {'/'.join(dtypes)} on {'/'.join(devices)}; decomposing a "
                          f"{str(dtype).replace('torch.', '')} copy on {self.device} ({gib:.2f} GiB)", stacklevel=3)
        with autocast_off(self.device):
            self.tower = tower_class(self.visual, self.device)
        if map_mlp == "gate":
            if getattr(self.tower, "pool_mlp_parts", None) is None:
                raise UnsupportedModelError(f"model '{model_name or type(model).__name__}': map_mlp='gate' needs a "
                                            f"MAP head with a plain MLP (fc1, elementwise activation, fc2)")
            self.tower.map_mlp = "gate"
        t = self.tower
        self.num_layers, self.num_heads, self.width, self.head_dim, self.out_dim = \
            t.num_layers, t.num_heads, t.width, t.head_dim, t.out_dim
        self.mlp_labels = t.mlp_labels

    def request(self, spatial: Spatial = False, layers: Optional[Iterable[int]] = None, attention_maps: bool = False,
                ln_stats: bool = False, post_activations: Iterable[int] = ()) -> Request:
        """Check the options of a call (see ``__call__``); ``InputError`` naming the bad one."""
        L = self.num_layers
        if not (spatial is False or spatial is True or spatial == "sum"):
            raise InputError(f"spatial={spatial!r}: expected False, True or 'sum'")
        post = tuple(sorted(set(int(l) for l in post_activations)))
        for l in post:
            if not 0 <= l < L:
                raise InputError(f"post_activations: layer {l} out of range for a {L}-layer model")
        if layers is not None:
            layers = tuple(int(l) for l in layers)
            if spatial:
                raise InputError("layers: only without spatial (the spatial modes keep or sum every layer)")
            if list(layers) != sorted(set(layers)) or not all(0 <= l < L for l in layers):
                raise InputError(f"layers {list(layers)}: must be distinct, ascending and in 0..{L - 1}")
        return Request(spatial, layers, bool(attention_maps), bool(ln_stats), post)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, *, spatial: Spatial = False, layers: Optional[Iterable[int]] = None,
                 attention_maps: bool = False, ln_stats: bool = False, post_activations: Iterable[int] = ()
                 ) -> Decomposition:
        """Decompose ``images`` [b, 3, H, W] (any dtype and device; run in float32 on ``self.device``).

        Args:
            spatial: ``False``: attn ``[b, L', H, d]``, summed over source tokens (the fast mode). ``True``: per
                source token, ``[b, L, N, H, d]``. ``"sum"``: the memory-light spatial mode, the per-token terms
                summed over layers and heads inside the forward, ``[b, N, d]`` (segmentation; each entry takes
                the share ``L·H / ((2L+1)·N·H)``, so everything still sums to r/||r||).
            layers: keep the attention terms of these layers only (ascending, distinct; not with ``spatial``):
                attn becomes ``[b, len(layers), H, d]`` and the other layers, summed over heads inside the
                forward, go to ``attn_rest`` ``[b, d]``. cls_attn and mlp keep every layer. ``None``: every layer.
            attention_maps, ln_stats, post_activations: the extras (``Decomposition``'s fields of those names).
        """
        req = self.request(spatial, layers, attention_maps, ln_stats, post_activations)
        with autocast_off(self.device):
            raw = self.tower.forward(images.to(self.device, self.dtype), req)
            norm = raw.representation.norm(dim=-1)  # [b]
            out = {name: self.tower.project_(t, share, raw.ln_mean, raw.ln_std).div_(_expand(norm, t))
                   for name, (t, share) in raw.terms.items()}
        kept = tuple(range(self.num_layers)) if req.layers is None else req.layers
        return Decomposition(attn=out["attn"], mlp=out["mlp"], cls_attn=out["cls_attn"], attn_rest=out.get("attn_rest"),
                             representation=raw.representation, norm=norm, layers=kept, num_layers=self.num_layers,
                             num_heads=self.num_heads, spatial=req.spatial, ln_post_mean=raw.ln_mean,
                             ln_post_std=raw.ln_std, mlp_labels=self.mlp_labels,
                             num_prefix_tokens=self.tower.num_prefix_tokens, **raw.extras)


def decompose(model: nn.Module | Decomposer, images: torch.Tensor, *, spatial: Spatial = False,
              layers: Optional[Iterable[int]] = None, attention_maps: bool = False, ln_stats: bool = False,
              post_activations: Iterable[int] = (), device: Optional[torch.device | str] = None,
              model_name: Optional[str] = None) -> Decomposition:
    """Decompose ``images`` [b, 3, H, W] with ``model`` (an open_clip model, or a ``Decomposer`` to reuse its
    fixed maps); the options are ``Decomposer.__call__``'s, ``device`` and ``model_name`` the constructor's."""
    engine = model if isinstance(model, Decomposer) else Decomposer(model, device, model_name)
    return engine(images, spatial=spatial, layers=layers, attention_maps=attention_maps, ln_stats=ln_stats,
                  post_activations=post_activations)


# ----------------------------------------------------------------------------- the original API
class PRSLogger:
    """The original ``hook_prs_logger`` API (``reinit`` -> ``encode_image`` -> ``finalize``) over a ``Decomposer``,
    for code written against it; new code calls the ``Decomposer`` (or ``decompose``) directly.

    ``encode_image`` decomposes the batch and returns its unnormalised representation [b, d]; ``finalize``
    returns ``(attentions, mlps)``, the ``Decomposition``'s attn and mlp, and sets ``cls_attentions`` (and with
    ``layers``, ``attn_rest``). Given another representation, ``finalize`` divides by its norm instead (new
    tensors; the earlier results are left as they were). After ``encode_image`` the extras asked for are on the
    logger: ``attention_maps``, ``ln_1_mean``/``ln_1_std``, ``post_gelu`` ``{layer: [b, N, K]}``,
    ``post_ln_mean``/``post_ln_std``; ``decomposition`` holds the whole record.

    Args: ``model``, ``device`` and ``model_name`` as ``Decomposer``; ``spatial``, ``layers`` and the extras
    (``attention_maps``, ``ln_stats``, ``post_gelu_layers`` = ``post_activations``) as ``Decomposer.__call__``.
    """

    def __init__(self, model: nn.Module, device: Optional[torch.device | str] = None, spatial: Spatial = False,
                 attention_maps: bool = False, ln_stats: bool = False, post_gelu_layers: Iterable[int] = (),
                 layers: Optional[Iterable[int]] = None, model_name: Optional[str] = None):
        self.engine = Decomposer(model, device, model_name)
        req = self.engine.request(spatial, layers, attention_maps, ln_stats, post_gelu_layers)
        self.spatial, self.keep_attention_maps, self.keep_ln_stats = req.spatial, req.attention_maps, req.ln_stats
        self.layers = None if req.layers is None else list(req.layers)
        self.post_gelu_layers = list(req.post_activations)
        self.reinit()

    def __getattr__(self, name: str):  # visual, device, num_layers, num_heads, width, head_dim, out_dim
        if name in ("visual", "device", "num_layers", "num_heads", "width", "head_dim", "out_dim"):
            return getattr(self.engine, name)
        raise AttributeError(name)

    def reinit(self) -> None:
        """Forget the last batch."""
        self.decomposition: Optional[Decomposition] = None
        self.attentions = self.mlps = self.cls_attentions = self.attn_rest = self.representation = None
        self.attention_maps = self.ln_1_mean = self.ln_1_std = self.post_ln_mean = self.post_ln_std = None
        self.post_gelu: dict[int, torch.Tensor] = {}
        self._norm = None

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Decompose ``images`` [b, 3, H, W]; return the unnormalised embedding [b, d] (then call ``finalize``)."""
        self.reinit()
        d = self.engine(images, spatial=self.spatial, layers=self.layers, attention_maps=self.keep_attention_maps,
                        ln_stats=self.keep_ln_stats, post_activations=self.post_gelu_layers)
        self.decomposition, self.representation = d, d.representation
        self.attention_maps, self.ln_1_mean, self.ln_1_std = d.attention_maps, d.ln_1_mean, d.ln_1_std
        self.post_gelu, self.post_ln_mean, self.post_ln_std = dict(d.post_activations), d.ln_post_mean, d.ln_post_std
        return d.representation

    __call__ = encode_image

    def finalize(self, representation: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attentions, mlps)`` divided by ``||representation||`` (default: the one ``encode_image`` returned):
        ``[b, L, H, d]`` (spatial: ``[b, L, N, H, d]``; spatial="sum": ``[b, N, d]``) and ``[b, L+1, d]``."""
        d = self.decomposition
        if d is None:
            raise RuntimeError("PRSLogger.finalize: call encode_image(images) first")
        if representation is None:
            representation = d.representation
        b = d.attn.shape[0]
        if representation.dim() != 2 or representation.shape[0] != b:
            raise InputError(f"PRSLogger.finalize: representation has shape {list(representation.shape)}, "
                             f"expected [{b}, d] for the logged batch of {b} images")
        if representation is d.representation:
            norm = d.norm
        else:
            with autocast_off(self.engine.device):
                norm = representation.detach().to(self.engine.device, torch.float32).norm(dim=-1)
        if self._norm is not None and (norm is self._norm or torch.equal(norm, self._norm)):
            return self.attentions, self.mlps
        rest = d.attn_rest
        if norm is d.norm or torch.equal(norm, d.norm):
            attn, mlps, cls_attn = d.attn, d.mlp, d.cls_attn
        else:  # divided by the new norm instead of the logged one
            scale = d.norm / norm
            attn, mlps, cls_attn = d.attn * _expand(scale, d.attn), d.mlp * scale[:, None, None], \
                d.cls_attn * scale[:, None, None]
            rest = None if rest is None else rest * scale[:, None]
        self.attentions, self.mlps, self.cls_attentions, self.attn_rest, self._norm = attn, mlps, cls_attn, rest, norm
        return attn, mlps


def hook_prs_logger(model: nn.Module, device: Optional[torch.device | str] = None, spatial: Spatial = False,
                    **kwargs) -> PRSLogger:
    """Create a ``PRSLogger`` for ``model`` (same call as the original ``hook_prs_logger``)."""
    return PRSLogger(model, device, spatial=spatial, **kwargs)
