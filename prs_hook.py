"""The hooked open_clip ViT: an explicit image-tower forward that records every direct contribution.

The CLS residual stream after the last block is a sum of ``2L + 1`` terms: the embedding term, L attention
outputs and L MLP outputs (docs/design.md section 1). Each attention output splits per head and per source token.
``PRSLogger`` runs the image tower of an unmodified ``open_clip`` model block by block, reading its weights
by name, and records those terms already multiplied into the output space, so that ``finalize`` only has to
apply the frozen ``ln_post`` statistics (docs/design.md section 2)::

    P(c) = (gamma * (c - mu / T) / sigma + beta / T) @ proj / ||r||

Nothing of size ``[batch, tokens, tokens, heads, width]`` is ever built: only the CLS query row of each
attention map is computed, and without ``spatial=True`` the source-token axis is reduced inside the forward.

Port from the original ``hook_prs_logger`` API::

    prs = hook_prs_logger(model, device, spatial=False)
    prs.reinit()
    representation = prs.encode_image(images)             # was: model.encode_image(..., attn_method='head')
    attentions, mlps = prs.finalize(representation)      # [b, L, H, d] (spatial: [b, L, N, H, d]), [b, L+1, d]
    cls_attn = prs.cls_attentions                        # [b, L, d]

``hook_prs_logger(model, device, layers=[28, 29, 30, 31])`` keeps the attention terms of those layers only
(``[b, 4, H, d]``) and sums the others over heads inside the forward into ``prs.attn_rest`` ``[b, d]``.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import InputError, UnsupportedModelError

__all__ = ["PRSLogger", "UnsupportedModelError", "autocast_off", "check_supported", "float32_tower", "hook_prs_logger"]


def check_supported(model: nn.Module, model_name: Optional[str] = None) -> None:
    """Raise ``UnsupportedModelError`` unless ``model.visual`` is an open_clip ViT we can decompose exactly.

    Supported: ``open_clip.transformer.VisionTransformer`` with CLS-token pooling, standard residual blocks
    (``nn.MultiheadAttention``), any MLP activation (GELU, QuickGELU, ...), with or without layer scale.
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    name = model_name or type(model).__name__
    visual = getattr(model, "visual", None)
    if visual is None:
        raise UnsupportedModelError(f"model '{name}': has no image tower (`model.visual`)")
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        hint = {"ModifiedResNet": "ResNet image towers", "TimmModel": "timm image towers"}.get(kind, kind)
        raise UnsupportedModelError(
            f"model '{name}': unsupported image tower {kind} ({hint}); only open_clip VisionTransformer is supported")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"model '{name}': attention pooling (attentional_pool) is not supported")
    if visual.pool_type != "tok":
        raise UnsupportedModelError(
            f"model '{name}': pool_type='{visual.pool_type}' (average pooling) is not supported; needs CLS-token pooling")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block) is not ResidualAttentionBlock:
            raise UnsupportedModelError(
                f"model '{name}': block {i} is {type(block).__name__} (qk-norm / scaled-cosine / head-scaling "
                f"attention); only the standard ResidualAttentionBlock is supported")
        if hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(f"model '{name}': cross-attention blocks are not supported")
        if block.attn.in_proj_weight is None or block.attn.in_proj_bias is None:
            raise UnsupportedModelError(f"model '{name}': attention without packed in_proj weights/bias")


def _layer_scale(module: nn.Module, width: int, ref: torch.Tensor) -> torch.Tensor:
    """The LayerScale vector of ``ls_1``/``ls_2`` (ones for ``nn.Identity``), float32, [width]."""
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, dtype=torch.float32, device=ref.device)
    return gamma.detach().float()


def _resolve_device(device: torch.device | str) -> torch.device:
    """``device`` with an explicit index for CUDA (``cuda`` -> ``cuda:<current>``), comparable to a tensor's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def float32_tower(visual: nn.Module, device: torch.device) -> nn.Module:
    """``visual`` itself if all its floating-point weights are float32 on ``device``; otherwise a float32 copy on
    ``device`` (the model passed in is left untouched; the copy is made once, without a second copy in the
    original dtype or on the original device)."""
    tensors = list(visual.parameters()) + list(visual.buffers())
    if all(t.device == device and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return visual
    memo = {}
    for t in tensors:
        moved = t.detach().to(device, torch.float32 if t.is_floating_point() else t.dtype)
        memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(visual, memo).eval()


def autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which autocast is disabled for ``device``'s type (CPU, CUDA, ...): ops run in their inputs'
    dtype whatever an enclosing ``torch.autocast`` says."""
    device_type = torch.device(device).type
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    return torch.autocast(device_type, enabled=False) if available(device_type) else contextlib.nullcontext()


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (biased variance + eps) over the last axis, in float32: ``[...]``, ``[...]``."""
    x = x.float()
    mean = x.mean(-1)
    std = (x.var(-1, unbiased=False) + eps).sqrt()
    return mean, std


class PRSLogger:
    """Explicit forward of ``model.visual`` that logs the projected residual stream (PRS).

    Numerics: the decomposition always runs in float32.

    - Autocast (CPU or CUDA) is disabled inside the constructor, ``encode_image`` and ``finalize``, so an
      enclosing ``torch.autocast`` changes nothing.
    - A float16 or bfloat16 model is **upcast**: the logger decomposes a float32 copy of ``model.visual`` (made
      once, here; the model passed in is not modified). Half-precision weights are exactly representable in
      float32, so this is the decomposition of the model's own weights, computed exactly: its terms sum to
      ``model.float().encode_image``. They do not sum to the half-precision forward, which differs from it by
      half-precision rounding (~1e-3). A warning gives the size of the copy; to avoid it, pass a float32 model.
    - Every logged attention term (``attentions`` in all modes, ``cls_attentions``, ``attention_maps``) comes
      from one explicit float32 softmax of the CLS query row, and the CLS row of the residual stream is
      computed from the same softmax, so the terms sum to the logged representation up to float32 rounding.
      The other query rows use ``F.scaled_dot_product_attention`` (the fused kernel, as open_clip does).
    - ``device``: if the image tower is elsewhere (or spread over devices), a float32 copy is made on ``device``.

    Args:
        model: an open_clip CLIP model (unmodified, from ``open_clip.create_model_and_transforms``).
        device: where the computation runs and the results live (default: the model's device).
        spatial: keep the per-source-token axis of the attention terms (``[b, L, N, H, d]``). ``"sum"``: the
            memory-light spatial mode, the same terms summed over layers and heads inside the forward,
            ``[b, N, d]`` (each entry takes the share ``L·H / ((2L+1)·N·H)``, so everything still sums to r/||r||).
        attention_maps: also keep the CLS-query attention rows, ``self.attention_maps`` ``[b, L, H, N]``.
        ln_stats: also keep every block's ``ln_1`` statistics per token, ``self.ln_1_mean/std`` ``[b, L, N]``.
        post_gelu_layers: MLP layers whose post-activation values to keep, ``self.post_gelu[l]`` ``[b, N, K]``.
        layers: keep the attention terms of these layers only (sorted, distinct; not with ``spatial``):
            ``attentions`` becomes ``[b, len(layers), H, d]`` and ``self.attn_rest`` ``[b, d]`` holds the other
            layers summed over heads, reduced inside the forward, so that everything still sums to r/||r||.
            ``cls_attentions`` and ``mlps`` keep every layer. ``None``: every layer, no rest term.
        model_name: used in error messages.

    Attributes:
        visual: the float32 image tower the logger runs (``model.visual`` itself when it already is float32 on
            ``device``, else the copy).
    """

    def __init__(
            self,
            model: nn.Module,
            device: Optional[torch.device | str] = None,
            spatial: bool = False,
            attention_maps: bool = False,
            ln_stats: bool = False,
            post_gelu_layers: Iterable[int] = (),
            layers: Optional[Iterable[int]] = None,
            model_name: Optional[str] = None,
    ):
        check_supported(model, model_name)
        self.model = model
        self.device = _resolve_device(device if device is not None else next(model.visual.parameters()).device)
        self.visual = float32_tower(model.visual, self.device)
        if self.visual is not model.visual:
            dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.visual.parameters()})
            devices = sorted({str(p.device) for p in model.visual.parameters()})
            gib = sum(p.numel() for p in self.visual.parameters()) * 4 / 2 ** 30
            warnings.warn(f"PRSLogger: the image tower is {'/'.join(dtypes)} on {'/'.join(devices)}; decomposing a "
                          f"float32 copy on {self.device} ({gib:.2f} GiB)", stacklevel=2)
        self.spatial = spatial
        self.keep_attention_maps = attention_maps
        self.keep_ln_stats = ln_stats
        self.post_gelu_layers = sorted(set(int(l) for l in post_gelu_layers))
        blocks = self.visual.transformer.resblocks
        self.num_layers = len(blocks)
        self.num_heads = blocks[0].attn.num_heads
        self.width = blocks[0].attn.embed_dim
        self.head_dim = self.width // self.num_heads
        for l in self.post_gelu_layers:
            if not 0 <= l < self.num_layers:
                raise ValueError(f"post_gelu_layers: layer {l} out of range for a {self.num_layers}-layer model")
        self.layers = None if layers is None else [int(l) for l in layers]
        if self.layers is not None:
            if spatial:
                raise ValueError("layers: only without spatial (the spatial modes keep or sum every layer)")
            if self.layers != sorted(set(self.layers)) or not all(0 <= l < self.num_layers for l in self.layers):
                raise ValueError(f"layers {self.layers}: must be distinct, ascending and in 0..{self.num_layers - 1}")
        # slot of each layer in the attention output; -1: summed into attn_rest
        keep = range(self.num_layers) if self.layers is None else self.layers
        self._slot = [-1] * self.num_layers
        for i, l in enumerate(keep):
            self._slot[l] = i
        with autocast_off(self.device):
            self._build_projections()
        self.reinit()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def _build_projections(self) -> None:
        """Fold ``ln_post``'s gain, ``proj``, layer scale and each head's ``out_proj`` block into [., d] maps."""
        v, W, H, dh, dev = self.visual, self.width, self.num_heads, self.head_dim, self.device  # float32, on dev
        ref = v.ln_post.weight
        proj = v.proj.detach() if v.proj is not None else torch.eye(W, device=dev)
        gamma = v.ln_post.weight.detach() if v.ln_post.weight is not None else torch.ones(W, device=dev)
        beta = v.ln_post.bias.detach() if v.ln_post.bias is not None else torch.zeros(W, device=dev)
        self.post_eps = v.ln_post.eps
        self.G = gamma[:, None] * proj  # [W, d]
        self.g = self.G.sum(0)  # [d]  = gamma @ proj
        self.beta_proj = beta @ proj  # [d]
        self.out_dim = self.G.shape[1]
        self.head_out, self.head_bias, self.mlp_G = [], [], []
        for block in v.transformer.resblocks:
            ls1 = _layer_scale(block.ls_1, W, ref)
            ls2 = _layer_scale(block.ls_2, W, ref)
            w_o = block.attn.out_proj.weight.detach()  # [W_out, W_in]
            b_o = block.attn.out_proj.bias
            b_o = b_o.detach() if b_o is not None else torch.zeros(W, device=dev)
            # head h's value dims are columns h*dh:(h+1)*dh of out_proj.weight
            w_og = (w_o.t() * ls1) @ self.G  # [W_in, d]
            self.head_out.append(w_og.view(H, dh, self.out_dim))  # [H, dh, d]
            self.head_bias.append((b_o * ls1) @ self.G)  # [d], split over (token, head) entries
            self.mlp_G.append(ls2[:, None] * self.G)  # [W, d]

    def reinit(self) -> None:
        """Forget the last batch (kept for API compatibility with the original logger)."""
        self.attentions = None
        self.attn_rest = None
        self.mlps = None
        self.cls_attentions = None
        self.attention_maps = None
        self.ln_1_mean = self.ln_1_std = None
        self.post_gelu: dict[int, torch.Tensor] = {}
        self.post_ln_mean = self.post_ln_std = None
        self.representation = None
        self._finalized, self._norm = False, None

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Run the image tower on ``images`` [b, 3, H, W]; log the terms; return the unnormalised embedding [b, d].

        The logged terms are multiplied into the output space but not yet normalised: call ``finalize``.
        Runs in float32 on ``self.device`` with autocast off, whatever the dtype and device of ``images``.
        """
        with autocast_off(self.device):
            return self._encode_image(images.to(self.device, torch.float32))

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.reinit()
        v = self.visual
        # --- embeddings: x0 = ln_pre(patch_embed + cls + pos)                                   [b, N, W]
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        b, N, W = x.shape
        L, H, dh, d = self.num_layers, self.num_heads, self.head_dim, self.out_dim

        spatial_sum = isinstance(self.spatial, str) and self.spatial == "sum"
        kept = L if self.layers is None else len(self.layers)
        attn_shape = (b, N, d) if spatial_sum else (b, L, N, H, d) if self.spatial else (b, kept, H, d)
        attentions = (torch.zeros if spatial_sum else torch.empty)(attn_shape, dtype=torch.float32, device=self.device)
        attn_rest = torch.zeros((b, d), dtype=torch.float32, device=self.device) if kept < L else None
        cls_attentions = torch.empty((b, L, d), dtype=torch.float32, device=self.device)
        mlps = torch.empty((b, L + 1, d), dtype=torch.float32, device=self.device)
        if self.keep_attention_maps:
            self.attention_maps = torch.empty((b, L, H, N), dtype=torch.float32, device=self.device)
        if self.keep_ln_stats:
            self.ln_1_mean = torch.empty((b, L, N), dtype=torch.float32, device=self.device)
            self.ln_1_std = torch.empty((b, L, N), dtype=torch.float32, device=self.device)
        mlps[:, 0] = x[:, 0] @ self.G

        for l, block in enumerate(v.transformer.resblocks):
            if self.keep_ln_stats:
                self.ln_1_mean[:, l], self.ln_1_std[:, l] = _ln_stats(x, block.ln_1.eps)
            h = block.ln_1(x)
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, val = qkv.view(b, N, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [b, H, N, dh]
            out = F.scaled_dot_product_attention(q, k, val)  # every query row, fused kernel      [b, H, N, dh]
            # the CLS query row again, with an explicit float32 softmax, A[b, h, n]: every logged attention term
            # and the CLS row of the residual stream come from it, so the terms sum exactly to what is logged
            attn_cls = ((q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) * dh ** -0.5).softmax(-1)  # [b, H, N]
            out_cls = (attn_cls.unsqueeze(2) @ val).squeeze(2)  # [b, H, dh]
            out[:, :, 0] = out_cls
            if self.keep_attention_maps:
                self.attention_maps[:, l] = attn_cls
            w_og, b_og = self.head_out[l], self.head_bias[l]
            if spatial_sum:
                # sum_h A[b,h,n] v[b,h,n] W_O,h + b_O / N: one [b, N, H*dh] @ [H*dh, d] product       [b, N, d]
                weighted = (attn_cls.unsqueeze(-1) * val).transpose(1, 2).reshape(b, N, H * dh)
                terms = weighted @ w_og.reshape(H * dh, d) + b_og / N
                attentions += terms
                cls_attentions[:, l] = terms[:, 0]
            elif self.spatial:
                # A[b,h,n] * v[b,h,n] W_O,h  + b_O / (N H)                                          [b, N, H, d]
                terms = torch.einsum("bhn,bhnk,hkd->bnhd", attn_cls, val, w_og) + b_og / (N * H)
                attentions[:, l] = terms
                cls_attentions[:, l] = terms[:, 0].sum(1)
            else:
                # sum over source tokens is the CLS row of the attention output
                if self._slot[l] >= 0:
                    attentions[:, self._slot[l]] = torch.einsum("bhk,hkd->bhd", out_cls, w_og) + b_og / H
                else:  # a layer not kept: summed over heads as well, one [b, H*dh] @ [H*dh, d] product
                    attn_rest += out_cls.reshape(b, H * dh) @ w_og.reshape(H * dh, d) + b_og
                cls_term = torch.einsum("bh,bhk,hkd->bd", attn_cls[:, :, 0], val[:, :, 0], w_og)
                cls_attentions[:, l] = cls_term + b_og / N
            attn_out = F.linear(out.transpose(1, 2).reshape(b, N, W), block.attn.out_proj.weight,
                                block.attn.out_proj.bias)
            x = x + block.ls_1(attn_out)

            mlp = block.mlp
            act = mlp.gelu(mlp.c_fc(block.ln_2(x)))  # [b, N, K]
            if l in self.post_gelu_layers:
                self.post_gelu[l] = act
            mlp_out = mlp.c_proj(act)
            mlps[:, l + 1] = mlp_out[:, 0] @ self.mlp_G[l]
            x = x + block.ls_2(mlp_out)

        x_cls = x[:, 0]
        self.post_ln_mean, self.post_ln_std = _ln_stats(x_cls, self.post_eps)  # [b], [b]
        pooled = v.ln_post(x_cls)
        representation = pooled @ v.proj if v.proj is not None else pooled
        self.attentions, self.attn_rest, self.cls_attentions, self.mlps = attentions, attn_rest, cls_attentions, mlps
        self.representation, self.num_tokens = representation, N
        return representation

    __call__ = encode_image

    # --------------------------------------------------------------- finalize
    def _project_(self, terms: torch.Tensor, share: float) -> torch.Tensor:
        """In place: the frozen ``ln_post`` on terms already multiplied by ``G``; ``share`` = (#terms summed) / T."""
        view = (-1,) + (1,) * (terms.dim() - 1)
        mean = self.post_ln_mean.view(view)
        std = self.post_ln_std.view(view)
        return terms.sub_(share * mean * self.g).div_(std).add_(share * self.beta_proj)

    @torch.no_grad()
    def finalize(self, representation: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the logged terms to the output space and divide by ``||representation||``.

        ``representation`` [b, d] defaults to the one ``encode_image`` returned. Returns ``(attentions, mlps)``:
        ``[b, L, H, d]`` (spatial: ``[b, L, N, H, d]``; spatial="sum": ``[b, N, d]``) and ``[b, L+1, d]``,
        float32, on ``self.device``. ``self.cls_attentions`` becomes ``[b, L, d]``, and with ``layers``
        ``self.attn_rest`` ``[b, d]``. Summing everything (attentions, attn_rest, mlps) gives
        ``representation / ||representation||``.

        The first call works in place on the logged buffers. Calling it again returns the same tensors if the
        norms are the same, and otherwise new tensors rescaled to the new ``representation`` (earlier results
        are left as they were).
        """
        if self.attentions is None:
            raise RuntimeError("PRSLogger.finalize: call encode_image(images) first")
        if representation is None:
            representation = self.representation
        b = self.attentions.shape[0]
        if representation.dim() != 2 or representation.shape[0] != b:
            raise InputError(f"PRSLogger.finalize: representation has shape {list(representation.shape)}, "
                             f"expected [{b}, d] for the logged batch of {b} images")
        with autocast_off(self.device):
            norm = representation.detach().to(self.device, torch.float32).norm(dim=-1)  # [b]
            if self._finalized:
                if not torch.equal(norm, self._norm):
                    scale = self._norm / norm  # results are divided by the new norm instead of the old one
                    self.attentions = self.attentions * scale.view(-1, *([1] * (self.attentions.dim() - 1)))
                    self.cls_attentions = self.cls_attentions * scale[:, None, None]
                    self.mlps = self.mlps * scale[:, None, None]
                    if self.attn_rest is not None:
                        self.attn_rest = self.attn_rest * scale[:, None]
                    self._norm = norm
                return self.attentions, self.mlps
            L, H, N = self.num_layers, self.num_heads, self.num_tokens
            T = 2 * L + 1
            if isinstance(self.spatial, str) and self.spatial == "sum":
                attn = self._project_(self.attentions, L / (T * N))  # each entry sums L*H terms of share 1/(T*N*H)
            elif self.spatial:
                attn = self._project_(self.attentions, 1.0 / (T * N * H))
            else:
                attn = self._project_(self.attentions, 1.0 / (T * H))
            if self.attn_rest is not None:  # (L - kept) * H head terms of share 1/(T*H) each
                self.attn_rest = self._project_(self.attn_rest, (L - len(self.layers)) / T).div_(norm[:, None])
            cls_attn = self._project_(self.cls_attentions, 1.0 / (T * N))
            mlps = self._project_(self.mlps, 1.0 / T)
            self.attentions = attn.div_(norm.view(-1, *([1] * (attn.dim() - 1))))
            self.cls_attentions = cls_attn.div_(norm[:, None, None])
            self.mlps = mlps.div_(norm[:, None, None])
            self._finalized, self._norm = True, norm
            return self.attentions, self.mlps


def hook_prs_logger(model: nn.Module, device: Optional[torch.device | str] = None, spatial: bool = False,
                    **kwargs) -> PRSLogger:
    """Create a ``PRSLogger`` for ``model`` (same call as the original ``hook_prs_logger``)."""
    return PRSLogger(model, device, spatial=spatial, **kwargs)
