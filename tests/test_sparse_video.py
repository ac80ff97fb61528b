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
from visattn.processors.sparse_video.permutation import token_orders  # noqa: E402
from visattn.processors.sparse_video.recall import RecallMeter, attention_recall  # noqa: E402
from visattn.processors.sparse_video.routing import tile_relation  # noqa: E402

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
            dict(strategy="grat", grat_radius=9), dict(keep=1.0, score="antidiagonal", permute="cluster"),
            dict(top_p=1.0, score="antidiagonal", stride=4, permute="importance"),
            dict(strategy="sliding_tile", window=(9, 9, 9), window_stride=2)]


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
    """Dense attention in raster order under the token mask of the routing decision (independent of the kernel).

    With ``permute``, routing sees each head's tokens in the orders of ``token_orders`` (block ``p // block`` holds
    the token at position ``p`` of that order); the mask maps them back to raster tokens."""
    geo = geometry(layout.grid, layout.grid_start, layout.num_tokens, config.tile_for(layout.grid), q.device)
    ng = geo.num_grid
    b, h, n, _ = q.shape
    qp, kp = (t.index_select(2, geo.perm) for t in (q, k))
    qg, kg = qp[:, :, :ng], kp[:, :, :ng]
    q_order = k_order = torch.arange(ng).expand(b, h, ng)
    if config.permute != "none":
        orders = token_orders(config.permute, qg, kg, geo.block, scale)
        q_order = q_order if orders[0] is None else orders[0]
        k_order = orders[1]
        qg, kg = (t.gather(2, o[..., None].expand_as(t)) for t, o in ((qg, q_order), (kg, k_order)))
    idx, cnt = route_blocks(qg, kg, config, geo, scale)
    idx, cnt = idx.expand(b, h, *idx.shape[2:]), cnt.expand(b, h, cnt.shape[-1])
    mask = torch.ones(b, h, n, n, dtype=torch.bool)
    grid_raster = geo.perm[:ng]  # tile position -> raster token
    for bi in range(b):
        for hi in range(h):
            blocks = torch.zeros(geo.num_blocks, geo.num_blocks, dtype=torch.bool)
            for qb in range(geo.num_blocks):
                blocks[qb, idx[bi, hi, qb, :cnt[bi, hi, qb]].long()] = True
            q_tok, k_tok = grid_raster[q_order[bi, hi]], grid_raster[k_order[bi, hi]]  # position p -> raster token
            block_of = torch.arange(ng) // geo.block
            mask[bi, hi, q_tok[:, None], k_tok[None, :]] = blocks[block_of[:, None], block_of[None, :]]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


WAN_LIKE = TokenLayout(num_tokens=5 * 6 * 10, grid=(5, 6, 10))  # ragged for 2x4x4 tiles: edge tiles 1x2x2 ...
JOINT = TokenLayout(num_tokens=7 + 3 * 6 * 10, grid=(3, 6, 10), grid_start=7, text=((0, 7),))  # text first


@pytest.mark.parametrize("layout", [WAN_LIKE, JOINT], ids=["wan_like", "text_first"])
@pytest.mark.parametrize("options", [dict(keep=0.1), dict(keep=0.3), dict(top_p=0.5),
                                     dict(strategy="sliding_tile", window=(1, 3, 1)),
                                     dict(strategy="sliding_tile", window=((1, 1, 1), (3, 1, 3))),
                                     dict(strategy="grat", grat_pattern="criss_cross"),
                                     dict(keep=0.3, score="antidiagonal"),
                                     dict(top_p=0.5, score="antidiagonal", stride=4),
                                     dict(keep=0.3, permute="importance"), dict(keep=0.3, permute="cluster"),
                                     dict(keep=0.3, permute="cluster", score="antidiagonal"),
                                     dict(strategy="sliding_tile", window=(1, 2, 2), window_stride=(1, 2, 1),
                                          window_dilation=(1, 1, 2))],
                         ids=["keep0.1", "keep0.3", "top_p0.5", "sliding", "sliding_per_head", "grat_cross",
                              "antidiagonal", "antidiagonal_top_p", "permute_importance", "permute_cluster",
                              "antidiagonal_permuted", "sliding_gna"])
def test_routed_path_equals_dense_masked_reference(layout: TokenLayout, options: dict) -> None:
    config = SparseVideoConfig.from_options(tile=(2, 4, 4), **options)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 16) for _ in range(3))
    out = sparse_video_attention(q, k, v, layout, config, scale=0.3)
    torch.testing.assert_close(out, _reference(q, k, v, layout, config, 0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(keep=0.3), dict(strategy="rectified", keep=0.3),
                                     dict(strategy="sliding_tile", window=(1, 3, 1)), dict(strategy="grat")],
                         ids=["tile_topk", "rectified", "sliding", "grat"])
def test_wanted_rows_equal_the_full_call_and_other_blocks_visit_nothing(options: dict) -> None:
    """``rows`` (a rank's shard under ring attention): its rows equal the full call's; tile_topk, sliding and grat
    leave every query block without a wanted row at zero (it visited no kv block)."""
    layout, config = WAN_LIKE, SparseVideoConfig.from_options(tile=(2, 4, 4), **options)
    q, k, v = (torch.randn(2, 2, layout.num_tokens, 16) for _ in range(3))
    full = sparse_video_attention(q, k, v, layout, config, scale=0.3)
    rows = torch.zeros(layout.num_tokens, dtype=torch.bool)
    rows[:layout.num_tokens // 2] = True  # the first frames and a half: a contiguous shard, as diffusers splits
    out = sparse_video_attention(q, k, v, layout, config, scale=0.3, rows=rows)
    torch.testing.assert_close(out[:, :, rows], full[:, :, rows], rtol=0, atol=0)
    assert not torch.equal(out[:, :, ~rows], full[:, :, ~rows])
    if options.get("strategy") != "rectified":  # rectified's correction fills every row
        assert out[:, :, 4 * 6 * 10:].abs().max() == 0  # frame 4's tiles (1x4x4) hold no wanted row: no kv visited
    with pytest.raises(ShapeError, match="permute cannot compute a subset"):
        sparse_video_attention(q, k, v, layout, SparseVideoConfig.from_options(keep=0.3, permute="importance"),
                               rows=rows)


def test_gna_windows_stride_groups_share_a_window_and_dilation_keeps_residues() -> None:
    cpu = torch.device("cpu")
    sliding = dict(strategy="sliding_tile")
    plain = tile_relation("sliding_tile", (1, 9), SparseVideoConfig.from_options(**sliding, window=(1, 3)), cpu)[0]
    strided = tile_relation("sliding_tile", (1, 9), SparseVideoConfig.from_options(
        **sliding, window=(1, 3), window_stride=(1, 2)), cpu)[0]
    blocked = tile_relation("sliding_tile", (1, 9), SparseVideoConfig.from_options(
        **sliding, window=(1, 3), window_stride=(1, 3)), cpu)[0]
    dilated = tile_relation("sliding_tile", (1, 8), SparseVideoConfig.from_options(
        **sliding, window=(1, 3), window_dilation=(1, 2)), cpu)[0]
    for rel in (plain, strided, blocked, dilated):
        assert rel.diagonal().all() and (rel.sum(-1) == 3).all()  # every tile sees itself and a full window
    assert torch.equal(plain[4].nonzero().flatten(), torch.tensor([3, 4, 5]))
    assert torch.equal(strided[2], strided[3]) and torch.equal(strided[2].nonzero().flatten(), torch.tensor([1, 2, 3]))
    assert [r.nonzero().flatten().tolist() for r in blocked[::3]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert torch.equal(blocked[3], blocked[5])  # blocked attention: non-overlapping windows
    assert dilated[3].nonzero().flatten().tolist() == [1, 3, 5] and dilated[0].nonzero().flatten().tolist() == [0, 2, 4]
    three = tile_relation("sliding_tile", (3, 4, 6), SparseVideoConfig.from_options(
        **sliding, window=(2, 2, 3), window_stride=(1, 2, 1), window_dilation=(1, 1, 2)), cpu)[0]
    assert three.diagonal().all() and (three.sum(-1) == 2 * 2 * 3).all()


def test_keep_defaults_per_strategy_and_routes_that_fraction() -> None:
    """keep=None (the default) is 0.25 for tile_topk and 0.5 for rectified (the measured trade-offs, package doc)."""
    geo = geometry((4, 4, 4), 0, 64, (1, 2, 2), torch.device("cpu"))  # 16 blocks of 4 tokens
    q = k = torch.randn(1, 2, 64, 8)
    for strategy, keep in (("tile_topk", 0.25), ("rectified", 0.5)):
        default = SparseVideoConfig.from_options(strategy=strategy, tile=(1, 2, 2))
        assert default.keep == keep and default == SparseVideoConfig.from_options(strategy=strategy, keep=None,
                                                                                  tile=(1, 2, 2))
        _, counts = route_blocks(q, k, default, geo, scale=0.3)
        assert (counts == math.ceil(keep * 16)).all(), counts
    assert SparseVideoConfig.from_options(strategy="sliding_tile").keep is None  # not read by the window strategies


def test_permutation_gathers_scattered_semantic_keys_into_fewer_blocks() -> None:
    torch.manual_seed(0)
    layout = TokenLayout(num_tokens=128, grid=(2, 8, 8))
    kind = torch.randint(0, 4, (128,))  # four token classes scattered over the grid; attention stays in a class
    centre = 3 * torch.randn(4, 16)
    q, k = ((centre[kind] + 0.3 * torch.randn(128, 16)).expand(1, 2, 128, 16).contiguous() for _ in range(2))
    recall = {p: float(attention_recall(q, k, layout, SparseVideoConfig.from_options(keep=0.25, tile=(1, 4, 4),
                                                                                    permute=p)).mean())
              for p in ("none", "importance", "cluster")}
    assert recall["none"] < 0.35 and recall["cluster"] > 2 * recall["none"], recall
    assert float(attention_recall(q, k, layout, SparseVideoConfig.from_options(keep=1.0, tile=(1, 4, 4))).min()) == 1.0


def test_attention_recall_is_the_dense_mass_on_the_routed_blocks() -> None:
    q, k = torch.randn(2, 2, JOINT.num_tokens, 16), torch.randn(2, 2, JOINT.num_tokens, 16)
    config = SparseVideoConfig.from_options(keep=0.3, tile=(2, 4, 4))
    geo = geometry(JOINT.grid, JOINT.grid_start, JOINT.num_tokens, (2, 4, 4), torch.device("cpu"))
    attn = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
    # the reference's mask, read back from its output on one-hot values: v = identity picks each key's weight
    v = torch.eye(JOINT.num_tokens).expand(2, 2, -1, -1)
    masked = _reference(q, k, v, JOINT, config, 0.3)  # rows: the sparse attention weights
    kept = masked > 0
    grid_rows = geo.perm[:geo.num_grid]
    expected = (attn * kept)[:, :, grid_rows].sum(-1).mean(-1)
    torch.testing.assert_close(attention_recall(q, k, JOINT, config, scale=0.3), expected, rtol=1e-5, atol=1e-5)


def test_recall_meter_averages_the_recall_of_every_self_attention_call() -> None:
    from visattn.frameworks import diffusers as fw
    from visattn.patching import Patcher

    model, inputs, grid, ref = _model("wan")
    configs = {"dense": SparseVideoConfig.from_options(keep=1.0),
               "keep": SparseVideoConfig.from_options(keep=0.3, tile=(1, 2, 2)),
               "cluster": SparseVideoConfig.from_options(keep=0.3, tile=(1, 2, 2), permute="cluster"),
               "dense_layer": SparseVideoConfig.from_options(keep=0.3, tile=(1, 2, 2), dense_layers=1)}
    processors = dict(model.attn_processors)
    with RecallMeter(model, configs, samples=2) as meter:
        out = _run(model, inputs)
    assert torch.equal(out, ref) and model.attn_processors == processors  # it only observed
    seen, patcher = [], Patcher()  # the same calls captured independently
    selfs = [i for i, kind in enumerate(fw.layer_kinds(model)) if kind == "self"]
    fw.observe_attention(model, patcher, selfs, lambda layer, q, k, scale, mask: seen.append((q, k, scale)))
    _run(model, inputs)
    patcher.undo()
    layout = TokenLayout(num_tokens=math.prod(grid), grid=grid)
    per_call = {label: [attention_recall(q[:2], k[:2], layout, c, scale=s) for q, k, s in seen]
                for label, c in configs.items()}
    per_call["dense_layer"][0] = torch.ones_like(per_call["dense_layer"][0])  # the first self-attention runs dense
    expected = {label: float(torch.cat(calls).mean()) for label, calls in per_call.items()}
    means = meter.means()
    assert len(seen) == len(selfs) > 1 and means["dense"] == pytest.approx(1.0)
    assert means == pytest.approx(expected) and 0 < means["keep"] < means["dense_layer"] < 1
    with pytest.raises(UnsupportedModelError, match="RecallMeter: UNet2DConditionModel is not a family"):
        RecallMeter(BUILDERS["unet"]()[0], configs)


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
    with pytest.raises(OptionError, match=r"sparse_video: keep must be None \(0.25 for tile_topk, 0.5 for rectified\) "
                                          r"or a number in \(0, 1\] \(got 0\)"):
        visattn.apply(model, "sparse_video", keep=0)
    with pytest.raises(OptionError, match=r"keep must be .* a number in \(0, 1\] \(got 1.5\)"):
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
    with pytest.raises(OptionError, match=r"stride is read only with score='antidiagonal' \(got score='mean'\)"):
        visattn.apply(model, "sparse_video", stride=4)
    with pytest.raises(OptionError, match="score must be one of 'mean', 'antidiagonal'"):
        visattn.apply(model, "sparse_video", score="max")
    with pytest.raises(OptionError, match="permute must be one of 'none', 'importance', 'cluster'"):
        visattn.apply(model, "sparse_video", permute=True)
    with pytest.raises(OptionError, match="strategy 'sliding_tile' does not use permute"):
        visattn.apply(model, "sparse_video", strategy="sliding_tile", permute="cluster")
    with pytest.raises(OptionError, match=r"window_stride \(1, 3\) must have one value per axis of the window "
                                          r"\(2, 2\), each <= the window"):
        visattn.apply(model, "sparse_video", strategy="sliding_tile", window=(2, 2), window_stride=(1, 3))
    with pytest.raises(OptionError, match=r"window_dilation must be None \(1\), an int >= 1 or a tuple"):
        visattn.apply(model, "sparse_video", strategy="sliding_tile", window_dilation=0)
    with pytest.raises(OptionError, match=r"antidiagonal stride \(8\) must divide the block \(4 tokens, a tile's\)"):
        visattn.apply(model, "sparse_video", score="antidiagonal", tile=(2, 2))
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
