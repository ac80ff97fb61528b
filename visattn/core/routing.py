"""Block routing: pool q and k into blocks, score block pairs, pick kv blocks per query block.

This is step 1 of the block-sparse methods (step 2 is :mod:`visattn.kernels.block_sparse`):

- BiFormer (Zhu et al., CVPR 2023), bi-level routing attention: region queries and keys are the
  means of q and k over each region, ``A_r = Q_r K_r^T``, and each region keeps the ``topk``
  regions of highest affinity.
- VSA (video sparse attention) and XAttention-style selection: the same coarse scores over
  (t, h, w) tiles, kept by top-k or by cumulative softmax mass (top-p).
- XAttention (Xu et al., 2025), antidiagonal scoring (:func:`antidiagonal_scores`): a block pair's
  importance is the attention mass estimated from strided antidiagonal sums of ``q . k`` inside it.

Blocks are runs of consecutive tokens, so a method first reorders a grid's tokens tile by tile
(:func:`tile_order`) and back afterwards. Everything here is plain PyTorch, framework-free, and
works on any device. Identity settings: ``topk`` of all blocks or ``topp=1.0`` keep every block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError, ShapeError
from .attention import per_query_head


def pool_blocks(x: Tensor, block: int) -> Tensor:
    """Mean of ``x`` ``[..., N, D]`` over runs of ``block`` tokens: ``[..., ceil(N / block), D]``.

    The last block may be shorter (ragged N); it is averaged over the tokens it has. Sums are
    accumulated in float32; the result has ``x``'s dtype.
    """
    if block < 1:
        raise ShapeError(f"pool_blocks: block must be >= 1 (got {block})")
    if x.ndim < 2 or x.shape[-2] == 0:
        raise ShapeError(f"pool_blocks: x must be [..., N, D] with N >= 1; got {tuple(x.shape)}")
    n = x.shape[-2]
    full = n // block
    parts = []
    if full:
        parts.append(x[..., : full * block, :].unflatten(-2, (full, block)).mean(dim=-2))
    if n > full * block:
        parts.append(x[..., full * block:, :].mean(dim=-2, keepdim=True))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def block_scores(q_blocks: Tensor, k_blocks: Tensor, *, scale: float | None = None) -> Tensor:
    """Block affinities ``scale * Q_r K_r^T``: ``[B, H, nqb, nkb]`` in the inputs' dtype.

    Half-precision inputs keep half-precision scores (ranking blocks needs few bits, and top-k
    over 16-bit keys is twice as fast). ``k_blocks`` may have fewer heads (grouped kv heads):
    each serves ``H / Hkv`` query heads.
    """
    if q_blocks.ndim != 4 or k_blocks.ndim != 4 or q_blocks.shape[-1] != k_blocks.shape[-1]:
        raise ShapeError(f"block_scores: expected [B, H, nqb, D] and [B, Hkv, nkb, D]; got "
                         f"{tuple(q_blocks.shape)} and {tuple(k_blocks.shape)}")
    k_blocks = per_query_head(k_blocks, q_blocks.shape[1], "block_scores")
    scale = q_blocks.shape[-1] ** -0.5 if scale is None else scale
    return torch.matmul(q_blocks * scale, k_blocks.transpose(-1, -2))


def antidiagonal_scores(q: Tensor, k: Tensor, block: int, stride: int, *, scale: float | None = None,
                        max_elements: int = 1 << 26) -> Tensor:
    """XAttention's block importance: ``log`` of the attention mass of each (query block, kv block) pair,
    estimated from strided antidiagonals, ``[B, H, nqb, nkb]`` float32.

    Queries and keys are cut into groups of ``stride`` consecutive tokens. For query group ``r`` and key
    group ``c`` the antidiagonal sum is ``a_rc = sum_s q[r S + S - 1 - s] . k[c S + s]`` (``S = stride``; lower
    left to upper right inside the ``S x S`` square), computed for all pairs as one matrix product of the
    reshaped ``[N / S, S D]`` queries (offsets reversed) and keys. Each query group's row of
    ``softmax_c(scale * a_rc / S)`` estimates its attention over the key groups; a block pair's importance
    is the sum of that mass over the pair's groups (XAttention's antidiagonal scoring). Returned as ``log`` mass, so
    :func:`select_topk` ranks blocks by mass and :func:`select_topp`'s softmax is the mass normalised over
    each query block's row (XAttention's cumulative threshold).

    ``block`` must be a multiple of ``stride``. A ragged end (``N`` not a multiple of ``stride``) is padded
    with zeros inside its last group; key groups of padding alone are left out. ``k`` may have fewer heads
    (grouped kv heads). Rows are processed in chunks of at most ``max_elements`` scores.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ShapeError(f"antidiagonal_scores: expected [B, H, N, D] and [B, Hkv, Nk, D]; got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if stride < 1 or block < 1 or block % stride:
        raise ShapeError(f"antidiagonal_scores: the stride ({stride}) must divide the block ({block} tokens)")
    h = q.shape[1]
    k = per_query_head(k, h, "antidiagonal_scores")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, nk = q.shape[2], k.shape[2]
    nqb, nkb, per = -(-n // block), -(-nk // block), block // stride
    qs = F.pad(q, (0, 0, 0, nqb * block - n)).unflatten(2, (-1, stride)).flip(3).flatten(3)  # [B, H, nqb*per, S*D]
    ks = F.pad(k, (0, 0, 0, nkb * block - nk)).unflatten(2, (-1, stride)).flatten(3)         # [B, H, nkb*per, S*D]
    empty = torch.arange(ks.shape[2], device=k.device) * stride >= nk                      # key groups of padding
    real_rows = -(-n // stride)
    rows_per_chunk = max(per, max_elements // max(1, q.shape[0] * h * ks.shape[2]) // per * per)
    out = []
    for r0 in range(0, qs.shape[2], rows_per_chunk):
        logits = torch.matmul(qs[:, :, r0:r0 + rows_per_chunk], ks.transpose(-1, -2)).float() * (scale / stride)
        mass = logits.masked_fill(empty, float("-inf")).softmax(-1)
        rows = torch.arange(r0, r0 + mass.shape[2], device=q.device)
        mass = mass.masked_fill((rows >= real_rows)[:, None], 0.0)
        out.append(mass.unflatten(-1, (nkb, per)).sum(-1).unflatten(-2, (-1, per)).sum(-2))
    return torch.cat(out, dim=2).clamp_min(torch.finfo(torch.float32).tiny).log()


def diagonal_blocks(num_q: int, num_kv: int, block_q: int, block_k: int,
                    device: torch.device | str | None = None) -> Tensor:
    """Boolean ``[nqb, nkb]``: kv block ``j`` shares token positions with query block ``i``.

    For self-attention with ``block_q == block_k`` this is the diagonal; it is what the
    "always keep the diagonal" option of the selectors forces.
    """
    qb = torch.arange(-(-num_q // block_q), device=device)
    kb = torch.arange(-(-num_kv // block_k), device=device)
    q_start, q_end = qb * block_q, torch.clamp((qb + 1) * block_q, max=num_q)
    k_start, k_end = kb * block_k, torch.clamp((kb + 1) * block_k, max=num_kv)
    return (q_start[:, None] < k_end[None, :]) & (k_start[None, :] < q_end[:, None])


def _check_scores(scores: Tensor, keep: Tensor | None, who: str) -> None:
    if scores.ndim != 4:
        raise ShapeError(f"{who}: scores must be [B, H, nqb, nkb]; got {tuple(scores.shape)}")
    if keep is not None:
        if keep.dtype != torch.bool:
            raise ShapeError(f"{who}: keep must be boolean; got {keep.dtype}")
        try:
            torch.broadcast_shapes(keep.shape, scores.shape)
        except RuntimeError:
            raise ShapeError(f"{who}: keep {tuple(keep.shape)} does not broadcast to scores "
                             f"{tuple(scores.shape)}") from None


def select_topk(scores: Tensor, topk: int, *, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``topk`` highest-scoring kv blocks of each query block: ``(kv_indices, kv_counts)`` int32.

    ``keep`` (boolean, broadcastable to ``scores``) marks blocks that are always picked; they count
    towards ``topk``. ``topk`` larger than the number of kv blocks keeps them all.
    """
    _check_scores(scores, keep, "select_topk")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise OptionError(f"select_topk: topk must be an int >= 1 (got {topk!r})")
    k = min(topk, scores.shape[-1])
    if keep is not None:
        scores = scores.masked_fill(keep, float("inf"))
    idx = scores.topk(k, dim=-1, sorted=False).indices.to(torch.int32)
    counts = torch.full(scores.shape[:3], k, dtype=torch.int32, device=scores.device)
    return idx, counts


def select_topp(scores: Tensor, topp: float, *, keep: Tensor | None = None,
                min_blocks: int = 1) -> tuple[Tensor, Tensor]:
    """Per query block, the fewest highest-scoring kv blocks whose softmax mass reaches ``topp``.

    Mass is ``softmax(scores)`` over the kv blocks of the row. Blocks marked in ``keep`` are taken
    first (their mass counts); at least ``min_blocks`` are kept. ``topp=1.0`` keeps every block.
    The lists are as long as the longest row; ``kv_counts`` says how much of each row is used.
    """
    _check_scores(scores, keep, "select_topp")
    if not 0.0 < topp <= 1.0:
        raise OptionError(f"select_topp: topp must lie in (0, 1] (got {topp})")
    if min_blocks < 1:
        raise OptionError(f"select_topp: min_blocks must be >= 1 (got {min_blocks})")
    nkb = scores.shape[-1]
    mass = scores.float().softmax(dim=-1)
    forced = torch.zeros_like(mass, dtype=torch.bool) if keep is None else keep.expand_as(mass)
    order = torch.sort(mass + 2.0 * forced, dim=-1, descending=True).indices
    sorted_mass = mass.gather(-1, order)
    before = sorted_mass.cumsum(dim=-1) - sorted_mass
    counts = (before < topp).sum(dim=-1) if topp < 1.0 else torch.full_like(mass[..., 0], nkb, dtype=torch.long)
    counts = torch.maximum(counts, forced.sum(dim=-1)).clamp(min=min(min_blocks, nkb), max=nkb)
    width = int(counts.max()) if counts.numel() else 1
    return order[..., :width].to(torch.int32).contiguous(), counts.to(torch.int32)


@dataclass(frozen=True)
class BlockRouting:
    """A routing decision: which kv blocks each query block visits, in the kernel's format."""

    kv_indices: Tensor  # int32 [B, H, nqb, max_kv]
    kv_counts: Tensor   # int32 [B, H, nqb]
    block_q: int
    block_k: int
    num_kv_blocks: int

    @property
    def kept_fraction(self) -> float:
        """Mean fraction of kv blocks kept per query block."""
        return float(self.kv_counts.float().mean()) / self.num_kv_blocks


def route(q: Tensor, k: Tensor, *, block_q: int, block_k: int, topk: int | None = None,
          topp: float | None = None, keep_diagonal: bool = False, scale: float | None = None) -> BlockRouting:
    """Pool, score and select in one call (computed without gradients, as in BiFormer).

    Exactly one of ``topk`` (number of kv blocks) and ``topp`` (softmax mass) is given.
    ``keep_diagonal`` always keeps the kv blocks that share positions with the query block.
    """
    if (topk is None) == (topp is None):
        raise OptionError(f"route: give exactly one of topk and topp (got topk={topk}, topp={topp})")
    if q.ndim != 4 or k.ndim != 4:
        raise ShapeError(f"route: q and k must be [B, H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    with torch.no_grad():
        scores = block_scores(pool_blocks(q, block_q), pool_blocks(k, block_k), scale=scale)
        keep = (diagonal_blocks(q.shape[2], k.shape[2], block_q, block_k, q.device)
                if keep_diagonal else None)
        if topk is not None:
            idx, counts = select_topk(scores, topk, keep=keep)
        else:
            idx, counts = select_topp(scores, topp, keep=keep)
    return BlockRouting(idx, counts, block_q, block_k, scores.shape[-1])


@dataclass(frozen=True)
class TileOrder:
    """A permutation of grid tokens from raster order to tile order, and back.

    ``perm[p]`` is the raster index of the token at tiled position ``p``; ``inverse`` undoes it.
    Tiles come in raster order of the tile grid, tokens in raster order within a tile; edge tiles
    of a grid that the tile does not divide are smaller (``tile_sizes``).
    """

    grid: tuple[int, ...]
    tile: tuple[int, ...]
    perm: Tensor
    inverse: Tensor
    tile_sizes: Tensor

    @property
    def num_tokens(self) -> int:
        return self.perm.numel()

    def _apply(self, x: Tensor, index: Tensor, dim: int, start: int) -> Tensor:
        dim = dim % x.ndim
        if not 0 <= start <= x.shape[dim] - self.num_tokens:
            raise ShapeError(f"TileOrder: {self.num_tokens} grid tokens at offset {start} do not fit in dim "
                             f"{dim} of size {x.shape[dim]}")
        index = index.to(x.device)
        if start or x.shape[dim] != self.num_tokens:
            n = x.shape[dim]
            full = torch.arange(n, device=x.device)
            full[start:start + self.num_tokens] = index + start
            index = full
        return x.index_select(dim, index)

    def to_tiles(self, x: Tensor, dim: int = -2, start: int = 0) -> Tensor:
        """Reorder the grid tokens ``[start, start + num_tokens)`` of ``x`` along ``dim`` into tile order."""
        return self._apply(x, self.perm, dim, start)

    def to_raster(self, x: Tensor, dim: int = -2, start: int = 0) -> Tensor:
        """Undo :meth:`to_tiles`."""
        return self._apply(x, self.inverse, dim, start)


def tile_order(grid: Sequence[int], tile: Sequence[int], device: torch.device | str | None = None) -> TileOrder:
    """The raster <-> tile permutation of a 2D ``(h, w)`` or 3D ``(t, h, w)`` grid (regions in BiFormer).

    Example: ``order = tile_order((30, 45), (8, 8))``; ``x_tiled = order.to_tiles(x)`` puts each 8 x 8
    tile's tokens next to each other (edge tiles 6 x 8, 8 x 5 and 6 x 5), ``order.to_raster`` restores.
    """
    grid, tile = tuple(int(g) for g in grid), tuple(int(t) for t in tile)
    if len(grid) not in (2, 3) or len(tile) != len(grid):
        raise ShapeError(f"tile_order: grid and tile must both be (h, w) or (t, h, w); got {grid} and {tile}")
    if any(g < 1 for g in grid) or any(t < 1 for t in tile):
        raise ShapeError(f"tile_order: grid and tile sizes must be >= 1; got {grid} and {tile}")
    coords = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    tiles_per_dim = [-(-g // t) for g, t in zip(grid, tile)]
    tile_id = torch.zeros(grid, dtype=torch.long, device=device)
    local = torch.zeros(grid, dtype=torch.long, device=device)
    for c, t, n in zip(coords, tile, tiles_per_dim):
        tile_id = tile_id * n + c // t
        local = local * t + c % t
    key = (tile_id * math.prod(tile) + local).flatten()
    perm = torch.argsort(key)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    # tile sizes from the extents per axis (edge tiles are cut short), in tile_id's row-major order: no
    # data-dependent op, so meta tensors and torch.compile take it
    sizes = torch.ones(1, dtype=torch.long, device=device)
    for g, t, n in zip(grid, tile, tiles_per_dim):
        extent = torch.tensor([min(t, g - i * t) for i in range(n)], dtype=torch.long, device=device)
        sizes = (sizes[:, None] * extent[None, :]).flatten()
    return TileOrder(grid, tile, perm, inverse, sizes)


def token_words(x: Tensor) -> Tensor:
    """``x`` ``[B, H, N, D]`` viewed as 8-byte words per token where its layout allows (else ``x`` itself).

    Moving tokens as ``D * itemsize / 8`` words instead of ``D`` elements halved the cost of the token
    permutations of ``sparse_video`` on the H100 (benchmarks/video.py); the bytes moved are the same.
    """
    size = x.element_size()
    if x.stride(-1) == 1 and (x.shape[-1] * size) % 8 == 0 and all(s * size % 8 == 0 for s in x.stride()[:-1]):
        return x.view(torch.int64)
    return x


def take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(2, index)`` for ``[B, H, N, D]`` tensors, moving whole tokens (:func:`token_words`)."""
    words = token_words(x)
    return words.index_select(2, index).view(x.dtype)
