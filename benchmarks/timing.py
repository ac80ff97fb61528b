"""The timing helpers the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _timed_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds of one call of ``fn``: CUDA events around it when a GPU is present (synchronising on the end
    event), the host clock otherwise."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def median_ms(fn: Callable[[], Any], iters: int = 1, warmup: int = 0) -> float:
    """Median milliseconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (:func:`_timed_ms`)."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed_ms(fn) for _ in range(iters))


def interleaved_ms(fns: dict[str, Callable[[], Any]], iters: int = 1, warmup: int = 0) -> dict[str, float]:
    """Median milliseconds of each of ``fns`` over ``iters`` rounds that call every one once, in an order rotated
    each round, after ``warmup`` such rounds untimed. Launch-bound calls drift with the host's state over a run;
    interleaved, every function meets the same drift, so their ratio does not depend on which ran first."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            if i < warmup:
                fns[name]()
            else:
                times[name].append(_timed_ms(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


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
