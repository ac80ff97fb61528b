"""Benchmark of the block-sparse attention kernel (issue 4) against SDPA dense and FlexAttention.

Every row is measured in one run: SDPA dense (forward, backward), FlexAttention (compiled, the
same block lists given as full blocks) and ``visattn.kernels.block_sparse_attention`` with random
but valid block lists at several kept fractions. bf16, head dim 128, non-causal.

Figures per row:
- ``rate_vs_sdpa``: the kernel's TFLOP/s over the kept blocks divided by SDPA's dense TFLOP/s
  (1.0 = kept blocks processed as fast as SDPA processes every block);
- ``speedup_vs_sdpa``: SDPA dense time over the kernel's time (same for FlexAttention);
- ``routing_pct``: pooling + block scores + top-k (``visattn.core.routing.route``) as a percentage
  of the kernel's forward time;
- ``bwd_rate_vs_sdpa``: the same rate ratio for the backward pass (dq, dk, dv).

    PYTHONPATH=. python3 -m benchmarks.kernels --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from visattn.core.routing import route
from visattn.kernels.block_sparse import block_sparse_attention

SHAPES = [(1, 12, 32768), (1, 12, 75776), (1, 24, 4096)]  # (B, H, N), as in ../shared/anchors.md
BLOCKS = [64, 128]
FRACTIONS = [1.0, 0.5, 0.25, 0.1]
HEAD_DIM = 128


def bench(fn) -> float:
    """Median milliseconds (CUDA events, after warm-up)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def random_lists(b: int, h: int, nqb: int, nkb: int, kept: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.rand(b, h, nqb, nkb, device=device).topk(kept, dim=-1).indices.to(torch.int32)
    return idx, torch.full((b, h, nqb), kept, dtype=torch.int32, device=device)


def flex_block_mask(idx: torch.Tensor, cnt: torch.Tensor, n: int, block: int) -> BlockMask:
    b, h, nqb, _ = idx.shape
    nkb = -(-n // block)
    padded = torch.zeros(b, h, nqb, nkb, dtype=torch.int32, device=idx.device)
    padded[..., : idx.shape[-1]] = idx
    none = torch.zeros_like(cnt)
    return BlockMask.from_kv_blocks(none, torch.zeros_like(padded), full_kv_num_blocks=cnt,
                                    full_kv_indices=padded, BLOCK_SIZE=block, seq_lengths=(n, n))


def grad_fn(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], dout: torch.Tensor):
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def run_shape(b: int, h: int, n: int, flex, log) -> list[dict]:
    dev = "cuda"
    q, k, v = (torch.randn(b, h, n, HEAD_DIM, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    dense_flops = 4 * b * h * n * n * HEAD_DIM
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward timings without autograd bookkeeping
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd))
    o_sdpa = F.scaled_dot_product_attention(q, k, v)
    t_sdpa_bwd = bench(grad_fn(o_sdpa, (q, k, v), dout))
    del o_sdpa
    log(f"B{b} H{h} N{n}: SDPA fwd {t_sdpa:.3f} ms ({dense_flops / t_sdpa / 1e9:.0f} TFLOP/s), "
        f"bwd {t_sdpa_bwd:.3f} ms")
    rows = []
    for block in BLOCKS:
        for frac in FRACTIONS:
            row = run_row(q, k, v, dout, block, frac, flex)
            row.update(sdpa_ms=t_sdpa, sdpa_tflops=dense_flops / t_sdpa / 1e9, sdpa_bwd_ms=t_sdpa_bwd)
            kf = row["kept_fraction"]
            row.update(ours_kept_tflops=dense_flops * kf / row["ours_ms"] / 1e9,
                       rate_vs_sdpa=kf * t_sdpa / row["ours_ms"], speedup_vs_sdpa=t_sdpa / row["ours_ms"],
                       flex_speedup_vs_sdpa=t_sdpa / row["flex_ms"], flex_rate_vs_sdpa=kf * t_sdpa / row["flex_ms"],
                       bwd_rate_vs_sdpa=kf * t_sdpa_bwd / row["ours_bwd_ms"])
            rows.append(row)
            log(f"  block {block} kept {kf:.3f}: ours {row['ours_ms']:.3f} ms (rate {row['rate_vs_sdpa']:.2f}, "
                f"{row['speedup_vs_sdpa']:.2f}x), flex {row['flex_ms']:.3f} ms "
                f"({row['flex_speedup_vs_sdpa']:.2f}x), bwd {row['ours_bwd_ms']:.3f} ms "
                f"(rate {row['bwd_rate_vs_sdpa']:.2f}), route {row['route_ms']:.3f} ms "
                f"({row['routing_pct']:.1f}%), |ours-flex|/|flex| {row['ours_vs_flex_rel_diff']:.1e}; "
                f"{row['configs']}")
    return rows


def run_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, block: int, frac: float,
            flex) -> dict:
    """Times of the kernel (forward, backward), FlexAttention and routing at one kept fraction."""
    b, h, n, _ = q.shape
    nb = n // block
    kept = max(1, round(frac * nb))
    idx, cnt = random_lists(b, h, nb, nb, kept, q.device)

    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block, check_values=False)

    qd, kd, vd = q.detach(), k.detach(), v.detach()  # forward timings without autograd bookkeeping
    t_ours = bench(lambda: ours(qd, kd, vd))
    mask = flex_block_mask(idx, cnt, n, block)
    # Flex's default tiles (128 x 64 on the H100) do not divide 64-token blocks: give it 64 x 64 there.
    options = {"BLOCK_M": 64, "BLOCK_N": 64} if block < 128 else None
    t_flex = bench(lambda: flex(qd, kd, vd, block_mask=mask, kernel_options=options))
    o = ours(q, k, v)
    o_flex = flex(qd, kd, vd, block_mask=mask, kernel_options=options)
    flex_diff = ((o.float() - o_flex.float()).norm() / o_flex.float().norm()).item()
    t_bwd = bench(grad_fn(o, (q, k, v), dout))
    tuned = importlib.import_module("visattn.kernels._block_sparse_triton")
    config = "; ".join(f"{name} {getattr(tuned, name + '_tuned').best_config}" for name in ("fwd", "dq", "dkdv"))
    t_route = bench(lambda: route(q, k, block_q=block, block_k=block, topk=kept))
    return dict(B=b, H=h, N=n, D=HEAD_DIM, block=block, kept_fraction=kept / nb, ours_ms=t_ours, flex_ms=t_flex,
                ours_vs_flex_rel_diff=flex_diff, ours_bwd_ms=t_bwd, route_ms=t_route,
                routing_pct=100 * t_route / t_ours, configs=config)


def table(rows: list[dict]) -> str:
    head = ("| B,H,N | block | kept | SDPA ms | ours ms | ours kept-rate / SDPA | ours speedup | Flex speedup | "
            "routing % | bwd kept-rate / SDPA bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['B']},{r['H']},{r['N']} | {r['block']} | {r['kept_fraction']:.2f} | {r['sdpa_ms']:.2f} | "
                     f"{r['ours_ms']:.2f} | {r['rate_vs_sdpa']:.2f} | {r['speedup_vs_sdpa']:.2f}x | "
                     f"{r['flex_speedup_vs_sdpa']:.2f}x | {r['routing_pct']:.1f} | {r['bwd_rate_vs_sdpa']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (n, block) in sorted({(r["N"], r["block"]) for r in rows}):
        sel = sorted((r for r in rows if r["N"] == n and r["block"] == block), key=lambda r: r["kept_fraction"])
        x = [r["kept_fraction"] for r in sel]
        line, = ax.plot(x, [r["speedup_vs_sdpa"] for r in sel], marker="o", label=f"visattn N={n} block {block}")
        ax.plot(x, [r["flex_speedup_vs_sdpa"] for r in sel], marker="x", ls="--", color=line.get_color(),
                alpha=0.6, label=f"FlexAttention N={n} block {block}")
    xs = [0.1, 1.0]
    ax.plot(xs, [1 / x for x in xs], color="gray", ls=":", label="ideal 1/kept")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of kv blocks")
    ax.set_ylabel("speedup over SDPA dense (forward)")
    ax.set_title(f"Block-sparse attention, H100, bf16, D={HEAD_DIM}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for kernels.json and the plot")
    parser.add_argument("--n", type=int, nargs="*", help="sequence lengths to run (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    flex = torch.compile(flex_attention, dynamic=False)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    rows: list[dict] = []
    start = time.time()
    for b, h, n in SHAPES:
        if args.n and n not in args.n:
            continue
        rows += run_shape(b, h, n, flex, log)
        result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                      head_dim=HEAD_DIM, dtype="bfloat16", rows=rows, log=lines,
                      seconds=round(time.time() - start, 1))
        (out / "kernels.json").write_text(json.dumps(result, indent=1))
        plot(rows, out / "kernels_speedup.png")
    print(table(rows))
    big = [r for r in rows if r["N"] >= 32768]
    if big:
        print(f"N>=32K: min kept-rate {min(r['rate_vs_sdpa'] for r in big):.2f}, "
              f"min speedup at 10% {min(r['speedup_vs_sdpa'] for r in big if r['kept_fraction'] < 0.15):.2f}x, "
              f"max routing at 10% {max(r['routing_pct'] for r in big if r['kept_fraction'] < 0.15):.1f}%, "
              f"min bwd rate {min(r['bwd_rate_vs_sdpa'] for r in big):.2f}")
    print(f"total {math.ceil(time.time() - start)} s")


if __name__ == "__main__":
    main()
