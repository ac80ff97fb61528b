"""Token merging and token pruning: the framework-free math of ToMe and EViT.

**ToMe** (Bolya et al., 2023, "Token Merging: Your ViT But Faster"), bipartite soft matching, run
between a block's attention and its MLP:

1. the image tokens alternate into two sets, A (even positions in the sequence) and B (odd
   positions), as in ToMe's code with its class token at position 0; prefix tokens (class,
   registers) belong to neither and are never merged;
2. every a in A finds its most similar b in B by cosine similarity of the metric (the block's keys
   averaged over heads): ``e_a = max_b cos(k_a, k_b)``;
3. the ``r`` tokens of A with the highest ``e_a`` join their b; every other token is kept;
4. a group G becomes one token, the size-weighted average ``x_G = sum_{i in G} s_i x_i / s_G``
   with size ``s_G = sum_{i in G} s_i`` (sizes start at 1: the number of patches a token holds).

Later attention layers use proportional attention, ``softmax(q k^T / sqrt(d) + log s)``, so a
token that stands for ``s`` patches weighs as much as those ``s`` patches would: :func:`log_size_bias`
is that additive bias, shaped to go into a fused attention kernel as a float mask.

A merge decision is, for every output token, the input token it starts from, and for every
merged token the output token it joins; the group sizes follow. Surviving tokens keep their
relative order (prefix first, then the image tokens in raster order), so the result of a merge is
again a sequence the model's head can read. This module is the PyTorch implementation and the
oracle of the Triton kernels (:mod:`visattn.kernels.tome`, which decide and average in one launch
each and dispatch between themselves and this module); it never calls them.

**EViT** (Liang et al., 2022, "Not All Patches are What You Need"): keep the ``k`` image tokens with
the highest [CLS] attention ``a_i = mean_h softmax(q_cls k^T / sqrt(d))_i`` and fuse the rest into
one token ``x_fused = sum_{i not kept} a_i x_i`` (EViT's Eq. for the "inattentive" tokens), placed
after the kept tokens. :func:`cls_attention` computes ``a`` from ``q_cls`` and the keys alone
(``[B, H, 1, N]``), never the full attention map.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError

MergeFn = Callable[..., Tensor]


def _identity(x: Tensor, mode: str = "mean", add: Tensor | None = None) -> Tensor:
    return x if add is None else x + add


def bipartite_soft_matching(metric: Tensor, r: int, *, num_prefix: int = 0, size: Tensor | None = None,
                            mergeable: Tensor | None = None) -> tuple[MergeFn, MergeFn]:
    """ToMe's matching step: decide which ``r`` image tokens merge into which, once.

    Args:
        metric: ``[B, N, C]`` the similarity features of the ``N`` tokens (ToMe: keys averaged
            over heads).
        r: how many tokens to remove; clamped to half the image tokens. ``r <= 0`` returns
            closures that do nothing.
        num_prefix: leading tokens that are never merged (class and register tokens).
        size: ``[B, N]`` how many patches each token holds (``None``: one each); the weights of
            the ``"mean"`` merge.
        mergeable: ``[B, N]`` bool, False for tokens that must stay apart (padding tokens under a
            key mask); ``r`` is then clamped to the edges between mergeable tokens, which costs
            one device-to-host read.

    Returns:
        ``merge(x, mode="mean", add=None)``: ``[B, N, C] -> [B, N - r, C]``; ``"mean"`` is the size-weighted
        average of each group, ``"sum"`` its plain sum (use it for source maps, ``[B, N, N0]``); with ``add``
        it merges ``x + add`` (the merge kernel sums them as it reads, never writing the sum out);
        ``merge.size`` ``[B, N - r]`` holds the group sizes (float32), ``merge.kept`` ``[B, N - r]``
        the input token each output token starts from (a group's destination). ``unmerge(x)``:
        ``[B, N - r, C] -> [B, N, C]``, every input token gets the value of the group it joined.
    """
    r = merge_count(metric, r, num_prefix, mergeable)
    if r <= 0:
        return _identity, _identity
    return merge_functions(decide(metric, r, num_prefix, size, mergeable), metric.shape[:2], size)


def merge_count(metric: Tensor, r: int, num_prefix: int, mergeable: Tensor | None) -> int:
    """``r`` clamped to half the image tokens and, under a key mask, to the edges between mergeable tokens (the
    tokens are ``metric``'s dim -2: ``[B, N, C]``, or keys ``[B, H, N, D]`` without a mask)."""
    r = min(r, (metric.shape[-2] - num_prefix) // 2)
    if r > 0 and mergeable is not None:
        r = min(r, _mergeable_edges(metric, num_prefix, mergeable))
    return r


def merge_functions(m: Match, tokens: tuple[int, int], size: Tensor | None,
                    mean: Callable[[Tensor, Tensor | None], Tensor] | None = None) -> tuple[MergeFn, MergeFn]:
    """``merge`` and ``unmerge`` (see :func:`bipartite_soft_matching`) of the decision ``m`` over ``tokens``
    ``(B, N)`` tokens; ``mean``, when given, computes ``merge(x, "mean", add)`` (a fused kernel does)."""

    def merge(x: Tensor, mode: str = "mean", add: Tensor | None = None) -> Tensor:
        if mode == "mean" and mean is not None:
            return mean(x, add)
        if add is not None:
            x = x + add
        rows = lambda idx: idx[:, :, None].expand(-1, -1, x.shape[-1])  # noqa: E731
        out, merged = x.gather(1, rows(m.kept)), x.gather(1, rows(m.src))  # every group's kept member, in order
        if mode == "sum":
            return out.scatter_add_(1, rows(m.dst_out), merged)
        if mode == "mean":  # x_G = (s_kept x_kept + sum_src s_src x_src) / s_G (a lone token's weight is 1)
            s = m.size.new_ones(tokens) if size is None else size.float()
            kept_weight = s.gather(1, m.kept) / m.size
            src_weight = s.gather(1, m.src) / m.size.gather(1, m.dst_out)
            out = out * kept_weight.to(x.dtype)[..., None]
            return out.scatter_add_(1, rows(m.dst_out), merged * src_weight.to(x.dtype)[..., None])
        raise ValueError(f"merge mode must be 'mean' or 'sum' (got {mode!r})")

    merge.size = m.size  # type: ignore[attr-defined]
    merge.kept = m.kept  # type: ignore[attr-defined]  # the input token each output token starts from

    def unmerge(x: Tensor) -> Tensor:
        out_index = torch.arange(m.kept.shape[1], device=x.device).expand_as(m.kept)
        assign = m.kept.new_empty(tokens).scatter_(1, m.kept, out_index).scatter_(1, m.src, m.dst_out)
        return x.gather(1, assign[:, :, None].expand(-1, -1, x.shape[-1]))

    return merge, unmerge


def _scores(metric: Tensor, num_prefix: int, mergeable: Tensor | None) -> tuple[Tensor, int, int]:
    """Cosine similarities of set A (rows) to set B (columns), and where A and B start."""
    a, b = num_prefix % 2, 1 - num_prefix % 2  # A: even positions in the sequence
    m = F.normalize(metric[:, num_prefix:], dim=-1)
    scores = m[:, a::2] @ m[:, b::2].transpose(1, 2)
    if mergeable is not None:
        ok = mergeable[:, num_prefix:]
        scores = scores.masked_fill(~(ok[:, a::2, None] & ok[:, None, b::2]), -math.inf)
    return scores, a, b


def _mergeable_edges(metric: Tensor, num_prefix: int, mergeable: Tensor) -> int:
    """The fewest tokens of A, over the batch, that have a mergeable partner in B (a host read)."""
    scores, _, _ = _scores(metric, num_prefix, mergeable)
    return int((scores.amax(-1) > -math.inf).sum(-1).min())


class Match(NamedTuple):
    """A merge decision. ``kept`` ``[B, N - r]``: the input token each output token starts from, in
    order; ``src`` ``[B, r]``: the merged tokens of A; ``dst_out`` ``[B, r]``: the output token each of
    them joins; ``size`` ``[B, N - r]``: the group sizes."""

    kept: Tensor
    src: Tensor
    dst_out: Tensor
    size: Tensor


@torch.no_grad()
def decide(metric: Tensor, r: int, num_prefix: int, size: Tensor | None, mergeable: Tensor | None) -> Match:
    """The decision for exactly ``r`` merges (:func:`merge_count` clamps ``r`` first), as index tensors, in
    PyTorch: no host synchronisation."""
    batch, n, _ = metric.shape
    scores, a, b = _scores(metric, num_prefix, mergeable)
    best, partner = scores.max(dim=-1)
    top = best.topk(r, dim=-1).indices  # positions in A of the r most similar edges
    src = torch.add(num_prefix + a, top, alpha=2)  # sequence positions (A: a, a + 2, ...)
    dst = torch.add(num_prefix + b, partner.gather(1, top), alpha=2)
    is_kept = torch.ones(batch, n, dtype=torch.bool, device=metric.device).scatter_(1, src, False)
    kept = torch.sort(is_kept.logical_not(), dim=1, stable=True).indices[:, :n - r]
    dst_out = is_kept.cumsum(1).gather(1, dst) - 1
    s = torch.ones(batch, n, device=metric.device) if size is None else size.float()
    group_size = s.gather(1, kept).scatter_add_(1, dst_out, s.gather(1, src))
    return Match(kept, src, dst_out, group_size)


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor | None, add: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
    """Apply a merge to hidden states ``[B, N, C]`` (to ``x + add`` when ``add`` is given): ``(x_G, s_G)``
    (``size`` back unchanged when the merge does nothing)."""
    return merge(x, "mean", add), getattr(merge, "size", size)


def key_mask(mask: Tensor, batch: int, num_tokens: int) -> Tensor:
    """A boolean key mask (True = attend) of shape ``[B, 1, 1, N]`` (or ``[1, 1, 1, N]``) as ``[B, N]``.

    These are the masks whose meaning survives merging and pruning: they say which tokens exist,
    not which pairs may attend. Any other mask raises :class:`~visattn.errors.ShapeError` (a ``ValueError``).
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:] != (1, 1, num_tokens) \
            or mask.shape[0] not in (1, batch):
        raise ShapeError(f"only boolean key masks of shape [B, 1, 1, N] (True = attend) can follow merged or "
                         f"pruned tokens; got a {mask.dtype} mask of shape {list(mask.shape)} for {batch} "
                         f"sequences of {num_tokens} tokens")
    return mask.reshape(-1, num_tokens).expand(batch, num_tokens)


def log_size_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """Proportional attention's additive bias ``log s`` as a ``[B, 1, 1, N]`` float mask.

    The row is laid out with a stride that is a multiple of 16 elements, so fused attention
    kernels take it as it is (no padded copy per call); the padding is never read.
    """
    batch, n = size.shape
    bias = torch.empty(batch, 1, 1, -(-n // 16) * 16, dtype=dtype, device=size.device)[..., :n]
    return bias.copy_(size.log()[:, None, None, :])


def parse_r(r: int | tuple[int, float] | list[int], num_layers: int) -> list[int]:
    """ToMe's schedule: tokens removed per layer from an int, an ``(r, inflect)`` pair or a list.

    ``(r, inflect)`` spreads ``num_layers * r`` removals linearly: ``inflect = -1`` removes ``2r``
    at the first layer and 0 at the last, ``0`` is constant, ``+1`` the reverse. A list gives each
    layer's ``r``; missing layers get 0.
    """
    if isinstance(r, list):
        return list(r) + [0] * (num_layers - len(r))
    r, inflect = r if isinstance(r, tuple) else (r, 0.0)
    first = r * (1.0 - inflect)
    step = 2 * (r - first) / max(num_layers - 1, 1)
    return [int(first + step * i) for i in range(num_layers)]


def cls_attention(q_cls: Tensor, k: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Head-averaged attention of the class token to every token, ``[B, N]`` (float32).

    ``q_cls`` is ``[B, H, 1, D]`` and ``k`` ``[B, H, N, D]``: one ``[B, H, 1, N]`` product, never
    the full map. ``bias`` is an additive float mask broadcastable to ``[B, H, 1, N]``.
    """
    logits = (q_cls.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def keep_top_and_fuse(importance: Tensor, keep: int, *, num_prefix: int = 0) -> Callable[[Tensor], Tensor]:
    """EViT's selection: keep the ``keep`` image tokens of highest ``importance``, fuse the rest.

    Args:
        importance: ``[B, N_img]`` the [CLS] attention to each image token (prefix tokens excluded).
        keep: image tokens to keep; ``keep >= N_img`` returns a closure that does nothing.
        num_prefix: leading tokens that are always kept (class and register tokens).

    Returns:
        ``prune(x)``: ``[B, num_prefix + N_img, C] -> [B, num_prefix + keep + 1, C]``: the prefix,
        the kept tokens in their original order, then ``sum_{i not kept} a_i x_i``. ``prune.kept``
        ``[B, keep]``: the image tokens kept (indices among the image tokens, ascending).
    """
    n_img = importance.shape[1]
    if keep >= n_img:
        return lambda x: x
    with torch.no_grad():
        kept = importance.topk(keep, dim=-1).indices.sort(dim=-1).values
        fuse_weight = importance.scatter(1, kept, 0.0)[:, None, :]  # [B, 1, N_img], zero where kept

    def prune(x: Tensor) -> Tensor:
        img = x[:, num_prefix:]
        fused = torch.bmm(fuse_weight.to(x.dtype), img)
        kept_x = img.gather(1, kept[:, :, None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :num_prefix], kept_x, fused], dim=1)

    prune.kept = kept  # type: ignore[attr-defined]
    return prune


def follow_origin(origin: Tensor | None, index: Tensor, num_tokens: int) -> Tensor:
    """The origins (see :class:`visattn.frameworks.base.StepCall`) of the tokens ``index`` ``[B, M]`` takes from a
    sequence of ``num_tokens`` tokens whose origins are ``origin`` (``None``: their own positions)."""
    if origin is None:
        origin = torch.arange(num_tokens, device=index.device).expand(index.shape[0], -1)
    return origin.gather(1, index)


def num_kept(keep_ratio: float, n_img: int) -> int:
    """EViT's count of image tokens kept: ``ceil(keep_ratio * n_img)``."""
    return math.ceil(keep_ratio * n_img)
