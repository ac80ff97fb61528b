"""The timing helpers the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], iters: int = 1, warmup: int = 0) -> float:
    """Median milliseconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones: CUDA events
    around each call when a GPU is present (synchronising on the end event), the host clock otherwise."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured in a CUDA graph, so the CPU's launch cost drops out; returns the graph's replay.
    ``fn`` runs twice on a side stream first (warm-up, autotuning)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def generate_seconds(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                     **kwargs: Any) -> float:
    """Seconds of a greedy ``generate()`` of exactly ``new_tokens`` tokens (``kwargs`` passed on)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             **kwargs)
    sync()
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return time.perf_counter() - start
