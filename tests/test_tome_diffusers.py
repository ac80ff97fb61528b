"""tome on diffusers (ToMe for Stable Diffusion): ratio=0 reproduces stock on every supported family and
scope, merging leaves N - ratio*N tokens where it should (self-attention, or the whole block) and
only there (UNet levels by max_downsample, never text tokens), the cell partition and matching do
what ToMe-SD says, remove() restores the model, and bad input gets a clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import diffusers  # noqa: E402
import tiny_dits  # noqa: E402
from test_diffusers import B, T, _flux, _pixart, _run, _sd3, _unet  # noqa: E402

import visattn  # noqa: E402
from visattn.core.merge_sd import cell_destinations, match_to_cells  # noqa: E402
from visattn.frameworks import diffusers as adapter  # noqa: E402
from visattn.processors.tome.diffusers import PerSampleRopeFluxAttnProcessor  # noqa: E402


def _sdxl() -> tuple:
    """A tiny SDXL-like UNet: no attention at full resolution, two transformer layers at the lowest
    level, text_time added conditions, linear projections."""
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
        use_linear_projection=True)
    inputs = dict(sample=torch.randn(B, 4, 16, 16), timestep=torch.tensor([10, 10]),
                  encoder_hidden_states=torch.randn(B, T, 16),
                  added_cond_kwargs={"text_embeds": torch.randn(B, 8), "time_ids": torch.randn(B, 6)})
    return model, inputs


FAMILIES = {"unet": _unet, "sdxl": _sdxl, "pixart": _pixart, "dit": tiny_dits.BUILDERS["dit"], "sd3": _sd3,
            "flux": _flux}


def _build(family: str) -> tuple[torch.nn.Module, dict[str, Any], torch.Tensor]:
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()[:2]
    model.eval()
    return model, inputs, _run(model, inputs)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, dict[str, Any], torch.Tensor]:
    return (request.param, *_build(request.param))


def _snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {n: m.processor for n, m in adapter.attention_layers(model)}


def _assert_restored(model: torch.nn.Module, snapshot: tuple[dict, dict]) -> None:
    state, processors = snapshot
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(m.processor is processors[n] for n, m in adapter.attention_layers(model))
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(type(m).__module__.startswith(("diffusers", "torch")) for m in model.modules())


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_ratio_zero_reproduces_stock_bit_for_bit(case, scope: str) -> None:
    family, model, inputs, stock = case
    snapshot = _snapshot(model)
    handle = visattn.apply(model, "tome", ratio=0.0, scope=scope, max_downsample=8)
    try:
        assert torch.equal(_run(model, inputs), stock)
        assert handle.token_counts and all(n_in == n_out for _, n_in, n_out in handle.token_counts)
    finally:
        visattn.remove(model)
    _assert_restored(model, snapshot)
    assert torch.equal(_run(model, inputs), stock)


def _record_lengths(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, list[int]], list]:
    """Token counts the named attention layers compute queries for (the input of their ``to_q``)."""
    seen: dict[str, list[int]] = {n: [] for n in names}
    modules = {n: m.to_q for n, m in model.named_modules() if n in seen}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            seen[name].append(x.shape[1])
        return record

    return seen, [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]


@pytest.mark.parametrize("scope", ["attention", "block"])
def test_merging_leaves_n_minus_r_tokens_where_the_scope_says(case, scope: str) -> None:
    family, model, inputs, stock = case
    snapshot = _snapshot(model)
    names = [n for n, _ in adapter.attention_layers(model)]
    handle = visattn.apply(model, "tome", ratio=0.5, scope=scope, max_downsample=8)
    seen, hooks = _record_lengths(model, names)  # what the attention itself computes on
    try:
        out = _run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
        visattn.remove(model)
    assert out.shape == stock.shape and torch.isfinite(out).all() and not torch.equal(out, stock)
    merged = {name: (n_in, n_out) for name, n_in, n_out in handle.token_counts}
    assert merged and all(n_out == n_in - int(0.5 * n_in) for n_in, n_out in merged.values())
    text = T if family == "flux" else 0
    for name in names:
        (length,) = seen[name]
        attn = dict(model.named_modules())[name]
        block = name.rsplit(".", 1)[0]
        single = "single_transformer_blocks" in name  # Flux single stream: text + image in one sequence
        if scope == "attention" and name in merged:
            n_in, n_out = merged[name]
            assert length == n_out + (text if single else 0), name
        elif scope == "block" and block in merged:  # every attention in a merged block, cross-attention too
            n_in, n_out = merged[block]
            assert length == n_out + (text if single else 0), name
        else:
            assert getattr(attn, "is_cross_attention", False) or name not in merged, name
    _assert_restored(model, snapshot)
    assert torch.equal(_run(model, inputs), stock)


def test_sdxl_max_downsample_reaches_its_attention_levels() -> None:
    model, inputs, stock = _build("sdxl")
    levels = {}
    for max_downsample in (None, 2, 4):
        handle = visattn.apply(model, "tome", ratio=0.5, max_downsample=max_downsample)
        try:
            _run(model, inputs)
        finally:
            visattn.remove(model)
        levels[max_downsample] = sorted({n_in for _, n_in, _ in handle.token_counts})
    # 16x16 latents: attention at 8x8 (downsampled 2) and 4x4 (downsampled 4), none at 16x16
    assert levels == {None: [64], 2: [64], 4: [16, 64]}
    with pytest.raises(visattn.OptionError, match="max_downsample=1 selects no layer.*downsampling 2, 4"):
        visattn.apply(model, "tome", ratio=0.5, max_downsample=1)
    assert "_visattn_handles" not in model.__dict__


def test_block_scope_keeps_each_tokens_own_residual() -> None:
    """y_i = x_i + (Block(merge x) - merge x)_{G(i)}: the tokens of a group share one residual update."""
    model, inputs, _ = _build("pixart")
    block = model.transformer_blocks[0]
    seen: dict[str, torch.Tensor] = {}
    handle = visattn.apply(model, "tome", ratio=0.5, scope="block")
    pre = block.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", a[0]), with_kwargs=True,
                                           prepend=True)  # before the method's hook: the unmerged input
    post = block.register_forward_hook(lambda m, a, out: seen.__setitem__("y", out))  # after: unmerged output
    try:
        _run(model, inputs)
    finally:
        pre.remove()
        post.remove()
        visattn.remove(model)
    assert handle.token_counts[0][1:] == (16, 8) and seen["y"].shape == seen["x"].shape
    delta = seen["y"] - seen["x"]
    for b in range(B):
        same = torch.cdist(delta[b], delta[b]) < 1e-4  # rows of one group, up to rounding
        assert len(torch.unique(same, dim=0)) == 8  # 16 tokens, 8 groups


def test_seed_fixes_the_destinations() -> None:
    model, inputs, _ = _build("sd3")
    outs = []
    for seed in (0, 0, 1):
        visattn.apply(model, "tome", ratio=0.5, seed=seed)
        try:
            outs.append(_run(model, inputs))
        finally:
            visattn.remove(model)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_each_timestep_draws_its_destinations_and_a_repeated_call_the_same() -> None:
    from visattn.processors.tome.diffusers import destination_key

    model, inputs, _ = _build("unet")
    visattn.apply(model, "tome", ratio=0.5)
    try:
        first, again = _run(model, inputs), _run(model, inputs)
    finally:
        visattn.remove(model)
    assert torch.equal(first, again)  # no state carried from call to call: a generation run again is the same
    keys = [destination_key(0, {"timestep": torch.tensor([t, t])}) for t in (10, 9, 10)]
    partitions = [cell_destinations((8, 8), (2, 2), key)[0] for key in keys]
    assert torch.equal(partitions[0], partitions[2]) and not torch.equal(partitions[0], partitions[1])
    assert destination_key(3, {}) == 3  # a model called without a timestep: the seed alone


# --- the math (visattn.core.merge_sd) ------------------------------------------------------------------


def test_one_destination_per_full_cell_and_the_rest_are_sources() -> None:
    h, w, sx, sy = 7, 9, 2, 3
    dst, src = cell_destinations((h, w), (sy, sx), 0)
    assert dst.numel() == (h // sy) * (w // sx) and sorted(torch.cat([dst, src]).tolist()) == list(range(h * w))
    assert torch.equal(dst, dst.sort().values) and torch.equal(src, src.sort().values)
    cells = sorted(((int(i) // w) // sy, (int(i) % w) // sx) for i in dst)
    assert cells == [(r, c) for r in range(h // sy) for c in range(w // sx)]
    again, _ = cell_destinations((h, w), (sy, sx), 0)
    other, _ = cell_destinations((h, w), (sy, sx), 1)
    assert torch.equal(dst, again) and not torch.equal(dst, other)
    with pytest.raises(ValueError, match="no full 3x2 cell"):
        cell_destinations((2, 9), (sy, sx))


def test_video_cells_hold_one_destination_each() -> None:
    t, h, w, st, sy, sx = 5, 4, 7, 2, 2, 3
    dst, src = cell_destinations((t, h, w), (st, sy, sx), 3)
    assert sorted(torch.cat([dst, src]).tolist()) == list(range(t * h * w)) and torch.equal(dst, dst.sort().values)
    cells = sorted(((i // (h * w)) // st, (i // w % h) // sy, (i % w) // sx) for i in dst.tolist())
    assert cells == [(a, b, c) for a in range(t // st) for b in range(h // sy) for c in range(w // sx)]
    frames = {i // (h * w) % st for i in dst.tolist()}
    assert frames == {0, 1}  # the destinations' frames within their cells vary (key 3)
    planes = cell_destinations((1, h, w), (1, sy, sx), 0)[0]
    assert torch.equal(planes, cell_destinations((h, w), (sy, sx), 0)[0])  # a one-frame cell is the image cell


def test_matching_merges_the_most_similar_sources_into_their_destination_average() -> None:
    torch.manual_seed(0)
    h = w = 4
    x = torch.randn(2, h * w, 8)
    dst, src = cell_destinations((h, w), (2, 2), 0)
    r = 5
    merge = match_to_cells(x, dst, src, r)
    y = merge.merge(x)
    assert y.shape == (2, h * w - r, 8) and merge.r == r
    xn = torch.nn.functional.normalize(x, dim=-1)
    for b in range(2):
        sim = xn[b, src] @ xn[b, dst].T
        best, partner = sim.max(-1)
        merged = set(best.topk(r).indices.tolist())
        groups = {int(d): [int(d)] for d in dst}
        for j, s in enumerate(src.tolist()):
            if j in merged:
                groups[int(dst[partner[j]])].append(s)
        for d, members in groups.items():  # each destination's slot holds its group's average
            torch.testing.assert_close(y[b, merge.slot[b, d]], x[b, members].mean(0))
            assert all(merge.slot[b, i] == merge.slot[b, d] for i in members)
        kept = [s for j, s in enumerate(src.tolist()) if j not in merged]
        assert all(torch.equal(y[b, merge.slot[b, s]], x[b, s]) for s in kept)
    out = merge.unmerge(y)
    assert out.shape == x.shape and torch.equal(out, y.gather(1, merge.slot[..., None].expand(-1, -1, 8)))
    assert torch.equal(merge.select(x), x.gather(1, merge.own[..., None].expand(-1, -1, 8)))
    assert torch.equal(merge.unmerge(merge.select(x)).gather(1, merge.own[..., None].expand(-1, -1, 8)),
                       merge.select(x))  # every slot's own token maps back to that slot
    nothing = match_to_cells(x, dst, src, 0)
    assert nothing.merge(x) is x and nothing.unmerge(x) is x and nothing.select(x) is x
    assert match_to_cells(x, dst, src, 99).r == src.numel()  # clamped to the sources


def test_per_sample_rope_processor_matches_the_stock_processor() -> None:
    model, inputs, stock = _build("flux")
    attn = model.transformer_blocks[0].attn
    torch.manual_seed(1)
    x, text = torch.randn(B, 12, 16), torch.randn(B, T, 16)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    rope = model.pos_embed(ids)
    proc = PerSampleRopeFluxAttnProcessor(attn.processor)
    with torch.no_grad():
        ref = attn.processor(attn, x, text, None, rope)
        shared = proc(attn, x, text, None, rope)  # shared tables: the stock processor itself
        per_sample = proc(attn, x, text, None, tuple(t[None].expand(B, -1, -1) for t in rope))
    for a, b, c in zip(ref, shared, per_sample):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)


# --- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts,msg", [
    ({"r": 4}, "r is an option for timm and open_clip models, not diffusers models; diffusers options: ratio"),
    ({"r": 4, "trace_source": True}, "r, trace_source are options for timm and open_clip models"),
    ({"ratio": 1.0}, r"ratio must be a number in \[0.0, 1.0\) \(got 1.0\)"),
    ({"ratio": -0.1}, "ratio must be"),
    ({"scope": "mlp"}, "scope must be one of 'attention', 'block'"),
    ({"max_downsample": 3}, "max_downsample must be None or one of 1, 2, 4, 8"),
    ({"max_downsample": True}, "max_downsample must be"),
    ({"sx": 0}, r"sx must be an int >= 1"), ({"st": 0}, r"st must be an int >= 1"),
    ({"r": 8}, "r is an option for timm and open_clip models"),  # r=8 is its default: given all the same
])
def test_bad_options_raise_before_touching(opts: dict, msg: str) -> None:
    model, inputs, stock = _build("pixart")
    with pytest.raises(visattn.OptionError, match=msg):
        visattn.apply(model, "tome", **opts)
    assert "_visattn_handles" not in model.__dict__ and torch.equal(_run(model, inputs), stock)


def test_unsupported_family_and_masked_attention_are_refused() -> None:
    torch.manual_seed(0)
    sana = tiny_dits.BUILDERS["sana"]()[0]
    with pytest.raises(visattn.UnsupportedModelError, match="supported diffusers models: UNet2DConditionModel"):
        visattn.apply(sana, "tome")
    model, inputs, _ = _build("pixart")
    visattn.apply(model, "tome", ratio=0.5)
    try:
        attn = model.transformer_blocks[0].attn1
        with pytest.raises(ValueError, match="attention mask over its tokens"), torch.no_grad():
            attn(torch.randn(B, 16, 16), attention_mask=torch.ones(B, 16, dtype=torch.bool))
    finally:
        visattn.remove(model)


def _check_decision(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, r: int, slot: torch.Tensor) -> None:
    """``slot`` is a ToMe-SD decision for ``x`` up to rounding: every merged source joins a destination of highest
    similarity (within 1e-5), the merged sources score at least as high as the kept ones, the destinations hold the
    last slots in order and the kept sources the first ones, each once."""
    unit = torch.nn.functional.normalize(x, dim=-1)
    cos = unit[:, src] @ unit[:, dst].transpose(1, 2)  # [B, S, D]
    best = cos.amax(-1)
    kept = src.numel() - r
    to = slot[:, src]
    merged = to >= kept
    joined = cos.gather(2, (to - kept).clamp_min(0)[..., None])[..., 0]
    assert bool(((joined >= best - 1e-5) | ~merged).all())
    assert int(merged.sum()) == r * x.shape[0]
    low = torch.where(merged, best, torch.inf).amin(1)
    high = torch.where(merged, -torch.inf, best).amax(1)
    assert bool((low >= high - 1e-5).all())
    assert torch.equal(slot[:, dst], torch.arange(kept, kept + dst.numel()).expand(x.shape[0], -1))
    assert torch.equal(torch.where(merged, -1, to).sort(1).values[:, r:], torch.arange(kept).expand(x.shape[0], -1))


def cell_kernel_cases() -> bool:
    """The decision kernels (``visattn::tome_cells``) and the merge kernels (``visattn::tome_cell_mean``,
    ``visattn::tome_cell_update``) against the core's PyTorch, their gradients, and a UNet merging through them
    compiled whole (run in the interpreter, see below)."""
    from visattn.core.merge_sd import CellMerge
    from visattn.kernels import tome as kernels

    torch.manual_seed(0)
    kernels._START_ROWS = 32  # the prefix sum over the destinations in several chunks (81 in the last case)
    for grid, cell, channels, ratio in [((8, 8), (2, 2), 20, 0.5), ((6, 10), (2, 2), 130, 0.5),
                                        ((2, 6, 6), (2, 2, 2), 12, 0.7), ((5, 7), (2, 3), 17, 0.3),
                                        ((12, 12), (2, 2), 70, 0.6), ((18, 18), (2, 2), 24, 0.5)]:
        n = torch.Size(grid).numel()
        x = torch.randn(3, n, channels)
        x[1, : n // 2] = x[1, 0]  # one sample in which many sources join one destination (its scores tie)
        dst, src = cell_destinations(grid, cell, 5)
        r = int(n * ratio)
        ref = match_to_cells(x, dst, src, r)
        fused = kernels.match_to_cells(x, dst, src, r, strict=True)
        assert fused.average is not None and ref.average is None
        assert torch.equal(fused.slot[0::2], ref.slot[0::2])  # no ties: the same decision
        _check_decision(x, dst, src, r, fused.slot)  # ties may break otherwise in either: a valid decision
        assert torch.equal(fused.own[0::2], ref.own[0::2])
        assert int(fused.size.max()) > 4  # a group larger than a tile's usual one
        plain = CellMerge(fused.slot, n - r)  # the kernels' decision applied by PyTorch
        torch.testing.assert_close(fused.merge(x), plain.merge(x))
        heads = torch.randn(3, n, 4, 5).transpose(1, 2)  # [B, H, N, D] with the token axis second in memory
        torch.testing.assert_close(fused.merge(heads, dim=2), plain.merge(heads, dim=2))
        x.requires_grad_()
        grad = torch.randn(3, n - r, channels)
        torch.testing.assert_close(torch.autograd.grad(fused.merge(x), x, grad)[0],
                                   torch.autograd.grad(plain.merge(x), x, grad)[0])
        # a block's update unmerged onto the residual stream: x + (out - merged)[slot], and its gradients
        out, merged = torch.randn(3, n - r, channels, requires_grad=True), plain.merge(x).detach().requires_grad_()
        torch.testing.assert_close(fused.update(x, out, merged), x + plain.unmerge(out - merged))
        grad = torch.randn(3, n, channels)
        for got, want in zip(torch.autograd.grad(fused.update(x, out, merged), (x, out, merged), grad),
                             torch.autograd.grad(plain.update(x, out, merged), (x, out, merged), grad)):
            torch.testing.assert_close(got, want)
    # a metric whose rows are strided (the keys averaged over heads at an attention call are not) decides alike
    wide = torch.randn(2, 64, 40)
    dst, src = cell_destinations((8, 8), (2, 2), 1)
    assert torch.equal(kernels.match_to_cells(wide[..., ::2], dst, src, 30).slot,
                       match_to_cells(wide[..., ::2], dst, src, 30).slot)
    model, inputs, _ = _build("unet")
    visattn.apply(model, "tome", ratio=0.5, scope="block", strict=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs).sample,
                                   _run(model, inputs))
    return True


def test_merge_kernels_match_the_pytorch_path() -> None:
    """ToMe-SD's decision and merge kernels, run in Triton's interpreter, equal the core's PyTorch (the merge's
    gradients too), and a UNet merging through them compiles without a graph break."""
    pytest.importorskip("triton")
    from interpreter import run_interpreted

    assert run_interpreted(__file__, "cell_kernel_cases") is True


def test_merge_kernel_fallback_is_logged_once_and_strict_refuses_it(caplog: pytest.LogCaptureFixture) -> None:
    from visattn import _logging
    from visattn.kernels import tome as kernels
    from visattn.kernels._runtime import runtime_unavailable

    x = torch.randn(2, 16, 8)
    reason = runtime_unavailable(x)
    if reason is None:
        pytest.skip("the merge kernel runs here (CUDA or TRITON_INTERPRET=1)")
    dst, src = cell_destinations((4, 4), (2, 2), 0)
    with pytest.raises(visattn.KernelUnavailableError, match="strict=True forbids the fallback"):
        kernels.match_to_cells(x, dst, src, 6, strict=True)
    _logging._seen.discard(f"tome-sd:{reason}")
    with caplog.at_level("WARNING", logger="visattn"):
        merges = [kernels.match_to_cells(x, dst, src, 6) for _ in range(2)]
    assert [r.message for r in caplog.records].count(
        f"visattn tome merge kernel: {reason}; merging through PyTorch; falling back (logged once; pass "
        f"strict=True to make this an error)") == 1
    assert merges[0].average is None and torch.equal(merges[0].merge(x), match_to_cells(x, dst, src, 6).merge(x))
    model, inputs, _ = _build("sdxl")
    visattn.apply(model, "tome", ratio=0.5, scope="block", max_downsample=4, strict=True)
    try:
        with pytest.raises(visattn.KernelUnavailableError):
            _run(model, inputs)
    finally:
        visattn.remove(model)
