"""``permute``: per-head token orders that gather the keys a query block needs into fewer kv blocks.

Block-sparse attention pays for every kv block a query block visits, whether it needs one key of it or
all. Attention is unchanged by any permutation of the keys (with their values) and equivariant under a
permutation of the queries, so a layer may reorder both, route and attend in the new order, and put the
outputs back (Sparser Block-Sparse Attention via Token Permutation, PBS-Attn, 2025). The tile
order of the grid (:func:`~.routing.geometry`) is where the orders start from; text tokens never move.

- ``importance`` (PBS-Attn's key permutation): keys sorted by the attention mass the block-pooled queries
  give them, ``m_j = sum_i softmax_j(scale * qbar_i . k_j)``, highest first; queries keep the tile order.
  The keys most queries need then share the first kv blocks.
- ``cluster`` (semantic clustering, as Sparse VideoGen2's semantic-aware permutation): queries and keys
  are each sorted by their k-means cluster (as many clusters as blocks, started at the blocks' means of
  the tile order, :data:`CLUSTER_ITERATIONS` Lloyd updates), so a block holds similar tokens and its mean
  (what ``tile_topk`` scores) represents them.

The orders are computed per head (keys per kv head) on every call, without gradients; their cost is
measured beside the strategies in ``benchmarks/video.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.routing import pool_blocks, token_words

#: Lloyd updates of ``permute='cluster'`` (two: the clusters move little after the tile means).
CLUSTER_ITERATIONS = 2


def importance_order(qg: Tensor, kg: Tensor, block: int, scale: float) -> Tensor:
    """Keys ``[B, Hkv, N, D]`` ordered by the mass the pooled queries ``[B, H, N, D]`` give them: ``[B, Hkv, N]``."""
    qb = pool_blocks(qg, block).float()                                   # [B, H, nb, D]
    hkv = kg.shape[1]
    qb = qb.unflatten(1, (hkv, qg.shape[1] // hkv)).flatten(2, 3)          # a kv head's query heads together
    mass = torch.matmul(qb * scale, kg.float().transpose(-1, -2)).softmax(-1).sum(-2)
    return torch.argsort(mass, dim=-1, descending=True, stable=True)


def cluster_order(x: Tensor, block: int, iterations: int = CLUSTER_ITERATIONS) -> Tensor:
    """Tokens ``[B, H, N, D]`` ordered by k-means cluster (one cluster per block, started at the block means)."""
    xf = x.float()
    centres = pool_blocks(xf, block)
    ones = torch.ones(xf.shape[:3], device=x.device)

    def assign(c: Tensor) -> Tensor:  # nearest centre: argmax of x . c - |c|^2 / 2
        return (torch.matmul(xf, c.transpose(-1, -2)) - 0.5 * c.square().sum(-1)[..., None, :]).argmax(-1)

    for _ in range(iterations):
        a = assign(centres)
        sums = torch.zeros_like(centres).scatter_add_(2, a[..., None].expand_as(xf), xf)
        counts = torch.zeros(centres.shape[:3], device=x.device).scatter_add_(2, a, ones)[..., None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster stays put
    return torch.argsort(assign(centres), dim=-1, stable=True)


def token_orders(kind: str, qg: Tensor, kg: Tensor, block: int, scale: float) -> tuple[Tensor | None, Tensor]:
    """``(query order or None, key order)`` of the grid queries ``qg`` and keys ``kg`` for ``permute=kind``."""
    with torch.no_grad():
        if kind == "importance":
            return None, importance_order(qg, kg, block, scale)
        return cluster_order(qg, block), cluster_order(kg, block)


def permute_grid(kind: str, qg: Tensor, kv: tuple[Tensor, ...], block: int, scale: float
                 ) -> tuple[Tensor | None, Tensor, tuple[Tensor, ...]]:
    """``(query order or None, qg, kv)`` with the grid queries ``qg`` ``[B, H, ng, D]`` and the first ``ng`` tokens
    (the grid keys, then values) of each tensor of ``kv`` reordered by :func:`token_orders` of ``qg`` and the grid
    part of ``kv[0]``; tokens after the grid (text) stay where they are."""
    ng = qg.shape[2]
    q_order, k_order = token_orders(kind, qg, kv[0][:, :, :ng], block, scale)
    if q_order is not None:
        qg = gather_tokens(qg, q_order)
    return q_order, qg, tuple(torch.cat([gather_tokens(t[:, :, :ng], k_order), t[:, :, ng:]], dim=2) for t in kv)


def gather_tokens(x: Tensor, order: Tensor) -> Tensor:
    """``x`` ``[B, H, N, D]`` with each head's tokens in ``order`` ``[B, H, N]`` (whole tokens moved as words)."""
    words = token_words(x)
    return words.gather(2, order[..., None].expand(*order.shape, words.shape[-1])).view(x.dtype)


def scatter_tokens(x: Tensor, order: Tensor) -> Tensor:
    """Undo :func:`gather_tokens`: token ``p`` of ``x`` goes back to position ``order[..., p]``."""
    words = token_words(x.contiguous())
    out = torch.empty_like(words)
    return out.scatter_(2, order[..., None].expand(*order.shape, words.shape[-1]), words).view(x.dtype)
