"""``sparse_video`` and ``tome`` on diffusers families added by issue 19, at their real width and token count (random
weights).

- ``hunyuanvideo15``: HunyuanVideo-1.5 (the diffusers class's default config: 16 heads x 128, 2048 wide) at 121
  frames of 480x848 (latent 31x30x53: 49,290 video tokens; 256 MLLM text tokens, 64 byT5 tokens, 729 image-embed
  tokens, which text-to-video masks), ``--blocks`` of its 54 transformer blocks;
- ``qwenimage``: Qwen-Image (24 heads x 128, 3072 wide) at 1024x1024 (64x64 = 4096 image tokens, 256 text tokens),
  ``--blocks`` of its 60 blocks.

Both batch 1, bf16, one forward, eager and ``torch.compile`` (default mode), each variant against stock in the same
mode: ``sparse_video`` tile_topk keep 0.1 installed as processors and as the attention backend (both families'
processors call ``dispatch_attention_fn``); bound: every self-attention over the first 10% of its keys
(``benchmarks.modes.keys_kept``; text included in the cut, so it is the cost of attention over 10% of the sequence).
``tome`` ratio 0.5 (2x2 cells; ``tome75``: ratio 0.75 in 2x2x2 cells, video only), merged at the attention call;
its bound (``tome_bound``, ``tome75_bound``): every self-attention over as many tokens as the merge leaves
(``benchmarks.modes.tokens_cut``), nothing else changed.
Every block of a family is the same, so the ratio of the first ``--blocks`` blocks is the full model's up to the
embeddings and the output layer (which cost next to nothing beside the blocks).

    PYTHONPATH=. python3 -m benchmarks.families --out benchmarks/results/families.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from benchmarks.modes import applied, fmt, fmt_ms, in_modes, keys_kept, listed, log, ratios, run_parts, tokens_cut


def _build(cls: type, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """``cls(**config)`` on the GPU with random weights (seed 0), in ``dtype`` except what diffusers keeps in fp32."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(**config).to(dtype).eval()
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name for k in keep):
            tensor.data = tensor.data.float()
    return model


def hunyuanvideo15(blocks: int, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from diffusers import HunyuanVideo15Transformer3DModel

    model = _build(HunyuanVideo15Transformer3DModel, dict(num_layers=blocks, task_type="t2v"), dtype)
    cfg, latent, text, glyph = model.config, (31, 30, 53), 256, 64
    g = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
    inputs = dict(hidden_states=g(1, cfg.in_channels, *latent),
                  timestep=torch.tensor([500.0], device="cuda", dtype=dtype),  # HunyuanVideo-1.5: in the model dtype
                  encoder_hidden_states=g(1, text, cfg.text_embed_dim),
                  encoder_attention_mask=torch.ones(1, text, device="cuda"),
                  encoder_hidden_states_2=g(1, glyph, cfg.text_embed_2_dim),
                  encoder_attention_mask_2=torch.ones(1, glyph, device="cuda"),
                  image_embeds=torch.zeros(1, 729, cfg.image_embed_dim, device="cuda", dtype=dtype))
    return model, inputs, f"HunyuanVideo-1.5, 121x480x848 (latent {latent}), {blocks} of 54 blocks", latent


def qwenimage(blocks: int, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from diffusers import QwenImageTransformer2DModel

    model = _build(QwenImageTransformer2DModel, dict(num_layers=blocks), dtype)
    cfg, side, text = model.config, 64, 256
    inputs = dict(hidden_states=torch.randn(1, side * side, cfg.in_channels, device="cuda", dtype=dtype),
                  encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, device="cuda", dtype=dtype),
                  encoder_hidden_states_mask=torch.ones(1, text, device="cuda", dtype=torch.long),
                  timestep=torch.tensor([0.5], device="cuda"), img_shapes=[(1, side, side)])
    return model, inputs, f"Qwen-Image, 1024x1024 ({side}x{side} tokens), {blocks} of 60 blocks", (side, side)


#: what runs beside stock (``--variants``): sparse_video keep 0.1 as processors and as the attention backend,
#: its bound, tome ratio 0.5 and its bound, and on video families tome 0.75 (2x2x2 cells) and its bound.
VARIANTS = ("processor", "backend", "bound", "tome", "tome_bound", "tome75", "tome75_bound")
FAMILIES: dict[str, Callable[[int, torch.dtype], tuple[torch.nn.Module, dict[str, Any], str, tuple[int, ...]]]] = {
    "hunyuanvideo15": hunyuanvideo15, "qwenimage": qwenimage}


def part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, inputs, what, grid = FAMILIES[name](args.blocks, torch.bfloat16)
    run = lambda m: m(**inputs, return_dict=False)[0]  # noqa: E731
    modes = ("eager", "compiled")
    tokens = math.prod(grid)
    variants = {"processor": lambda: applied(model, "sparse_video", keep=0.1),
                "backend": lambda: applied(model, "sparse_video", keep=0.1, install="attention_backend"),
                "bound": lambda: keys_kept(0.1, 1024),
                "tome": lambda: applied(model, "tome", ratio=0.5),
                "tome_bound": lambda: tokens_cut(int(tokens * 0.5), 1024),
                "tome75": lambda: applied(model, "tome", ratio=0.75, st=2),
                "tome75_bound": lambda: tokens_cut(int(tokens * 0.75), 1024)}
    row: dict[str, Any] = {"model": what, "keep": 0.1}
    with torch.no_grad():
        row["stock"] = in_modes(model, run, args.iters, modes)
        log(f"{name} stock {fmt_ms(row['stock'])}")
        for variant in args.variants:
            enter = variants[variant]
            with enter():
                row[variant] = in_modes(model, run, args.iters, modes)
            row[f"{variant}_speedup"] = ratios(row["stock"], row[variant])
            log(f"{name} {variant}: {fmt(row[f'{variant}_speedup'])}; compile stats {row[variant].get('compile')}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of: {', '.join(FAMILIES)}")
    parser.add_argument("--blocks", type=int, default=8, help="transformer blocks built (every block is the same)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--variants", default="processor,backend,bound,tome,tome_bound",
                        help=f"of: {', '.join(VARIANTS)} (the last two on video families)")
    parser.add_argument("--out", default="visattn_results/families.json")
    args = parser.parse_args()
    args.variants = listed(parser, "--variants", args.variants, VARIANTS)
    parts = {name: partial(part, name, args) for name in FAMILIES}
    run_parts(listed(parser, "--families", args.families, tuple(FAMILIES)), parts, args.out,
              blocks=args.blocks)


if __name__ == "__main__":
    main()
