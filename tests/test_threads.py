"""Two threads on one patched model: each gets what it would get alone.

Every method keeps what one forward (or one ``generate()``) carries between its hooks per thread
(:class:`visattn.frameworks.base.PerThread`). Each test holds a first thread inside the model, halfway through
its forward, while a second thread runs a whole forward of other inputs (another batch size where the model
allows); then the first thread finishes. Both outputs, and what the handle recorded as each thread reads it,
must equal runs of the same calls alone, each in a fresh thread (as the interleaved ones are: ``tome`` on
diffusers draws its random destinations from a generator each thread seeds at its first call).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
from tiny_models import tiny_clip, tiny_vit

import visattn


def _start(fn: Callable[[], Any], name: str, result: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            result[name] = fn()
        except BaseException as exc:  # re-raised in the main thread
            result[f"{name} error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread


def _results(result: dict[str, Any], *names: str) -> list[Any]:
    for name in names:
        if f"{name} error" in result:
            raise result[f"{name} error"]
    return [result[name] for name in names]


def alone(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a fresh thread."""
    result: dict[str, Any] = {}
    _start(fn, "alone", result).join(300)
    return _results(result, "alone")[0]


def interleaved(pause_at: nn.Module, first: Callable[[], Any], second: Callable[[], Any]) -> tuple[Any, Any]:
    """Run ``first()`` in a fresh thread held at the entry of ``pause_at`` until ``second()`` has run whole in
    another; return both results."""
    inside, release = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def hold(module: nn.Module, args: tuple) -> None:
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(300)

    hook = pause_at.register_forward_pre_hook(hold)
    try:
        thread = _start(first, "first", result)
        while not inside.wait(0.1):
            assert thread.is_alive(), "the first thread ended before the pause point"
        _start(second, "second", result).join(300)
    finally:
        release.set()
        thread.join(300)
        hook.remove()
    return tuple(_results(result, "first", "second"))


def assert_same(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert got is not None and torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def check_threads(model: nn.Module, pause_at: nn.Module, run_a: Callable[[], Any], run_b: Callable[[], Any]) -> None:
    """``run_a`` / ``run_b`` return (output, what the handle shows this thread); alone vs interleaved."""
    alone_a, alone_b = alone(run_a), alone(run_b)
    assert not all(isinstance(t, torch.Tensor) and torch.equal(t, u) for t, u in zip(alone_a, alone_b)), \
        "the two runs must differ for the test to show anything"
    got_a, got_b = interleaved(pause_at, run_a, run_b)
    assert_same(got_a, alone_a)
    assert_same(got_b, alone_b)


# --- timm and open_clip ViTs ----------------------------------------------------------------------------


VIT_CASES = [("tome", dict(r=3), lambda h: (h.token_counts, h.size)),
             ("tome", dict(r=3, trace_source=True), lambda h: h.source),
             ("prune", dict(keep=0.5, layers=(1,)), lambda h: h.token_counts),
             ("inspect", {}, lambda h: {layer: list(maps) for layer, maps in h.maps.items()}),
             ("bra", dict(n_win=2, topk=1), lambda h: h.routes)]


@pytest.mark.parametrize("method,options,shown", VIT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(VIT_CASES)])
def test_timm_vit_threads(method: str, options: dict, shown: Callable) -> None:
    model = tiny_vit(depth=3, qk_norm=True)  # qk-norm: observation hooks q_norm/k_norm
    x, y = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    handle = visattn.apply(model, method, **options)

    def run(images: torch.Tensor) -> Callable[[], Any]:
        def go() -> Any:
            if method == "inspect":
                handle.clear()
            with torch.no_grad():
                out = model(images)
            return out, shown(handle)

        return go

    try:
        check_threads(model, model.blocks[1], run(x), run(y))
    finally:
        visattn.remove(model)


@pytest.mark.parametrize("method,options", [("tome", dict(r=3)), ("prune", dict(keep=0.5, layers=(1,)))])
def test_open_clip_tower_threads(method: str, options: dict) -> None:
    model = tiny_clip(layers=3)
    tower = model.visual
    x, y = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    handle = visattn.apply(tower, method, **options)

    def run(images: torch.Tensor) -> Callable[[], Any]:
        def go() -> Any:
            with torch.no_grad():
                return tower(images), handle.token_counts

        return go

    try:
        check_threads(tower, tower.transformer.resblocks[1], run(x), run(y))
    finally:
        visattn.remove(tower)


# --- diffusers ------------------------------------------------------------------------------------------


def _diffusers_case(family: str) -> tuple[nn.Module, dict, dict]:
    pytest.importorskip("diffusers")
    from test_diffusers import BUILDERS

    torch.manual_seed(0)
    model, inputs, _, _, _ = BUILDERS[family]()
    other = {k: torch.randn_like(v) if k in ("hidden_states", "sample", "encoder_hidden_states") else v
             for k, v in inputs.items()}
    return model.eval(), inputs, other


DIFFUSERS_CASES = [("unet", "tome", dict(ratio=0.5), "up_blocks", lambda h: h.token_counts),
                   ("unet", "tome", dict(ratio=0.5, scope="block"), "up_blocks", lambda h: h.token_counts),
                   ("flux", "tome", dict(ratio=0.5), "single_transformer_blocks", lambda h: h.token_counts),
                   ("flux", "inspect", {}, "single_transformer_blocks",
                    lambda h: {layer: list(maps) for layer, maps in h.maps.items()}),
                   ("wan", "sparse_video", dict(keep=0.5, tile=(1, 2, 2)), "blocks", lambda h: None),
                   ("wan", "sparse_video", dict(keep=0.5, tile=(1, 2, 2), install="attention_backend"), "blocks",
                    lambda h: None)]


@pytest.mark.parametrize("family,method,options,pause,shown", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(DIFFUSERS_CASES)])
def test_diffusers_threads(family: str, method: str, options: dict, pause: str, shown: Callable) -> None:
    model, inputs, other = _diffusers_case(family)
    handle = visattn.apply(model, method, **options)

    def run(call: dict) -> Callable[[], Any]:
        def go() -> Any:
            if method == "inspect":
                handle.clear()
            with torch.no_grad():
                return model(**call, return_dict=False)[0], shown(handle)

        return go

    try:
        check_threads(model, getattr(model, pause)[-1], run(inputs), run(other))
    finally:
        visattn.remove(model)


def test_sparse_video_dense_steps_count_each_threads_own_denoising_steps() -> None:
    """dense_steps: a thread's first step runs dense although another thread has taken steps meanwhile."""
    model, inputs, other = _diffusers_case("wan")
    later = dict(other, timestep=torch.tensor([5, 5]))  # a second step of the main thread's generation
    visattn.apply(model, "sparse_video", keep=0.5, tile=(1, 2, 2), dense_steps=1)

    def one_step() -> Any:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0], None

    def two_steps() -> Any:
        with torch.no_grad():
            model(**other, return_dict=False)
            return model(**later, return_dict=False)[0], None

    try:
        visattn.remove(model)
        with torch.no_grad():
            dense = model(**inputs, return_dict=False)[0]
        visattn.apply(model, "sparse_video", keep=0.5, tile=(1, 2, 2), dense_steps=1)
        assert torch.equal(alone(one_step)[0], dense)
        check_threads(model, model.blocks[-1], one_step, two_steps)
    finally:
        visattn.remove(model)


# --- transformers ---------------------------------------------------------------------------------------


VLM_CASES = [("prune", dict(strategy="fastv", keep=0.5, layer=1), lambda h: h.kept),
             ("prune", dict(strategy="cls", keep=0.5), lambda h: h.kept),
             ("prune", dict(strategy="plphp", keep=0.5, layer=1), lambda h: h.kept),
             ("prune", dict(strategy="zo", keep=0.5), lambda h: h.kept),
             ("prune", dict(strategy="vflowopt", keep=0.5, entropy=0.5), lambda h: h.kept),
             ("visual_sink", dict(tau=0.5, rho=1.0), lambda h: h.sink_tokens),
             ("head_modulation", dict(strategy="vhr", alpha=0.5), lambda h: (h.vhd, h.head_gains)),
             ("head_modulation", dict(strategy="pai", alpha=0.5, decoder_layers=(0, 1)), lambda h: None),
             ("head_modulation", dict(strategy="imbalance", alpha=0.5), lambda h: (h.selected, h.sensitivity)),
             ("head_modulation", dict(strategy="avisc", lamb=0.0), lambda h: h.blind)]


@pytest.mark.parametrize("method,options,shown", VLM_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(VLM_CASES)])
def test_vlm_generate_threads(method: str, options: dict, shown: Callable) -> None:
    pytest.importorskip("transformers")
    from tiny_vlms import build, generate, vlm_inputs

    model = build("llava", "sdpa")
    batch = vlm_inputs("llava", model)
    one = {k: v[1:] for k, v in batch.items()}  # the second prompt alone: another batch size, another image
    one["pixel_values"] = torch.randn_like(one["pixel_values"])
    handle = visattn.apply(model, method, **options)

    def run(inputs: dict) -> Callable[[], Any]:
        def go() -> Any:
            return generate(model, inputs), shown(handle)

        return go

    try:
        layers = model.model.language_model.layers
        check_threads(model, layers[len(layers) // 2], run(batch), run(one))
    finally:
        visattn.remove(model)
