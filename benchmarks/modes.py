"""Speed in the three execution modes users run (issue 17): eager, ``torch.compile`` and CUDA graphs.

Every workload is timed in one process, each variant against the stock model **in the same mode**, one variant
after the other (as a user runs one model), except BRA against BiFormer: launch-bound, timed interleaved, call
by call (``side_by_side``), so that the host's drift falls on both alike:

- ``eager``: calls issued from Python (the GPU machine's slow CPU makes small eager steps launch-bound);
- ``compiled``: ``torch.compile(model)`` (default mode, Inductor), after its warm-up calls; the graph
  breaks and the graphs compiled over the warm-up and timed calls are recorded (``recompiles`` > 0 means a
  call of the same shapes compiled again);
- ``graph``: the eager model captured in one CUDA graph and replayed (GPU time alone).

Next to each speedup, its bound: the same model doing only the work the method leaves (``bound`` rows):

- ``vit``: ToMe on ViT-B/16 r=13 and ViT-L/16 r=7, batch 256 fp16; bound: the same blocks with merging
  replaced by dropping the last r tokens (same token counts, no decision, no averaging); EViT keep 0.7 (eager
  and CUDA graphs);
- ``kernel``: the block-sparse kernel at N=4096 (B=1, H=24, D=128, block 128, 1, 2, 3 and 16 of 32 kv blocks kept, bf16)
  against FlexAttention given the same lists (always compiled, as Flex must be) and dense SDPA; ours is timed
  eager, inside a compiled function, and replayed from a CUDA graph; bound: dense SDPA over the kept keys alone;
  each list's rows are timed interleaved, call by call (these calls are launch-bound), ours and Flex compiled
  afresh for each list (as a user's function is, with static sizes);
- ``wan``: one Wan 2.1 1.3B forward at 81x480x832 (32,760 tokens, bf16, random weights), ``sparse_video``
  tile_topk keep 0.1 installed as processors and as the attention backend (``--wan-variants``); bound: every
  self-attention over the first 10% of its keys (SDPA);
- ``bra``: bi-level routing attention as a whole layer (qkv and output projections, with and without LePE
  5x5: BiFormer's ``side_dwconv``), 64x64 tokens, dim 768, 12 heads, n_win 8, batch 8, bf16, topk 4 and 16,
  against BiFormer's own ``ops/bra_nchw.py``
  (``--biformer``: a copy of rayleizhu/BiFormer) on its NCHW channels-last input; peak memory of one call;
  bound: the layer without token mixing (projections and LePE; ``no_token_mixing``);
- ``timm``: ToMe r=13 on timm models with positions inside attention (``--timm-models``: DINOv3-B/16 and
  EVA02-B/14 with rotary embeddings, BEiT-B/16 with a relative position bias; their own image sizes), batch 256
  fp16; bound as in ``vit``;
- ``sdxl``: one SDXL UNet step at 1024 px, batch 8 fp16, ``tome`` scope="block" ratio 0.5 at both attention
  levels (``max_downsample=4``); bound: the
  merged layers run on the first N - r tokens (``benchmarks.diffusion.half_tokens``); ``--sdxl-variants`` picks
  which of the two run beside stock, ``--sdxl-modes`` in which modes.

    PYTHONPATH=. python3 -m benchmarks.modes --parts vit,kernel --out benchmarks/results/modes.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import visattn
from benchmarks.timing import graphed, interleaved_ms, median_ms

MODES = ("eager", "compiled", "graph")


def compile_stats() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def in_modes(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], iters: int,
             modes: tuple[str, ...] = MODES, memory: bool = False) -> dict[str, Any]:
    """Milliseconds of ``run(model)`` in each mode (see the module doc), and the compile statistics; with
    ``memory``, also the MiB one eager and one compiled call allocate (``peak_mib``)."""
    return side_by_side({"model": (model, run)}, iters, modes, memory)["model"]


def side_by_side(variants: dict[str, tuple[torch.nn.Module, Callable[[torch.nn.Module], Any]]], iters: int,
                 modes: tuple[str, ...] = MODES, memory: bool = False) -> dict[str, dict[str, Any]]:
    """:func:`in_modes` of each ``name: (model, run)`` of ``variants``, the variants of a mode timed interleaved,
    call by call (:func:`benchmarks.timing.interleaved_ms`; ``iters`` rounds after 3 untimed ones), so that the
    host's drift over a run falls on all of them alike and their ratio does not depend on which ran first. The
    models must be distinct objects (a method applied to a copy of the stock model). Compiled, each variant's
    ``compile`` statistics are those of its own warm-up calls (no graph where the graphs of an earlier variant's
    model serve it: dynamo's guards decide); ``recompiles`` counts the graphs compiled during the timed calls of
    all the variants together."""
    out: dict[str, dict[str, Any]] = {name: {} for name in variants}
    calls = {name: partial(run, model) for name, (model, run) in variants.items()}

    def timed(mode: str, fns: dict[str, Callable[[], Any]], warmup: int = 3) -> None:
        for name, ms in interleaved_ms(fns, iters, warmup).items():
            out[name][mode] = ms
        if memory and mode != "graph":
            for name, fn in fns.items():
                out[name][f"{mode}_mib"] = peak_mib(fn)

    if "eager" in modes:
        timed("eager", calls)
    if "graph" in modes:
        timed("graph", {name: graphed(call) for name, call in calls.items()})
    if "compiled" in modes:
        torch._dynamo.reset()
        compiled = {}
        for name, (model, run) in variants.items():
            torch._dynamo.utils.counters.clear()
            compiled[name] = partial(run, torch.compile(model))
            for _ in range(3):
                compiled[name]()
            out[name]["compile"] = compile_stats()
        torch._dynamo.utils.counters.clear()
        timed("compiled", compiled, warmup=0)
        recompiles = compile_stats()["graphs"]
        for name in variants:
            out[name]["compile"]["recompiles"] = recompiles
        del compiled
        torch._dynamo.reset()
    return out


def peak_mib(fn: Callable[[], Any]) -> float:
    """MiB that one call of ``fn`` allocates above what is allocated before it (its outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def ratios(stock: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    return {m: stock[m] / other[m] for m in MODES if m in stock and m in other}


@contextlib.contextmanager
def applied(model: torch.nn.Module, method: str, **options: Any) -> Iterator[Any]:
    handle = visattn.apply(model, method, **options)
    try:
        yield handle
    finally:
        visattn.remove(model)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hooked(register: Callable[[], list]) -> Iterator[None]:
    """The hooks that ``register`` returns are in place inside the block."""
    hooks = register()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def drop_last_merges() -> contextlib.AbstractContextManager:
    """ToMe's bound: the merge step keeps the first N - r tokens (no decision, no average)."""
    from visattn.processors.tome import vit as tome_vit

    def drop_last(metric: torch.Tensor, r: int, *, num_prefix: int = 0, size: torch.Tensor | None = None,
                  **_: object) -> tuple:
        batch, n = metric.shape[0], metric.shape[-2]  # the keys [B, H, N, D]
        keep = n - min(r, (n - num_prefix) // 2)

        def merge(t: torch.Tensor, mode: str = "mean", add: torch.Tensor | None = None) -> torch.Tensor:
            return t[:, :keep] if add is None else t[:, :keep] + add[:, :keep]

        merge.size = (torch.ones(batch, n, device=metric.device) if size is None else size)[:, :keep]
        merge.kept = torch.arange(keep, device=metric.device).expand(batch, -1)  # positions follow
        return merge, None

    return patched(tome_vit, "bipartite_soft_matching", drop_last)


def tome_rows(args: argparse.Namespace, models: list[tuple[str, int]], modes: tuple[str, ...] = MODES,
              evit: bool = False) -> list[dict]:
    """ToMe at ``r`` on each timm model (random weights, fp16, batch ``args.batch``, its own image size) against
    stock in each of ``modes``, with its bound (:func:`drop_last_merges`) and, with ``evit``, EViT keep 0.7."""
    import timm

    rows = []
    for name, r in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).cuda().half().eval()
        x = torch.randn(args.batch, 3, *model.patch_embed.img_size, device="cuda", dtype=torch.float16)
        run = lambda m, x=x: m(x)  # noqa: E731
        with torch.inference_mode():
            row: dict[str, Any] = {"model": name, "r": r, "batch": args.batch,
                                   "stock": in_modes(model, run, args.iters, modes)}
            with applied(model, "tome", r=r) as handle:
                row["tome"] = in_modes(model, run, args.iters, modes)
                row["token_counts"] = handle.token_counts
                with drop_last_merges():
                    row["bound"] = in_modes(model, run, args.iters, modes)
            if evit:
                with applied(model, "prune", keep=0.7):  # adds no graph break (tests/test_compile.py); not compiled
                    row["evit"] = in_modes(model, run, args.iters, ("eager", "graph"))
        for k in ("tome", "bound") + (("evit",) if evit else ()):
            row[f"{k}_speedup"] = ratios(row["stock"], row[k])
        evit_text = f"; EViT {fmt(row['evit_speedup'])}" if evit else ""
        log(f"{name} r={r}: tome {fmt(row['tome_speedup'])}; bound {fmt(row['bound_speedup'])}{evit_text}; "
            f"compile stats tome {row['tome'].get('compile')}")
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows


def part_vit(args: argparse.Namespace) -> list[dict]:
    return tome_rows(args, [("vit_base_patch16_224", 13), ("vit_large_patch16_224", 7)], evit=True)


def part_timm(args: argparse.Namespace) -> list[dict]:
    """ToMe r=13 on timm families with positions inside attention: EVA02-B/14 and DINOv3-B/16 (rotary
    embeddings), BEiT-B/16 (relative position bias), at their own image sizes, against stock in each mode; bound
    as in ``vit``. No CUDA graphs: stock EVA-style models build their rotary tables from host tensors per call."""
    return tome_rows(args, [(name, 13) for name in args.timm_models.split(",")], ("eager", "compiled"))


def fmt(speedups: dict[str, float]) -> str:
    return ", ".join(f"{m} {v:.3f}x" for m, v in speedups.items())


# ----------------------------------------------------------------------------------------------------------


def part_kernel(args: argparse.Namespace) -> list[dict]:
    from torch.nn.attention.flex_attention import flex_attention

    from benchmarks.kernels import flex_block_mask, random_lists
    from visattn.kernels.block_sparse import block_sparse_attention

    b, h, n, d, block = 1, 24, 4096, 128, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    nb = n // block
    rows = []
    with torch.inference_mode():
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        sdpa_ms = {"eager": median_ms(sdpa, args.iters * 5, warmup=5),
                   "graph": median_ms(graphed(sdpa), args.iters * 5, warmup=5)}
        for kept in (1, 2, 3, 16):
            # Each row compiles afresh, as a user's function would: compiled again over the last row's lists (a
            # new length), dynamo would make their length a dynamic size (automatic dynamic shapes).
            torch._dynamo.reset()
            flex = torch.compile(flex_attention)
            idx, cnt = random_lists(b, h, nb, nb, kept, q.device)

            def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block,  # noqa: B023
                                              check_values=False)

            ours_compiled = torch.compile(ours)
            mask = flex_block_mask(idx, cnt, n, block)
            flex_run = lambda: flex(q, k, v, block_mask=mask)  # noqa: E731,B023
            kq, kk = q, k[:, :, :kept * block]
            kv = v[:, :, :kept * block]
            bound = lambda: F.scaled_dot_product_attention(kq, kk, kv)  # noqa: E731,B023
            # Launch-bound at 1-3 blocks: the host's speed drifts over a run, so the rows compared are timed
            # interleaved, call by call (benchmarks.timing.interleaved_ms), each graph captured first.
            timed = interleaved_ms({
                "ours eager": lambda: ours(q, k, v),  # noqa: B023
                "ours compiled": lambda: ours_compiled(q, k, v),  # noqa: B023
                "ours graph": graphed(lambda: ours(q, k, v)),  # noqa: B023
                "flex compiled": flex_run, "flex graph": graphed(flex_run),
                "bound eager": bound, "bound graph": graphed(bound)}, args.iters * 20, warmup=5)
            row = {"B": b, "H": h, "N": n, "D": d, "block": block, "kept_blocks": kept, "of_blocks": nb,
                   "sdpa_ms": sdpa_ms, "timed_calls": args.iters * 20, "interleaved": True,
                   **{f"{who}_ms": {mode: timed[f"{who} {mode}"] for mode in MODES if f"{who} {mode}" in timed}
                      for who in ("ours", "flex", "bound")}}
            o, o_flex = ours(q, k, v).float(), flex_run().float()
            row["ours_vs_flex_rel_diff"] = ((o - o_flex).norm() / o_flex.norm()).item()
            log(f"kernel N={n} kept {kept}/{nb}: ours {fmt_ms(row['ours_ms'])}; flex {fmt_ms(row['flex_ms'])}; "
                f"SDPA dense {fmt_ms(sdpa_ms)}; bound {fmt_ms(row['bound_ms'])}")
            rows.append(row)
    return rows


def fmt_ms(times: dict[str, float]) -> str:
    return ", ".join(f"{m} {times[m]:.3f} ms" for m in MODES if m in times)


# ----------------------------------------------------------------------------------------------------------


def keys_kept(fraction: float, min_tokens: int) -> contextlib.AbstractContextManager:
    """Sparse attention's bound: every self-attention call (``Nq == Nk >= min_tokens``) attends to the first
    ``fraction`` of its keys only (SDPA, so the attention costs ``fraction`` of stock's)."""
    real = F.scaled_dot_product_attention

    def truncated(*args: Any, **kwargs: Any) -> torch.Tensor:
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs.pop(name) for i, name in enumerate(names))
        n = k.shape[-2]
        if q.shape[-2] == n >= min_tokens:
            keep = math.ceil(fraction * n)
            k, v = k[..., :keep, :], v[..., :keep, :]
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            if mask is not None and mask.shape[-1] == n:  # a key mask: its kept columns
                if len(args) > 3:
                    args = (*args[:3], mask[..., :keep], *args[4:])
                else:
                    kwargs["attn_mask"] = mask[..., :keep]
        return real(q, k, v, *args[3:], **kwargs)

    return patched(F, "scaled_dot_product_attention", truncated)


def tokens_cut(count: int, min_tokens: int) -> contextlib.AbstractContextManager:
    """Token merging's bound at the attention call: every self-attention call (``Nq == Nk >= min_tokens``) runs over
    its first ``N - count`` tokens only (queries, keys and values; a mask cut alike), its output padded back to ``N``
    with the remaining queries (a copy, as cheap as an unmerge)."""
    real = F.scaled_dot_product_attention

    def truncated(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor:
        n = query.shape[-2]
        if not key.shape[-2] == n >= min_tokens:
            return real(query, key, value, attn_mask=attn_mask, **kwargs)
        keep = n - count
        if attn_mask is not None:
            attn_mask = attn_mask[..., :keep] if attn_mask.shape[-2] == 1 else attn_mask[..., :keep, :keep]
        out = real(query[..., :keep, :], key[..., :keep, :], value[..., :keep, :], attn_mask=attn_mask, **kwargs)
        return torch.cat([out, query[..., keep:, :]], dim=-2)

    return patched(F, "scaled_dot_product_attention", truncated)


def part_wan(args: argparse.Namespace) -> list[dict]:
    from benchmarks.video import WAN_1_3B, wan_model

    model, inputs = wan_model(WAN_1_3B, (21, 60, 104), 512, torch.device("cuda"), torch.bfloat16)
    run = lambda m: m(**inputs, return_dict=False)[0]  # noqa: E731
    iters = max(3, args.iters // 4)
    modes = ("eager", "compiled")  # a CUDA graph of the eager forward adds nothing at 0.3-0.5 s per call
    variants = {"processor": lambda: applied(model, "sparse_video", keep=0.1),
                "backend": lambda: applied(model, "sparse_video", keep=0.1, install="attention_backend"),
                "bound": lambda: keys_kept(0.1, 4096)}
    with torch.no_grad():
        row: dict[str, Any] = {"model": "Wan 2.1 T2V 1.3B", "latent": [21, 60, 104], "keep": 0.1,
                               "stock": in_modes(model, run, iters, modes)}
        log(f"wan stock {fmt_ms(row['stock'])}")
        for name in args.wan_variants:
            with variants[name]():
                row[name] = in_modes(model, run, iters, modes)
            row[f"{name}_speedup"] = ratios(row["stock"], row[name])
            log(f"wan {name} (sparse_video keep 0.1 or its bound): {fmt(row[f'{name}_speedup'])}; "
                f"compile stats {row[name].get('compile')}")
    return [row]


def part_sdxl(args: argparse.Namespace) -> list[dict]:
    import diffusers

    from benchmarks.diffusion import SDXL, half_tokens

    torch.manual_seed(0)
    device, dtype, batch = torch.device("cuda"), torch.float16, args.sdxl_batch
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**SDXL).to(dtype).eval()
    inputs = dict(sample=torch.randn(batch, 4, 128, 128, device=device, dtype=dtype),
                  timestep=torch.full((batch,), 500, device=device),
                  encoder_hidden_states=torch.randn(batch, 77, 2048, device=device, dtype=dtype),
                  added_cond_kwargs={"text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
                                     "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)})
    run = lambda m: m(**inputs, return_dict=False)[0]  # noqa: E731
    modes = args.sdxl_modes
    variants = {"tome_block": lambda: applied(unet, "tome", ratio=0.5, scope="block", max_downsample=4),
                "bound": lambda: hooked(lambda: half_tokens(unet, "block", 0.5, 4))}
    with torch.no_grad():
        row: dict[str, Any] = {"model": "SDXL UNet 1024px", "batch": batch, "ratio": 0.5, "max_downsample": 4,
                               "stock": in_modes(unet, run, args.iters, modes)}
        log(f"sdxl stock {fmt_ms(row['stock'])}; compile stats {row['stock'].get('compile')}")
        for name in args.sdxl_variants:
            start = time.perf_counter()
            with variants[name]():
                row[name] = in_modes(unet, run, args.iters, modes)
            row[name]["seconds"] = time.perf_counter() - start
            row[f"{name}_speedup"] = ratios(row["stock"], row[name])
            log(f"sdxl {name} (tome block 0.5 or its bound): {fmt_ms(row[name])}; {fmt(row[f'{name}_speedup'])}; "
                f"compile stats {row[name].get('compile')}; {row[name]['seconds']:.0f} s in all")
    return [row]


def no_token_mixing() -> contextlib.AbstractContextManager:
    """BRA's bound: the layer with its attention (routing included) replaced by passing v through, so that only
    the projections and LePE remain (and one copy of v; an output that did not depend on v would let Inductor
    drop the qkv projection)."""
    from visattn.processors import bra

    def nothing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
        return v

    return patched(bra, "bi_level_routing_attention", nothing)


BRA_SHAPE = (8, 64, 768, 12, 8)  # batch, grid side, dim, heads, n_win


def bra_pair(biformer: str, topk: int, lepe: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor,
                                                            torch.Tensor]:
    """visattn's BRA layer and BiFormer's ``ops/bra_nchw.py`` layer (``biformer``: a copy of rayleizhu/BiFormer) at
    64x64 tokens, dim 768, 12 heads, n_win 8, with LePE 5x5 or none, and their inputs (batch 8, bf16; BiFormer's
    NCHW channels-last): ``(ours, peer, x_ours, x_peer)``."""
    import sys

    from visattn.timm import bra

    sys.path.insert(0, biformer)
    from ops.bra_nchw import nchwBRA  # BiFormer's own layer (a git-ignored copy of rayleizhu/BiFormer)

    batch, side, dim, heads, n_win = BRA_SHAPE
    dd = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    ours = bra(n_win=n_win, topk=topk, lepe=lepe, num_prefix_tokens=0)(dim, num_heads=heads, qkv_bias=True)
    ours = ours.to(**dd).eval()
    peer = nchwBRA(dim, num_heads=heads, n_win=n_win, topk=topk, side_dwconv=5 if lepe else 0).to(**dd).eval()
    x_ours = torch.randn(batch, side * side, dim, **dd)
    x_peer = x_ours.transpose(1, 2).reshape(batch, dim, side, side).contiguous(memory_format=torch.channels_last)
    return ours, peer, x_ours, x_peer


def part_bra(args: argparse.Namespace) -> list[dict]:
    """BRA as a whole layer (qkv and output projections, LePE) against BiFormer's ``ops/bra_nchw.py``."""
    batch, side, dim, heads, n_win = BRA_SHAPE
    rows = []
    for topk, lepe in ((4, True), (4, False), (16, True)):
        ours, peer, x_ours, x_peer = bra_pair(args.biformer, topk, lepe)
        with torch.inference_mode():
            row: dict[str, Any] = {"batch": batch, "tokens": side * side, "dim": dim, "heads": heads,
                                   "n_win": n_win, "topk": topk, "lepe": "5x5 depthwise on v" if lepe else "none",
                                   "interleaved": ["visattn", "biformer"],
                                   **side_by_side({"visattn": (ours, lambda m, x=x_ours: m(x)),
                                                   "biformer": (peer, lambda m, x=x_peer: m(x))},
                                                  args.iters, memory=True)}
            with no_token_mixing():
                row["bound"] = in_modes(ours, lambda m, x=x_ours: m(x), args.iters, memory=True)
        row["speedup_vs_biformer"] = ratios(row["biformer"], row["visattn"])
        row["bound_vs_biformer"] = ratios(row["biformer"], row["bound"])
        row["memory_vs_biformer"] = {m: row["biformer"][f"{m}_mib"] / row["visattn"][f"{m}_mib"]
                                     for m in ("eager", "compiled")}
        log(f"bra layer topk {topk} lepe {lepe}: visattn {fmt_ms(row['visattn'])}; BiFormer {fmt_ms(row['biformer'])}; "
            f"speedup {fmt(row['speedup_vs_biformer'])} (bound {fmt(row['bound_vs_biformer'])}); memory "
            f"{row['visattn']['eager_mib']:.0f} / {row['biformer']['eager_mib']:.0f} MiB eager, "
            f"{row['memory_vs_biformer']} x less; compile stats {row['visattn'].get('compile')}")
        rows.append(row)
    return rows


WAN_VARIANTS = ("processor", "backend", "bound")
SDXL_VARIANTS = ("tome_block", "bound")
PARTS = {"vit": part_vit, "kernel": part_kernel, "wan": part_wan, "sdxl": part_sdxl, "bra": part_bra,
         "timm": part_timm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--out", default="visattn_results/modes.json")
    parser.add_argument("--batch", type=int, default=256, help="ViT batch")
    parser.add_argument("--timm-models", default="vit_base_patch16_dinov3,eva02_base_patch14_224,beit_base_patch16_224",
                        help="part timm: timm models (12 blocks) for ToMe r=13")
    parser.add_argument("--sdxl-batch", type=int, default=8)
    parser.add_argument("--wan-variants", default=",".join(WAN_VARIANTS), help=f"of: {', '.join(WAN_VARIANTS)}")
    parser.add_argument("--sdxl-variants", default=",".join(SDXL_VARIANTS), help=f"of: {', '.join(SDXL_VARIANTS)}")
    parser.add_argument("--sdxl-modes", default=",".join(MODES), help=f"of: {', '.join(MODES)}")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--biformer", default=".peer/biformer", help="a copy of rayleizhu/BiFormer (part bra)")
    args = parser.parse_args()
    args.wan_variants = listed(parser, "--wan-variants", args.wan_variants, WAN_VARIANTS)
    args.sdxl_variants = listed(parser, "--sdxl-variants", args.sdxl_variants, SDXL_VARIANTS)
    args.sdxl_modes = listed(parser, "--sdxl-modes", args.sdxl_modes, MODES)
    parts = {name: partial(part, args) for name, part in PARTS.items()}
    run_parts(listed(parser, "--parts", args.parts, tuple(PARTS)), parts, args.out)


def listed(parser: argparse.ArgumentParser, option: str, value: str, accepted: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` split at commas; a ``parser.error`` naming the accepted values if one is not among them."""
    chosen = tuple(n for n in value.split(",") if n)
    unknown = [n for n in chosen if n not in accepted]
    if unknown or not chosen:
        parser.error(f"{option}: unknown or no values {unknown or value!r}; accepted: {', '.join(accepted)}")
    return chosen


def run_parts(chosen: tuple[str, ...], parts: dict[str, Callable[[], Any]], out: str, **header: Any) -> None:
    """Run the ``chosen`` ``parts`` in order, writing the results (under the device, torch and visattn versions
    and ``header``) to ``out`` as JSON as each part finishes."""
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "visattn": visattn.__version__, **header}
    for name in chosen:
        results[name] = parts[name]()
        torch.cuda.empty_cache()
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
