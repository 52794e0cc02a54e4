"""The hooked open_clip ViT: an explicit image-tower forward that records every direct contribution.

The CLS residual stream after the last block is a sum of ``2L + 1`` terms: the embedding term, L attention
outputs and L MLP outputs (DESIGN.md section 1). Each attention output splits per head and per source token.
``PRSLogger`` runs the image tower of an unmodified ``open_clip`` model block by block, reading its weights
by name, and records those terms already multiplied into the output space, so that ``finalize`` only has to
apply the frozen ``ln_post`` statistics (DESIGN.md section 2)::

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

from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.cli import InputError

__all__ = ["PRSLogger", "UnsupportedModelError", "check_supported", "hook_prs_logger"]


class UnsupportedModelError(InputError):
    """The image tower has a feature that breaks the exact decomposition."""


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


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (biased variance + eps) over the last axis, in float32: ``[...]``, ``[...]``."""
    x = x.float()
    mean = x.mean(-1)
    std = (x.var(-1, unbiased=False) + eps).sqrt()
    return mean, std


class PRSLogger:
    """Explicit forward of ``model.visual`` that logs the projected residual stream (PRS).

    Args:
        model: an open_clip CLIP model (unmodified, from ``open_clip.create_model_and_transforms``).
        device: where the computation runs and the results live.
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
        self.visual = model.visual
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
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
        self._build_projections()
        self.reinit()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def _build_projections(self) -> None:
        """Fold ``ln_post``'s gain, ``proj``, layer scale and each head's ``out_proj`` block into [., d] maps."""
        v, W, H, dh = self.visual, self.width, self.num_heads, self.head_dim
        ref = v.ln_post.weight
        proj = v.proj.detach().float() if v.proj is not None else torch.eye(W, device=ref.device)
        gamma = v.ln_post.weight.detach().float() if v.ln_post.weight is not None else torch.ones(W, device=ref.device)
        beta = v.ln_post.bias.detach().float() if v.ln_post.bias is not None else torch.zeros(W, device=ref.device)
        self.post_eps = v.ln_post.eps
        self.G = (gamma[:, None] * proj).to(self.device)  # [W, d]
        self.g = self.G.sum(0)  # [d]  = gamma @ proj
        self.beta_proj = (beta @ proj).to(self.device)  # [d]
        self.out_dim = self.G.shape[1]
        self.head_out, self.head_bias, self.mlp_G = [], [], []
        for block in v.transformer.resblocks:
            ls1 = _layer_scale(block.ls_1, W, ref).to(self.device)
            ls2 = _layer_scale(block.ls_2, W, ref).to(self.device)
            w_o = block.attn.out_proj.weight.detach().float().to(self.device)  # [W_out, W_in]
            b_o = block.attn.out_proj.bias
            b_o = b_o.detach().float().to(self.device) if b_o is not None else torch.zeros(W, device=self.device)
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
        self._finalized = False

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Run the image tower on ``images`` [b, 3, H, W]; log the terms; return the unnormalised embedding [b, d].

        The logged terms are multiplied into the output space but not yet normalised: call ``finalize``.
        """
        self.reinit()
        v = self.visual
        dtype = v.conv1.weight.dtype
        x = images.to(self.device, dtype)
        # --- embeddings: x0 = ln_pre(patch_embed + cls + pos)                                   [b, N, W]
        x = v.conv1(x).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
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
        mlps[:, 0] = x[:, 0].float() @ self.G

        for l, block in enumerate(v.transformer.resblocks):
            if self.keep_ln_stats:
                self.ln_1_mean[:, l], self.ln_1_std[:, l] = _ln_stats(x, block.ln_1.eps)
            h = block.ln_1(x)
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, val = qkv.view(b, N, 3, H, dh).permute(2, 0, 3, 1, 4)  # each [b, H, N, dh]
            out = F.scaled_dot_product_attention(q, k, val)  # [b, H, N, dh]
            # the CLS query row of the attention map, A[b, h, n]
            scores = (q[:, :, 0:1].float() @ k.float().transpose(-1, -2)).squeeze(2) * dh ** -0.5
            attn_cls = scores.softmax(-1)  # [b, H, N]
            if self.keep_attention_maps:
                self.attention_maps[:, l] = attn_cls
            w_og, b_og = self.head_out[l], self.head_bias[l]
            if spatial_sum:
                # sum_h A[b,h,n] v[b,h,n] W_O,h + b_O / N: one [b, N, H*dh] @ [H*dh, d] product       [b, N, d]
                weighted = (attn_cls.unsqueeze(-1) * val.float()).transpose(1, 2).reshape(b, N, H * dh)
                terms = weighted @ w_og.reshape(H * dh, d) + b_og / N
                attentions += terms
                cls_attentions[:, l] = terms[:, 0]
            elif self.spatial:
                # A[b,h,n] * v[b,h,n] W_O,h  + b_O / (N H)                                          [b, N, H, d]
                terms = torch.einsum("bhn,bhnk,hkd->bnhd", attn_cls, val.float(), w_og) + b_og / (N * H)
                attentions[:, l] = terms
                cls_attentions[:, l] = terms[:, 0].sum(1)
            else:
                # sum over source tokens is the CLS row of the attention output
                if self._slot[l] >= 0:
                    attentions[:, self._slot[l]] = torch.einsum("bhk,hkd->bhd", out[:, :, 0].float(), w_og) + b_og / H
                else:  # a layer not kept: summed over heads as well, one [b, H*dh] @ [H*dh, d] product
                    attn_rest += out[:, :, 0].float().reshape(b, H * dh) @ w_og.reshape(H * dh, d) + b_og
                cls_term = torch.einsum("bh,bhk,hkd->bd", attn_cls[:, :, 0], val[:, :, 0].float(), w_og)
                cls_attentions[:, l] = cls_term + b_og / N
            attn_out = F.linear(out.transpose(1, 2).reshape(b, N, W), block.attn.out_proj.weight,
                                block.attn.out_proj.bias)
            x = x + block.ls_1(attn_out)

            mlp = block.mlp
            act = mlp.gelu(mlp.c_fc(block.ln_2(x)))  # [b, N, K]
            if l in self.post_gelu_layers:
                self.post_gelu[l] = act
            mlp_out = mlp.c_proj(act)
            mlps[:, l + 1] = mlp_out[:, 0].float() @ self.mlp_G[l]
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

        Returns ``(attentions, mlps)``: ``[b, L, H, d]`` (spatial: ``[b, L, N, H, d]``; spatial="sum":
        ``[b, N, d]``) and ``[b, L+1, d]``,
        float32, on ``self.device``. ``self.cls_attentions`` becomes ``[b, L, d]``, and with ``layers``
        ``self.attn_rest`` ``[b, d]``. Summing everything (attentions, attn_rest, mlps) gives
        ``representation / ||representation||``.
        """
        if self.attentions is None:
            raise RuntimeError("PRSLogger.finalize: call encode_image(images) first")
        if self._finalized:
            return self.attentions, self.mlps
        if representation is None:
            representation = self.representation
        L, H, N = self.num_layers, self.num_heads, self.num_tokens
        T = 2 * L + 1
        norm = representation.float().norm(dim=-1).to(self.device)  # [b]
        if isinstance(self.spatial, str) and self.spatial == "sum":
            attn = self._project_(self.attentions, L / (T * N))  # each entry sums L*H terms of share 1/(T*N*H)
        elif self.spatial:
            attn = self._project_(self.attentions, 1.0 / (T * N * H))
        else:
            attn = self._project_(self.attentions, 1.0 / (T * H))
        if self.attn_rest is not None:  # (L - kept) * H head terms of share 1/(T*H) each
            rest = self._project_(self.attn_rest, (L - len(self.layers)) / T)
            self.attn_rest = rest.div_(norm[:, None])
        cls_attn = self._project_(self.cls_attentions, 1.0 / (T * N))
        mlps = self._project_(self.mlps, 1.0 / T)
        self.attentions = attn.div_(norm.view(-1, *([1] * (attn.dim() - 1))))
        self.cls_attentions = cls_attn.div_(norm[:, None, None])
        self.mlps = mlps.div_(norm[:, None, None])
        self._finalized = True
        return self.attentions, self.mlps


def hook_prs_logger(model: nn.Module, device: Optional[torch.device | str] = None, spatial: bool = False,
                    **kwargs) -> PRSLogger:
    """Create a ``PRSLogger`` for ``model`` (same call as the original ``hook_prs_logger``)."""
    return PRSLogger(model, device, spatial=spatial, **kwargs)
