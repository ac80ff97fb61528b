"""``sparse_video`` — block-sparse self-attention for diffusion transformers (Wan, CogVideoX,
HunyuanVideo, Flux, SD3).

Every strategy is a routing rule on one token layout and one kernel
(:mod:`visattn.kernels.block_sparse`). The grid tokens of a layer are permuted from raster order into
tile order (:func:`visattn.core.routing.tile_order`: ``tile`` = 4x4x4 for video, 8x8 for images;
grids the tile does not divide get smaller edge tiles, nothing is padded), and a block is a run of
``prod(tile)`` consecutive tokens in that order — one tile where the tile divides the grid. For each
query block, a strategy lists the kv blocks it visits:

- ``tile_topk`` — VSA (Zhang et al., "Faster Video Diffusion with Trainable Sparse Attention",
  2025), coarse stage, used training-free: tile queries and keys are the means of q and k over a
  block, ``S = scale * Q_t K_t^T`` (the coarse attention logits), and each query block keeps its
  ``ceil(keep * n_blocks)`` best kv blocks, or with ``top_p`` the fewest whose ``softmax(S)`` mass
  reaches ``top_p`` (XAttention-style). Its own block is always kept. The fine stage is the kernel.
- ``rectified`` — Rectified SpaAttn (2025) on top of ``tile_topk``. The pooled map
  ``P = softmax_j(scale * q_i . k_j + log n_j)`` over pooled kv blocks ``j`` (``n_j`` tokens each)
  and the text keys is the implicit full-attention reference. Isolated-pooling attention
  reallocation (IPAR): the sparse output, normalised over the kept keys only, is rescaled by the
  reference's kept mass ``r_i = sum_{j kept} P_ij``. Gain-aware pooling rectification (GAPR): a
  dropped block adds its pooled contribution ``P_ij * v_j`` (``v_j`` the mean of v over the block)
  where the gain beats the pooling error. Pooling replaces ``sum_y exp(logit_y)`` by
  ``n_j * exp(mean logit)``, off by a factor ``~exp(var / 2)`` for logits of variance ``var`` inside
  the block; with isotropic keys ``var = scale^2 |q_i|^2 d_j / D`` (``d_j`` = mean squared distance of
  the block's keys from their mean), so the block is added when the relative error
  ``exp(var / 2) - 1`` is below the relative gain 1, i.e. ``var / 2 < ln 2``. The paper's exact error
  estimate differs; this is our reading of its condition.
- ``sliding_tile`` — STA (sliding tile attention): each query tile attends to the ``window`` of
  kv tiles around it (in tiles, per axis), shifted inwards at the grid's border so that every tile
  sees the same number of tiles; one window for all heads or one per head.
- ``grat`` — GRAT ("Grouping First, Attending Smartly", 2025): the query tokens of a tile (a
  contiguous group) share one kv set: the ``surrounding`` tiles (Chebyshev distance
  ``<= grat_radius`` in tiles, not shifted at the border) or ``criss_cross``: the tiles on the
  three lines through the query tile (tiles that differ from it in at most one tile coordinate;
  row and column in 2D).

Where a block covers several tiles (ragged edges), it visits the union of their kv tiles' blocks.

Text tokens (Flux and CogVideoX put them first, SD3 and HunyuanVideo last; any token of the joint
sequence outside the grid) are always attended and always attend: grid queries see them through the
kernel's always-attended ranges, text queries run dense SDPA over the whole sequence. A key-padding
mask (HunyuanVideo's text mask, per sample) is honoured exactly: masked text keys are left out of each
sample's kv sequence. Masks on grid keys are not supported (error). Layers that are not self- or joint
attention over a grid stay stock: Wan's cross-attention and HunyuanVideo's token refiner.

Schedule: the first ``dense_steps`` denoising steps and the first ``dense_layers`` sparse-eligible
layers (self/joint attention over a grid, in execution order) run stock attention. A step is a
distinct timestep: repeated calls at one timestep (classifier-free guidance run as two calls) are one
step, and a timestep larger than the last one starts a new generation at step 0.

Options and identity values: ``strategy`` ('tile_topk'); ``keep`` (0.25; identity 1.0) and ``top_p``
(None; identity 1.0) for tile_topk and rectified; ``tile`` (None: 4x4x4 / 8x8); ``window`` (None:
3 tiles per axis; identity: the tile grid's size) for sliding_tile; ``grat_pattern`` ('surrounding')
and ``grat_radius`` (1; identity: >= the tile grid's largest side, surrounding) for grat;
``dense_steps`` (0), ``dense_layers`` (0); ``strict`` (False: the PyTorch reference is used, logged
once, where the Triton kernel cannot run); ``install`` ('processor'; 'attention_backend' for diffusers'
context parallelism, see :mod:`visattn.processors.sparse_video.backend`). At an identity setting the
layer calls stock SDPA itself, so the output is bit-identical to stock.

Installation (diffusers): ``visattn.apply(pipe_or_model, "sparse_video", ...)`` or
``model.set_attn_processor(visattn.diffusers.SparseVideoAttnProcessor(model, ...))``; see
:class:`SparseVideoAttnProcessor` for why the processor keeps the stock processors' math.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...core.layout import TokenLayout
from ...core.routing import (
    block_scores,
    diagonal_blocks,
    pool_blocks,
    select_topk,
    select_topp,
    take_tokens,
    tile_order,
    token_words,
)
from ...errors import OptionError, ShapeError, UnsupportedModelError
from ...kernels import block_sparse_attention
from ...options import Option, bool_option, check_scope, choice_option, float_option, int_option, validate_options
from ...patching import Patcher

STRATEGIES = ("tile_topk", "rectified", "sliding_tile", "grat")
GRAT_PATTERNS = ("surrounding", "criss_cross")
FAMILIES = ("WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel",
            "FluxTransformer2DModel", "SD3Transformer2DModel")
DEFAULT_TILE = {3: (4, 4, 4), 2: (8, 8)}
DEFAULT_WINDOW = 3


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError
    t = tuple(v)
    if len(t) not in (2, 3) or not all(_is_int(i) and i >= 1 for i in t):
        raise ValueError
    return t


def _check_tile(v: Any) -> tuple[int, ...] | None:
    return None if v is None else _int_tuple(v)


def _check_window(v: Any) -> tuple[int, ...] | tuple[tuple[int, ...], ...] | None:
    if v is None:
        return None
    if isinstance(v, Sequence) and v and all(isinstance(w, Sequence) for w in v):
        per_head = tuple(_int_tuple(w) for w in v)
        if len({len(w) for w in per_head}) != 1:
            raise ValueError
        return per_head
    return _int_tuple(v)


def _check_top_p(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError
    return float(v)


_ROUTED = ("tile_topk", "rectified")  # the strategies that score block pairs and keep the best
OPTIONS: tuple[Option, ...] = (
    choice_option("strategy", "tile_topk", STRATEGIES, doc="routing rule (see the module doc)"),
    float_option("keep", 0.25, low=0, high=1, low_open=True, identity=1.0,
                 doc="tile_topk/rectified: fraction of kv blocks each query block visits").scoped(strategies=_ROUTED),
    Option("top_p", None, "None or a number in (0, 1]", _check_top_p, identity=1.0, strategies=_ROUTED,
           doc="tile_topk/rectified: keep the fewest blocks whose coarse softmax mass reaches top_p (replaces keep)"),
    Option("tile", None, "None (4x4x4 for video, 8x8 for images) or a tuple of 2 or 3 ints >= 1", _check_tile,
           doc="tile shape in tokens (t, h, w) or (h, w); a block is one tile's worth of tokens"),
    Option("window", None, "None (3 tiles per axis), a tuple of 2 or 3 ints >= 1, or one such tuple per head",
           _check_window, strategies=("sliding_tile",),
           doc="sliding_tile: window in tiles per axis (identity: the tile grid's size)"),
    choice_option("grat_pattern", "surrounding", GRAT_PATTERNS,
                  doc="grat: shared kv set of a tile group").scoped(strategies=("grat",)),
    int_option("grat_radius", 1, low=0,
               doc="grat surrounding: radius in tiles (identity: the tile grid's side)").scoped(strategies=("grat",)),
    int_option("dense_steps", 0, low=0, doc="first denoising steps (distinct timesteps) run dense"),
    int_option("dense_layers", 0, low=0, doc="first sparse-eligible attention layers run dense"),
    bool_option("strict", False, doc="raise instead of falling back to the PyTorch reference"),
)
INSTALLS = ("processor", "attention_backend")
INSTALL = choice_option("install", "processor", INSTALLS,
                        doc="'processor': attention processors around the stock ones; 'attention_backend': the "
                            "diffusers attention backend 'visattn_sparse', which context parallelism (Ulysses) "
                            "wraps (visattn.processors.sparse_video.backend)")


@dataclass(frozen=True)
class SparseVideoConfig:
    """The validated options of ``sparse_video`` (see the module doc)."""

    strategy: str = "tile_topk"
    keep: float = 0.25
    top_p: float | None = None
    tile: tuple[int, ...] | None = None
    window: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    grat_pattern: str = "surrounding"
    grat_radius: int = 1
    dense_steps: int = 0
    dense_layers: int = 0
    strict: bool = False

    @classmethod
    def from_options(cls, **options: Any) -> SparseVideoConfig:
        """The config of ``options`` as given; an option the chosen strategy does not read is an error."""
        values = validate_options("sparse_video", OPTIONS, options)
        check_scope("sparse_video", OPTIONS, options, "diffusers")
        return cls(**values)

    @classmethod
    def resolve(cls, config: SparseVideoConfig | None, options: dict[str, Any]) -> SparseVideoConfig:
        """``config`` (checked already, as ``visattn.apply`` does) or the config of ``options``, not both."""
        if config is None:
            return cls.from_options(**options)
        if options:
            raise OptionError(f"sparse_video: give a config or options, not both (got config and {sorted(options)})")
        return config

    def tile_for(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        tile = self.tile or DEFAULT_TILE[len(grid)]
        if len(tile) != len(grid):
            raise ShapeError(f"sparse_video: tile {tile} cannot cover the {'x'.join(map(str, grid))} token grid; "
                             f"give a tile with {len(grid)} sides")
        return tile


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


@lru_cache(maxsize=64)
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
    tile_of = torch.repeat_interleave(torch.arange(order.tile_sizes.numel(), device=device), order.tile_sizes)
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
    """Boolean ``[W, num_tiles, num_tiles]``: query tile -> kv tiles, for sliding_tile (W windows) or grat (W=1)."""
    c = _tile_coords(tiles_per_dim, device)
    dims = torch.tensor(tiles_per_dim, device=device)
    if strategy == "grat":
        diff = (c[:, None, :] - c[None, :, :]).abs()
        if config.grat_pattern == "surrounding":
            return (diff <= config.grat_radius).all(-1)[None]
        return ((diff != 0).sum(-1) <= 1)[None]
    windows = config.window or (DEFAULT_WINDOW,) * len(tiles_per_dim)
    windows = windows if isinstance(windows[0], tuple) else (windows,)
    out = []
    for window in windows:
        if len(window) != len(tiles_per_dim):
            raise ShapeError(f"sparse_video: window {window} does not match the {len(tiles_per_dim)}D tile grid")
        w = torch.minimum(torch.tensor(window, device=device), dims)
        start = torch.minimum((c - w // 2).clamp(min=0), dims - w)  # [num_tiles, ndim], shifted inside
        inside = (c[None, :, :] >= start[:, None, :]) & (c[None, :, :] < (start + w)[:, None, :])
        out.append(inside.all(-1))
    return torch.stack(out)


def _lists_from_mask(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean ``[..., nqb, nkb]`` -> ``(kv_indices, kv_counts)`` int32, listed blocks first."""
    counts = mask.sum(-1)
    width = max(int(counts.max()), 1)
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    return order.to(torch.int32).contiguous(), counts.to(torch.int32)


@lru_cache(maxsize=64)
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
# The attention


def route_blocks(qg: Tensor, kg: Tensor, config: SparseVideoConfig, geo: Geometry, scale: float
                 ) -> tuple[Tensor, Tensor]:
    """kv block lists of the grid query blocks, ``[B|1, H|1, nb, max]`` and ``[B|1, H|1, nb]`` int32."""
    if config.strategy in ("sliding_tile", "grat"):
        idx, cnt, _ = static_lists(config.strategy, config, geo)
        if idx.shape[1] not in (1, qg.shape[1]):
            raise ShapeError(f"sparse_video: window gives {idx.shape[1]} per-head windows, the layer has "
                             f"{qg.shape[1]} heads")
        return idx, cnt
    nb = geo.num_blocks
    with torch.no_grad():
        scores = block_scores(pool_blocks(qg, geo.block), pool_blocks(kg, geo.block), scale=scale)
        if config.top_p is not None:
            return select_topp(scores, config.top_p, keep=geo.own_block)
        return select_topk(scores, max(1, math.ceil(config.keep * nb)), keep=geo.own_block)


def _rectify(out: Tensor, qg: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor, geo: Geometry,
             scale: float) -> Tensor:
    """IPAR and GAPR (module doc), in place on the sparse output ``out`` of the grid queries.

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
        if k_pool.shape[1] != h:
            rep = h // k_pool.shape[1]
            k_pool, v_pool, spread, kt = (t.repeat_interleave(rep, dim=1) for t in (k_pool, v_pool, spread, kt))
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


def _attend_grid(qg: Tensor, k: Tensor, v: Tensor, config: SparseVideoConfig, geo: Geometry,
                 scale: float) -> Tensor:
    """Grid queries over grid blocks (routed) and every other key of ``k``, ``v`` (always attended)."""
    ng = geo.num_grid
    idx, cnt = route_blocks(qg, k[:, :, :ng], config, geo, scale)
    always = [(ng, k.shape[2])] if k.shape[2] > ng else None
    out = block_sparse_attention(qg, k, v, idx, cnt, block_q=geo.block, block_k=geo.block, scale=scale,
                                 always_kv=always, strict=config.strict, check_values=False)
    if config.strategy == "rectified":
        out = _rectify(out, qg, k, v, idx, cnt, geo, scale)
    return out


def key_padding(mask: Tensor | None, batch: int, num_kv: int) -> Tensor | None:
    """An SDPA mask that only masks keys, as boolean ``[B, N]`` (True = attend); ``None`` if it masks nothing.

    Raises :class:`ShapeError` for masks that depend on the query or the head, or float masks that are
    not 0 / -inf.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == float("-inf"))).all()):
            raise ShapeError("sparse_video: float attention masks must hold only 0 and -inf")
        mask = mask == 0
    m = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if m.shape[1] != 1 or m.shape[2] != 1:
        if not bool((m == m[:, :1, :1]).all()):
            raise ShapeError(f"sparse_video: only key-padding attention masks are supported (got a mask of shape "
                             f"{tuple(mask.shape)} that varies over heads or queries)")
        m = m[:, :1, :1]
    m = m[:, 0, 0].expand(batch, num_kv)
    return None if bool(m.all()) else m


def _attend_text(qt: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Text queries attend densely to every key, as in stock."""
    if qt.shape[2] == 0:
        return qt
    return F.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != qt.shape[1])


def sparse_video_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, config: SparseVideoConfig, *,
                           scale: float | None = None, attn_mask: Tensor | None = None) -> Tensor:
    """Sparse self-attention of a ``[B, H, N, D]`` sequence laid out as ``layout`` (grid plus text tokens).

    Grid queries follow ``config.strategy``; non-grid (text) tokens are always attended and attend
    densely. ``attn_mask`` may mask keys only (per sample); grid keys must not be masked.
    """
    if layout.grid is None:
        raise ShapeError("sparse_video: the layer's token layout has no grid")
    n = q.shape[2]
    if n != layout.num_tokens or k.shape[2] != n:
        raise ShapeError(f"sparse_video: expected {layout.num_tokens} query and key tokens for grid {layout.grid} "
                         f"and {layout.num_text_tokens} text tokens; got {n} and {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    geo = geometry(tuple(layout.grid), layout.grid_start, n, config.tile_for(layout.grid), q.device)
    ng = geo.num_grid
    qp, kp, vp = (take_tokens(t, geo.perm) for t in (q, k, v))
    keys = key_padding(attn_mask, q.shape[0], n)
    if keys is None:
        out_grid = _attend_grid(qp[:, :, :ng], kp, vp, config, geo, scale)
        out_text = _attend_text(qp[:, :, ng:], kp, vp, None, scale)
    else:
        keys = keys[:, geo.perm]
        if not bool(keys[:, :ng].all()):
            raise ShapeError("sparse_video: the attention mask masks grid tokens; only text keys may be masked")
        out_grid = torch.empty_like(qp[:, :, :ng])
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(keys.cpu()):
            groups.setdefault(tuple(row.nonzero().flatten().tolist()), []).append(i)
        for kept_keys, samples in groups.items():
            sel, cols = torch.tensor(samples, device=q.device), torch.tensor(kept_keys, device=q.device)
            out_grid[sel] = _attend_grid(qp[sel, :, :ng], kp[sel][:, :, cols], vp[sel][:, :, cols], config, geo,
                                         scale)
        out_text = _attend_text(qp[:, :, ng:], kp, vp, keys[:, None, None, :], scale)
    if ng == n:
        return take_tokens(out_grid, geo.inverse)
    out = out_grid.new_empty(*out_grid.shape[:2], n, out_grid.shape[3])
    for part, index in ((out_grid, geo.perm[:ng]), (out_text, geo.perm[ng:])):
        token_words(out).index_copy_(2, index, token_words(part.contiguous()))
    return out


# ----------------------------------------------------------------------------------------------------------
# diffusers


def _sparse_sdpa(layout: TokenLayout, config: SparseVideoConfig) -> Any:
    """An SDPA interception that answers the layer's self/joint-attention call with :func:`sparse_video_attention`."""
    from ...frameworks.diffusers import SDPAIntercept

    def answer(call: dict[str, Any]) -> Tensor | None:
        q, k = call["query"], call["key"]
        if (q.shape[-2] != k.shape[-2] or q.shape[-2] != layout.num_tokens or call.get("is_causal")
                or call.get("dropout_p")):
            return None
        return sparse_video_attention(q, k, call["value"], layout, config, scale=call.get("scale"),
                                      attn_mask=call.get("attn_mask"))

    return SDPAIntercept(answer)


class SparseVideoSchedule:
    """Which attention layers of one diffusers model run sparse in the current call, and with what token layout.

    Both installations of ``sparse_video`` — :class:`SparseVideoAttnProcessor` and the attention backend
    (:mod:`visattn.processors.sparse_video.backend`) — ask it, because neither a processor call nor a backend
    call carries the token grid, the denoising step or the layer index. Construction checks the model family
    and the tile, and installs :func:`visattn.frameworks.diffusers.install_context` (hooks undone by
    ``patcher``): the grid and text length of each denoiser call, the running attention layer, the timestep.
    """

    def __init__(self, model: nn.Module, config: SparseVideoConfig, patcher: Patcher) -> None:
        from ...frameworks import diffusers as fw

        family = type(model).__name__
        if family not in FAMILIES:
            raise UnsupportedModelError(f"sparse_video does not support the diffusers model {family}; supported: "
                                        f"{', '.join(FAMILIES)}")
        rank = 3 if family in FAMILIES[:3] else 2
        if config.tile is not None and len(config.tile) != rank:
            raise ShapeError(f"sparse_video: tile {config.tile} cannot cover the {rank}D token grid of "
                             f"{family}; give a tile with {rank} sides")
        windows = () if config.window is None else (
            config.window if isinstance(config.window[0], tuple) else (config.window,))
        if any(len(w) != rank for w in windows):
            raise ShapeError(f"sparse_video: window {config.window} does not match the {rank}D token grid of "
                             f"{family}; give windows of {rank} sides")
        self.config = config
        self._fw = fw
        self._model = model
        self._layouts: dict[tuple, TokenLayout] = {}
        self.eligible: dict[int, int] = {}  # layer index -> position among the layers sparse attention may replace
        for index, (name, module) in enumerate(fw.attention_layers(model)):
            layout = fw.token_layout(model, index, (1,) * rank, 1)
            if layout.grid is not None and not getattr(module, "is_cross_attention", False):
                self.eligible[index] = len(self.eligible)
                heads = getattr(module, "heads", None)
                if len(windows) > 1 and heads is not None and len(windows) != heads:
                    raise ShapeError(f"sparse_video: window gives {len(windows)} per-head windows, and attention "
                                     f"layer {name} has {heads} heads; give one window, or one per head")
        self._ctx = fw.install_context(model, patcher)
        self._call, self._step, self._timestep = -1, -1, None

    @property
    def running_layer(self) -> int | None:
        """Index of the attention layer running now (``None`` outside attention layers)."""
        return self._ctx.layer

    def _denoising_step(self) -> int:
        if self._ctx.step != self._call:
            self._call = self._ctx.step
            t = self._ctx.timestep
            t = None if t is None else float(torch.as_tensor(t).flatten()[0])
            if t is None or self._timestep is None or t > self._timestep:
                self._step = 0
            elif t < self._timestep:
                self._step += 1
            self._timestep = t
        return self._step

    def layout(self, index: int, device: torch.device) -> TokenLayout | None:
        """The token layout of layer ``index`` in the current call if it runs sparse now, else ``None``.

        ``None``: not self/joint attention over a grid, no denoiser call seen, a dense layer or step of the
        schedule, or an identity setting on this call's geometry (so that stock attention runs bit for bit).
        """
        eligible = self.eligible.get(index)
        extra = self._ctx.extra
        if (eligible is None or extra is None or eligible < self.config.dense_layers
                or (self.config.dense_steps and self._denoising_step() < self.config.dense_steps)):
            return None
        key = (index, tuple(extra["grid"]), extra["text_tokens"])
        if key not in self._layouts:
            self._layouts[key] = self._fw.token_layout(self._model, index, extra["grid"], extra["text_tokens"])
        layout = self._layouts[key]
        geo = geometry(tuple(layout.grid), layout.grid_start, layout.num_tokens, self.config.tile_for(layout.grid),
                       device)
        return None if is_dense(self.config, geo) else layout


@dataclass
class _Layer:
    index: int
    name: str
    stock: Any
    stock_params: frozenset[str]


class SparseVideoAttnProcessor:
    """A diffusers attention processor running ``sparse_video`` (module doc) in the layers of one model.

    ``model.set_attn_processor(SparseVideoAttnProcessor(model, strategy="tile_topk", keep=0.1))`` —
    or ``visattn.apply(model_or_pipe, "sparse_video", ...)``, which does the same and can be undone with
    ``visattn.remove``. The processor is made for one model (the denoiser), because a diffusers
    processor call alone does not carry the token grid, the denoising step or the layer index:
    construction records each attention layer's current (stock) processor and installs forward
    hooks on the model that read the grid and text length of each call (:class:`SparseVideoSchedule`).
    ``stock_processors`` gives the processors back for ``model.set_attn_processor(...)``; ``detach()``
    removes the hooks.

    Why stock processors are kept rather than re-implemented: each call runs the layer's own
    stock processor — projections, norms, rotary embeddings, the text/image concatenation, output
    projections all exactly as stock — inside a ``TorchFunctionMode`` that answers its one
    self/joint-attention SDPA call (directly or through ``dispatch_attention_fn``'s native backends)
    with :func:`sparse_video_attention` on the very q, k, v that SDPA would get. ``__call__`` names
    every keyword any of these stock processors takes (``image_rotary_emb``, ``rotary_emb``, ``temb``),
    because diffusers drops the keywords a processor's signature does not name. Layers that are not
    self/joint attention over a grid (Wan's cross-attention, HunyuanVideo's token refiner) run
    their stock processor untouched; a layer that never reaches SDPA (a non-native attention backend)
    raises :class:`~visattn.errors.UnsupportedModelError`. The attention itself,
    :func:`sparse_video_attention`, is a plain function of ``[B, H, N, D]`` tensors and a layout; it also
    serves as a diffusers attention backend (:mod:`visattn.processors.sparse_video.backend`, the way to
    run under context parallelism). Eager inference only (not ``torch.compile``).
    """

    def __init__(self, model: nn.Module, *, patcher: Patcher | None = None, config: SparseVideoConfig | None = None,
                 **options: Any) -> None:
        from ...frameworks import diffusers as fw

        self.config = SparseVideoConfig.resolve(config, options)
        self._model = model
        self._patcher = patcher or Patcher()
        self._schedule = SparseVideoSchedule(model, self.config, self._patcher)
        self._layers: dict[int, _Layer] = {}
        for index, (name, module) in enumerate(fw.attention_layers(model)):
            stock = module.processor
            if isinstance(stock, SparseVideoAttnProcessor):
                stock = stock._layers[id(module)].stock
            params = frozenset(inspect.signature(stock.__call__).parameters)
            self._layers[id(module)] = _Layer(index, name, stock, params)

    @property
    def stock_processors(self) -> dict[str, Any]:
        """``{"<layer>.processor": stock processor}``, for ``model.set_attn_processor`` to restore stock."""
        return {f"{layer.name}.processor": layer.stock for layer in self._layers.values()}

    def sparse_layers(self) -> list[int]:
        """Indices (in attention-layer order) of the layers whose attention this processor makes sparse."""
        return sorted(self._schedule.eligible)

    def detach(self) -> None:
        """Remove the hooks this processor installed on its model."""
        self._patcher.undo()

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None, rotary_emb: Any = None,
                 temb: Tensor | None = None) -> Any:
        layer = self._layers.get(id(attn))
        if layer is None:
            raise UnsupportedModelError(f"SparseVideoAttnProcessor: {type(attn).__name__} is not an attention layer "
                                        f"of the {type(self._model).__name__} this processor was made for")
        kwargs: dict[str, Any] = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask}
        rotary = image_rotary_emb if image_rotary_emb is not None else rotary_emb
        for name, value in (("image_rotary_emb", rotary), ("rotary_emb", rotary), ("temb", temb)):
            if value is not None and name in layer.stock_params:
                kwargs[name] = value
        layout = self._schedule.layout(layer.index, hidden_states.device)
        if layout is None:
            return layer.stock(attn, hidden_states, **kwargs)
        mode = _sparse_sdpa(layout, self.config)
        with mode:
            out = layer.stock(attn, hidden_states, **kwargs)
        if mode.answered == 0:
            backend = getattr(layer.stock, "_attention_backend", None)
            raise UnsupportedModelError(
                f"sparse_video: attention layer {layer.index} ({layer.name}) ran without a "
                f"torch.nn.functional.scaled_dot_product_attention call over its {layout.num_tokens} tokens "
                f"(processor {type(layer.stock).__name__}, attention backend {backend or 'default'}); use the stock "
                f"processor with a native attention backend, or install='attention_backend'")
        return out
