"""Speed of diffusion token merging (``tome`` on diffusers) and of ``isolation`` (issue 7).

All in one run, random weights (models built from config dicts, no download), eager mode:

- SDXL UNet (the SDXL base config), 1024px (128x128 latents), fp16, batch 8 (batch 2 is CPU-launch
  bound on the H100): stock; ``tome`` ratio 0.5 with ``scope="attention"`` and ``"block"`` at both
  SDXL attention levels (``max_downsample=4``: 64x64 and 32x32 latents) and at the finest only
  (``max_downsample=2``); and each scope's bound, measured in the same run: the same layers run on
  the first ``N - r`` tokens and their output is repeated back to ``N`` tokens (no matching, no
  averaging: merge cost ignored). Where the time goes: per step, the time in self-attention and in
  the transformer blocks (CUDA events around the modules), and the cost of one merge decision plus
  merge and unmerge at each level, timed alone.
- Flux transformer at 1024px (4096 image + 512 text tokens), bf16, batch 2, reduced depth (labelled:
  ``--flux-dual`` dual-stream and ``--flux-single`` single-stream blocks of the full width), stock vs
  ``tome`` ratio 0.5 (both scopes) with bounds, and the time per dual and single block.
- ``isolation`` on the SDXL UNet and on Flux: one reference and one target per batch element pair
  (batch 2), two subjects, latency per step and peak memory against stock.

    PYTHONPATH=. python3 -m benchmarks.diffusion --out benchmarks/results/diffusion.json
    PYTHONPATH=. python3 -m benchmarks.diffusion --tiny   # CPU smoke run at toy sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch

import visattn
from benchmarks.timing import graphed as timing_graphed
from benchmarks.timing import median_ms
from visattn.core.merge_sd import cell_destinations, match_to_cells
from visattn.processors.tome.diffusers import _sites

SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SDXL_TINY = dict(SDXL, sample_size=16, block_out_channels=(8, 16, 16), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(1, 2, 2), cross_attention_dim=16, addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 8, norm_num_groups=4)
FLUX = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_TINY = dict(FLUX, in_channels=4, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                 pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def graphed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """:func:`benchmarks.timing.graphed` on a GPU (``tome``'s destinations are hashed on the device from the
    call's timestep, so a replay computes them as an eager call does); ``fn`` itself elsewhere."""
    return timing_graphed(fn) if device.type == "cuda" else fn


def half_tokens(model: torch.nn.Module, scope: str, ratio: float, max_downsample: int) -> list:
    """The bound of a scope: its layers run on the first N - r image tokens, outputs repeated back to N."""
    text = {"tokens": 0}  # Flux single-stream attention sees the text first

    def on_call(m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        text["tokens"] = kwargs["encoder_hidden_states"].shape[1]

    hooks = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    for site in _sites(model):
        if site.downsample > max_downsample:
            continue
        text_first = scope == "attention" and site.kind == "flux_single"
        for mod in [site.block] if scope == "block" else [a for _, a in site.attentions]:
            stash: list[tuple[int, int, int]] = []

            def before(m: torch.nn.Module, args: tuple, kwargs: dict, stash: list = stash,
                       text_first: bool = text_first) -> tuple:
                x = args[0] if args else kwargs["hidden_states"]
                start = text["tokens"] if text_first else 0
                n = x.shape[1] - start
                keep = n - int(n * ratio)
                stash.append((start, n, keep))
                x = x[:, :start + keep]
                if "image_rotary_emb" in kwargs:
                    rope = kwargs["image_rotary_emb"]
                    cut = rope[0].shape[0] - n + keep
                    kwargs = {**kwargs, "image_rotary_emb": (rope[0][:cut], rope[1][:cut])}
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

            def after(m: torch.nn.Module, args: tuple, kwargs: dict, out: Any, stash: list = stash) -> Any:
                start, n, keep = stash.pop()

                def grow(y: torch.Tensor) -> torch.Tensor:
                    return torch.cat([y, y[:, start:start + n - keep]], dim=1)

                if isinstance(out, tuple):
                    i = 1 if scope == "block" else 0  # blocks: (text, image); attention: (image, text)
                    return tuple(grow(t) if j == i else t for j, t in enumerate(out))
                return grow(out)

            hooks.append(mod.register_forward_pre_hook(before, with_kwargs=True))
            hooks.append(mod.register_forward_hook(after, with_kwargs=True))
    return hooks


def module_times(model: torch.nn.Module, run: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Milliseconds per step inside self-attention layers and inside transformer blocks (CUDA events)."""
    if device.type != "cuda":
        return {}
    events: dict[str, list] = {"self_attention": [], "blocks": []}
    hooks = []
    for site in _sites(model):
        for kind, mods in (("self_attention", [a for _, a in site.attentions]), ("blocks", [site.block])):
            for mod in mods:
                def pre(m: torch.nn.Module, a: tuple, kind: str = kind) -> None:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    events[kind].append([ev])

                def post(m: torch.nn.Module, a: tuple, o: Any, kind: str = kind) -> None:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    events[kind][-1].append(ev)

                hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    run()
    sync(device)
    for h in hooks:
        h.remove()
    return {k: sum(a.elapsed_time(b) for a, b in v) for k, v in events.items()}


def merge_cost(batch: int, tokens: int, channels: int, ratio: float, device: torch.device,
               dtype: torch.dtype) -> float:
    """Milliseconds of one decision (partition + matching) plus merge and unmerge of ``[B, N, C]``."""
    side = int(tokens ** 0.5)
    x = torch.randn(batch, tokens, channels, device=device, dtype=dtype)

    def once() -> torch.Tensor:
        dst, src = cell_destinations((side, side), (2, 2), device=device)
        merge = match_to_cells(x, dst, src, int(tokens * ratio))
        return merge.unmerge(merge.merge(x))

    return median_ms(graphed(once, device), 20, warmup=3)


def bench_sdxl(device: torch.device, dtype: torch.dtype, batch: int, tiny: bool, iters: int,
               light: bool = False) -> dict[str, Any]:
    """SDXL UNet step: stock, tome per scope and max_downsample, bounds; ``light``: max_downsample=4 only."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**(SDXL_TINY if tiny else SDXL)).to(dtype).eval()
    side, text, ctx = (16, 5, 16) if tiny else (128, 77, 2048)
    pooled = 8 if tiny else 1280
    inputs = dict(sample=torch.randn(batch, 4, side, side, device=device, dtype=dtype),
                  timestep=torch.full((batch,), 500, device=device),
                  encoder_hidden_states=torch.randn(batch, text, ctx, device=device, dtype=dtype),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                                     "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)})

    @torch.no_grad()
    def step() -> torch.Tensor:
        return unet(**inputs).sample

    stock_out = step()
    res: dict[str, Any] = {"model": "SDXL UNet (random weights)", "px": side * 8, "batch": batch,
                           "dtype": str(dtype), "finite": bool(torch.isfinite(stock_out).all())}
    # eager: the CPU launches ~2,000 kernels per step and, on the H100 machine, is nearly the bottleneck
    # at batch 8 already; every figure below is therefore also taken from a CUDA graph replay.
    res["stock_eager_ms"] = median_ms(step, iters, warmup=3)
    res["stock_peak_mib"] = peak_mib(step, device)
    res["stock_ms"] = median_ms(graphed(step, device), iters, warmup=3)
    variants = {}
    for max_downsample in (4,) if light else (4, 2):
        for scope in ("attention", "block"):
            key = f"{scope}_md{max_downsample}"
            hooks = half_tokens(unet, scope, 0.5, max_downsample)
            bound = median_ms(graphed(step, device), iters, warmup=3)
            for h in hooks:
                h.remove()
            visattn.apply(unet, "tome", ratio=0.5, scope=scope, max_downsample=max_downsample)
            ms = median_ms(graphed(step, device), iters, warmup=3)
            eager = median_ms(step, iters, warmup=3)
            peak = peak_mib(step, device)
            out = step()
            visattn.remove(unet)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            variants[key] = {"tome_ms": ms, "bound_ms": bound, "speedup": res["stock_ms"] / ms,
                             "bound_speedup": res["stock_ms"] / bound, "of_bound": bound / ms,
                             "tome_eager_ms": eager, "eager_speedup": res["stock_eager_ms"] / eager,
                             "peak_mib": peak,
                             "rel_change": float((out - stock_out).float().norm() / stock_out.float().norm())}
    res["tome"] = variants
    if not light:
        res["isolation"] = bench_isolation(unet, step, res["stock_ms"], res["stock_peak_mib"], side * 8, device)
    if light:  # where the time goes (events around modules: eager, at a batch where the GPU is the bottleneck)
        res["stock_where"] = module_times(unet, step, device)
        return res
    visattn.apply(unet, "tome", ratio=0.0, scope="block", max_downsample=4)
    res["ratio0_ms"] = median_ms(graphed(step, device), iters, warmup=3)
    visattn.remove(unet)
    res["stock_ms_again"] = median_ms(graphed(step, device), iters, warmup=3)
    levels = [(side // 2) ** 2, (side // 4) ** 2]
    chans = (16, 16) if tiny else (640, 1280)
    res["merge_cost_ms"] = {f"{n} tokens x {c}": merge_cost(batch, n, c, 0.5, device, dtype)
                            for n, c in zip(levels, chans)}
    return res


def bench_flux(device: torch.device, dtype: torch.dtype, batch: int, tiny: bool, iters: int, dual: int,
               single: int) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):
        flux = diffusers.FluxTransformer2DModel(**(FLUX_TINY if tiny else FLUX), num_layers=dual,
                                                num_single_layers=single).to(dtype).eval()
    side, text = (8, 5) if tiny else (64, 512)
    cfg = flux.config
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    inputs = dict(hidden_states=torch.randn(batch, side * side, cfg.in_channels, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, device=device, dtype=dtype),
                  pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype),
                  timestep=torch.full((batch,), 0.5, device=device, dtype=dtype), img_ids=img_ids,
                  txt_ids=torch.zeros(text, 3, device=device), guidance=torch.full((batch,), 3.5, device=device))

    @torch.no_grad()
    def step() -> torch.Tensor:
        return flux(**inputs).sample

    res: dict[str, Any] = {"model": f"Flux transformer, reduced depth: {dual} dual + {single} single blocks "
                                    f"(full model: 19 + 38), random weights", "px": side * 16, "batch": batch,
                           "image_tokens": side * side, "text_tokens": text, "dtype": str(dtype)}
    res["stock_ms"] = median_ms(step, iters, warmup=3)
    res["stock_peak_mib"] = peak_mib(step, device)
    if device.type == "cuda":  # per block: events around each block
        per: dict[str, list[float]] = {"dual": [], "single": []}
        events = []
        hooks = []
        for kind, blocks in (("dual", flux.transformer_blocks), ("single", flux.single_transformer_blocks)):
            for b in blocks:
                def pre(m: torch.nn.Module, a: tuple, k: dict, kind: str = kind) -> None:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    events.append([kind, ev])

                def post(m: torch.nn.Module, a: tuple, k: dict, o: Any) -> None:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    events[-1].append(ev)

                hooks += [b.register_forward_pre_hook(pre, with_kwargs=True),
                          b.register_forward_hook(post, with_kwargs=True)]
        step()
        sync(device)
        for h in hooks:
            h.remove()
        for kind, a, b in events:
            per[kind].append(a.elapsed_time(b))
        res["stock_block_ms"] = {k: statistics.mean(v) for k, v in per.items() if v}
    variants = {}
    for scope in ("attention", "block"):
        hooks = half_tokens(flux, scope, 0.5, 1)
        bound = median_ms(step, iters, warmup=3)
        for h in hooks:
            h.remove()
        visattn.apply(flux, "tome", ratio=0.5, scope=scope)
        ms = median_ms(step, iters, warmup=3)
        peak = peak_mib(step, device)
        visattn.remove(flux)
        variants[scope] = {"tome_ms": ms, "bound_ms": bound, "speedup": res["stock_ms"] / ms,
                           "bound_speedup": res["stock_ms"] / bound, "of_bound": bound / ms, "peak_mib": peak}
    res["tome"] = variants
    res["isolation"] = bench_isolation(flux, step, res["stock_ms"], res["stock_peak_mib"], side * 16, device,
                                       graph=False)
    return res


def bench_isolation(model: torch.nn.Module, step: Callable[[], Any], stock_ms: float, stock_peak: float | None,
                    px: int, device: torch.device, graph: bool = True) -> dict[str, Any]:
    """``isolation`` with two subjects, one reference per target (the batch: pairs of reference, target)."""
    s = px / 1024
    box = lambda *b: tuple(int(v * s) for v in b)  # noqa: E731
    regions = dict(target_regions=[box(64, 256, 448, 960), box(576, 256, 960, 960)],
                   reference_regions=[box(100, 300, 400, 900), box(500, 100, 1000, 1000)])
    visattn.apply(model, "isolation", **regions)
    run = graphed(step, device) if graph else step
    ms = median_ms(run, 10, warmup=3)
    peak = peak_mib(step, device)
    visattn.remove(model)
    return {"subjects": 2, "references": 1, "ms": ms, "stock_ms": stock_ms, "slowdown": ms / stock_ms,
            "peak_mib": peak, "stock_peak_mib": stock_peak, "timing": "CUDA graph" if graph else "eager"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke run)")
    parser.add_argument("--parts", default="sdxl,flux", help="comma-separated: sdxl, flux, isolation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--flux-dual", type=int, default=2)
    parser.add_argument("--flux-single", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    iters = 2 if args.tiny else args.iters
    parts = args.parts.split(",")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "diffusers": diffusers.__version__}
    if args.out and args.out.exists():
        results = {**json.loads(args.out.read_text()), **results}
    if "sdxl" in parts:
        results["sdxl"] = bench_sdxl(device, torch.float16 if device.type == "cuda" else torch.float32,
                                     args.batch, args.tiny, iters)
        print(json.dumps(results["sdxl"], indent=1), flush=True)
        if not args.tiny:  # twice the work per launch: eager is GPU-bound; module times taken there
            results["sdxl_batch16"] = bench_sdxl(device, torch.float16, 16, False, args.iters, light=True)
            print(json.dumps(results["sdxl_batch16"], indent=1), flush=True)
    if "flux" in parts:
        results["flux"] = bench_flux(device, torch.bfloat16 if device.type == "cuda" else torch.float32, 2,
                                     args.tiny, iters, args.flux_dual, args.flux_single)
        print(json.dumps(results["flux"], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
