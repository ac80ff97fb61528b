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
product per sample (``S`` sources, ``D`` destinations); applying a decision is one scatter-add
and one scaling (merge) or one gather (unmerge) over the hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_destinations(h: int, w: int, sx: int, sy: int, key: Tensor | int = 0, *,
                      device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """ToMe-SD's partition of an ``h x w`` raster grid: one pseudo-random destination per full ``sy x sx`` cell.

    Returns ``(dst, src)``: the raster indices of the destinations (in raster order, one per cell:
    ``(h // sy) * (w // sx)`` of them) and of the sources (every other token, in raster order).
    ``key`` (an integer, or an int64 scalar tensor on ``device``) picks the positions: each cell's is a hash
    of the key and the cell's index, so one key always gives one partition and another key another; no
    generator and no device-to-host read.
    """
    if h < 1 or w < 1 or sx < 1 or sy < 1:
        raise ValueError(f"grid {h}x{w} and cell {sy}x{sx} must be positive")
    rows, cols = h // sy, w // sx
    if rows == 0 or cols == 0:
        raise ValueError(f"a {h}x{w} grid holds no full {sy}x{sx} cell")
    cells = torch.arange(rows * cols, device=device).view(rows, cols)
    pick = torch.div(_hash(_hash(torch.as_tensor(key, dtype=torch.long, device=device)) + cells), 16,
                     rounding_mode="floor") % (sx * sy)
    row = torch.arange(rows, device=device)[:, None] * sy + torch.div(pick, sx, rounding_mode="floor")
    col = torch.arange(cols, device=device)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h * w, dtype=torch.int8, device=device)
    is_dst.index_fill_(0, (row * w + col).flatten(), -1)
    order = torch.argsort(is_dst, stable=True)  # destinations (-1) first, each part in raster order
    return order[:rows * cols], order[rows * cols:]


def _hash(x: Tensor) -> Tensor:
    """Two rounds of a 31-bit multiplicative hash with xor-shift mixing, on int64 tensors (no overflow)."""
    for _ in range(2):
        x = ((x & 0x7FFFFFFF) * 1103515245 + 12345) & 0x7FFFFFFF
        x = x ^ (x >> 15)
    return x


class CellMerge:
    """One merge decision over ``[B, N, C]`` tensors (see the module docstring).

    ``merge(x)``: ``[B, N, C] -> [B, N - r, C]``, destinations averaged with their merged sources;
    ``unmerge(y)``: ``[B, N - r, C] -> [B, N, C]``, every token takes its group's output;
    ``select(x)``: ``[B, N, C] -> [B, N - r, C]``, every output slot the value of its own token
    (``own[b, j]``, the input token standing at slot ``j``: computed on first use).
    With ``r == 0`` all three return their input unchanged.
    """

    def __init__(self, slot: Tensor | None, num_out: int, own: Callable[[], Tensor] | None = None) -> None:
        self.slot = slot  # [B, N] output position of every input token
        self.num_out = num_out
        if slot is not None:  # 1 / |G| of every output slot, [B, N - r, 1]
            count = torch.zeros(slot.shape[0], num_out, device=slot.device).scatter_add_(
                1, slot, torch.ones(slot.shape, device=slot.device))
            self.inv_size = count.reciprocal_()[:, :, None]
        self._own = own
        self._own_index: Tensor | None = None

    @property
    def own(self) -> Tensor | None:
        """``[B, N - r]`` the input token that stands at each output slot (computed on first use)."""
        if self._own_index is None and self._own is not None:
            self._own_index = self._own()
        return self._own_index

    @property
    def r(self) -> int:
        return 0 if self.slot is None else self.slot.shape[1] - self.num_out

    def merge(self, x: Tensor) -> Tensor:
        if self.slot is None:
            return x
        index = self.slot[:, :, None].expand(-1, -1, x.shape[-1])
        total = x.new_zeros(x.shape[0], self.num_out, x.shape[-1]).scatter_add_(1, index, x)
        return total * self.inv_size.to(x.dtype)

    def unmerge(self, y: Tensor) -> Tensor:
        if self.slot is None:
            return y
        return y.gather(1, self.slot[:, :, None].expand(-1, -1, y.shape[-1]))

    def select(self, x: Tensor) -> Tensor:
        own = self.own
        if own is None:
            return x
        return x.gather(1, own[:, :, None].expand(-1, -1, x.shape[-1]))


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
        m = F.normalize(metric, dim=-1)
        scores = m.index_select(1, src) @ m.index_select(1, dst).transpose(1, 2)  # [B, S, D]
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # sources, most similar first: the first r merge
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(src.numel(), device=device).expand(batch, -1))
        src_slot = torch.where(rank < r, num_kept + partner, rank - r)  # merged: its destination's slot
        dst_slot = torch.arange(num_kept, num_kept + dst.numel(), device=device).expand(batch, -1)
        slot = torch.empty(batch, n, dtype=torch.long, device=device)
        slot.scatter_(1, torch.cat([src, dst]).expand(batch, -1), torch.cat([src_slot, dst_slot], dim=1))

    def own() -> Tensor:
        return torch.cat([src[order[:, r:]], dst.expand(batch, -1)], dim=1)

    return CellMerge(slot, n - r, own)
