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
