"""Benchmark of ``sparse_video`` (issue 6): attention-only and full-transformer speed, memory and fidelity.

Every row is measured in one run, bf16, against stock attention (``F.scaled_dot_product_attention``,
the call the stock diffusers processors make) measured in the same run:

- attention only, Wan 2.1 1.3B at 81x480x832 (grid 21x30x52 = 32,760 tokens, 12 heads, head dim 128)
  and HunyuanVideo-size 720p (grid 21x45x80 = 75,600 video tokens + 256 text tokens last, 24 heads):
  time per strategy, kept block fraction, speedup, extra peak memory; for tile_topk the kernel alone
  on the same block lists, so ``overhead_ms`` = permutation + routing + text + un-permutation;
- one forward of ``WanTransformer3DModel`` with the Wan 2.1 T2V 1.3B config and random weights
  (latents 16x21x60x104, 512 text tokens): stock vs ``visattn.apply(model, "sparse_video", ...)``,
  peak memory, the bound ``1 / ((1 - f) + f * kept)`` where ``f`` = 30 stock self-attention calls
  over the stock forward, and the achieved fraction of that bound;
- fidelity: relative L2 error of that forward's output against stock, per strategy and keep ratio
  (random-weight architecture, not a trained model: the numbers show the mechanics, not quality).

    PYTHONPATH=. python3 -m benchmarks.video --out benchmarks/results/video.json
    PYTHONPATH=. python3 -m benchmarks.video --smoke   # tiny shapes on the CPU (reference path)

``--rules`` runs only the attention rows of the routing rules of issue 21 (``RULE_CASES``: XAttention's
antidiagonal scores, the token permutations, GNA's strided and dilated windows, beside plain tile_topk and
sliding_tile) at Wan's shape, 10 repetitions, eager. For tile_topk rows ``route_ms`` is the rule's routing
alone (antidiagonal scoring included) and ``overhead_ms`` all but the kernel (a permutation included):

    PYTHONPATH=. python3 -m benchmarks.video --rules --out benchmarks/results/video_routing.json

``--sweep`` runs only the attention rows of every point of :func:`sweep_points` at Wan's shape (no text, the
default tile), 10 repetitions, eager; each row also records its strategy ``line``, ``level`` (the kept fraction
aimed at; None for grat) and ``options``. ``benchmarks.video_quality`` joins these speeds with the testbed video
DiT's quality at the same points (``--smoke``: a 4x8x8 grid, 2 heads, on the CPU):

    PYTHONPATH=. python3 -m benchmarks.video --sweep --out benchmarks/results/video_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import visattn
from benchmarks.timing import median_ms
from visattn.core.layout import TokenLayout
from visattn.core.routing import take_tokens
from visattn.kernels import block_sparse_attention
from visattn.processors.sparse_video import (
    SparseVideoConfig,
    geometry,
    route_blocks,
    sparse_video_attention,
)

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=16, ffn_dim=64,
                num_layers=2)

# (name, heads, grid, text tokens (after the grid), strategies: name -> options)
ATTENTION_CASES = [
    ("wan_1.3b_480p", 12, (21, 30, 52), 0, {
        "tile_topk keep=0.10": dict(keep=0.1), "tile_topk keep=0.10 tile 4x8x4": dict(keep=0.1, tile=(4, 8, 4)),
        "tile_topk keep=0.25": dict(keep=0.25), "tile_topk top_p=0.9": dict(top_p=0.9),
        "rectified keep=0.10": dict(strategy="rectified", keep=0.1),
        "sliding_tile 3x3x7": dict(strategy="sliding_tile", window=(3, 3, 7)),
        "grat surrounding r=1": dict(strategy="grat"),
        "grat criss_cross": dict(strategy="grat", grat_pattern="criss_cross")}),
    ("hunyuanvideo_720p", 24, (21, 45, 80), 256, {
        "tile_topk keep=0.10": dict(keep=0.1), "tile_topk keep=0.10 tile 4x8x4": dict(keep=0.1, tile=(4, 8, 4)),
        "rectified keep=0.10": dict(strategy="rectified", keep=0.1),
        "sliding_tile 3x5x9": dict(strategy="sliding_tile", window=(3, 5, 9)),
        "grat criss_cross": dict(strategy="grat", grat_pattern="criss_cross")}),
]
RULES = {
    "tile_topk keep=0.10": dict(keep=0.1),
    "tile_topk keep=0.10 antidiagonal": dict(keep=0.1, score="antidiagonal"),
    "tile_topk keep=0.10 permute=importance": dict(keep=0.1, permute="importance"),
    "tile_topk keep=0.10 permute=cluster": dict(keep=0.1, permute="cluster"),
    "sliding_tile 3x3x7": dict(strategy="sliding_tile", window=(3, 3, 7)),
    "sliding_tile 3x3x7 stride 1x3x7 (blocked w)": dict(strategy="sliding_tile", window=(3, 3, 7),
                                                        window_stride=(1, 3, 7)),
    "sliding_tile 3x3x7 dilation 1x1x2": dict(strategy="sliding_tile", window=(3, 3, 7), window_dilation=(1, 1, 2)),
}
RULE_CASES = [("wan_1.3b_480p", 12, (21, 30, 52), 0, RULES)]
SMOKE_RULE_CASES = [("tiny_video", 2, (4, 8, 8), 0, {name: dict(options, tile=(2, 4, 4)) for name, options
                                                      in RULES.items() if options.get("strategy") != "sliding_tile"})]
SMOKE_ATTENTION_CASES = [("tiny_video", 2, (5, 6, 10), 7, {"tile_topk keep=0.25": dict(keep=0.25, tile=(2, 4, 4)),
                                                           "rectified keep=0.25": dict(strategy="rectified", keep=0.25,
                                                                                       tile=(2, 4, 4))})]
FORWARD_CONFIGS = {
    "tile_topk keep=0.05": dict(keep=0.05), "tile_topk keep=0.10": dict(keep=0.1),
    "tile_topk keep=0.10 tile 4x8x4": dict(keep=0.1, tile=(4, 8, 4)),
    "tile_topk keep=0.25": dict(keep=0.25), "tile_topk keep=0.50": dict(keep=0.5),
    "tile_topk top_p=0.9": dict(top_p=0.9),
    "rectified keep=0.10": dict(strategy="rectified", keep=0.1),
    "rectified keep=0.25": dict(strategy="rectified", keep=0.25),
    "sliding_tile 3x3x7": dict(strategy="sliding_tile", window=(3, 3, 7)),
    "grat surrounding r=1": dict(strategy="grat"),
    "grat criss_cross": dict(strategy="grat", grat_pattern="criss_cross"),
}
HEAD_DIM = 128
# the quality-vs-speed sweep (sweep_points): kept fractions aimed at, and the lines of each kind
LEVELS = (0.5, 0.25, 0.1)
KEEP_LINES = {"tile_topk": {}, "tile_topk antidiagonal": dict(score="antidiagonal"),
              "tile_topk permute=importance": dict(permute="importance"),
              "tile_topk permute=cluster": dict(permute="cluster"), "rectified": dict(strategy="rectified")}
WINDOW_LINES = {"sliding_tile": False, "sliding_tile blocked": True}  # line -> window_stride = window (GNA blocked)
GRAT_POINTS = (dict(strategy="grat"), dict(strategy="grat", grat_pattern="criss_cross"))
# (case, heads, grid, tile, what): the --sweep shape
SWEEP_CASE = ("wan_1.3b_480p", 12, (21, 30, 52), None, "Wan 2.1 1.3B 81x480x832 attention (12 heads, grid 21x30x52)")
SMOKE_SWEEP_CASE = ("tiny_video", 2, (4, 8, 8), (2, 4, 4), "tiny attention (2 heads, grid 4x8x8, tile 2x4x4)")


def peak_extra_mib(fn: Callable[[], Any]) -> float:
    """Peak memory that ``fn`` allocates beyond what is allocated before it (MiB; 0 on the CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def kept_fraction(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, config: SparseVideoConfig) -> float:
    geo = geometry(layout.grid, layout.grid_start, layout.num_tokens, config.tile_for(layout.grid), q.device)
    qp, kp = (t.index_select(2, geo.perm)[:, :, :geo.num_grid] for t in (q, k))
    _, cnt = route_blocks(qp, kp, config, geo, q.shape[-1] ** -0.5)
    return float(cnt.float().mean()) / geo.num_blocks


def grid_kept_fraction(grid: tuple[int, ...], options: dict[str, Any]) -> float:
    """:func:`kept_fraction` of ``options`` on ``grid`` (no text) for one head of random q and k on the CPU: exact
    for every strategy but top-p (top-k keeps a fixed count, windows and grat do not read q and k)."""
    n = math.prod(grid)
    q, k = torch.randn(2, 1, 1, n, 16).unbind(0)
    return kept_fraction(q, k, TokenLayout(num_tokens=n, grid=grid), SparseVideoConfig.from_options(**options))


def window_points(grid: tuple[int, ...], tile: tuple[int, ...] | None, blocked: bool
                  ) -> list[tuple[float, dict[str, Any]]]:
    """For each of :data:`LEVELS`, the sliding_tile window (tiles per axis, 1 .. the axis's tiles) whose kept block
    fraction on ``grid`` is nearest the level (ties: the smaller spread between axes); ``blocked`` sets
    ``window_stride = window`` (GNA's blocked attention). A window nearest to several levels is kept once, at the
    level it is nearest to."""
    extra = {} if tile is None else dict(tile=tile)

    def options(window: tuple[int, ...]) -> dict[str, Any]:
        return dict(strategy="sliding_tile", window=window, **(dict(window_stride=window) if blocked else {}), **extra)

    geo = geometry(grid, 0, math.prod(grid), SparseVideoConfig(tile=tile).tile_for(grid), torch.device("cpu"))
    kept = {w: grid_kept_fraction(grid, options(w))
            for w in itertools.product(*(range(1, t + 1) for t in geo.tiles_per_dim))}
    best = {level: min(kept, key=lambda w: (abs(kept[w] - level), max(w) - min(w))) for level in LEVELS}
    return [(level, options(w)) for level, w in best.items()
            if level == min((lv for lv in LEVELS if best[lv] == w), key=lambda lv: abs(kept[w] - lv))]


def sweep_points(grid: tuple[int, ...], tile: tuple[int, ...] | None
                 ) -> dict[str, list[tuple[float | None, dict[str, Any]]]]:
    """The quality-vs-speed sweep on ``grid``: each strategy line's (level, options) points. Keep lines (tile_topk and
    its rules, rectified) at ``keep = level``, window lines (sliding_tile, blocked) at the window nearest each level
    (:func:`window_points`), grat's two patterns at level None; ``tile`` (None: the default) in every point."""
    extra = {} if tile is None else dict(tile=tile)
    points: dict[str, list[tuple[float | None, dict[str, Any]]]] = {
        line: [(level, dict(options, keep=level, **extra)) for level in LEVELS] for line, options in KEEP_LINES.items()}
    for line, blocked in WINDOW_LINES.items():
        points[line] = window_points(grid, tile, blocked)
    points["grat"] = [(None, dict(options, **extra)) for options in GRAT_POINTS]
    return points


def point_label(line: str, options: dict[str, Any]) -> str:
    """A sweep point's name: its line and keep, window or grat pattern."""
    if "keep" in options:
        return f"{line} keep={options['keep']:.2f}"
    if "window" in options:
        return f"{line} {'x'.join(map(str, options['window']))}"
    return f"{line} {options.get('grat_pattern', 'surrounding')}"


def sweep_rows(smoke: bool, device: torch.device, dtype: torch.dtype) -> tuple[str, list[dict]]:
    """The attention rows of every point of :func:`sweep_points` (each with its line, level and options) at
    :data:`SWEEP_CASE` (``smoke``: :data:`SMOKE_SWEEP_CASE`, 2 repetitions), and what that shape is."""
    name, heads, grid, tile, what = SMOKE_SWEEP_CASE if smoke else SWEEP_CASE
    points = {point_label(line, options): (line, level, options)
              for line, line_points in sweep_points(grid, tile).items() for level, options in line_points}
    rows = attention_rows([(name, heads, grid, 0, {label: options for label, (_, _, options) in points.items()})],
                          device, dtype, 2 if smoke else 10)
    for row in rows:
        line, level, options = points[row["strategy"]]
        row.update(line=line, level=level, options=options)
    return what, rows


def dense_masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                           config: SparseVideoConfig) -> torch.Tensor:
    """Dense float32 attention in raster order under the token mask of the same routing decision."""
    n, scale = layout.num_tokens, q.shape[-1] ** -0.5
    geo = geometry(layout.grid, layout.grid_start, n, config.tile_for(layout.grid), q.device)
    ng = geo.num_grid
    qp, kp = (t.index_select(2, geo.perm)[:, :, :ng] for t in (q, k))
    idx, cnt = route_blocks(qp, kp, config, geo, scale)
    idx, cnt = idx.expand(q.shape[0], q.shape[1], *idx.shape[2:]), cnt.expand(*q.shape[:2], cnt.shape[-1])
    listed = torch.arange(idx.shape[-1], device=q.device) < cnt[..., None]
    blocks = torch.zeros(*q.shape[:2], geo.num_blocks, geo.num_blocks + 1, dtype=torch.bool, device=q.device)
    blocks.scatter_(-1, torch.where(listed, idx.long(), geo.num_blocks), True)
    block_of = torch.full((n,), geo.num_blocks, device=q.device)  # raster token -> block (text: a spare column)
    block_of[geo.perm[:ng]] = torch.arange(ng, device=q.device) // geo.block
    padded = torch.cat([blocks, torch.ones_like(blocks[:, :, :1])], dim=2)  # text queries: a spare row
    mask = padded[:, :, block_of][:, :, :, block_of] | (block_of == geo.num_blocks)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)


def kernel_check(device: torch.device) -> list[dict]:
    """The whole routed path in bf16 (kernel on CUDA) against :func:`dense_masked_reference`."""
    layout = TokenLayout(num_tokens=37 + 9 * 14 * 20, grid=(9, 14, 20), text=((9 * 14 * 20, 37 + 9 * 14 * 20),))
    q, k, v = (torch.randn(2, 4, layout.num_tokens, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    rows = []
    for options in (dict(keep=0.1), dict(top_p=0.5), dict(strategy="sliding_tile", window=(1, 3, 3)),
                    dict(strategy="grat", grat_pattern="criss_cross")):
        config = SparseVideoConfig.from_options(**options)
        out = sparse_video_attention(q, k, v, layout, config).float()
        ref = dense_masked_reference(q, k, v, layout, config)
        rows.append(dict(options=options, rel_error=float((out - ref).norm() / ref.norm())))
        print(f"check {options}: relative error vs dense-masked reference {rows[-1]['rel_error']:.2e}", flush=True)
    return rows


def attention_rows(cases: list, device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    rows = []
    for name, heads, grid, text, strategies in cases:
        n = math.prod(grid) + text
        layout = TokenLayout(num_tokens=n, grid=grid, text=((n - text, n),) if text else ())
        q, k, v = (torch.randn(1, heads, n, HEAD_DIM if device.type == "cuda" else 16, device=device, dtype=dtype)
                   for _ in range(3))
        stock = partial(F.scaled_dot_product_attention, q, k, v)
        stock_ms, stock_mib = median_ms(stock, reps, warmup=2), peak_extra_mib(stock)
        for label, options in strategies.items():
            config = SparseVideoConfig.from_options(**options)
            row = dict(case=name, heads=heads, grid=list(grid), text_tokens=text, tokens=n, strategy=label,
                       kept_fraction=kept_fraction(q, k, layout, config), stock_ms=stock_ms, stock_peak_mib=stock_mib)
            sparse = partial(sparse_video_attention, q, k, v, layout, config)
            row["sparse_ms"], row["sparse_peak_mib"] = median_ms(sparse, reps, warmup=2), peak_extra_mib(sparse)
            row["speedup"] = stock_ms / row["sparse_ms"]
            if config.strategy == "tile_topk":  # the kernel alone on the same lists
                geo = geometry(grid, 0, n, config.tile_for(grid), device)
                qp, kp, vp = (take_tokens(t, geo.perm) for t in (q, k, v))
                idx, cnt = route_blocks(qp[:, :, :geo.num_grid], kp[:, :, :geo.num_grid], config, geo,
                                        q.shape[-1] ** -0.5)
                always = [(geo.num_grid, n)] if text else None
                row["kernel_ms"] = median_ms(partial(block_sparse_attention, qp[:, :, :geo.num_grid], kp, vp, idx, cnt,
                                                 block_q=geo.block, block_k=geo.block, always_kv=always,
                                                 check_values=False), reps, warmup=2)
                row["overhead_ms"] = row["sparse_ms"] - row["kernel_ms"]
                row["permute_qkv_ms"] = 3 * median_ms(partial(take_tokens, q, geo.perm), reps, warmup=2)
                row["permute_qkv_index_select_ms"] = 3 * median_ms(partial(q.index_select, 2, geo.perm), reps, warmup=2)
                row["route_ms"] = median_ms(partial(route_blocks, qp[:, :, :geo.num_grid], kp[:, :, :geo.num_grid],
                                                config, geo, q.shape[-1] ** -0.5), reps, warmup=2)
                row["unpermute_ms"] = median_ms(partial(take_tokens, qp, geo.inverse), reps, warmup=2)
                row["kernel_speedup"] = stock_ms / row["kernel_ms"]
                row["kernel_rate_vs_sdpa"] = stock_ms * row["kept_fraction"] / row["kernel_ms"]
            line = (f"attention {name:18s} {label:31s} kept {row['kept_fraction']:.3f}  stock {stock_ms:7.2f} ms  "
                    f"sparse {row['sparse_ms']:7.2f} ms  {row['speedup']:5.2f}x  "
                    f"peak +{row['sparse_peak_mib']:.0f} MiB (stock +{stock_mib:.0f})")
            if "kernel_ms" in row:
                line += (f"  kernel {row['kernel_ms']:.2f} ms, overhead {row['overhead_ms']:.2f} ms (permute "
                         f"{row['permute_qkv_ms']:.2f}, as index_select {row['permute_qkv_index_select_ms']:.2f}; "
                         f"route {row['route_ms']:.2f}, "
                         f"unpermute {row['unpermute_ms']:.2f})")
            print(line, flush=True)
            rows.append(row)
    return rows


def wan_model(config: dict, latent: tuple[int, int, int], text: int, device: torch.device, dtype: torch.dtype
              ) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``WanTransformer3DModel(**config)`` with random weights (seed 0), in ``dtype`` except the modules diffusers
    keeps in fp32 (as ``from_pretrained(torch_dtype=)`` leaves them), and the inputs of one call (batch 1)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(keep in name for keep in model._keep_in_fp32_modules):
            tensor.data = tensor.data.float()
    inputs = dict(hidden_states=torch.randn(1, config["in_channels"], *latent, device=device, dtype=dtype),
                  timestep=torch.tensor([500.0], device=device),
                  encoder_hidden_states=torch.randn(1, text, config["text_dim"], device=device, dtype=dtype))
    return model, inputs


def forward_rows(config: dict, latent: tuple[int, int, int], text: int, device: torch.device, dtype: torch.dtype,
                 reps: int, attention_ms: float | None) -> dict:
    model, inputs = wan_model(config, latent, text, device, dtype)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    dense = run().float()
    stock_ms = median_ms(run, reps, warmup=2)
    stock_mib = peak_extra_mib(run)
    result: dict[str, Any] = dict(config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                                  latent=list(latent), text_tokens=text, stock_ms=stock_ms, stock_peak_mib=stock_mib)
    if attention_ms is not None:
        result["self_attention_share"] = config["num_layers"] * attention_ms / stock_ms
    print(f"forward stock {stock_ms:.1f} ms, peak +{stock_mib:.0f} MiB"
          + (f", self-attention {100 * result['self_attention_share']:.0f}%" if attention_ms else ""), flush=True)
    rows = []
    for label, options in (FORWARD_CONFIGS if device.type == "cuda" else {"tile_topk keep=0.25": dict(keep=0.25)}
                           ).items():
        if device.type != "cuda":
            options = dict(options, tile=(1, 2, 2))
        visattn.apply(model, "sparse_video", **options)
        out = run().float()
        row = dict(strategy=label, rel_l2_error=float((out - dense).norm() / dense.norm()),
                   sparse_ms=median_ms(run, reps, warmup=2), sparse_peak_mib=peak_extra_mib(run))
        visattn.remove(model)
        row["speedup"] = stock_ms / row["sparse_ms"]
        print(f"forward {label:22s} rel L2 {row['rel_l2_error']:.4f}  {row['sparse_ms']:.1f} ms  "
              f"{row['speedup']:.2f}x  peak +{row['sparse_peak_mib']:.0f} MiB", flush=True)
        rows.append(row)
    result["rows"] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--rules", action="store_true", help="only the attention rows of issue 21's routing rules")
    parser.add_argument("--sweep", action="store_true", help="only the attention rows of the quality-vs-speed sweep")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    reps = 2 if args.smoke else 20
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "dtype": str(dtype)}
    if args.rules:
        results["rows"] = attention_rows(SMOKE_RULE_CASES if args.smoke else RULE_CASES, device, dtype,
                                         2 if args.smoke else 10)
        write(results, args.out)
        return
    if args.sweep:
        results["shape"], results["rows"] = sweep_rows(args.smoke, device, dtype)
        write(results, args.out)
        return
    results["kernel_check"] = kernel_check(device)
    results["attention"] = attention_rows(SMOKE_ATTENTION_CASES if args.smoke else ATTENTION_CASES, device, dtype,
                                          reps)
    wan_stock = next((r["stock_ms"] for r in results["attention"] if r["case"] == "wan_1.3b_480p"), None)
    if args.smoke:
        fwd = forward_rows(WAN_TINY, (3, 8, 8), 5, device, dtype, reps, None)
    else:
        fwd = forward_rows(WAN_1_3B, (21, 60, 104), 512, device, dtype, 5, wan_stock)
        for row in fwd["rows"]:
            kept = next((r["kept_fraction"] for r in results["attention"]
                         if r["case"] == "wan_1.3b_480p" and r["strategy"] == row["strategy"]), None)
            if kept is not None:
                share = fwd["self_attention_share"]
                row["kept_fraction"] = kept
                row["bound"] = 1.0 / ((1.0 - share) + share * kept)
                row["fraction_of_bound"] = row["speedup"] / row["bound"]
                row["fraction_of_possible_gain"] = (row["speedup"] - 1.0) / (row["bound"] - 1.0)
    results["wan_forward"] = fwd
    write(results, args.out)


def write(results: dict[str, Any], out: Path | None) -> None:
    """``results`` as JSON at ``out`` (if given)."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
