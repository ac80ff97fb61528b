"""Probes of how the timings of ``benchmarks.modes`` behave on the GPU machine (issue 17): each answers one question
about a measurement rather than measuring a method, and writes its figures as JSON (``--out``).

- ``order``: does timing two models interleaved, call by call, read differently from timing one after the other?
  ViT-B/16 ToMe r=13 against stock (batch 256, fp16; GPU-bound) and BRA against BiFormer (topk 4, LePE 5x5, batch
  8, bf16; launch-bound eager), each way in one process (BRA one after the other twice);
- ``bra_host``: does the eager BRA layer's time move with the host's state within one process? The same eager
  layer timed fresh, after a CUDA graph capture, after compiling an unrelated function, after compiling the layer,
  after ``torch._dynamo.reset()``, after ``gc.collect()``, after Inductor's compile workers are shut down, and after
  ``gc.freeze()`` (two medians of 30 calls each);
- ``kernel_host``: the host's time per call of the block-sparse kernel at N=4096 (B=1, H=24, D=128, block 128, 1 of
  32 kv blocks) compiled, eager, and FlexAttention compiled (300 calls issued back to back, three times), and a
  profile of 50 calls of each (dynamo's guard check, the compiled graph's call, the launch); ablations: the
  kernel compiled with Inductor's static launcher for user Triton kernels
  (``static_launch_user_defined_triton_kernels``), the op alone, without the Python checks, and ours and Flex
  compiled with dynamo's guards on globals skipped (``torch.compiler.skip_guard_on_globals_unsafe``);
- ``vit_profile``: the compiled ViT-B/16 (batch 256, fp16), stock, with ``tome`` r=13, with ``tome`` deciding on
  the keys' mean over heads written out first (as before the match kernel averaged them itself), and with its
  bound: the host's time to issue a call and the time until it has run (20 calls back to back, twice), and the
  GPU time of each kernel over 10 calls.

    PYTHONPATH=. python3 -m benchmarks.probes --probes order,bra_host,kernel_host,vit_profile  # visattn_results/
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

import visattn
from benchmarks.modes import bra_pair, fmt, fmt_ms, in_modes, listed, log, ratios, run_parts, side_by_side
from benchmarks.timing import graphed, median_ms


def probe_order(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().half().eval()
    merged = copy.deepcopy(model)
    visattn.apply(merged, "tome", r=13)
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    run = lambda m: m(x)  # noqa: E731
    with torch.inference_mode():
        sequential = {"stock": in_modes(model, run, args.iters), "tome": in_modes(merged, run, args.iters)}
        interleaved = side_by_side({"stock": (model, run), "tome": (merged, run)}, args.iters)
        out["vit_b"] = {"sequential": sequential, "interleaved": interleaved}
    del model, merged
    ours, peer, x_ours, x_peer = bra_pair(args.biformer, 4, True)
    pair = {"visattn": (ours, lambda m: m(x_ours)), "biformer": (peer, lambda m: m(x_peer))}
    with torch.inference_mode():
        out["bra"] = {name: {who: in_modes(m, r, args.iters) for who, (m, r) in pair.items()}
                      for name in ("sequential_1", "sequential_2")}
        out["bra"]["interleaved"] = side_by_side(pair, args.iters)
    for name, slow in (("vit_b", "tome"), ("bra", "visattn")):
        fast = "stock" if name == "vit_b" else "biformer"
        for order, times in out[name].items():
            times["speedup"] = ratios(times[fast], times[slow])
            log(f"{name} {order}: {slow} {fmt_ms(times[slow])}; {fast} {fmt_ms(times[fast])}; "
                f"speedup {fmt(times['speedup'])}")
    return out


def probe_bra_host(args: argparse.Namespace) -> dict[str, list[float]]:
    from torch._inductor.async_compile import shutdown_compile_workers

    ours, _, x, _ = bra_pair(args.biformer, 4, True)
    out: dict[str, list[float]] = {}

    def timed(label: str) -> None:
        out[label] = [median_ms(lambda: ours(x), 30, warmup=5) for _ in range(2)]
        log(f"bra eager {label}: {[round(v, 3) for v in out[label]]} ms")

    with torch.inference_mode():
        timed("fresh")
        graphed(lambda: ours(x))()
        timed("after a CUDA graph capture")
        torch.compile(lambda a: a * 2 + 1)(x)
        timed("after compiling an unrelated function")
        compiled = torch.compile(ours)
        for _ in range(3):
            compiled(x)
        timed("after compiling the layer")
        torch._dynamo.reset()
        timed("after dynamo reset")
        gc.collect()
        timed("after gc.collect")
        shutdown_compile_workers()
        timed("after shutting the compile workers down")
        gc.freeze()
        timed("after gc.freeze")
    return out


def host_us(fn: Callable[[], Any], calls: int = 300) -> dict[str, float]:
    """Microseconds per call of ``calls`` calls issued back to back: until the last is issued, and until the GPU
    has run them (equal where the host is the bound)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    return {"issued_us": 1e6 * (issued - start) / calls, "done_us": 1e6 * (time.perf_counter() - start) / calls}


def fresh(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a code object of its own: dynamo keeps its compiled graphs per code object, so a second
    ``torch.compile`` of ``fn`` itself would reuse the first one's graph."""
    copy = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def probe_kernel_host(args: argparse.Namespace) -> dict[str, Any]:
    from torch._inductor import config as inductor_config
    from torch.nn.attention.flex_attention import flex_attention
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.kernels import flex_block_mask, random_lists
    from visattn.kernels.block_sparse import _attend_op, block_sparse_attention

    b, h, n, d, block = 1, 24, 4096, 128, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    idx, cnt = random_lists(b, h, n // block, n // block, 1, q.device)
    idx32, cnt32 = idx.to(torch.int32).contiguous(), cnt.to(torch.int32).contiguous()

    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block, check_values=False)

    def op_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _attend_op(q, k, v, idx32, cnt32, n // block, None, None, None, None, block, block, d ** -0.5)[0]

    mask = flex_block_mask(idx, cnt, n, block)
    flex = torch.compile(flex_attention)
    unguarded = {"guard_filter_fn": torch.compiler.skip_guard_on_globals_unsafe}  # what dynamo's guards cost
    # Each compiled variant: (its compiled function, the context its first call, which compiles it, runs in).
    variants = {"ours compiled": (torch.compile(ours), contextlib.nullcontext),
                "ours compiled, static launch": (
                    torch.compile(fresh(ours, "ours_static")),
                    partial(inductor_config.patch, static_launch_user_defined_triton_kernels=True)),
                "op alone compiled": (torch.compile(op_alone), contextlib.nullcontext),
                "ours compiled, global guards skipped": (
                    torch.compile(fresh(ours, "ours_unguarded"), options=unguarded), contextlib.nullcontext)}
    runs = {name: partial(fn, q, k, v) for name, (fn, _) in variants.items()}
    flex_unguarded = torch.compile(fresh(flex_attention, "flex_unguarded"), options=unguarded)
    runs.update({"ours eager": partial(ours, q, k, v), "flex compiled": lambda: flex(q, k, v, block_mask=mask),
                 "flex compiled, global guards skipped": lambda: flex_unguarded(q, k, v, block_mask=mask)})
    out: dict[str, Any] = {"host": {name: [] for name in runs}, "profile_cpu_us_per_call": {}}
    with torch.inference_mode():
        for fn, context in variants.values():
            with context():
                fn(q, k, v)
        for fn in runs.values():
            for _ in range(5):
                fn()
        for _ in range(3):
            for name, fn in runs.items():
                out["host"][name].append(host_us(fn))
        for name, fn in runs.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
            out["profile_cpu_us_per_call"][name] = {e.key: e.cpu_time_total / 50 for e in prof.key_averages()
                                                    if e.cpu_time_total > 0}
    for name, reps in out["host"].items():
        log(f"kernel N={n} 1 of {n // block} blocks, {name}: {[round(r['issued_us'], 1) for r in reps]} us per call "
            f"issued; profile {({k: round(t, 1) for k, t in out['profile_cpu_us_per_call'][name].items()})}")
    return out


def probe_vit_profile(args: argparse.Namespace) -> dict[str, Any]:
    """The compiled ViT-B/16 (batch 256, fp16) stock, with ``tome`` r=13 and with its bound, profiled: the GPU time
    of each kernel over 10 calls, so that what ToMe's merges cost over the bound reads kernel by kernel; and ToMe
    with the keys' mean over heads written out before the match kernel (its cost, apart)."""
    import timm
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.modes import applied, drop_last_merges, patched
    from visattn.kernels import tome as tome_kernels
    from visattn.processors.tome import vit as tome_vit

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().half().eval()
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    out: dict[str, Any] = {}

    def profiled(name: str) -> None:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for _ in range(3):
            compiled(x)
        host = [host_us(lambda: compiled(x), calls=20) for _ in range(2)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                compiled(x)
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / 10e3) for e in prof.key_averages() if e.device_time_total > 0),
                         key=lambda kv: -kv[1])
        out[name] = {"ms_per_call": sum(t for _, t in kernels), "kernels_ms": dict(kernels), "host": host}
        log(f"vit_b compiled {name}: {out[name]['ms_per_call']:.3f} ms of kernels per call; issued / done "
            f"{[(round(h['issued_us'] / 1e3, 3), round(h['done_us'] / 1e3, 3)) for h in host]} ms per call; top "
            f"{[(k[:60], round(t, 3)) for k, t in kernels[:12]]}")

    with torch.inference_mode():
        profiled("stock")
        with applied(model, "tome", r=13):
            profiled("tome")
            with patched(tome_vit, "bipartite_soft_matching",
                         lambda keys, *a, **k: tome_kernels.bipartite_soft_matching(keys.mean(dim=1), *a, **k)):
                profiled("tome, keys averaged first")
            with drop_last_merges():
                profiled("bound")
    return out


PROBES = {"order": probe_order, "bra_host": probe_bra_host, "kernel_host": probe_kernel_host,
          "vit_profile": probe_vit_profile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma-separated, of: {', '.join(PROBES)}")
    parser.add_argument("--out", default="visattn_results/probes.json")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--biformer", default=".peer/biformer", help="a copy of rayleizhu/BiFormer (order, bra_host)")
    args = parser.parse_args()
    probes = {name: partial(probe, args) for name, probe in PROBES.items()}
    run_parts(listed(parser, "--probes", args.probes, tuple(PROBES)), probes, args.out)


if __name__ == "__main__":
    main()
