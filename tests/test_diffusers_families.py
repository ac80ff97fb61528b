"""The diffusers families of the adapter's table beyond the first seven (tiny random configs, ``tiny_dits``): attention
layers in execution order, each call's token grid, token layouts checked against what attention sees (which query
rows move with the latent and which with the text), ``inspect``, ``sparse_video`` and ``tome`` bit-identical at their
identity settings, sparse and merged attention changing the output where they should (merged attention shorter by
the tokens merged, text masks followed), ``remove()`` exact, and refusals at ``apply``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import test_diffusers as td  # noqa: E402
from tiny_dits import BUILDERS, ragged_mask  # noqa: E402

import visattn  # noqa: E402
from visattn.errors import OptionError, ShapeError, UnsupportedModelError  # noqa: E402
from visattn.frameworks import diffusers as adapter  # noqa: E402
from visattn.patching import Patcher  # noqa: E402
from visattn.processors.sparse_video.config import FAMILIES as SPARSE_FAMILIES  # noqa: E402
from visattn.processors.tome import diffusers as tome_diffusers  # noqa: E402
from visattn.processors.tome.diffusers import FAMILIES as TOME_FAMILIES  # noqa: E402

GRIDS = {"dit": (4, 4), "pixart": (4, 4), "skyreels_v2": (4, 2, 3)}  # others: (3, 4) images, (2, 3, 4) video
TEXT_INPUT = {"dit": None}  # the input perturbed to move the text rows: encoder_hidden_states elsewhere
BACKEND_FAMILIES = {"ltx", "qwenimage", "skyreels_v2", "wan_vace", "hunyuanvideo15", "flux2", "chroma", "wan_i2v"}


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


FAMILIES = {**BUILDERS, "pixart": lambda: td._pixart()[:2]}  # PixArt: sparse_video since the family table


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    model, inputs = FAMILIES[request.param]()
    model.eval()
    return request.param, model, inputs, _run(model, inputs)


def _grid(name: str, model: torch.nn.Module) -> tuple[int, ...]:
    return GRIDS.get(name, (2, 3, 4) if adapter.family_of(model).rank == 3 else (3, 4))


def _first_queries(model: torch.nn.Module, inputs: dict[str, Any]) -> dict[int, torch.Tensor]:
    """Each observable layer's query ``[B, H, N, D]`` in its first attention call."""
    seen: dict[int, torch.Tensor] = {}
    patcher = Patcher()
    layers = [i for i in range(len(adapter.attention_layers(model))) if i not in adapter.linear_attention(model)]
    adapter.observe_attention(model, patcher, layers, lambda i, q, k, scale, mask: seen.setdefault(i, q.clone()))
    try:
        _run(model, inputs)
    finally:
        patcher.undo()
    return seen


def test_layers_run_in_the_order_listed(case: tuple) -> None:
    name, model, inputs, _ = case
    names = [n for n, _ in adapter.attention_layers(model)]
    seen: list[str] = []
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.append(n)) for n in names]
    try:
        _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    assert list(dict.fromkeys(seen)) == names


def test_call_grid(case: tuple) -> None:
    name, model, inputs, _ = case
    grid, _ = adapter.call_grid(model, inputs)
    assert grid == _grid(name, model)


def test_layouts_match_the_rows_the_latent_and_the_text_move(case: tuple) -> None:
    """A layout's grid rows are the query rows that move with the latent; its other rows, in the first layer that
    joins them to the grid, move with the text and not with the latent (nothing has mixed them yet)."""
    name, model, inputs, _ = case
    grid = _grid(name, model)
    base = _first_queries(model, inputs)
    torch.manual_seed(1)
    latent_key = "hidden_states"
    moved_latent = _first_queries(model, {**inputs, latent_key: inputs[latent_key] + torch.randn_like(
        inputs[latent_key])})
    text_key = TEXT_INPUT.get(name, "encoder_hidden_states")
    moved_text = None if text_key is None else _first_queries(
        model, {**inputs, text_key: inputs[text_key] + torch.randn_like(inputs[text_key])})

    def rows(moved: dict[int, torch.Tensor], layer: int) -> torch.Tensor:  # [N] bool: the row changed
        return (moved[layer] != base[layer]).flatten(0, 1).transpose(0, 1).flatten(1).any(1)

    joined = None
    for layer in sorted(base):
        kind = adapter.layer_kind(model, layer)
        layout = adapter.token_layout(model, layer, grid, base[layer].shape[-2])
        if kind == "text":
            assert layout.grid is None and not rows(moved_latent, layer).any(), layer
            continue
        assert layout.num_tokens == base[layer].shape[-2] and layout.grid == adapter.layer_grid(model, layer, grid)
        start, end = layout.grid_span
        assert rows(moved_latent, layer)[start:end].all(), layer
        if joined is None and layout.num_tokens > math.prod(layout.grid):
            joined = layer
            outside = torch.ones(layout.num_tokens, dtype=torch.bool)
            outside[start:end] = False
            assert not rows(moved_latent, layer)[outside].any(), layer
            assert moved_text is not None and rows(moved_text, layer)[outside].any(), layer
            if name != "mochi":  # Mochi's timestep embedding pools the text: every token moves with it
                assert not rows(moved_text, layer)[start:end].any(), layer
    families_with_text = {"mochi", "auraflow", "cogview4", "qwenimage", "lumina2", "hunyuanvideo15", "flux2",
                          "chroma", "sd35"}
    assert (joined is not None) == (name in families_with_text)


def test_inspect_is_bit_identical_and_remove_restores_everything(case: tuple) -> None:
    name, model, inputs, out = case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: m.processor for n, m in adapter.attention_layers(model)}
    handle = visattn.apply(model, "inspect")
    assert torch.equal(_run(model, inputs), out)
    linear = adapter.linear_attention(model)
    assert sorted(handle.layer_names) == [i for i in range(len(processors)) if i not in linear]
    assert all(handle.maps[i] for i in handle.layer_names)
    visattn.remove(model)
    assert torch.equal(_run(model, inputs), out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(m.processor is processors[n] for n, m in adapter.attention_layers(model))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _sparse_options(model: torch.nn.Module, **options: Any) -> dict[str, Any]:
    """Small tiles, so the tiny grids hold several blocks."""
    return {"tile": (1, 2, 2) if adapter.family_of(model).rank == 3 else (1, 2), **options}


def _installs(name: str) -> list[str]:
    return ["processor", "attention_backend"] if name in BACKEND_FAMILIES else ["processor"]


def test_sparse_video_identity_sparse_and_remove(case: tuple) -> None:
    name, model, inputs, out = case
    if type(model).__name__ not in SPARSE_FAMILIES:
        pytest.skip("not a sparse_video family (test_refusals)")
    if name == "skyreels_v2":
        pytest.skip("diffusion forcing masks grid keys per query (test_refusals)")
    outputs = {}
    for install in _installs(name):
        visattn.apply(model, "sparse_video", **_sparse_options(model, keep=1.0, install=install))
        identity = _run(model, inputs)
        visattn.remove(model)
        assert torch.equal(identity, out), install
        visattn.apply(model, "sparse_video", **_sparse_options(model, keep=0.3, install=install))
        outputs[install] = _run(model, inputs)
        visattn.remove(model)
        assert torch.isfinite(outputs[install]).all() and not torch.equal(outputs[install], out)
    if len(outputs) == 2:
        torch.testing.assert_close(outputs["attention_backend"], outputs["processor"])
    assert torch.equal(_run(model, inputs), out)


class _AttentionLengths(torch.overrides.TorchFunctionMode):
    """Records ``(query tokens, key tokens)`` of every SDPA call that reaches torch (outside visattn's own modes)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k = (args[i] if len(args) > i else kwargs[n] for i, n in ((0, "query"), (1, "key")))
            self.calls.append((q.shape[-2], k.shape[-2]))
        return func(*args, **kwargs)


def _lengths(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    with _AttentionLengths() as seen:
        out = _run(model, inputs)
    return out, seen.calls


def _tome_options(model: torch.nn.Module, **options: Any) -> dict[str, Any]:
    """Cells 2 frames deep on video, so that the tiny grids merge across frames too."""
    return {"st": 2 if adapter.family_of(model).rank == 3 else 1, **options}


def test_tome_identity_merging_and_remove(case: tuple) -> None:
    name, model, inputs, out = case
    if type(model).__name__ not in TOME_FAMILIES:
        pytest.skip("not a tome family (test_refusals)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {n: m.processor for n, m in adapter.attention_layers(model)}
    handle = visattn.apply(model, "tome", **_tome_options(model, ratio=0.0))
    identity = _run(model, inputs)
    assert all(n == kept for _, n, kept in handle.token_counts) and handle.token_counts
    visattn.remove(model)
    assert torch.equal(identity, out)
    if name == "skyreels_v2":
        return  # its diffusion-forcing mask differs between grid tokens (test_refusals)
    _, stock_lengths = _lengths(model, inputs)
    handle = visattn.apply(model, "tome", **_tome_options(model, ratio=0.5))
    merged, lengths = _lengths(model, inputs)
    counts = handle.token_counts
    visattn.remove(model)
    assert torch.isfinite(merged).all() and not torch.equal(merged, out)
    assert all(kept == n - int(n * 0.5) for _, n, kept in counts)
    # every merge shortened its attention call by the tokens merged, queries and keys alike; nothing else changed
    shortened = [(a - b, c - d) for (a, c), (b, d) in zip(stock_lengths, lengths) if (a, c) != (b, d)]
    assert len(lengths) == len(stock_lengths) and shortened == [(n - kept, n - kept) for _, n, kept in counts]
    if type(model).__name__ in tome_diffusers.CALL_FAMILIES:
        self_layers = {n for (n, _), kind in zip(adapter.attention_layers(model), adapter.layer_kinds(model))
                       if kind == "self"}
        assert {layer for layer, _, _ in counts} == self_layers
    assert torch.equal(_run(model, inputs), out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(m.processor is processors[n] for n, m in adapter.attention_layers(model))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", ["qwenimage", "hunyuanvideo15", "chroma", "mochi"])
def test_tome_follows_text_masks(name: str) -> None:
    """Masked text tokens of sample 1 (their contents changed) leave its output unchanged, as in stock."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.eval()
    text = inputs["encoder_hidden_states"].clone()
    text[1, 4:] += torch.randn_like(text[1, 4:])
    changed = {**inputs, "encoder_hidden_states": text}
    assert torch.equal(_run(model, inputs)[1], _run(model, changed)[1])  # stock: the masked text is unseen
    visattn.apply(model, "tome", **_tome_options(model, ratio=0.5))
    try:
        merged = _run(model, inputs)
        assert torch.equal(merged[1], _run(model, changed)[1])
    finally:
        visattn.remove(model)


CALL_REFUSALS = {  # inputs sparse attention cannot serve, refused at the call (the family is supported)
    "skyreels_v2": (lambda inputs: {}, "grid queries must share one key mask"),  # diffusion forcing: block-causal
    "lumina2": (lambda inputs: {"encoder_attention_mask": ragged_mask()}, "masks grid tokens"),  # image moves
    "chroma": (lambda inputs: {"attention_mask": inputs["attention_mask"].float()},  # as its pipeline passes it
               "float attention mask over grid queries must hold only 0 and -inf"),
}


def test_refusals(case: tuple) -> None:
    name, model, inputs, out = case
    if name == "sana":
        with pytest.raises(UnsupportedModelError, match="sparse_video does not support the diffusers model Sana"):
            visattn.apply(model, "sparse_video")
        linear = next(iter(adapter.linear_attention(model)))
        with pytest.raises(OptionError, match="runs linear attention"):
            visattn.apply(model, "inspect", layers=[linear])
    elif name in CALL_REFUSALS:
        change, message = CALL_REFUSALS[name]
        visattn.apply(model, "sparse_video", **_sparse_options(model, keep=0.3))
        try:
            with pytest.raises(ShapeError, match=message):
                _run(model, {**inputs, **change(inputs)})
        finally:
            visattn.remove(model)
    elif name not in BACKEND_FAMILIES and type(model).__name__ in SPARSE_FAMILIES:
        with pytest.raises(UnsupportedModelError, match="call SDPA directly: use install='processor'"):
            visattn.apply(model, "sparse_video", install="attention_backend")
    else:
        pytest.skip("nothing this family refuses")
    assert not visattn.applied(model)
    assert torch.equal(_run(model, inputs), out)


TOME_CALL_REFUSALS = {  # masks that differ between grid tokens, refused at the call
    "skyreels_v2": lambda inputs: {},  # diffusion forcing: block-causal over frames
    "lumina2": lambda inputs: {"encoder_attention_mask": ragged_mask()},  # each sample's image starts elsewhere
}


def test_tome_refusals(case: tuple) -> None:
    name, model, inputs, out = case
    family = type(model).__name__
    if family not in TOME_FAMILIES:
        with pytest.raises(UnsupportedModelError, match=f"tome does not support the diffusers model {family}"):
            visattn.apply(model, "tome")
    if family in tome_diffusers.CALL_FAMILIES:
        with pytest.raises(OptionError, match="merges at its attention calls only: use scope='attention'"):
            visattn.apply(model, "tome", scope="block")
    if family in TOME_FAMILIES and adapter.family_of(model).rank == 2:
        with pytest.raises(OptionError, match="st=2 is the cell depth in frames"):
            visattn.apply(model, "tome", st=2)
    assert not visattn.applied(model)
    if name in TOME_CALL_REFUSALS:
        visattn.apply(model, "tome", **_tome_options(model, ratio=0.5))
        try:
            with pytest.raises(ShapeError, match="differs between grid tokens, which merged tokens cannot follow"):
                _run(model, {**inputs, **TOME_CALL_REFUSALS[name](inputs)})
        finally:
            visattn.remove(model)
    assert torch.equal(_run(model, inputs), out)


def test_visattn_processors_name_every_argument_of_the_stock_processors(case: tuple) -> None:
    """diffusers passes a processor only the keywords its signature names: visattn's name all the stock ones."""
    import inspect

    from visattn.frameworks.diffusers_layers import KEYWORDS

    name, model, _, _ = case
    for layer, module in adapter.attention_layers(model):
        params = list(inspect.signature(module.processor.__call__).parameters.values())[2:]
        named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        assert named <= set(KEYWORDS), (layer, named - set(KEYWORDS))
