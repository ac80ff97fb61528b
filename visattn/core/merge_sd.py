"""Token merging for diffusion models: the framework-free math of ToMe for Stable Diffusion.

ToMe-SD (Bolya & Hoffman, 2023, "Token Merging for Fast Stable Diffusion") merges the
image tokens of a ``h x w`` grid before a computation and unmerges its output afterwards, so that
every token gets an output again:

1. destinations: the grid is cut into ``sy x sx`` cells and one token per full cell, at a random
   position within it, is a destination (a random strided partition); every other token
   (the rest of each cell, and the rows and columns beyond the last full cell) is a source. The
   positions are hashed from a key and the cell index on the device (:func:`cell_destinations`), not
   drawn from a generator: a compiled graph or a CUDA graph computes them like any other tensor;
2. matching: every source finds its most similar destination by cosine similarity of a metric
   (the hidden states), ``e_s = max_d cos(x_s, x_d)``;
3. the ``r`` sources with the highest ``e_s`` merge into their destination: a destination with its
   merged sources ``G`` becomes their plain average ``x_G = (1 / |G|) sum_{i in G} x_i``; every
   other token is kept;
4. unmerge: after the computation ``f``, every input token takes the output of the token it went
   to, ``y_i = f(x)_{G(i)}`` (the copies of a merged token are identical).

A decision is a map ``slot[b, i]``: the output position of input token ``i``. Merged sequences are
laid out as the kept sources (by decreasing similarity) followed by the destinations in raster order;
attention and per-token layers do not depend on the order, and :meth:`CellMerge.select` gives
every output slot the value of its own token (destinations and kept sources) for per-token data
that cannot be averaged, such as rotary position tables. Deciding costs one ``[S, D]`` similarity
product per sample (``S`` sources, ``D`` destinations; computed for all ``N`` tokens, which spares a
normalised copy of the sources); applying a decision is one scatter-add
and one scaling (merge) or one gather (unmerge) over the hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def cell_destinations(grid: Sequence[int], cell: Sequence[int], key: Tensor | int = 0, *,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """ToMe-SD's partition of a raster grid, ``(h, w)`` or ``(t, h, w)``: one pseudo-random destination per full cell.

    ``cell`` gives the cell's sides in the grid's axis order (``(sy, sx)``, or ``(st, sy, sx)`` for video: a cell
    spans ``st`` frames). Returns ``(dst, src)``: the raster indices of the destinations (in raster order, one per
    full cell) and of the sources (every other token, in raster order: the rest of each cell and the rows, columns
    or frames beyond the last full cell). ``key`` (an integer, or an int64 scalar tensor on ``device``) picks the
    positions: each cell's is a hash of the key and the cell's raster index, so one key always gives one partition
    and another key another; no generator and no device-to-host read.
    """
    grid, cell = tuple(grid), tuple(cell)
    if len(grid) != len(cell) or min(grid) < 1 or min(cell) < 1:
        raise ValueError(f"grid {grid} and cell {cell} must be positive and of one rank")
    counts = [g // c for g, c in zip(grid, cell)]
    if min(counts) == 0:
        raise ValueError(f"a {'x'.join(map(str, grid))} grid holds no full {'x'.join(map(str, cell))} cell")
    cells = torch.arange(math.prod(counts), device=device)
    pick = torch.div(_hash(_hash(torch.as_tensor(key, dtype=torch.long, device=device)) + cells), 16,
                     rounding_mode="floor") % math.prod(cell)  # the destination's raster position in its cell
    flat, stride = torch.zeros_like(cells), 1
    for size, side, count in reversed(list(zip(grid, cell, counts))):  # last axis first
        flat = flat + ((cells % count) * side + pick % side) * stride
        cells, pick, stride = torch.div(cells, count, rounding_mode="floor"), torch.div(
            pick, side, rounding_mode="floor"), stride * size
    is_dst = torch.zeros(math.prod(grid), dtype=torch.int8, device=device)
    is_dst.index_fill_(0, flat, -1)
    order = torch.argsort(is_dst, stable=True)  # destinations (-1) first, each part in raster order
    return order[:flat.numel()], order[flat.numel():]


def _hash(x: Tensor) -> Tensor:
    """Two rounds of a 31-bit multiplicative hash with xor-shift mixing, on int64 tensors (no overflow)."""
    for _ in range(2):
        x = ((x & 0x7FFFFFFF) * 1103515245 + 12345) & 0x7FFFFFFF
        x = x ^ (x >> 15)
    return x


class CellMerge:
    """One merge decision over ``[B, N, C]`` tensors (see the module docstring).

    ``merge(x)``: ``[B, N, C] -> [B, N - r, C]``, destinations averaged with their merged sources;
    ``unmerge(y)``: ``[B, N - r, C] -> [B, N, C]``, every token takes its group's output (both take the token axis
    as ``dim``: 2 for ``[B, H, N, D]`` attention inputs);
    ``select(x)``: ``[B, N, C] -> [B, N - r, C]``, every output slot the value of its own token
    (``own[b, j]``, the input token standing at slot ``j``: computed on first use).
    With ``r == 0`` all three return their input unchanged.

    ``update(x, out, merged)``: ``x + unmerge(out - merged)``, every token's residual stream plus its group's
    update (a block run on merged tokens).

    ``size`` ``[B, N - r]`` (int64) holds every group's ``|G|`` (computed on first use). ``average`` and
    ``add_update``, when set, compute ``merge`` on ``[B, N, C]`` tensors and ``update`` in place of the PyTorch
    here: a kernel's (:func:`visattn.kernels.tome.match_to_cells`).
    """

    def __init__(self, slot: Tensor | None, num_out: int, own: Callable[[], Tensor] | None = None) -> None:
        self.slot = slot  # [B, N] output position of every input token
        self.num_out = num_out
        self._size: Tensor | None = None
        self.average: Callable[[Tensor], Tensor] | None = None
        self.add_update: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
        self._own = own
        self._own_index: Tensor | None = None

    @property
    def size(self) -> Tensor:
        """``[B, N - r]`` (int64) every group's ``|G|`` (computed on first use)."""
        if self._size is None:
            self._size = torch.zeros(self.slot.shape[0], self.num_out, dtype=torch.long,
                                     device=self.slot.device).scatter_add_(1, self.slot, torch.ones_like(self.slot))
        return self._size

    @property
    def own(self) -> Tensor | None:
        """``[B, N - r]`` the input token that stands at each output slot (computed on first use)."""
        if self._own_index is None and self._own is not None:
            self._own_index = self._own()
        return self._own_index

    @property
    def r(self) -> int:
        return 0 if self.slot is None else self.slot.shape[1] - self.num_out

    def _index(self, x: Tensor, dim: int) -> Tensor:
        """``slot`` shaped to index ``x``'s token axis ``dim`` (the batch is axis 0)."""
        n = self.slot.shape[1]
        return self.slot.view(_with_tokens(x, dim, n, broadcast=True)).expand(_with_tokens(x, dim, n))

    def merge(self, x: Tensor, dim: int = 1) -> Tensor:
        if self.slot is None:
            return x
        if self.average is not None:  # on [B, N, C]: the token axis second, the others flattened last
            rows = x.movedim(dim, 1)
            out = self.average(rows.reshape(*rows.shape[:2], -1))
            return out.view(*out.shape[:2], *rows.shape[2:]).movedim(1, dim)
        total = x.new_zeros(_with_tokens(x, dim, self.num_out)).scatter_add_(dim, self._index(x, dim), x)
        return total / self.size.view(_with_tokens(x, dim, self.num_out, broadcast=True))

    def unmerge(self, y: Tensor, dim: int = 1) -> Tensor:
        if self.slot is None:
            return y
        return y.gather(dim, self._index(y, dim))

    def update(self, x: Tensor, out: Tensor, merged: Tensor) -> Tensor:
        if self.slot is None:  # nothing merged: merged is x, and x + (out - x) is out
            return out
        if self.add_update is not None:
            return self.add_update(x, out, merged)
        return x + self.unmerge(out - merged)

    def select(self, x: Tensor) -> Tensor:
        own = self.own
        if own is None:
            return x
        return x.gather(1, own[:, :, None].expand(-1, -1, x.shape[-1]))


def _with_tokens(x: Tensor, dim: int, n: int, *, broadcast: bool = False) -> list[int]:
    """``x``'s shape with ``n`` tokens on axis ``dim`` (``broadcast``: 1 on every axis but the batch and ``dim``)."""
    shape = [x.shape[0]] + [1] * (x.ndim - 1) if broadcast else list(x.shape)
    shape[dim] = n
    return shape


def match_to_cells(metric: Tensor, dst: Tensor, src: Tensor, r: int) -> CellMerge:
    """ToMe-SD's matching: merge the ``r`` sources most similar to a destination into it.

    Args:
        metric: ``[B, N, C]`` the similarity features (the hidden states).
        dst, src: raster indices of destinations and sources (:func:`cell_destinations`), shared
            by the batch.
        r: sources to merge; clamped to the number of sources. ``r <= 0`` gives a decision that
            changes nothing.
    """
    batch, n, _ = metric.shape
    r = min(r, src.numel())
    if r <= 0:
        return CellMerge(None, n)
    num_kept = src.numel() - r
    device = metric.device
    with torch.no_grad():
        # cos(x_s, x_d) = (x_s . x_d / |x_d|) / |x_s|: every token against the normalised destinations, the best
        # of each row, then the sources' rows (no normalised copy of the sources is made)
        inv_norm = torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12).reciprocal()
        scores = metric @ (metric.index_select(1, dst) * inv_norm.index_select(1, dst)).transpose(1, 2)  # [B, N, D]
        best, partner = scores.max(dim=-1)
        best, partner = best.index_select(1, src) * inv_norm[..., 0].index_select(1, src), partner.index_select(1, src)
        # sources, most similar first (equal scores by index, as the kernels rank them): the first r merge
        order = best.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(src.numel(), device=device).expand(batch, -1))
        src_slot = torch.where(rank < r, num_kept + partner, rank - r)  # merged: its destination's slot
        dst_slot = torch.arange(num_kept, num_kept + dst.numel(), device=device).expand(batch, -1)
        slot = torch.empty(batch, n, dtype=torch.long, device=device)
        slot.scatter_(1, torch.cat([src, dst]).expand(batch, -1), torch.cat([src_slot, dst_slot], dim=1))

    def own() -> Tensor:
        return torch.cat([src[order[:, r:]], dst.expand(batch, -1)], dim=1)

    return CellMerge(slot, n - r, own)
