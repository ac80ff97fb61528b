"""Benchmark of ``sparse_video`` under diffusers' Ulysses context parallelism (issue 11).

One launch does everything. Every rank builds the same ``WanTransformer3DModel`` (Wan 2.1 T2V 1.3B config,
random weights, seed 0, bf16) and the same inputs (81x480x832: latents 16x21x60x104, grid 21x30x52 = 32,760
tokens, 512 text tokens), then:

1. one GPU (each rank on its own, in parallel; rank 0's times are reported): stock forward, ``sparse_video``
   tile_topk at ``--keep`` installed as processors, and the same through the attention backend
   (``install="attention_backend"``, no parallelism), whose output must equal the processors';
2. ``enable_parallelism(ContextParallelConfig(ulysses_degree=world size))`` on that model: stock forward and the
   sparse backend forward on all ranks; the error of each output against its one-GPU counterpart (the gathered
   output is whole on every rank), and the speedups of N GPUs over one.

The stock pair's error is the floating-point baseline (the same model, split over GPUs); the sparse pair's
error is to be read against it. Each phase is timed with CUDA events (2 warm-ups, median of ``--iters``),
records its error instead of stopping the run, and rank 0 rewrites the JSON after each phase.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m benchmarks.context_parallel \\
        --out benchmarks/results/context_parallel.json
    torchrun --nproc-per-node 2 -m benchmarks.context_parallel --tiny --out /tmp/cp.json   # CPU, gloo, tiny Wan

(``python3 -m torch.distributed.run`` where ``torchrun`` is not on the path; one process runs phase 1 only.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import visattn
from benchmarks.timing import median_ms
from benchmarks.video import WAN_1_3B, WAN_TINY, wan_model

FULL = dict(config=WAN_1_3B, latent=(21, 60, 104), text=512, tile=None)
TINY = dict(config=WAN_TINY, latent=(3, 8, 8), text=5, tile=(1, 2, 2))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative L2 difference of ``out`` from ``ref`` (in fp32)."""
    out, ref = out.float(), ref.float()
    return dict(max_abs=float((out - ref).abs().max()), rel_l2=float((out - ref).norm() / ref.norm()),
                ref_max_abs=float(ref.abs().max()))


class Run:
    """The ranks' shared state: results (written by rank 0), and whether every rank got through each phase."""

    def __init__(self, out: Path | None, results: dict[str, Any]) -> None:
        self.out, self.results = out, results
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def write(self) -> None:
        if self.rank == 0 and self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.results, indent=1))

    def phase(self, name: str, body: Callable[[], dict[str, Any]]) -> bool:
        """Run ``body`` on every rank; record its result (or each failing rank's traceback) under ``name``.
        Returns whether every rank succeeded (agreed over the process group, so all ranks go on together)."""
        self.log(f"[{name}] ...")
        error = None
        try:
            record = body()
        except Exception:
            record, error = {}, traceback.format_exc()
            print(f"[{name}] rank {self.rank} failed:\n{error}", flush=True)
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error)
        failed = {f"rank {r}": e for r, e in enumerate(errors) if e is not None}
        if failed:
            record = dict(record, errors=failed)
        self.results[name] = record
        self.log(f"[{name}] {json.dumps(record)[:3000]}")
        self.write()
        return not failed


def timed(run: Callable[[], torch.Tensor], iters: int) -> tuple[torch.Tensor, float, list[float]]:
    """The output of ``run`` and its median time in ms on this rank, and every rank's median."""
    out = run()
    ms = median_ms(run, iters, warmup=2)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, ms)
    return out, ms, every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--keep", type=float, default=0.1, help="tile_topk keep ratio")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per measurement (after 2 warm-ups)")
    parser.add_argument("--tiny", action="store_true", help="tiny Wan on the CPU (gloo): checks the script runs")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (device README)
    shape = TINY if args.tiny else FULL
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        # diffusers 0.42.1 places a rank on device `rank % torch.accelerator.device_count()`, 0 without accelerator
        torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=3))
    else:
        device, dtype = torch.device("cuda", local_rank), torch.bfloat16
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=3))
    import diffusers
    from diffusers import ContextParallelConfig

    sparse = dict(strategy="tile_topk", keep=args.keep, **({"tile": shape["tile"]} if shape["tile"] else {}))
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in shape["config"].items()}
    results: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", world_size=dist.get_world_size(),
        torch=torch.__version__, diffusers=diffusers.__version__, dtype=str(dtype), latent=list(shape["latent"]),
        text_tokens=shape["text"], config=config, sparse_video=sparse, iters=args.iters,
        nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"))
    run = Run(args.out, results)
    run.log(f"world size {run.world}, {results['device']}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}")
    model, inputs = wan_model(shape["config"], shape["latent"], shape["text"], device, dtype)
    refs: dict[str, torch.Tensor] = {}

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    def weights() -> dict[str, Any]:
        fingerprint = torch.stack([p.detach().float().sum() for p in model.parameters()])
        every = [torch.empty_like(fingerprint) for _ in range(run.world)]
        dist.all_gather(every, fingerprint)
        return dict(parameters=sum(p.numel() for p in model.parameters()),
                    identical_on_every_rank=all(torch.equal(every[0], f) for f in every))

    def one_gpu() -> dict[str, Any]:
        refs["stock"], stock_ms, stock_all = timed(forward, args.iters)
        handle = visattn.apply(model, "sparse_video", **sparse)
        refs["sparse"], sparse_ms, sparse_all = timed(forward, args.iters)
        handle.remove()
        handle = visattn.apply(model, "sparse_video", install="attention_backend", **sparse)
        backend_out, backend_ms, _ = timed(forward, args.iters)
        handle.remove()
        return dict(stock_ms=stock_ms, sparse_ms=sparse_ms, sparse_speedup=stock_ms / sparse_ms,
                    backend_ms=backend_ms, backend_equals_processor=bool(torch.equal(backend_out, refs["sparse"])),
                    sparse_vs_stock=compare(refs["sparse"], refs["stock"]),
                    stock_ms_per_rank=stock_all, sparse_ms_per_rank=sparse_all)

    def ulysses() -> dict[str, Any]:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=run.world))
        stock, stock_ms, stock_all = timed(forward, args.iters)
        handle = visattn.apply(model, "sparse_video", install="attention_backend", **sparse)
        out, sparse_ms, sparse_all = timed(forward, args.iters)
        handle.remove()
        one = results["one_gpu"]
        return dict(ulysses_degree=run.world, stock_ms=stock_ms, sparse_ms=sparse_ms,
                    stock_speedup_over_one_gpu=one["stock_ms"] / stock_ms,
                    sparse_speedup_over_one_gpu=one["sparse_ms"] / sparse_ms,
                    sparse_speedup_over_stock=stock_ms / sparse_ms,
                    stock_error_vs_one_gpu=compare(stock, refs["stock"]),
                    sparse_error_vs_one_gpu=compare(out, refs["sparse"]),
                    stock_ms_per_rank=stock_all, sparse_ms_per_rank=sparse_all)

    ok = run.phase("weights", weights) and run.phase("one_gpu", one_gpu)
    if run.world == 1:
        results["ulysses"] = {"skipped": "world size 1: launch with torchrun --nproc-per-node 2"}
        run.write()
    elif ok:
        run.phase("ulysses", ulysses)
    run.log(f"done; wrote {args.out}" if args.out else "done")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
