"""Throughput of ViT token merging (``tome``) and pruning (``prune``, EViT) on the GPU (issue 5).

All in one run, fp16, random weights (``timm.create_model(..., pretrained=False)``), batch 256,
224x224 inputs, for each ``model:r`` pair:

- stock timm (fused SDPA attention) and ``visattn.apply(model, "tome", r=r)``, in eager mode and
  replayed from a CUDA graph (both sides alike);
- ToMe's own code (``tome.patch.timm``; facebookresearch/ToMe, from ``--tome-path``) on the same timm
  model, when it is importable;
- the FLOP-bound limit of merging over stock: multiply-accumulates of the linear layers
  (``12 N C^2`` per block, the MLP on the merged count), attention (``2 N^2 C``) and the patch
  embedding, from the token counts each block sees;
- the identity settings' overhead over stock (``tome`` r=0, ``prune`` keep=1.0), measured
  interleaved with stock;
- EViT (``prune``, strategy "cls", keep 0.7 at blocks depth/4, depth/2, 3 depth/4).

    PYTHONPATH=. python3 -m benchmarks.vit --out benchmarks/results/vit.json --tome-path .peers/ToMe
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import visattn
from benchmarks.modes import drop_last_merges, patched
from benchmarks.timing import graphed, median_ms

MODELS = {"vit_base_patch16_224": 13, "vit_large_patch16_224": 7}


def write_profile(path: str, title: str, fn: Callable[[], object]) -> None:
    """Append a torch.profiler table (kernels by device time) of one call of ``fn`` to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"## {title}\n{prof.key_averages().table(sort_by='self_device_time_total', row_limit=45)}\n")


def macs(model: torch.nn.Module, attn_counts: list[int], mlp_counts: list[int]) -> float:
    """Multiply-accumulates per image: the patch embedding, then per block qkv + proj and attention
    (``4 N C^2 + 2 N^2 C``) on the tokens entering it and the MLP (``8 N' C^2``) on those after merging."""
    c = model.embed_dim
    patch = model.patch_embed
    total = patch.num_patches * c * patch.proj.weight[0].numel()
    for n, m in zip(attn_counts, mlp_counts):
        total += 4 * n * c * c + 2 * n * n * c + 8 * m * c * c
    return float(total)


def bench_model(name: str, r: int, args: argparse.Namespace, tome: object) -> dict:
    """Every figure of one ``model:r`` row."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(dev).half().eval()
    x = torch.randn(args.batch, 3, 224, 224, device=dev, dtype=torch.float16)
    row: dict = {"model": name, "r": r}
    with torch.inference_mode():
        def fwd() -> torch.Tensor:
            return model(x)

        stock = median_ms(fwd, args.iters, warmup=3)
        stock_graph = median_ms(graphed(lambda: model(x)), args.iters, warmup=3)
        # identity settings, interleaved with stock so drift cancels
        ident = {"stock": [], "tome_r0": [], "prune_keep1": []}
        for _ in range(3):
            ident["stock"].append(median_ms(fwd, args.iters, warmup=3))
            visattn.apply(model, "tome", r=0)
            ident["tome_r0"].append(median_ms(fwd, args.iters, warmup=3))
            visattn.remove(model)
            visattn.apply(model, "prune", keep=1.0)
            ident["prune_keep1"].append(median_ms(fwd, args.iters, warmup=3))
            visattn.remove(model)
        base = statistics.median(ident["stock"])
        row["identity_overhead_pct"] = {k: 100 * (statistics.median(v) / base - 1)
                                        for k, v in ident.items() if k != "stock"}

        handle = visattn.apply(model, "tome", r=r)
        ours = median_ms(fwd, args.iters, warmup=3)
        counts = handle.token_counts
        ours_graph = median_ms(graphed(lambda: model(x)), args.iters, warmup=3)
        if args.profile:
            write_profile(args.profile, f"{name} r={r}: tome", fwd)
            visattn.remove(model)
            write_profile(args.profile, f"{name}: stock", fwd)
            visattn.apply(model, "tome", r=r)
        # diagnostic: the same block path and token counts, merging replaced by dropping the last r tokens
        with drop_last_merges():
            row["tome_drop_last_ms"] = median_ms(fwd, args.iters, warmup=3)
        # diagnostic: the same merges through the PyTorch path of visattn.core.merge (no Triton kernels)
        import visattn.core.merge as core_merge
        from visattn.processors.tome import vit as tome_processor

        with patched(tome_processor, "bipartite_soft_matching",
                     lambda keys, *a, strict=False, **k: core_merge.bipartite_soft_matching(keys.mean(1), *a, **k)):
            row["tome_torch_path_ms"] = median_ms(fwd, args.iters, warmup=3)
        visattn.remove(model)
        after = counts[1:] + [counts[-1] - min(r, (counts[-1] - model.num_prefix_tokens) // 2)]
        limit = macs(model, [counts[0]] * len(counts), [counts[0]] * len(counts)) / macs(model, counts, after)

        handle = visattn.apply(model, "prune", keep=0.7)
        evit = median_ms(fwd, args.iters, warmup=3)
        evit_counts = handle.token_counts
        visattn.remove(model)

        row.update(stock_ms=stock, ours_ms=ours, stock_graph_ms=stock_graph, ours_graph_ms=ours_graph,
                   token_counts=counts, flop_limit=limit, speedup=stock / ours,
                   speedup_graph=stock_graph / ours_graph, evit_keep07_ms=evit,
                   evit_speedup=stock / evit, evit_token_counts=evit_counts)
        if tome is not None:
            peer = copy.deepcopy(model)
            tome.patch.timm(peer)
            peer.r = r
            row["tome_ref_ms"] = median_ms(lambda: peer(x), args.iters, warmup=3)  # noqa: B023
            row["tome_ref_speedup"] = stock / row["tome_ref_ms"]
            # One merging block: both make the same merges (later blocks differ, since ToMe reorders
            # tokens and so re-pairs them), so the logits agree to fp16 noise.
            peer.r = [r]
            visattn.apply(model, "tome", r=[r])
            ours_out, peer_out = model(x).float(), peer(x).float()
            visattn.remove(model)
            row["logits_rel_diff_vs_tome_ref_one_block"] = ((ours_out - peer_out).norm() / peer_out.norm()).item()
    for k in ("stock", "ours", "stock_graph", "ours_graph", "evit_keep07", "tome_ref", "tome_drop_last",
              "tome_torch_path"):
        if f"{k}_ms" in row:
            row[f"{k}_img_s"] = args.batch / row[f"{k}_ms"] * 1000
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/vit.json")
    parser.add_argument("--tome-path", default=".peers/ToMe", help="folder holding ToMe's tome/ package")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--models", default=",".join(f"{m}:{r}" for m, r in MODELS.items()))
    parser.add_argument("--profile", default="", help="write a torch.profiler table of tome here")
    args = parser.parse_args()
    sys.path.insert(0, args.tome_path)
    try:
        import tome  # facebookresearch/ToMe
    except ImportError:
        tome = None

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "timm": timm.__version__,
               "batch": args.batch, "dtype": "float16", "rows": []}
    for spec in args.models.split(","):
        name, r = spec.split(":")
        results["rows"].append(bench_model(name, int(r), args, tome))
        torch.cuda.empty_cache()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"{'model':24s} {'r':>3s} {'stock im/s':>10s} {'tome':>8s} {'x':>6s} {'limit':>6s} {'graph x':>7s} "
          f"{'ToMe ref x':>10s} {'EViT x':>7s} {'id tome%':>8s} {'id prune%':>9s}")
    for row in results["rows"]:
        print(f"{row['model']:24s} {row['r']:3d} {row['stock_img_s']:10.0f} {row['ours_img_s']:8.0f} "
              f"{row['speedup']:6.3f} {row['flop_limit']:6.3f} {row['speedup_graph']:7.3f} "
              f"{row.get('tome_ref_speedup', float('nan')):10.3f} {row['evit_speedup']:7.3f} "
              f"{row['identity_overhead_pct']['tome_r0']:8.2f} {row['identity_overhead_pct']['prune_keep1']:9.2f}")
        print("   ", {k: round(v, 3) for k, v in row.items() if k.endswith("_ms") or k.startswith("logits")})


if __name__ == "__main__":
    main()
