"""Images per second of the batched second-order computation against a port of the original's per-(layer, head) one.

Both run in this process on the same random ViT-B-32-shaped model (open_clip ``create_model('ViT-B-32',
pretrained=None)``, QuickGELU), the same random images and the same captured forward pass; the time of that
forward pass counts for both. The baseline follows the original ``apply_attention_head_and_project_layer_neurons``:
for every later (layer, head) it builds the ``[batch, tokens, neurons, width]`` neuron-output tensor, normalises
it with the frozen ln_1, applies the head's value map and attention, the output projection and the frozen
ln_post, and sums. It is given one shortcut the original does not take (it only applies the CLS row of the
attention map, not the full N x N map), so the ratio is, if anything, an underestimate. Its batch is kept tiny
so it finishes. The two results are compared (max abs difference) before the timings are printed.

    python bench/bench_second_order.py                    # ViT-B-32, MLP layer 9, CPU
    python bench/bench_second_order.py --mlp_layer 8 --device cuda --images 256 --batch_size 64
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.neurons.effects import COEFFICIENT, SecondOrderEffects  # noqa: E402


@torch.no_grad()
def original_style_effects(so: SecondOrderEffects, images: torch.Tensor) -> torch.Tensor:
    """The per-(later layer, head) evaluation of the original code, on the same captures: [b, K, d]."""
    rec, m, engine = so.decompose(images), so.mlp_layer, so.engine
    blocks = so.visual.transformer.resblocks
    representation = rec.representation
    post = rec.post_activations[m].float()  # [b, N, K]
    K = post.shape[-1]
    L, H, W, dh = engine.num_layers, engine.num_heads, engine.width, engine.head_dim
    c_proj = blocks[m].mlp.c_proj
    proj, ln_post = so.visual.proj.float(), so.visual.ln_post
    total = 0.0
    for l in so.later_layers:
        blk = blocks[l]
        T1 = (1 + 2 * l) * K
        T2 = (1 + 2 * l) * (1 + 2 * L) * H * K
        w_v = blk.attn.in_proj_weight[2 * W:].view(H, dh, W)
        b_v = blk.attn.in_proj_bias[2 * W:].view(H, dh)
        w_o = blk.attn.out_proj.weight.view(W, H, dh)
        for h in range(H):
            # neuron outputs at every token: [b, N, K, W]
            neuron_out = post[..., None] * c_proj.weight.t()[None, None] + c_proj.bias / K
            mean = rec.ln_1_mean[:, l, :, None, None]
            std = rec.ln_1_std[:, l, :, None, None]
            normed = blk.ln_1.weight * (neuron_out - mean / T1) / std + blk.ln_1.bias / T1
            value = torch.einsum("bnkw,cw->bnkc", normed, w_v[h]) + b_v[h] / T1  # [b, N, K, dh]
            attended = torch.einsum("bn,bnkc->bkc", rec.attention_maps[:, l, h], value)  # CLS query
            out = torch.einsum("bkc,wc->bkw", attended, w_o[:, h]) + blk.attn.out_proj.bias / (T1 * H)
            post_ln = (ln_post.weight * (out - rec.ln_post_mean[:, None, None] / T2) / rec.ln_post_std[:, None, None]
                       + ln_post.bias / T2)
            total = total + post_ln @ proj * so.coefficient
    return total / representation.norm(dim=-1)[:, None, None]


def images_per_second(fn, images: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """Run ``fn`` over ``images`` in batches; return (images/s, the first batch's result)."""
    first = None
    start = time.perf_counter()
    for s in range(0, len(images), batch_size):
        out = fn(images[s:s + batch_size])
        if first is None:
            first = out
    if images.device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--mlp_layer", default=9, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", default=32, type=int, help="images for the batched path")
    parser.add_argument("--batch_size", default=16, type=int, help="batch of the batched path")
    parser.add_argument("--baseline_images", default=1, type=int, help="images for the original-style path")
    parser.add_argument("--baseline_batch_size", default=1, type=int)
    parser.add_argument("--threads", default=min(2, os.cpu_count() or 1), type=int, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None, force_quick_gelu=True).to(args.device).eval()
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(max(args.images, args.baseline_images), 3, size, size, device=args.device)
    so = SecondOrderEffects(model, args.mlp_layer, args.device, COEFFICIENT, model_name=args.model)
    so(images[:2])  # warm-up

    ours, ours_first = images_per_second(lambda x: so(x)[0], images[:args.images], args.batch_size)
    base, base_first = images_per_second(lambda x: original_style_effects(so, x), images[:args.baseline_images],
                                         args.baseline_batch_size)
    n = len(base_first)
    diff = (ours_first[:n] - base_first).abs().max().item()
    scale = base_first.abs().max().item()
    K, d = ours_first.shape[1:]
    print(f"{args.model} (random init), MLP layer {args.mlp_layer}: {so.num_terms} later (layer, head) pairs, "
          f"{K} neurons, d={d}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"agreement on {n} image(s): max abs diff {diff:.2e} (values up to {scale:.2f})")
    print("| computation | batch | images | images/s |")
    print("|---|---|---|---|")
    print(f"| original-style per-(layer, head) | {args.baseline_batch_size} | {args.baseline_images} | {base:.3f} |")
    print(f"| batched (utils.neurons.effects) | {args.batch_size} | {args.images} | {ours:.2f} |")
    print(f"speed-up: {ours / base:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "images_per_s": {"batched": ours, "original_style": base}, "speedup": ours / base,
            "max_abs_diff": diff, "max_abs_value": scale}, indent=1))


if __name__ == "__main__":
    main()
