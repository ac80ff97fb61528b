"""sparse_video: identity settings reproduce stock on Wan, CogVideoX, HunyuanVideo, Flux and SD3; the routed
path equals the dense-masked reference; text tokens always attend and are always attended; the dense
schedule, batches and the set_attn_processor entry point work; bad inputs raise clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from test_diffusers import BUILDERS, _run  # noqa: E402  (the tiny configs of the diffusers families)

import visattn  # noqa: E402
from visattn.core.layout import TokenLayout  # noqa: E402
from visattn.errors import CopyError, OptionError, ShapeError, UnsupportedModelError  # noqa: E402
from visattn.processors.sparse_video import (  # noqa: E402
    SparseVideoConfig,
    geometry,
    route_blocks,
    sparse_video_attention,
)

FAMILIES = ["wan", "cogvideox", "hunyuanvideo", "flux", "sd3"]


def _model(family: str) -> tuple[torch.nn.Module, dict, tuple[int, ...], torch.Tensor]:
    torch.manual_seed(0)
    model, inputs, _, grid, _ = BUILDERS[family]()
    model.eval()
    return model, inputs, grid, _run(model, inputs)


def _small_tile(grid: tuple[int, ...]) -> tuple[int, ...]:
    return (1, 2, 2) if len(grid) == 3 else (1, 2)


IDENTITY = [dict(strategy="tile_topk", keep=1.0), dict(strategy="tile_topk", top_p=1.0),
            dict(strategy="rectified", keep=1.0), dict(strategy="sliding_tile", window=(9, 9, 9)),
            dict(strategy="grat", grat_radius=9)]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_settings_reproduce_stock_and_remove_restores(family: str) -> None:
    model, inputs, grid, ref = _model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    processors = dict(model.attn_processors)
    for options in IDENTITY:
        options = dict(options)
        if "window" in options:
            options["window"] = options["window"][:len(grid)]
        visattn.apply(model, "sparse_video", **options)
        assert torch.equal(_run(model, inputs), ref), options
        visattn.remove(model)
    assert model.attn_processors == processors
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_run(model, inputs), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["tile_topk", "rectified", "sliding_tile", "grat"])
def test_sparse_strategies_run_on_every_family_and_change_only_self_attention(family: str, strategy: str) -> None:
    model, inputs, grid, ref = _model(family)
    options = {"tile_topk": dict(keep=0.5), "rectified": dict(keep=0.5),
               "sliding_tile": dict(window=(1,) * len(grid)), "grat": dict(grat_pattern="criss_cross")}[strategy]
    handle = visattn.apply(model, "sparse_video", strategy=strategy, tile=_small_tile(grid), **options)
    out = _run(model, inputs)
    processors = model.attn_processors
    handle.remove()
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert 0 < ((out - ref).norm() / ref.norm()) < 0.5
    sparse = [type(p).__name__ == "SparseVideoAttnProcessor" for p in processors.values()]
    assert any(sparse)
    if family == "wan":  # cross-attention (attn2) keeps its stock processor
        assert [n for n, s in zip(processors, sparse) if s] == [n for n in processors if ".attn1." in n]
    if family == "hunyuanvideo":  # the token refiner sees text only
        assert not any(s for n, s in zip(processors, sparse) if n.startswith("context_embedder."))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
               config: SparseVideoConfig, scale: float) -> torch.Tensor:
    """Dense attention in raster order under the token mask of the routing decision (independent of the kernel)."""
    geo = geometry(layout.grid, layout.grid_start, layout.num_tokens, config.tile_for(layout.grid), q.device)
    ng = geo.num_grid
    qp, kp = (t.index_select(2, geo.perm) for t in (q, k))
    idx, cnt = route_blocks(qp[:, :, :ng], kp[:, :, :ng], config, geo, scale)
    b, h, n, _ = q.shape
    idx, cnt = idx.expand(b, h, *idx.shape[2:]), cnt.expand(b, h, cnt.shape[-1])
    blocks = torch.zeros(b, h, geo.num_blocks, geo.num_blocks, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for qb in range(geo.num_blocks):
                blocks[bi, hi, qb, idx[bi, hi, qb, :cnt[bi, hi, qb]].long()] = True
    block_of = torch.full((n,), -1)  # raster token -> its block (-1: text)
    block_of[geo.perm[:ng]] = torch.arange(ng) // geo.block
    grid_tok = block_of >= 0
    mask = torch.ones(b, h, n, n, dtype=torch.bool)
    gq, gk = grid_tok.nonzero().flatten(), grid_tok.nonzero().flatten()
    mask[:, :, gq[:, None], gk[None, :]] = blocks[:, :, block_of[gq][:, None], block_of[gk][None, :]]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


WAN_LIKE = TokenLayout(num_tokens=5 * 6 * 10, grid=(5, 6, 10))  # ragged for 2x4x4 tiles: edge tiles 1x2x2 ...
JOINT = TokenLayout(num_tokens=7 + 3 * 6 * 10, grid=(3, 6, 10), grid_start=7, text=((0, 7),))  # text first


@pytest.mark.parametrize("layout", [WAN_LIKE, JOINT], ids=["wan_like", "text_first"])
@pytest.mark.parametrize("options", [dict(keep=0.1), dict(keep=0.3), dict(top_p=0.5),
                                     dict(strategy="sliding_tile", window=(1, 3, 1)),
                                     dict(strategy="sliding_tile", window=((1, 1, 1), (3, 1, 3))),
                                     dict(strategy="grat", grat_pattern="criss_cross")],
                         ids=["keep0.1", "keep0.3", "top_p0.5", "sliding", "sliding_per_head", "grat_cross"])
def test_routed_path_equals_dense_masked_reference(layout: TokenLayout, options: dict) -> None:
    config = SparseVideoConfig.from_options(tile=(2, 4, 4), **options)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 16) for _ in range(3))
    out = sparse_video_attention(q, k, v, layout, config, scale=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, layout, config, 0.3), rtol=1e-5, atol=1e-5)


def test_keep_fraction_and_own_block() -> None:
    config = SparseVideoConfig.from_options(keep=0.1, tile=(2, 4, 4))
    geo = geometry(WAN_LIKE.grid, 0, WAN_LIKE.num_tokens, (2, 4, 4), torch.device("cpu"))
    q, k = torch.randn(1, 3, WAN_LIKE.num_tokens, 8), torch.randn(1, 3, WAN_LIKE.num_tokens, 8)
    idx, cnt = route_blocks(q, k, config, geo, 1.0)
    assert geo.num_blocks == math.ceil(300 / 32) and (cnt == math.ceil(0.1 * geo.num_blocks)).all()
    own = torch.arange(geo.num_blocks).view(1, 1, -1, 1)
    assert (idx == own).any(-1).all()


def test_text_tokens_always_attend_and_are_always_attended() -> None:
    config = SparseVideoConfig.from_options(keep=0.1, tile=(2, 4, 4))
    q, k, v = (torch.randn(1, 2, JOINT.num_tokens, 16) for _ in range(3))
    out = sparse_video_attention(q, k, v, JOINT, config)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, :7], dense[:, :, :7])  # text queries: dense over everything
    v2 = v.clone()
    v2[:, :, 3] += 100.0  # a text value: every grid query must see it
    moved = sparse_video_attention(q, k, v2, JOINT, config) - out
    assert (moved[:, :, 7:].abs().amax(-1) > 1e-3).all()


def test_batch_rows_equal_single_sample_runs_with_per_sample_text_masks() -> None:
    model, inputs, grid, _ = _model("hunyuanvideo")  # second sample's text is padded (mask 1, 1, 1, 0, 0)
    visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid))
    both = _run(model, inputs)
    for i in range(2):
        single = {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
        torch.testing.assert_close(both[i:i + 1], _run(model, single), rtol=1e-4, atol=1e-5)


def test_dense_schedule_first_steps_and_first_layers() -> None:
    model, inputs, grid, ref = _model("wan")
    visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid), dense_steps=1)
    assert torch.equal(_run(model, inputs), ref)   # step 0
    assert torch.equal(_run(model, inputs), ref)   # same timestep again (CFG as a second call): still step 0
    later = dict(inputs, timestep=torch.tensor([5, 5]))
    sparse_later = _run(model, later)
    visattn.remove(model)
    assert not torch.equal(sparse_later, _run(model, later))
    assert torch.equal(_run(model, inputs), ref)
    visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid), dense_steps=1)
    _run(model, later)
    assert torch.equal(_run(model, inputs), ref)  # a larger timestep starts a new generation: dense again
    visattn.remove(model)

    visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid), dense_layers=2)  # Wan: 2 self-attn
    assert torch.equal(_run(model, inputs), ref)
    visattn.remove(model)
    outs = []
    for dense_layers in (0, 1):
        visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid), dense_layers=dense_layers)
        outs.append(_run(model, inputs))
        visattn.remove(model)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], ref)


def test_set_attn_processor_entry_point_matches_apply_and_restores() -> None:
    model, inputs, grid, ref = _model("flux")
    visattn.apply(model, "sparse_video", keep=0.5, tile=(1, 2))
    applied = _run(model, inputs)
    visattn.remove(model)
    processor = visattn.diffusers.SparseVideoAttnProcessor(model, keep=0.5, tile=(1, 2))
    model.set_attn_processor(processor)
    assert torch.equal(_run(model, inputs), applied)
    with pytest.raises(CopyError, match="sparse_video"):  # a copy would share the processor's hooks
        copy.deepcopy(model)
    model.set_attn_processor(processor.stock_processors)
    processor.detach()
    assert torch.equal(_run(model, inputs), ref)
    assert torch.equal(_run(copy.deepcopy(model), inputs), ref)


def test_bad_inputs_raise_clear_errors() -> None:
    model, inputs, _, _ = _model("flux")
    with pytest.raises(OptionError, match=r"sparse_video: keep must be a number in \(0, 1\] \(got 0\)"):
        visattn.apply(model, "sparse_video", keep=0)
    with pytest.raises(OptionError, match=r"keep must be a number in \(0, 1\] \(got 1.5\)"):
        visattn.apply(model, "sparse_video", keep=1.5)
    with pytest.raises(OptionError, match="strategy must be one of 'tile_topk', 'rectified'"):
        visattn.apply(model, "sparse_video", strategy="vsa")
    with pytest.raises(OptionError, match="strategy 'grat' does not use keep"):
        visattn.apply(model, "sparse_video", strategy="grat", keep=0.1)
    with pytest.raises(OptionError, match="strategy 'sliding_tile' does not use keep, grat_radius"):
        visattn.apply(model, "sparse_video", strategy="sliding_tile", keep=0.25, grat_radius=1)  # their defaults
    with pytest.raises(OptionError, match="strategy 'tile_topk' does not use window"):
        visattn.diffusers.SparseVideoAttnProcessor(model, window=(3, 3))  # the native entry point checks too
    with pytest.raises(OptionError, match="tile must be None"):
        visattn.apply(model, "sparse_video", tile=(0, 4))
    with pytest.raises(ShapeError, match=r"tile \(4, 4, 4\) cannot cover the 2D token grid of FluxTransformer2DModel"):
        visattn.apply(model, "sparse_video", tile=(4, 4, 4))
    assert not visattn.applied(model)
    unet = BUILDERS["unet"]()[0]
    with pytest.raises(UnsupportedModelError, match="sparse_video does not support the diffusers model "
                                                    "UNet2DConditionModel"):
        visattn.apply(unet, "sparse_video")
    with pytest.raises(UnsupportedModelError, match="UNet2DConditionModel"):
        visattn.diffusers.SparseVideoAttnProcessor(unet)
    wan, wan_inputs, _, _ = _model("wan")
    with pytest.raises(ShapeError, match=r"window gives 3 per-head windows, and attention layer blocks\.0\.attn1 has 2 "
                                         r"heads; give one window, or one per head"):
        visattn.apply(wan, "sparse_video", strategy="sliding_tile", tile=(1, 2, 2), window=((1, 1, 1),) * 3)
    with pytest.raises(ShapeError, match="window \\(3, 3\\) does not match the 3D token grid of WanTransformer3DModel"):
        visattn.apply(wan, "sparse_video", strategy="sliding_tile", window=(3, 3))
    assert not visattn.applied(wan)
    q = torch.randn(1, 2, 60, 8)
    with pytest.raises(ShapeError, match="window gives 3 per-head windows, the layer has 2 heads"):
        sparse_video_attention(q, q, q, TokenLayout(num_tokens=60, grid=(3, 4, 5)),
                               SparseVideoConfig(strategy="sliding_tile", tile=(1, 2, 2), window=((1, 1, 1),) * 3))
    with pytest.raises(ShapeError, match="only text keys may be masked"):
        sparse_video_attention(q, q, q, TokenLayout(num_tokens=60, grid=(3, 4, 5)), SparseVideoConfig(keep=0.5),
                               attn_mask=torch.arange(60) > 0)


def test_every_strategy_listing_every_block_equals_dense_attention() -> None:
    q, k, v = (torch.randn(2, 2, JOINT.num_tokens, 16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v)
    for options in (dict(keep=1.0), dict(strategy="rectified", keep=1.0),
                    dict(strategy="sliding_tile", window=(2, 2, 3)), dict(strategy="grat", grat_radius=3)):
        out = sparse_video_attention(q, k, v, JOINT, SparseVideoConfig.from_options(tile=(2, 4, 4), **options))
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_rectified_recovers_dropped_mass_where_attention_is_diffuse() -> None:
    q, k = (0.1 * torch.randn(1, 2, JOINT.num_tokens, 16) for _ in range(2))  # near-uniform attention
    v = torch.randn(1, 2, JOINT.num_tokens, 16) + 1.0
    dense = F.scaled_dot_product_attention(q, k, v)
    errors = {}
    for strategy in ("tile_topk", "rectified"):
        out = sparse_video_attention(q, k, v, JOINT, SparseVideoConfig.from_options(strategy=strategy, keep=0.2,
                                                                                    tile=(2, 4, 4)))
        errors[strategy] = float((out - dense).norm() / dense.norm())
    assert errors["rectified"] < 0.2 * errors["tile_topk"]


def test_layer_that_never_reaches_sdpa_raises() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    model, inputs, grid, _ = _model("sd3")
    model.transformer_blocks[0].attn2.set_processor(AttnProcessor())  # the classic bmm processor: no SDPA
    visattn.apply(model, "sparse_video", keep=0.5, tile=_small_tile(grid))
    with pytest.raises(UnsupportedModelError, match=r"attention layer 1 \(transformer_blocks.0.attn2\) ran without"):
        _run(model, inputs)
    visattn.remove(model)
