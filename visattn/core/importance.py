"""Importance scores for pruning the visual tokens of a vision-language model, framework-free.

Every score is a ``[B, N]`` float32 tensor over the current sequence; pruning keeps the candidate
(visual) tokens of highest score and every other token (text, padding):

- **FastV** (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2"): the attention the
  last token pays to each token at one decoder layer, averaged over heads,
  ``s_j = mean_h softmax(q_last k^T / sqrt(d) + m)_j`` (:func:`row_attention`), computed from the
  last query row and the keys alone: one ``[B, H, 1, N]`` product, no attention map.
- **VTC-CLS** ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"): the
  vision tower's [CLS] attention ``a_i = mean_h softmax(q_cls k^T / sqrt(d))_i``, averaged over
  the ensembled layers (:func:`visattn.core.merge.cls_attention` per layer).
- **TransPrune** ("Token Transition Pruning for Efficient Large Vision-Language Model"): token
  transition variation across a decoder layer, magnitude and direction,
  ``TTV_j = |(||h'_j|| - ||h_j||)| / ||h_j|| + (1 - cos(h_j, h'_j))`` (:func:`transition_variation`),
  plus instruction-guided attention, the attention of the instruction tokens (the text after the
  image) to each token averaged over heads and rows (:func:`row_attention`); each is min-max
  normalised over the candidates and the two are summed (:func:`normalized`).
- **PLPHP** ("Per-Layer Per-Head Vision Token Pruning"): a layer's share of the last token's
  attention that lands on visual tokens, ``v_l = sum_{j visual} mean_h a_j`` (:func:`vision_share`),
  sets its retention ``r_l = min(1, keep * v_l / mean_l v_l)`` (:func:`layer_retention`): layers
  that look at the image keep more; each kv head then keeps its own top tokens.
- **ZOO-Prune** (Kim et al., 2025, "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in
  Vision-Language Models"): a token's sensitivity is a zeroth-order estimate of how strongly the projector
  ``P`` reacts to it, ``s_i = mean_j ||P(x_i + h u_j) - P(x_i - h u_j)|| / (2h)`` over ``m`` random unit
  directions ``u_j`` shared by all tokens (:func:`zeroth_order_sensitivity`); the kept tokens are chosen
  greedily for sensitivity and diversity together, the first the most sensitive, each next the one of largest
  ``w_i * min_{k kept} (1 - cos(p_i, p_k))`` with ``w`` the min-max normalised sensitivity and ``p`` the
  projected features (:func:`diverse_ranks`, the paper's sensitivity-aware diverse selection).
- **VFlowOpt** (Yang et al., 2025, "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information
  Flow-Guided Optimization"): an image token's importance is its context relevance, the attention the vision
  tower's *global* tokens pay to it at one layer, ``a_j = mean_{g in G} A_gj`` with ``A`` the head-averaged
  attention and ``G = {g : mean_i A_ig > t * mean_{i,k} A_ik}`` the tokens that receive more than ``t`` times the
  mean attention (:func:`global_relevance`), plus ``beta`` times the softmax over the image of its patch's
  information entropy, ``H_j = -sum_v p_v log2 p_v`` over the patch's grey-level histogram (:func:`patch_entropy`).
  Pruned tokens are recycled: those of each cell of a coarse grid over the image become one token, their
  importance-weighted mean, in the place of the cell's most important pruned token (:func:`recycled_selection`,
  :func:`recycle`).

:func:`kept_indices` turns a score into the sorted positions kept, with one rule for a batch:
sample ``b`` has ``n_b`` candidates and should keep ``ceil(keep * n_b)`` of them; every sample
drops the same number ``D = min_b (n_b - ceil(keep * n_b))`` of its lowest-scored candidates, so
sequences stay rectangular and each sample keeps at least its own ``ceil(keep * n_b)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .attention import per_query_head


def additive_bias(mask: Tensor | None) -> Tensor | None:
    """An attention mask as an additive float32 bias: boolean (True = attend) -> 0 / -inf; float as given."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def row_attention(q_rows: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Attention probabilities of a few query rows over every key, per head: ``[B, H, R, N]`` (float32).

    ``q_rows`` is ``[B, H, R, D]``, ``k`` is ``[B, Hkv, N, D]`` with ``H % Hkv == 0`` (grouped kv heads
    are shared by consecutive query heads, as in transformers' ``repeat_kv``); ``bias`` is additive and
    broadcastable to ``[B, H, R, N]``.
    """
    k = per_query_head(k.float(), q_rows.shape[1], "row_attention")
    logits = (q_rows.float() @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def vision_share(probs: Tensor, candidates: Tensor) -> Tensor:
    """PLPHP's vision attention of a layer: the share of ``probs`` (``[..., B, H, N]``, rows summing to 1, leading
    dimensions for layers) that lands on ``candidates`` (``[B, N]`` bool), averaged over heads and samples
    (``[...]``: a 0-dim tensor for one layer)."""
    return (probs * candidates[:, None, :]).sum(-1).mean((-2, -1))


def layer_retention(shares: Tensor, keep: float) -> Tensor:
    """PLPHP's per-layer retention: ``r_l = min(1, keep * v_l / mean(v))`` for shares ``v`` ``[L]``."""
    mean = shares.mean().clamp_min(torch.finfo(shares.dtype).tiny)
    return (keep * shares / mean).clamp(min=torch.finfo(shares.dtype).tiny, max=1.0)


def transition_variation(before: Tensor, after: Tensor) -> Tensor:
    """TransPrune's token transition variation across a layer: ``[B, N, C]`` twice -> ``[B, N]``."""
    before, after = before.float(), after.float()
    norm_before, norm_after = before.norm(dim=-1), after.norm(dim=-1)
    magnitude = (norm_after - norm_before).abs() / norm_before.clamp_min(1e-6)
    direction = 1.0 - torch.nn.functional.cosine_similarity(before, after, dim=-1)
    return magnitude + direction


def normalized(scores: Tensor, candidates: Tensor) -> Tensor:
    """``scores`` min-max normalised to [0, 1] over each sample's ``candidates`` (others set to 0)."""
    inf = torch.tensor(float("inf"), device=scores.device)
    low = torch.where(candidates, scores, inf).amin(-1, keepdim=True)
    high = torch.where(candidates, scores, -inf).amax(-1, keepdim=True)
    return torch.where(candidates, (scores - low) / (high - low).clamp_min(1e-12), 0.0)


def num_dropped(keep: float, counts: Sequence[int]) -> int:
    """Candidates every sample drops: ``min_b (n_b - ceil(keep * n_b))`` for candidate counts ``n_b``."""
    return min(n - math.ceil(keep * n) for n in counts)


def kept_indices(scores: Tensor, candidates: Tensor, dropped: int) -> Tensor:
    """Positions kept, ``[B, N - dropped]`` in increasing order: every non-candidate and, per sample,
    all but the ``dropped`` candidates of lowest score (shapes known without reading a tensor on the host)."""
    batch, n = scores.shape
    order_key = torch.where(candidates, scores.float(), float("inf"))
    lowest = order_key.topk(dropped, dim=-1, largest=False, sorted=False).indices
    gone = torch.zeros(batch, n, dtype=torch.int8, device=scores.device).scatter(1, lowest, 1)
    return gone.sort(dim=1, stable=True).indices[:, :n - dropped]  # the kept first, in increasing order


def kept_order(scores: Tensor, candidates: Tensor, dropped: Tensor) -> Tensor:
    """Positions in the order pruning keeps them, for many rankings at once (PLPHP's layers and kv heads):
    ``scores`` ``[..., N]``, ``candidates`` (bool) and ``dropped`` broadcastable to ``scores`` and ``scores[..., :1]``.
    Each row lists every non-candidate in increasing order, then the candidates it keeps in increasing order, then
    its ``dropped`` candidates of lowest score (of equal scores the earlier is dropped first), so the first
    ``N - dropped`` positions of a row are what it keeps. One sort to rank, one to order: no loop over rows."""
    n = scores.shape[-1]
    position = torch.arange(n, device=scores.device)
    rank = torch.where(candidates, scores.float(), float("inf")).argsort(dim=-1, stable=True)  # lowest first
    first = (position < dropped).expand(rank.shape)  # by rank: the dropped ones
    gone = torch.zeros(rank.shape, dtype=torch.bool, device=scores.device).scatter(-1, rank, first)
    return (gone * (2 * n) + candidates * n + position).argsort(-1)


def zeroth_order_sensitivity(fn: Callable[[Tensor], Tensor], x: Tensor, directions: Tensor, step: float,
                             chunk: int = 8) -> Tensor:
    """``mean_j ||fn(x + step u_j) - fn(x - step u_j)|| / (2 step)`` for each token of ``x`` ``[..., T, d]``, over
    the unit ``directions`` ``[m, d]`` (the same for every token), ``chunk`` directions per call of ``fn`` (a
    token-wise map ``[..., T, d] -> [..., T, d']``): ``[..., T]`` float32."""
    total = torch.zeros(x.shape[:-1], device=x.device)
    for u in directions.to(x.device, x.dtype).split(chunk):
        shift = step * u.view(-1, *[1] * (x.ndim - 1), u.shape[-1])  # [c, 1, .., 1, d]
        plus, minus = fn((x + shift).flatten(0, 1)), fn((x - shift).flatten(0, 1))
        total += (plus - minus).float().norm(dim=-1).view(u.shape[0], *x.shape[:-1]).sum(0)
    return total / (2 * step * directions.shape[0])


def diverse_ranks(sensitivity: Tensor, features: Tensor, candidates: Tensor, count: int) -> Tensor:
    """ZOO-Prune's greedy selection of ``count`` candidates per sample, as scores for :func:`kept_indices`:
    ``count - r`` for the candidate picked in round ``r``, 0 for the others. ``sensitivity`` ``[B, N]`` (min-max
    normalised over the candidates here; all ones where it is constant), ``features`` ``[B, N, C]``, ``candidates``
    ``[B, N]`` bool. Round 0 picks the largest weight, each later round the largest weight times the cosine
    distance to the nearest pick so far."""
    batch, n = candidates.shape
    low = torch.where(candidates, sensitivity, float("inf")).amin(-1, keepdim=True)
    high = torch.where(candidates, sensitivity, float("-inf")).amax(-1, keepdim=True)
    weight = torch.where(high > low, (sensitivity - low) / (high - low).clamp_min(1e-12), 1.0).float()
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    rows = torch.arange(batch, device=candidates.device)
    scores = torch.zeros(batch, n, device=candidates.device)
    free = candidates.clone()
    nearest = torch.full((batch, n), float("inf"), device=candidates.device)
    for r in range(count):
        key = weight if r == 0 else weight * nearest
        pick = key.masked_fill(~free, float("-inf")).argmax(-1)
        valid = free[rows, pick]  # a sample whose candidates are all picked picks nothing more
        scores[rows, pick] = torch.where(valid, float(count - r), scores[rows, pick])
        free[rows, pick] = False
        nearest = torch.minimum(nearest, 1 - (unit * unit[rows, pick][:, None]).sum(-1))
    return scores


def global_relevance(attention: Tensor, threshold: float) -> Tensor:
    """VFlowOpt's context relevance from one layer's head-averaged attention ``[B, N, N]`` (rows: queries): the mean
    row of the global tokens, those receiving more than ``threshold`` times the mean received attention (the most
    attended token when none does), ``[B, N]`` float32."""
    attention = attention.float()
    received = attention.mean(1)
    chosen = (received > threshold * received.mean(-1, keepdim=True)) | (received == received.amax(-1, keepdim=True))
    weight = chosen.float()
    return (weight[:, None] @ attention).squeeze(1) / weight.sum(-1, keepdim=True)


def patch_entropy(pixels: Tensor, patch: int, levels: int = 256) -> Tensor:
    """Information entropy (bits) of each ``patch x patch`` patch of images ``[B, C, H, W]``, row-major ``[B, P]``
    float32: the grey value (mean over channels) quantised to ``levels`` levels over each image's own range, and
    ``-sum_v p_v log2 p_v`` over the patch's histogram."""
    grey = pixels.float().mean(1)
    low, high = grey.amin((1, 2), keepdim=True), grey.amax((1, 2), keepdim=True)
    level = ((grey - low) / (high - low).clamp_min(1e-12) * (levels - 1)).round().long()
    b, h, w = level.shape
    cells = level.view(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(b, -1, patch * patch)
    counts = torch.zeros(*cells.shape[:2], levels, device=pixels.device).scatter_add_(
        2, cells, torch.ones(cells.shape, device=pixels.device))
    p = counts / cells.shape[-1]
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


def recycled_selection(scores: Tensor, candidates: Tensor, cells: Tensor, dropped: int) -> tuple[Tensor, Tensor]:
    """VFlowOpt's pruning with recycling, for every sample at once; each keeps all but ``dropped`` candidates.

    ``scores`` ``[B, N]``, ``candidates`` ``[B, N]`` bool, ``cells`` ``[B, N]`` the grid cell of each candidate
    (numbered per sample, ``0..C_b-1``; anything for the others). A sample keeping ``K_b`` candidates keeps its
    ``K_b - C_b`` of highest score as they are; of the rest, each cell's highest becomes that cell's recycled token,
    and where a cell has none left, the next highest remaining tokens are kept as they are, so each sample keeps
    exactly ``K_b``. Returns the kept positions ``[B, N - dropped]`` (ascending) and ``target`` ``[B, N]``: for
    every token merged into a recycled one (the recycled tokens included), that token's position, else -1
    (:func:`recycle` averages them)."""
    batch, n = scores.shape
    position = torch.arange(n, device=scores.device).expand(batch, n)
    count = candidates.sum(-1, keepdim=True)
    n_cells = torch.where(candidates, cells + 1, 0).amax(-1, keepdim=True)
    # rank among the candidates, highest score first (ties: the earlier first); non-candidates rank last
    order = torch.where(candidates, scores.float(), float("-inf")).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, position)
    plain = candidates & (rank < count - dropped - n_cells)
    rest = candidates & ~plain
    # each cell's first remaining token by rank: sort by (cell, rank), take each cell's first
    key = torch.where(rest, cells * n + rank, n * n + position)
    by_cell = key.argsort(-1)
    first = torch.ones_like(rest)
    sorted_cells = cells.gather(1, by_cell)
    first[:, 1:] = sorted_cells[:, 1:] != sorted_cells[:, :-1]
    leader = torch.zeros_like(rest).scatter_(1, by_cell, first & rest.gather(1, by_cell))
    # cells without a remaining token: as many more tokens kept as they are, highest rank first
    missing = n_cells - leader.sum(-1, keepdim=True)
    spare = (rest & ~leader).gather(1, order)
    fill = torch.zeros_like(rest).scatter_(1, order, spare & (spare.cumsum(-1) <= missing))
    kept = ~candidates | plain | leader | fill
    leaders = torch.full((batch, n + 1), -1, device=scores.device).scatter_(
        1, torch.where(leader, cells, n), position)[:, :n]  # cell -> the position of its recycled token
    merged = rest & ~fill
    target = torch.where(merged, leaders.gather(1, torch.where(merged, cells, 0)), -1)
    return kept.int().argsort(dim=-1, descending=True, stable=True)[:, :n - dropped], target


def recycle(x: Tensor, weights: Tensor, target: Tensor) -> Tensor:
    """``x`` ``[B, N, C]`` with each recycled token (:func:`recycled_selection`'s ``target``) replaced by the
    ``weights``-weighted mean of the tokens merged into it (weights below 1e-30 count as 1e-30: a cell of zero
    weights gives the plain mean)."""
    merged = target >= 0
    w = torch.where(merged, weights.float().clamp_min(1e-30), 0.0)[..., None]
    index = torch.where(merged, target, 0)[..., None]
    total = torch.zeros(x.shape, device=x.device).scatter_add_(1, index.expand(x.shape), x.float() * w)
    mass = torch.zeros(*x.shape[:2], 1, device=x.device).scatter_add_(1, index, w)
    receives = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device).scatter_(1, index[..., 0], merged)
    return torch.where(receives[..., None], (total / mass.clamp_min(1e-12)).to(x.dtype), x)
