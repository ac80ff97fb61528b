"""Routing helpers: block pooling, scores, top-k / top-p selection, and raster <-> tile orders."""

from __future__ import annotations

import pytest
import torch

from visattn.core.attention import check_block_lists
from visattn.core.routing import (
    antidiagonal_scores,
    block_scores,
    diagonal_blocks,
    pool_blocks,
    route,
    select_topk,
    select_topp,
    tile_order,
)
from visattn.errors import OptionError, ShapeError


def test_pool_blocks_averages_each_block_including_a_ragged_tail():
    x = torch.randn(2, 3, 70, 8)
    pooled = pool_blocks(x, 16)
    assert pooled.shape == (2, 3, 5, 8) and pooled.dtype == torch.float32
    for i, (start, end) in enumerate([(0, 16), (16, 32), (32, 48), (48, 64), (64, 70)]):
        torch.testing.assert_close(pooled[:, :, i], x[:, :, start:end].mean(dim=2))
    half = pool_blocks(x[:, :, :64].bfloat16(), 16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), x[:, :, :64].bfloat16().float().view(2, 3, 4, 16, 8).mean(dim=3),
                               atol=1e-2, rtol=1e-2)


def test_block_scores_match_the_pooled_affinity_and_share_grouped_kv_heads():
    q, k = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 5, 16)
    scores = block_scores(q, k, scale=0.5)
    assert scores.shape == (1, 4, 6, 5)
    torch.testing.assert_close(scores[:, 3], q[:, 3] @ k[:, 1].transpose(-1, -2) * 0.5)
    with pytest.raises(ShapeError, match="multiple of kv heads"):
        block_scores(q, torch.randn(1, 3, 5, 16))


def _antidiagonal_mass(q: torch.Tensor, k: torch.Tensor, block: int, stride: int, scale: float) -> torch.Tensor:
    """XAttention's block mass by its definition, one S x S square at a time (zeros past the ends)."""
    n, nk = q.shape[2], k.shape[2]
    groups_q, groups_k = -(-n // stride), -(-nk // stride)
    qp = torch.cat([q, q.new_zeros(*q.shape[:2], groups_q * stride - n, q.shape[3])], dim=2)
    kp = torch.cat([k, k.new_zeros(*k.shape[:2], groups_k * stride - nk, k.shape[3])], dim=2)
    sums = torch.zeros(*q.shape[:2], groups_q, groups_k)
    for r in range(groups_q):
        for c in range(groups_k):
            for s in range(stride):  # lower left to upper right
                sums[:, :, r, c] += (qp[:, :, r * stride + stride - 1 - s] * kp[:, :, c * stride + s]).sum(-1)
    p = (sums * scale / stride).softmax(-1)
    mass = torch.zeros(*q.shape[:2], -(-n // block), -(-nk // block))
    for r in range(groups_q):
        for c in range(groups_k):
            mass[:, :, r * stride // block, c * stride // block] += p[:, :, r, c]
    return mass


@pytest.mark.parametrize("n, nk, block, stride", [(64, 64, 16, 4), (70, 53, 16, 8), (37, 37, 8, 8)])
def test_antidiagonal_scores_are_the_log_mass_of_strided_antidiagonals(n, nk, block, stride):
    q, k = torch.randn(2, 3, n, 8), torch.randn(2, 3, nk, 8)
    scores = antidiagonal_scores(q, k, block, stride, scale=0.5)
    torch.testing.assert_close(scores.exp(), _antidiagonal_mass(q, k, block, stride, 0.5), rtol=1e-5, atol=1e-6)
    chunked = antidiagonal_scores(q, k, block, stride, scale=0.5, max_elements=64)  # one query block at a time
    torch.testing.assert_close(chunked, scores, rtol=1e-5, atol=1e-5)
    # each query block's mass sums to its number of query groups
    torch.testing.assert_close(scores.exp().sum(-1)[0, 0, 0], torch.tensor(block / stride))


def test_antidiagonal_scores_share_grouped_kv_heads_and_check_the_stride():
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    grouped, alone = antidiagonal_scores(q, k, 8, 4), antidiagonal_scores(q[:, 3:], k[:, 1:], 8, 4)
    torch.testing.assert_close(grouped[:, 3], alone[:, 0])
    with pytest.raises(ShapeError, match=r"the stride \(3\) must divide the block \(8 tokens\)"):
        antidiagonal_scores(q, k, 8, 3)


def test_select_topk_picks_the_highest_scores_and_forced_blocks():
    scores = torch.randn(2, 3, 7, 9)
    idx, cnt = select_topk(scores, 3)
    assert idx.dtype == torch.int32 and idx.shape == (2, 3, 7, 3) and bool((cnt == 3).all())
    want = scores.topk(3, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx.long().sort(dim=-1).values, want)
    keep = diagonal_blocks(7 * 16, 9 * 16, 16, 16)
    idx, cnt = select_topk(scores, 2, keep=keep)
    assert all(i in idx[b, h, i].tolist() for b in range(2) for h in range(3) for i in range(7))
    check_block_lists(idx, cnt, batch=2, heads=3, num_q_blocks=7, num_kv_blocks=9)
    idx, cnt = select_topk(scores, 50)  # more than there are: every block
    assert idx.shape[-1] == 9 and bool((cnt == 9).all())
    with pytest.raises(OptionError, match="topk must be an int >= 1"):
        select_topk(scores, 0)


def test_select_topp_keeps_the_fewest_blocks_that_reach_the_mass():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).view(1, 1, 1, 4)
    for p, n in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.99, 4), (1.0, 4)]:
        idx, cnt = select_topp(scores, p)
        assert int(cnt) == n, (p, int(cnt))
        assert idx[0, 0, 0, :n].tolist() == [0, 1, 2, 3][:n]
    keep = torch.tensor([False, False, False, True]).view(1, 1, 1, 4)
    idx, cnt = select_topp(scores, 0.5, keep=keep)
    assert int(cnt) == 2 and idx[0, 0, 0, :2].tolist() == [3, 0]
    rand = torch.randn(2, 2, 5, 6)
    idx, cnt = select_topp(rand, 0.7)
    check_block_lists(idx, cnt, batch=2, heads=2, num_q_blocks=5, num_kv_blocks=6)
    with pytest.raises(OptionError, match=r"topp must lie in \(0, 1\]"):
        select_topp(rand, 0.0)


def test_diagonal_blocks_mark_overlapping_token_ranges():
    assert torch.equal(diagonal_blocks(48, 48, 16, 16), torch.eye(3, dtype=torch.bool))
    diag = diagonal_blocks(40, 40, 16, 8)  # q blocks [0,16) [16,32) [32,40); kv blocks of 8
    assert diag.tolist() == [[True, True, False, False, False], [False, False, True, True, False],
                             [False, False, False, False, True]]


def test_route_at_full_topk_keeps_every_block_and_needs_one_rule():
    q, k = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    r = route(q, k, block_q=16, block_k=16, topk=4, keep_diagonal=True)
    assert r.kept_fraction == 1.0 and r.kv_indices.shape == (1, 2, 4, 4)
    r = route(q, k, block_q=16, block_k=16, topk=1, keep_diagonal=True)
    assert torch.equal(r.kv_indices[0, :, :, 0].long(), torch.arange(4).expand(2, 4))
    with pytest.raises(OptionError, match="exactly one of topk and topp"):
        route(q, k, block_q=16, block_k=16)


@pytest.mark.parametrize("grid, tile", [((6, 8), (2, 4)), ((7, 10), (3, 4)), ((3, 5, 7), (2, 2, 3)),
                                        ((1, 9, 9), (1, 4, 4))])
def test_tile_order_groups_tiles_and_round_trips(grid, tile):
    order = tile_order(grid, tile)
    n = order.num_tokens
    assert sorted(order.perm.tolist()) == list(range(n))
    assert int(order.tile_sizes.sum()) == n
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).view(n, len(grid))
    tile_of = (coords // torch.tensor(tile)).tolist()
    tiled = [tuple(tile_of[i]) for i in order.perm.tolist()]
    start = 0
    for size in order.tile_sizes.tolist():  # each tile's tokens are contiguous and in raster order
        assert len(set(tiled[start:start + size])) == 1
        members = order.perm[start:start + size]
        assert torch.equal(members, members.sort().values)
        start += size
    assert tiled == sorted(tiled)  # tiles in raster order of the tile grid
    x = torch.randn(2, n, 3)
    assert torch.equal(order.to_raster(order.to_tiles(x)), x)
    y = torch.randn(2, 4, n + 3)  # one prefix token, two trailing ones, along the last dim
    z = order.to_tiles(y, dim=-1, start=1)
    assert torch.equal(z[..., 0], y[..., 0]) and torch.equal(z[..., -2:], y[..., -2:])
    assert torch.equal(order.to_raster(z, dim=-1, start=1), y)


def test_tile_order_edge_tiles_are_smaller():
    order = tile_order((5, 7), (2, 3))
    assert order.tile_sizes.tolist() == [6, 6, 2, 6, 6, 2, 3, 3, 1]
    assert order.perm[:6].tolist() == [0, 1, 2, 7, 8, 9]


def test_bad_routing_arguments_raise():
    with pytest.raises(ShapeError, match=r"\(h, w\) or \(t, h, w\)"):
        tile_order((4,), (2,))
    with pytest.raises(ShapeError, match="do not fit"):
        tile_order((2, 2), (1, 1)).to_tiles(torch.randn(3, 2), dim=0)
    with pytest.raises(ShapeError, match="block must be >= 1"):
        pool_blocks(torch.randn(4, 2), 0)
