"""Attention re-weighting for vision-language models: visual sinks, redistribution, logit modulation.

Framework-free math behind ``visual_sink`` and ``head_modulation``; shapes follow SDPA (``q`` is
``[B, H, Nq, D]``, ``k`` and ``v`` are ``[B, Hkv, Nk, D]``, ``H % Hkv == 0``).

- :func:`find_sinks` — VAR's sink test (Kang et al., 2025, "See What You Are Told: Visual Attention
  Sink in Large Multimodal Models", Sec. 3): a token is a sink when its hidden state, RMS-normalised
  (``x / sqrt(mean(x^2) + eps)``, no learned weight), has a massive value ``|x_d| > tau`` in a sink
  dimension ``d``. The sink dimensions are not a fixed list: they are read from the hidden states as
  the dimensions in which a reference token — the first real token of the sample, the language
  model's own attention sink — is massive (the paper observes that visual sink tokens share the
  massive dimensions of the BOS sink).
- :func:`redistribute` — VAR's attention redistribution (Sec. 4, Eqs. 4-6): in a row of an
  image-centric head (image share ``sum_{j in I} a_j >= summ`` and sink share of it
  ``sum_{j in S} a_j / sum_{j in I} a_j <= rho``), the sink columns ``S`` keep ``p`` of their weight
  and the freed mass ``(1 - p) sum_{j in S} a_j`` goes to the other image columns ``I \\ S`` in
  proportion to their weight; the row still sums to one.
- :func:`amplify_logits` — PAI (Liu et al., 2024, "Paying More Attention to Image: A Training-Free
  Method for Alleviating Hallucination in LVLMs", Eq. 4): ``l_j <- l_j + alpha * |l_j|`` on image
  columns, before the softmax; ``alpha`` may vary per head (a ``[.., H, .., ..]`` weight).
- :func:`spatial_contrast` and :func:`dual_stream_selection` — the token selection of "Fixing Imbalanced
  Attention to Mitigate In-Context Hallucination of Large Vision-Language Model" (2025): the image
  tokens most attended by the vision tower's [CLS] token (locally informative) together with those
  that differ most from their spatial neighbours (spatially significant), a fraction of each.
- :func:`blind_tokens` and :func:`contrast_logits` — AvisC (Woo et al., 2024, "Don't Miss the Forest for the
  Trees: Attentional Vision Calibration for Large Vision Language Models", Sec. 3): the "blind" image tokens,
  whose attention from the generating row, averaged over the layers that give the image most of their attention,
  reaches ``mean + lamb * std`` of the image tokens'; and the calibrated next-token logits
  ``(1 + alpha) * l - alpha * l_blind`` with the adaptive plausibility cut-off of contrastive decoding (tokens
  whose logit is below ``log(beta) + max l`` are removed).
- :func:`attend_rows` — attention for chosen query rows only, with a logit and a probability hook:
  the explicit path these methods take where they change the softmax, everything else staying on
  the fused kernel. Its numerics are transformers' eager attention's (``q k^T`` in the input dtype,
  softmax in float32, probabilities cast back for ``@ v``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ShapeError


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(mean(x^2, -1) + eps)`` in float32 (RMSNorm without its learned weight)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def find_sinks(hidden: Tensor, reference: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Sink dimensions and sink tokens of hidden states ``[B, N, C]``.

    ``reference`` ``[B]`` (int) is, per sample, the token whose massive dimensions define the sink
    dimensions (the first real token). Returns ``dims`` ``[B, C]`` (True where ``|x_ref,d| > tau``)
    and ``tokens`` ``[B, N]`` (True where ``|x_t,d| > tau`` for some sink dimension ``d``), both bool.
    """
    if hidden.ndim != 3 or reference.shape != hidden.shape[:1]:
        raise ShapeError(f"find_sinks takes hidden [B, N, C] and reference [B]; got {tuple(hidden.shape)} "
                         f"and {tuple(reference.shape)}")
    magnitude = rms_normalize(hidden).abs()
    ref = magnitude.gather(1, reference.view(-1, 1, 1).expand(-1, 1, magnitude.shape[-1]))[:, 0]
    dims = ref > tau
    tokens = magnitude.masked_fill(~dims[:, None, :], 0.0).amax(-1) > tau
    return dims, tokens


def redistribute(probs: Tensor, sink: Tensor, image: Tensor, *, p: float, rho: float, summ: float) -> Tensor:
    """VAR redistribution of attention rows ``probs`` ``[..., Nk]`` (float, rows summing to 1).

    ``sink`` and ``image`` are bool, broadcastable to ``probs``; sink columns outside ``image`` are
    ignored. Rows that are not image-centric (image share < ``summ``, sink share of it > ``rho``) or
    have no weight on a sink or on a non-sink image column are returned unchanged.
    """
    image = image.to(probs.dtype)
    sink = sink.to(probs.dtype) * image
    rest = image - sink
    a_sink = (probs * sink).sum(-1, keepdim=True)
    a_rest = (probs * rest).sum(-1, keepdim=True)
    a_image = a_sink + a_rest
    centric = (a_image >= summ) & (a_sink <= rho * a_image) & (a_sink > 0) & (a_rest > 0)
    sink_gain = torch.where(centric, p - 1.0, 0.0)  # sink columns: a -> p a
    rest_gain = torch.where(centric, (1.0 - p) * a_sink / a_rest.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
    return probs * (1.0 + sink * sink_gain + rest * rest_gain)


def amplify_logits(logits: Tensor, weight: Tensor) -> Tensor:
    """PAI: ``logits + weight * |logits|``; ``weight`` (``alpha`` on image columns, 0 elsewhere) broadcasts."""
    return logits + weight * logits.abs()


def spatial_contrast(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """``|| x_t - mean(4-neighbours of t) ||`` per token of ``features`` ``[n, h * w, C]`` laid out row-major
    on the ``grid`` ``(h, w)`` (edges repeat their border): ``[n, h * w]`` float32."""
    n, t, c = features.shape
    h, w = grid
    if t != h * w:
        raise ShapeError(f"spatial_contrast: {t} tokens do not fill a {h}x{w} grid")
    x = features.float().transpose(1, 2).reshape(n, c, h, w)
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    neighbours = (p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]) / 4
    return (x - neighbours).norm(dim=1).reshape(n, t)


def dual_stream_selection(cls_attention: Tensor, contrast: Tensor, fraction: float) -> Tensor:
    """Union of the ``ceil(fraction * T)`` tokens of highest ``cls_attention`` and of highest ``contrast``
    (both ``[n, T]``): bool ``[n, T]``."""
    k = min(cls_attention.shape[-1], math.ceil(fraction * cls_attention.shape[-1]))
    chosen = torch.zeros(cls_attention.shape, dtype=torch.bool, device=cls_attention.device)
    chosen.scatter_(-1, cls_attention.topk(k, dim=-1).indices, True)
    return chosen.scatter_(-1, contrast.topk(k, dim=-1).indices, True)


def blind_tokens(attention: Tensor, image: Tensor, layer_gamma: float, lamb: float) -> Tensor:
    """AvisC's blind tokens. ``attention`` ``[B, L, n]``: per layer, the generating row's attention over the ``n``
    key columns, averaged over heads; ``image`` ``[B, n]`` bool: the image columns. Per sample, the layers are
    ranked by their attention on the image and the fewest whose share of it (over all ``L`` layers) reaches
    ``layer_gamma`` are kept (at least one); their attention is averaged, and the image tokens at or above
    ``mean + lamb * std`` of the image tokens' (unbiased std; 0 for a single token) are blind. ``[B, n]`` bool."""
    a = attention.float() * image[:, None, :]
    share = a.sum(-1)
    share = share / share.sum(-1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
    ranked, order = share.sort(-1, descending=True)
    count = (ranked.cumsum(-1) < layer_gamma).sum(-1, keepdim=True).add_(1).clamp_max_(share.shape[-1])
    kept = (torch.arange(share.shape[-1], device=a.device) < count).float()  # by rank
    chosen = torch.zeros_like(share).scatter_(-1, order, kept)
    mean_attention = (a * chosen[..., None]).sum(1) / count
    tokens = image.sum(-1, keepdim=True)
    mean = mean_attention.sum(-1, keepdim=True) / tokens.clamp_min(1)
    std = (((mean_attention - mean) ** 2 * image).sum(-1, keepdim=True) / (tokens - 1).clamp_min(1)).sqrt()
    return image & (mean_attention >= mean + lamb * std)


def contrast_logits(logits: Tensor, blind: Tensor, alpha: float, beta: float) -> Tensor:
    """AvisC's calibrated logits: ``(1 + alpha) * logits - alpha * blind``, ``-inf`` where ``logits`` is below
    ``log(beta) + max(logits)`` over the vocabulary (the last dimension)."""
    cutoff = logits.amax(-1, keepdim=True) + math.log(beta)
    return ((1 + alpha) * logits - alpha * blind).masked_fill(logits < cutoff, float("-inf"))


def _rows(x: Tensor, rows: Tensor | None) -> Tensor:
    """``x[b, :, rows[b], :]`` for ``x`` ``[B|1, H|1, N|1, M]`` (broadcast dims kept)."""
    if rows is None or x.shape[-2] == 1:
        return x
    index = rows[:, None, :, None].expand(rows.shape[0], x.shape[1], rows.shape[1], x.shape[-1])
    return x.expand(rows.shape[0], *x.shape[1:]).gather(2, index)


def attend_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor | None, *, scale: float, mask: Tensor | None = None,
                logits_fn: Callable[[Tensor], Tensor] | None = None,
                probs_fn: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``softmax(logits_fn(q_r k^T * scale) + mask) -> probs_fn -> @ v`` for the query rows ``rows``.

    ``rows`` ``[B, R]`` (int) picks, per sample, the rows of ``q`` to compute (``None``: all rows);
    ``mask`` is boolean (True = attend) or additive float, broadcastable to ``[B, H, Nq, Nk]``. The
    hooks receive ``[B, H, R, Nk]`` float32 logits and probabilities. Returns ``[B, H, R, D]`` in
    ``v``'s dtype.
    """
    b, h, _, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if h % hkv or k.shape[0] != b or v.shape[:3] != k.shape[:3]:
        raise ShapeError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    q = _rows(q, rows)
    r = q.shape[2]
    grouped = q.reshape(b, hkv, (h // hkv) * r, d)  # query head i uses kv head i // (h // hkv)
    logits = torch.matmul(grouped, k.transpose(-1, -2)).view(b, h, r, nk).float().mul_(scale)
    if logits_fn is not None:
        logits = logits_fn(logits)
    if mask is not None:
        mask = _rows(mask.view((1,) * (4 - mask.ndim) + mask.shape), rows)
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = logits.softmax(-1)
    if probs_fn is not None:
        probs = probs_fn(probs)
    out = torch.matmul(probs.to(v.dtype).view(b, hkv, (h // hkv) * r, nk), v)
    return out.view(b, h, r, d)
