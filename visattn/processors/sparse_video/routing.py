"""The tile geometry of a token layout and one router per strategy: the kv blocks each grid query block visits.

:func:`geometry` permutes a layout's grid tokens into tile order and cuts them into blocks. ``ROUTERS``
maps each strategy to its router, which :func:`route_blocks` looks up: scored top-k / top-p routing
for ``tile_topk`` (VSA's coarse stage; top-p as in XAttention) and ``rectified`` (Rectified SpaAttn,
whose IPAR/GAPR correction of the sparse output, :func:`_rectify`, is here too), static tile windows for
``sliding_tile`` (STA) and static shared kv sets of tile groups for ``grat`` (GRAT). The package doc
(:mod:`visattn.processors.sparse_video`) gives the papers and equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.attention import per_query_head
from ...core.routing import (
    antidiagonal_scores,
    block_scores,
    diagonal_blocks,
    pool_blocks,
    select_topk,
    select_topp,
    tile_order,
)
from ...errors import ShapeError
from ...frameworks.base import constant
from .config import DEFAULT_WINDOW, SparseVideoConfig, axes

# ----------------------------------------------------------------------------------------------------------
# Geometry: the tile permutation of a layout and the static block lists of sliding_tile and grat


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a layout's grid sits and how its tokens are reordered: grid tokens in tile order, then the rest.

    ``perm[p]`` is the original index of the token at position ``p``; ``inverse`` undoes it.
    ``num_grid`` grid tokens form ``num_blocks`` blocks of ``block`` tokens (the last may be shorter).
    """

    perm: Tensor
    inverse: Tensor
    num_grid: int
    block: int
    tiles_per_dim: tuple[int, ...]
    block_tiles: Tensor  # float [num_blocks, num_tiles]: 1 where the block holds tokens of the tile
    own_block: Tensor    # bool [num_blocks, num_blocks]: the diagonal, always kept by tile_topk

    @property
    def num_blocks(self) -> int:
        return -(-self.num_grid // self.block)


@constant
def geometry(grid: tuple[int, ...], grid_start: int, num_tokens: int, tile: tuple[int, ...],
             device: torch.device) -> Geometry:
    order = tile_order(grid, tile, device=device)
    n_grid = order.num_tokens
    rest = torch.cat([torch.arange(grid_start, device=device),
                      torch.arange(grid_start + n_grid, num_tokens, device=device)])
    perm = torch.cat([order.perm + grid_start, rest])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(num_tokens, device=device)
    block = math.prod(tile)
    tile_of = torch.repeat_interleave(torch.arange(order.tile_sizes.numel(), device=device), order.tile_sizes,
                                      output_size=n_grid)
    block_tiles = torch.zeros(-(-n_grid // block), order.tile_sizes.numel(), device=device)
    block_tiles[torch.arange(n_grid, device=device) // block, tile_of] = 1.0
    tiles_per_dim = tuple(-(-g // t) for g, t in zip(grid, tile))
    own = diagonal_blocks(n_grid, n_grid, block, block, device)
    return Geometry(perm, inverse, n_grid, block, tiles_per_dim, block_tiles, own)


def _tile_coords(tiles_per_dim: tuple[int, ...], device: torch.device) -> Tensor:
    """``[num_tiles, ndim]`` coordinates of the tiles in raster order of the tile grid."""
    axes = torch.meshgrid(*(torch.arange(n, device=device) for n in tiles_per_dim), indexing="ij")
    return torch.stack([a.flatten() for a in axes], dim=-1)


def tile_relation(strategy: str, tiles_per_dim: tuple[int, ...], config: SparseVideoConfig,
                  device: torch.device) -> Tensor:
    """Boolean ``[W, num_tiles, num_tiles]``: query tile -> kv tiles, for sliding_tile (W windows) or grat (W=1).

    sliding_tile is GNA's window in tile units (package doc): along each axis, the tiles of one dilated
    sub-grid (same coordinate modulo ``window_dilation``) are cut into groups of ``window_stride``; a group
    shares the window of ``window`` sub-grid tiles centred on it (the lower one when off by half a tile),
    shifted inside the sub-grid. Stride and dilation 1 give STA's window centred on each tile.
    """
    c = _tile_coords(tiles_per_dim, device)
    dims = torch.tensor(tiles_per_dim, device=device)
    if strategy == "grat":
        diff = (c[:, None, :] - c[None, :, :]).abs()
        if config.grat_pattern == "surrounding":
            return (diff <= config.grat_radius).all(-1)[None]
        return ((diff != 0).sum(-1) <= 1)[None]
    windows = config.window or (DEFAULT_WINDOW,) * len(tiles_per_dim)
    windows = windows if isinstance(windows[0], tuple) else (windows,)
    ndim = len(tiles_per_dim)
    stride, dilation = axes(config.window_stride, ndim), axes(config.window_dilation, ndim)
    if len(stride) != ndim or len(dilation) != ndim:
        raise ShapeError(f"sparse_video: window_stride {config.window_stride} and window_dilation "
                         f"{config.window_dilation} must give one value per axis of the {ndim}D tile grid")
    s, d = torch.tensor(stride, device=device), torch.tensor(dilation, device=device)
    residue, u = c % d, c // d               # the dilated sub-grid of each tile, and its place there
    length = (dims - residue + d - 1) // d   # tiles of that sub-grid per axis
    same = residue[:, None, :] == residue[None, :, :]
    out = []
    for window in windows:
        if len(window) != ndim:
            raise ShapeError(f"sparse_video: window {window} does not match the {ndim}D tile grid")
        w = torch.minimum(torch.tensor(window, device=device), length)
        first = u // s * s                                   # first tile of the query tile's stride group
        group = torch.minimum(s, length - first)
        start = (first - (w - group + 1) // 2).clamp(min=0)  # the group centred in its window ...
        start = torch.minimum(start, length - w)             # ... shifted inside the sub-grid
        inside = same & (u[None, :, :] >= start[:, None, :]) & (u[None, :, :] < (start + w)[:, None, :])
        out.append(inside.all(-1))
    return torch.stack(out)


def _lists_from_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``[..., nqb, nkb]`` -> ``(kv_indices, kv_counts)`` int32, listed blocks first."""
    counts = mask.sum(-1)
    width = max(int(counts.max()), 1)
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), counts.to(torch.int32)


@constant
def static_lists(strategy: str, config: SparseVideoConfig, geo: Geometry) -> tuple[Tensor, Tensor, bool]:
    """sliding_tile / grat block lists ``[1, W, nb, max]``, ``[1, W, nb]`` and whether every block is listed."""
    device = geo.perm.device
    rel = tile_relation(strategy, geo.tiles_per_dim, config, device).float()
    mask = (geo.block_tiles @ rel @ geo.block_tiles.T) > 0  # [W, nb, nb]
    idx, cnt = _lists_from_mask(mask[None])
    return idx, cnt, bool(mask.all())


def is_dense(config: SparseVideoConfig, geo: Geometry) -> bool:
    """Whether ``config`` lists every kv block on this geometry (an identity setting)."""
    if config.strategy in ("tile_topk", "rectified"):
        if config.top_p is not None:
            return config.top_p >= 1.0
        return math.ceil(config.keep * geo.num_blocks) >= geo.num_blocks
    return static_lists(config.strategy, config, geo)[2]


# ----------------------------------------------------------------------------------------------------------
# Routers: one per strategy, each ``(qg, kg, config, geo, scale) -> (kv_indices, kv_counts)``

Router = Callable[[Tensor, Tensor, SparseVideoConfig, Geometry, float], tuple[Tensor, Tensor]]


def route_tile_topk(qg: Tensor, kg: Tensor, config: SparseVideoConfig, geo: Geometry, scale: float
                    ) -> tuple[Tensor, Tensor]:
    """tile_topk and rectified: each query block keeps its best-scored kv blocks, top-k or top-p; scored by pooled
    ``q . k`` (``score='mean'``) or by XAttention's antidiagonal mass (``score='antidiagonal'``)."""
    nb = geo.num_blocks
    with torch.no_grad():
        if config.score == "antidiagonal":
            scores = antidiagonal_scores(qg, kg, geo.block, config.antidiagonal_stride(), scale=scale)
        else:
            scores = block_scores(pool_blocks(qg, geo.block), pool_blocks(kg, geo.block), scale=scale)
        if config.top_p is not None:
            return select_topp(scores, config.top_p, keep=geo.own_block)
        return select_topk(scores, max(1, math.ceil(config.keep * nb)), keep=geo.own_block)


def _route_static(strategy: str, qg: Tensor, config: SparseVideoConfig, geo: Geometry) -> tuple[Tensor, Tensor]:
    """The :func:`static_lists` of ``strategy``, checked against the layer's heads."""
    idx, cnt, _ = static_lists(strategy, config, geo)
    if idx.shape[1] not in (1, qg.shape[1]):
        raise ShapeError(f"sparse_video: window gives {idx.shape[1]} per-head windows, the layer has "
                         f"{qg.shape[1]} heads")
    return idx, cnt


def route_sliding_tile(qg: Tensor, kg: Tensor, config: SparseVideoConfig, geo: Geometry, scale: float
                       ) -> tuple[Tensor, Tensor]:
    """sliding_tile: the blocks of the window of tiles around each query tile (one window, or one per head)."""
    return _route_static("sliding_tile", qg, config, geo)


def route_grat(qg: Tensor, kg: Tensor, config: SparseVideoConfig, geo: Geometry, scale: float
               ) -> tuple[Tensor, Tensor]:
    """grat: the blocks of the kv set each query tile shares (surrounding or criss_cross tiles)."""
    return _route_static("grat", qg, config, geo)


ROUTERS: dict[str, Router] = {
    "tile_topk": route_tile_topk,
    "rectified": route_tile_topk,  # routes as tile_topk; _rectify then corrects the sparse output
    "sliding_tile": route_sliding_tile,
    "grat": route_grat,
}


def route_blocks(qg: Tensor, kg: Tensor, config: SparseVideoConfig, geo: Geometry, scale: float
                 ) -> tuple[Tensor, Tensor]:
    """kv block lists of the grid query blocks, ``[B|1, H|1, nb, max]`` and ``[B|1, H|1, nb]`` int32."""
    return ROUTERS[config.strategy](qg, kg, config, geo, scale)


# ----------------------------------------------------------------------------------------------------------
# rectified: Rectified SpaAttn's correction of the sparse output (IPAR, GAPR)


def _rectify(out: Tensor, qg: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, geo: Geometry,
             scale: float) -> Tensor:
    """IPAR and GAPR (package doc), in place on the sparse output ``out`` of the grid queries.

    ``k``, ``v``: the grid keys then the (always attended) text keys, as the kernel saw them.
    """
    b, h, ng, d = qg.shape
    nb, blk = geo.num_blocks, geo.block
    kg, vg, kt = k[:, :, :ng], v[:, :, :ng], k[:, :, ng:]
    with torch.no_grad():
        q_pool = pool_blocks(qg, blk).float()                                        # [B, H, nb, D]
        k_pool, v_pool = pool_blocks(kg, blk).float(), pool_blocks(vg, blk).float()  # [B, Hkv, nb, D]
        k_sq = pool_blocks(torch.linalg.vector_norm(kg, dim=-1, dtype=torch.float32).square()[..., None], blk)
        spread = (k_sq[..., 0] - k_pool.square().sum(-1)).clamp(min=0)              # mean |k - k_j|^2
        k_pool, v_pool, spread, kt = (per_query_head(t, h, "rectified") for t in (k_pool, v_pool, spread, kt))
        sizes = torch.full((nb,), float(blk), device=qg.device)
        sizes[-1] = ng - (nb - 1) * blk
        p = torch.cat([q_pool @ k_pool.transpose(-1, -2) * scale + sizes.log(),
                       q_pool @ kt.float().transpose(-1, -2) * scale], dim=-1).softmax(-1)
        p_grid = p[..., :nb]                                                         # [B, H, nb, nb]
        listed = torch.arange(idx.shape[-1], device=qg.device) < cnt.unsqueeze(-1)
        kept = torch.zeros(*p_grid.shape[:3], nb + 1, dtype=torch.bool, device=qg.device)
        kept.scatter_(-1, torch.where(listed, idx.long(), nb).expand(*p_grid.shape[:3], idx.shape[-1]), True)
        kept = kept[..., :nb]
        ratio = (p_grid * kept).sum(-1) + p[..., nb:].sum(-1)                       # IPAR: reference kept mass
        # GAPR: logit variance of block j seen from q_i, isotropic estimate scale^2 |q_i|^2 |k - k_j|^2 / D;
        # the pooled mass is then off by a factor ~exp(variance / 2): add the block where that error < the gain
        variance = scale ** 2 * q_pool.square().sum(-1, keepdim=True) * spread[:, :, None, :] / d
        added = (p_grid * (~kept & (variance / 2 < math.log(2.0)))) @ v_pool        # [B, H, nb, D]
    full = ng // blk
    ratio, added = ratio.to(out.dtype), added.to(out.dtype)
    if out.requires_grad:  # the kernel saved its output for the backward pass
        out = out.clone()
    head = out[:, :, :full * blk].unflatten(2, (full, blk))
    head.mul_(ratio[:, :, :full, None, None]).add_(added[:, :, :full, None, :])
    if ng > full * blk:
        out[:, :, full * blk:].mul_(ratio[:, :, full:, None]).add_(added[:, :, full:])
    return out
