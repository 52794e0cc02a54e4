"""Second-order effects of MLP neurons through later attention heads (paper 2), batched; its files and inputs.

Definitions (docs/design.md section 4, tests/golden/README.md quirk Q1). For MLP layer ``m`` (M neurons), neuron
``k``, a later layer ``l > m`` (0-based, so ``1 + 2l`` terms make up the residual entering block ``l``), head
``h`` and every token ``n`` of one image::

    o[n, k] = post_act[n, k] * W_cproj[:, k] + b_cproj / M                          neuron output         [W]
    z[n, k] = gamma1_l * (o[n, k] - mu_l[n] / T1) / sigma_l[n] + beta1_l / T1        ln_1 of l, frozen     [W]
    v[n, k] = W_V,h z[n, k] + b_V,h / T1                                             value of head h       [dh]
    y[k]    = W_O[:, h-block] sum_n A_l[h, 0, n] v[n, k] + b_O / (T1 H)              CLS row of the head   [W]
    e[k]   += (gamma * (y[k] - mu / T2) / sigma + beta / T2) @ proj * coefficient / ||r||                [d]

    T1 = (1 + 2l) M,   T2 = (1 + 2l)(1 + 2L) H M,   mu/sigma: ln_post statistics of the CLS token,
    r: the unnormalised image embedding; summed over all l > m and all heads h.

Layer scale, where a model has one, multiplies the neuron output (``ls_2`` of layer m) and the head output
(``ls_1`` of layer l). The original evaluates this literally, building a ``[batch, tokens, neurons, width]``
tensor per (layer, head). Everything but ``post_act`` is linear and fixed, so here the sum over source tokens
comes first::

    c[l, h, k] = sum_n A_l[h, 0, n] post_act[n, k] / sigma_l[n]                     [L', H, K] per image
    U[l, h, k] = (gamma1_l * ls2 * W_cproj[:, k]) W_V,h^T W_O,h^T diag(ls1 * gamma) proj   [K, d], fixed
    e[k]       = coefficient / ||r|| * (sum_{l,h} c[l, h, k] U[l, h, k] / sigma + const)

and the bias and mean parts collapse to per-(image, l, h) scalars (sum_n A, sum_n A/sigma_l, sum_n A mu_l/sigma_l)
times fixed [d] vectors. One image then costs a forward pass plus ``L' H K (N + d)`` multiply-adds.
"""
from __future__ import annotations

from typing import Optional

import torch

from prs_hook import Decomposer, Decomposition, ViTTower, autocast_off
from utils.errors import InputError, UnsupportedModelError

COEFFICIENT = 100.0  # the papers' scale factor on the normalised output


def check_mlp_layer(mlp_layer: int, num_layers: int) -> None:
    """Raise ``ValueError`` unless ``0 <= mlp_layer < num_layers - 1`` (the last layer has no later heads)."""
    if not 0 <= mlp_layer < num_layers:
        raise InputError(f"--mlp_layer {mlp_layer}: out of range for a {num_layers}-layer image tower "
                         f"(valid: 0..{num_layers - 2})")
    if mlp_layer == num_layers - 1:
        raise InputError(f"--mlp_layer {mlp_layer}: the last layer has no later attention layers, so no "
                         f"second-order effect (valid: 0..{num_layers - 2})")


# ----------------------------------------------------------------------------- the computation
class SecondOrderEffects:
    """Batched second-order effects of every neuron of one MLP layer: ``[b, K, d]`` per image batch.

    Args:
        model: an open_clip CLIP model with a supported ViT image tower (see ``prs_hook``); or a
            ``prs_hook.Decomposer`` of one, to share its fixed maps.
        mlp_layer: the MLP layer ``m``; its neurons' effects through the attention heads of layers ``m+1..L-1``.
        device: where the forward pass and the contraction run.
        coefficient: the scale on the normalised output (100 in the paper).
        model_name: used in error messages.
        cache_bytes: keep the precomputed ``U`` maps ``[K, H, d]`` of as many later layers as fit in this many
            bytes; the rest are rebuilt for every batch (slower, same numbers).
    """

    def __init__(self, model: torch.nn.Module, mlp_layer: int, device: str | torch.device | None = None,
                 coefficient: float = COEFFICIENT, model_name: Optional[str] = None, cache_bytes: int = 2 ** 31):
        self.engine = model if isinstance(model, Decomposer) else Decomposer(model, device, model_name)
        self.tower = self.engine.tower  # its folded maps: head_out, head_bias, ls_2, ln_post_gain, ln_post_bias
        if not isinstance(self.tower, ViTTower):
            raise UnsupportedModelError(f"model '{model_name or type(model).__name__}': second-order effects need a "
                                        f"CLS-token open_clip VisionTransformer; its tower is read out by pooling "
                                        f"({type(self.tower).__name__}), which paper 2's maps do not cover yet")
        self.visual, self.device = self.engine.visual, self.engine.device
        L, H = self.engine.num_layers, self.engine.num_heads
        check_mlp_layer(mlp_layer, L)
        self.mlp_layer = mlp_layer
        self.coefficient = float(coefficient)
        self.later_layers = list(range(mlp_layer + 1, L))
        blocks = self.visual.transformer.resblocks
        self.num_neurons = blocks[mlp_layer].mlp.c_proj.weight.shape[1]
        self.out_dim = self.engine.out_dim
        per_layer = self.num_neurons * H * self.out_dim * 4
        n_cached = min(len(self.later_layers), max(0, int(cache_bytes // per_layer)))
        with autocast_off(self.device):
            self._cache = {l: self._layer_maps(l) for l in self.later_layers[:n_cached]}

    @property
    def num_terms(self) -> int:
        """Number of (later layer, head) pairs, ``J = (L - m - 1) H``."""
        return len(self.later_layers) * self.engine.num_heads

    @torch.no_grad()
    def _layer_maps(self, l: int) -> dict[str, torch.Tensor]:
        """Fixed maps of later layer ``l`` into the ``G``-space (before ``ln_post``'s 1/sigma), float32.

        ``U`` [K, H, d]: neuron k's direction through head h. ``bias`` / ``gamma`` / ``beta`` / ``vbias`` [H, d]:
        the neuron-bias, ln_1 mean, ln_1 bias and value-bias parts; ``obias`` [d]: the out_proj bias.
        """
        W, H, dh = self.engine.width, self.engine.num_heads, self.engine.head_dim
        dev, f64 = self.device, torch.float64
        src = self.visual.transformer.resblocks[self.mlp_layer]
        blk = self.visual.transformer.resblocks[l]
        ls2 = self.tower.ls_2[self.mlp_layer].to(dev, f64)
        w_c = src.mlp.c_proj.weight.detach().to(dev, f64) * ls2[:, None]  # [W, K]
        b_c = src.mlp.c_proj.bias
        b_c = b_c.detach().to(dev, f64) * ls2 if b_c is not None else torch.zeros(W, dtype=f64, device=dev)
        K = w_c.shape[1]
        ln = blk.ln_1
        g1 = ln.weight.detach().to(dev, f64) if ln.weight is not None else torch.ones(W, dtype=f64, device=dev)
        b1 = ln.bias.detach().to(dev, f64) if ln.bias is not None else torch.zeros(W, dtype=f64, device=dev)
        w_v = blk.attn.in_proj_weight[2 * W:].detach().to(dev, f64)  # [H*dh, W]
        b_v = blk.attn.in_proj_bias[2 * W:].detach().to(dev, f64)  # [H*dh]
        head_out = self.tower.head_out[l].to(f64)  # [H, dh, d]: out_proj block, ls_1 and G folded in

        def through(vec: torch.Tensor) -> torch.Tensor:  # [W] entering ln_1's affine part -> [H, d]
            return torch.einsum("he,hed->hd", (vec @ w_v.t()).view(H, dh), head_out)

        values = (w_c.t() * g1) @ w_v.t()  # [K, H*dh]
        U = torch.einsum("khe,hed->khd", values.view(K, H, dh), head_out)  # [K, H, d]
        maps = {"U": U, "bias": through(g1 * b_c / K), "gamma": through(g1), "beta": through(b1),
                "vbias": torch.einsum("he,hed->hd", b_v.view(H, dh), head_out),
                "obias": self.tower.head_bias[l].to(f64)}
        return {k: v.float().contiguous() for k, v in maps.items()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Second-order effects of ``images`` [b, 3, H, W].

        Returns ``(effects, representation)``: effects ``[b, K, d]`` summed over later layers and heads (with
        ``per_head=True``: ``[b, J, K, d]``, J = (later layer, head) pairs in order ``(l - m - 1) * H + h``;
        meant for small models), and the unnormalised embedding ``[b, d]``; float32 on ``self.device``, with
        autocast off (like ``prs_hook.Decomposer``).
        """
        with autocast_off(self.device):
            return self._effects(images, per_head)

    def decompose(self, images: torch.Tensor) -> Decomposition:
        """The forward pass the effects need: ``prs_hook``'s record of ``images`` with the CLS attention rows,
        every ``ln_1``'s statistics and the post-activation values of ``mlp_layer``."""
        return self.engine(images, attention_maps=True, ln_stats=True, post_activations=[self.mlp_layer])

    def _effects(self, images: torch.Tensor, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.decompose(images)
        representation = rec.representation
        post = rec.post_activations[self.mlp_layer].float()  # [b, N, K]
        b, N, K = post.shape
        L, H, d = self.engine.num_layers, self.engine.num_heads, self.out_dim
        mu_post, sd_post = rec.ln_post_mean, rec.ln_post_std  # [b], [b]
        scale = self.coefficient / representation.float().norm(dim=-1)  # [b]
        total = None if per_head else torch.zeros(K, b, d, device=self.device)
        const = torch.zeros(b, d, device=self.device)
        terms = []
        for l in self.later_layers:
            maps = self._cache.get(l) or self._layer_maps(l)
            T1 = (1 + 2 * l) * K
            T2 = (1 + 2 * l) * (1 + 2 * L) * H * K
            attn = rec.attention_maps[:, l]  # [b, H, N]
            w = attn / rec.ln_1_std[:, l, None, :]  # A / sigma_l          [b, H, N]
            c = torch.einsum("bhn,bnk->bhk", w, post)  # [b, H, K]
            alpha = w.sum(-1)  # [b, H]
            nu = (w * rec.ln_1_mean[:, l, None, :]).sum(-1)  # [b, H]
            s_a = attn.sum(-1)  # [b, H]
            head_const = (alpha[..., None] * maps["bias"] - nu[..., None] / T1 * maps["gamma"]
                          + s_a[..., None] / T1 * (maps["beta"] + maps["vbias"]) + maps["obias"] / (T1 * H))
            post_ln = (-mu_post[:, None] / T2) * self.tower.ln_post_gain / sd_post[:, None] \
                + self.tower.ln_post_bias / T2  # [b, d]
            if per_head:
                x = c[..., None] * maps["U"].permute(1, 0, 2)[None] + head_const[:, :, None]  # [b, H, K, d]
                terms.append(x / sd_post[:, None, None, None] + post_ln[:, None, None])
            else:
                # sum_h c[b, h, k] U[k, h, :] as a batched matmul over neurons: [K, b, H] @ [K, H, d]
                total.baddbmm_(c.permute(2, 0, 1).contiguous(), maps["U"])  # (contiguous: ~20x faster on CPU)
                const += head_const.sum(1) / sd_post[:, None] + H * post_ln
        if per_head:
            return torch.cat(terms, 1) * scale[:, None, None, None], representation
        # effects[b, k] = scale[b] * (total[k, b] / sigma[b] + const[b]), in one pass
        effects = torch.addcmul((const * scale[:, None])[:, None], total.permute(1, 0, 2),
                                (scale / sd_post)[:, None, None])
        return effects.contiguous(), representation
