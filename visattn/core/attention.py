"""Reference attention in plain PyTorch: the oracle for every kernel and the CPU fallback.

Shapes follow SDPA: ``q`` is ``[B, H, Nq, D]``, ``k`` and ``v`` are ``[B, Hkv, Nk, D]`` with
``H % Hkv == 0`` (grouped kv heads are repeated). Everything is computed in float32 (float64 for
float64 inputs) and returned in ``q``'s dtype. A query row with nothing to attend to returns zeros
(and a log-sum-exp of -inf), the convention the block-sparse kernels follow too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ShapeError


def per_query_head(x: Tensor, heads: int, who: str = "attention") -> Tensor:
    """Keys or values ``[B, Hkv, ...]`` (any trailing dims) repeated so each of the ``heads`` query heads has its own
    (grouped kv heads); ``who`` names the caller in the error when ``heads`` is not a multiple of ``Hkv``."""
    hkv = x.shape[1]
    if heads % hkv:
        raise ShapeError(f"{who}: query heads ({heads}) must be a multiple of kv heads ({hkv})")
    return x if hkv == heads else x.repeat_interleave(heads // hkv, dim=1)


def _acc(x: Tensor) -> Tensor:
    """``x`` in the accumulation dtype: float32, or float64 when ``x`` is float64."""
    return x if x.dtype == torch.float64 else x.float()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ShapeError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def attention_logits(q: Tensor, k: Tensor, *, scale: float | None = None, bias: Tensor | None = None,
                     mask: Tensor | None = None) -> Tensor:
    """``q k^T * scale (+ bias)``, masked positions set to -inf, in float32 (or float64): ``[B, H, Nq, Nk]``.

    ``mask`` is boolean, True where attention is allowed, broadcastable to the logits.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = per_query_head(k, q.shape[1])
    logits = torch.matmul(_acc(q), _acc(k).transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + _acc(bias)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ShapeError(f"mask must be boolean (True = attend); got {mask.dtype}")
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, bias: Tensor | None = None,
              mask: Tensor | None = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Dense attention ``softmax(q k^T * scale + bias) v`` with an optional boolean mask.

    Returns the output ``[B, H, Nq, D]`` and, with ``return_lse``, the float32 log-sum-exp ``[B, H, Nq]``.
    """
    _check_qkv(q, k, v)
    logits = attention_logits(q, k, scale=scale, bias=bias, mask=mask)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # empty rows -> all zeros
    out = torch.matmul(probs, _acc(per_query_head(v, q.shape[1]))).to(q.dtype)
    return (out, lse) if return_lse else out


def attention_probs(q: Tensor, k: Tensor, *, scale: float | None = None, bias: Tensor | None = None,
                    mask: Tensor | None = None, head_mean: bool = True, query_chunk: int = 1024) -> Tensor:
    """Attention probabilities, head-averaged ``[B, Nq, Nk]`` or per head ``[B, H, Nq, Nk]``, float32.

    Queries are processed ``query_chunk`` rows at a time, so a head-averaged map never needs the
    full per-head map in memory.
    """
    rows = []
    for start in range(0, q.shape[2], query_chunk):
        sl = slice(start, start + query_chunk)
        b = bias[..., sl, :] if bias is not None and bias.shape[-2] > 1 else bias
        m = mask[..., sl, :] if mask is not None and mask.shape[-2] > 1 else mask
        p = attention_logits(q[:, :, sl], k, scale=scale, bias=b, mask=m).softmax(dim=-1).nan_to_num(0.0)
        rows.append(p.mean(dim=1) if head_mean else p)
    return torch.cat(rows, dim=-2)


def check_block_lists(kv_indices: Tensor, kv_counts: Tensor, *, batch: int, heads: int, num_q_blocks: int,
                      num_kv_blocks: int, check_values: bool = True) -> None:
    """Validate per-query-block kv lists; raise :class:`ShapeError` naming the problem.

    ``kv_indices``: integer ``[B, H, num_q_blocks, max_kv]``; the first ``kv_counts[b, h, i]`` entries of
    row ``i`` are the kv blocks that query block ``i`` visits, distinct and in ``[0, num_kv_blocks)``.
    ``kv_counts``: integer ``[B, H, num_q_blocks]`` in ``[0, max_kv]``. ``B`` and ``H`` may be 1 to broadcast.
    """
    for name, t in (("kv_indices", kv_indices), ("kv_counts", kv_counts)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"{name} must be int32 or int64; got {t.dtype}")
    if kv_indices.ndim != 4 or kv_counts.ndim != 3:
        raise ShapeError(f"kv_indices must be [B, H, q_blocks, max_kv] and kv_counts [B, H, q_blocks]; "
                         f"got {tuple(kv_indices.shape)} and {tuple(kv_counts.shape)}")
    bi, hi, qi, _ = kv_indices.shape
    if (bi not in (1, batch) or hi not in (1, heads) or qi != num_q_blocks
            or tuple(kv_counts.shape) != (bi, hi, qi)):
        raise ShapeError(f"kv_indices {tuple(kv_indices.shape)} / kv_counts {tuple(kv_counts.shape)} do not fit "
                         f"B={batch}, H={heads}, q_blocks={num_q_blocks} (B and H may be 1)")
    if not check_values:
        return
    max_kv = kv_indices.shape[-1]
    if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > max_kv):
        raise ShapeError(f"kv_counts must lie in [0, {max_kv}] (the length of the kv lists)")
    valid = torch.arange(max_kv, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    used = kv_indices[valid]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_kv_blocks):
        raise ShapeError(f"kv_indices out of range: listed blocks must lie in [0, {num_kv_blocks})")
    padded = torch.where(valid, kv_indices.long(), -1 - torch.arange(max_kv, device=kv_indices.device))
    srt = padded.sort(dim=-1).values
    if bool((srt[..., 1:] == srt[..., :-1]).any()):
        raise ShapeError("kv_indices lists a kv block twice for one query block")


def block_mask(kv_indices: Tensor, kv_counts: Tensor, *, num_q: int, num_kv: int, block_q: int, block_k: int,
               always_kv: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The boolean token mask ``[B, H, num_q, num_kv]`` that the block lists (and ``always_kv`` ranges) describe."""
    nqb, nkb = -(-num_q // block_q), -(-num_kv // block_k)
    b, h, _, max_kv = kv_indices.shape
    valid = torch.arange(max_kv, device=kv_indices.device) < kv_counts.unsqueeze(-1)
    blocks = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=kv_indices.device)
    idx = torch.where(valid, kv_indices.long(), nkb)  # unused slots go to a spare column
    blocks.scatter_(-1, idx, True)
    blocks = blocks[..., :nkb]
    mask = blocks.repeat_interleave(block_q, dim=2)[:, :, :num_q].repeat_interleave(block_k, dim=3)[..., :num_kv]
    if always_kv:
        cols = torch.zeros(num_kv, dtype=torch.bool, device=mask.device)
        for start, end in always_kv:
            cols[start:end] = True
        mask = mask | cols
    return mask


def check_order(order: Tensor, num_tokens: int) -> None:
    """Raise :class:`ShapeError` unless ``order`` is a permutation of ``range(num_tokens)`` (reads the host)."""
    if order.shape != (num_tokens,) or not torch.equal(order.sort().values.long(),
                                                       torch.arange(num_tokens, device=order.device)):
        raise ShapeError(f"order must be a permutation of the {num_tokens} token positions")


def to_rows(t: Tensor, order: Tensor) -> Tensor:
    """The inverse of ``t.index_select(2, order)``: token ``i`` of ``t`` (in ``order``) put back at row ``order[i]``."""
    return torch.empty_like(t).index_copy_(2, order.long(), t)


def block_sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, *,
                                     block_q: int, block_k: int, scale: float | None = None,
                                     always_kv: Sequence[tuple[int, int]] | None = None,
                                     order: Tensor | None = None, return_lse: bool = False,
                                     check_values: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention computed densely with the mask of :func:`block_mask`: the kernels' oracle.

    Query block ``i`` (tokens ``[i*block_q, (i+1)*block_q)``) attends to the kv blocks listed in
    ``kv_indices[b, h, i, :kv_counts[b, h, i]]`` and to every token in the ``always_kv`` ranges. With an
    ``order`` (self-attention), the tokens are taken in that order first (token ``i`` is row ``order[i]``)
    and the output is put back in the input's rows. ``check_values=False`` skips the checks of the lists'
    values (host reads; the caller checked them).
    """
    _check_qkv(q, k, v)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    check_block_lists(kv_indices, kv_counts, batch=b, heads=h, num_q_blocks=-(-nq // block_q),
                      num_kv_blocks=-(-nk // block_k), check_values=check_values)
    for start, end in always_kv or ():
        if not 0 <= start <= end <= nk:
            raise ShapeError(f"always_kv range ({start}, {end}) must lie within [0, {nk}]")
    if order is not None:
        if nq != nk:
            raise ShapeError(f"order is for self-attention (Nq == Nk); got Nq={nq}, Nk={nk}")
        if check_values:
            check_order(order, nq)
        q, k, v = (t.index_select(2, order) for t in (q, k, v))
    mask = block_mask(kv_indices, kv_counts, num_q=nq, num_kv=nk, block_q=block_q, block_k=block_k,
                      always_kv=always_kv)
    out = attention(q, k, v, scale=scale, mask=mask, return_lse=True)
    if order is not None:
        out = tuple(to_rows(t, order) for t in out)
    return out if return_lse else out[0]
