"""BRA (bi-level routing attention) speed and memory: block-sparse kernel vs gather vs dense (issue 5).

The attention layer alone, as BiFormer measures it: 64x64 tokens (1024x1024 input, patch 16),
ViT-B width (768, 12 heads of 64), batch 8, n_win=8 (regions of 8x8 = 64 tokens), topk 4 and 16,
bf16. Each row, in one run: our routed path on the block-sparse kernel (routing included), the
same routing with torch.gather of the routed regions' keys and values (BiFormer's implementation,
``_routed_gather``), and dense SDPA over all tokens. Peak memory is what the call allocates over
its inputs. Times are taken twice: calls issued back to back from Python (what a user's eager
loop sees; the GPU machine's slow CPU can dominate) and replays of a CUDA graph (GPU time alone).
Then a whole ViT-B/16 forward at 224 px, stock vs ``bra`` at its identity setting
(topk = n_win ** 2), for the identity overhead.

    python -m benchmarks.bra --out benchmarks/results/bra.json      # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.timing import graphed


def timed(fn, reps: int = 50) -> tuple[float, float]:
    """Median milliseconds (CUDA events, calls issued back to back from Python) and the peak memory
    the call adds (GiB)."""

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    ms = do_bench(fn, warmup=25, rep=reps * 2, return_mode="median")
    return ms, peak


def graphed_ms(fn) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph: GPU time alone, no launch cost."""
    return do_bench(graphed(fn), warmup=25, rep=100, return_mode="median")


def attention_rows(batch: int, side: int, dim: int, heads: int, n_win: int, topks: list[int]) -> list[dict]:
    from visattn.processors.bra import bi_level_routing_attention

    d = dim // heads
    n = side * side + 1  # a class token, as in a ViT
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5
    dense = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    dense_ms, dense_mem = timed(dense)
    dense_graph_ms = graphed_ms(dense)
    rows = []
    for topk in topks:
        def run(path: str, topk: int = topk) -> torch.Tensor:
            return bi_level_routing_attention(q, k, v, num_prefix=1, grid=(side, side), n_win=n_win, topk=topk,
                                              scale=scale, strict=True, path=path)

        # "gather" is BiFormer's way: the same routing, then gather the routed regions' k and v
        kernel, gather = (lambda: run("kernel")), (lambda: run("gather"))

        torch.testing.assert_close(kernel().float(), gather().float(), atol=2e-2, rtol=2e-2)
        k_ms, k_mem = timed(kernel)
        g_ms, g_mem = timed(gather)
        kg_ms, gg_ms = graphed_ms(kernel), graphed_ms(gather)
        rows.append(dict(batch=batch, tokens=side * side, dim=dim, heads=heads, n_win=n_win, topk=topk,
                         kernel_ms=k_ms, gather_ms=g_ms, dense_ms=dense_ms, kernel_gib=k_mem, gather_gib=g_mem,
                         dense_gib=dense_mem, speedup_vs_gather=g_ms / k_ms, memory_vs_gather=g_mem / k_mem,
                         speedup_vs_dense=dense_ms / k_ms, graphed_kernel_ms=kg_ms, graphed_gather_ms=gg_ms,
                         graphed_dense_ms=dense_graph_ms, graphed_speedup_vs_gather=gg_ms / kg_ms,
                         graphed_speedup_vs_dense=dense_graph_ms / kg_ms))
    return rows


def profile_routed_path(batch: int = 8, side: int = 64, heads: int = 12, d: int = 64, n_win: int = 8,
                        topk: int = 4) -> None:
    """torch.profiler table of one routed call (kernels sorted by GPU time)."""
    from visattn.processors.bra import bi_level_routing_attention

    q, k, v = (torch.randn(batch, heads, side * side + 1, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def run() -> torch.Tensor:
        return bi_level_routing_attention(q, k, v, num_prefix=1, grid=(side, side), n_win=n_win, topk=topk,
                                          scale=d ** -0.5, strict=True, path="kernel")

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def identity_overhead(batch: int = 256) -> dict:
    import timm

    import visattn

    model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().half().eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.half)
    with torch.no_grad():
        stock_ms, _ = timed(lambda: model(x), reps=20)
        visattn.apply(model, "bra", n_win=7, topk=49)
        ident_ms, _ = timed(lambda: model(x), reps=20)
        visattn.remove(model)
        stock2_ms, _ = timed(lambda: model(x), reps=20)
    stock = (stock_ms + stock2_ms) / 2
    return dict(model="vit_base_patch16_224", batch=batch, dtype="fp16", stock_ms=stock, identity_ms=ident_ms,
                stock_spread_ms=abs(stock_ms - stock2_ms), overhead=ident_ms / stock - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bra.json"))
    parser.add_argument("--profile", action="store_true", help="print where the routed path's GPU time goes")
    args = parser.parse_args()
    if args.profile:
        profile_routed_path()
    rows = attention_rows(batch=8, side=64, dim=768, heads=12, n_win=8, topks=[4, 16])
    ident = identity_overhead()
    print(f"{'topk':>4} {'kernel ms':>9} {'gather ms':>9} {'dense ms':>8} {'x gather':>8} {'graphed x':>9} "
          f"{'mem kern':>8} {'mem gath':>8} {'mem x':>6}")
    for r in rows:
        print(f"{r['topk']:>4} {r['kernel_ms']:9.3f} {r['gather_ms']:9.3f} {r['dense_ms']:8.3f} "
              f"{r['speedup_vs_gather']:8.2f} {r['graphed_speedup_vs_gather']:9.2f} {r['kernel_gib']:8.3f} "
              f"{r['gather_gib']:8.3f} {r['memory_vs_gather']:6.1f}")
    print(f"identity (topk=49) on ViT-B/16 batch {ident['batch']}: stock {ident['stock_ms']:.2f} ms, "
          f"bra {ident['identity_ms']:.2f} ms, overhead {100 * ident['overhead']:+.1f}% "
          f"(stock run-to-run spread {ident['stock_spread_ms']:.2f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                    "python": platform.python_version(), "attention": rows, "identity": ident,
                                    "command": "python -m benchmarks.bra"}, indent=2))


if __name__ == "__main__":
    main()
