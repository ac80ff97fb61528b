"""ToMe's bipartite soft matching (Bolya et al., 2023) in two Triton launches per merging block.

The PyTorch path in :mod:`visattn.core.merge` takes some thirty small kernels per block to decide a
merge and three more to apply it; at ViT-B sizes that costs more than the merged tokens save. Here
:func:`match` decides in one launch (one program per sequence, all in registers) and
:func:`merge_mean` applies the size-weighted average in one pass over the hidden states. Both
compute exactly what :func:`visattn.core.merge.bipartite_soft_matching` computes (their oracle; ties
may pair differently).

Dispatch (:func:`bipartite_soft_matching`, as for every kernel of this package): CUDA tensors (or any
tensors under ``TRITON_INTERPRET=1``) with Triton importable, at most ``2 * MAX_SET`` image tokens
and no key mask run the kernels; anything else falls back to the core path, logged once, or raises
:class:`~visattn.errors.KernelUnavailableError` under ``strict=True``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .._logging import fallback
from ..core import merge as core
from ._runtime import runtime_unavailable

MAX_SET = 128  # tokens of each set A and B held by one program


def unavailable_reason(t: Tensor, n_img: int) -> str | None:
    """Why the kernels cannot merge a sequence of ``n_img`` image tokens held in ``t``, or ``None``."""
    reason = runtime_unavailable(t)
    if reason is not None:
        return reason
    if (n_img + 1) // 2 > MAX_SET:
        return f"{n_img} image tokens, the kernels take up to {2 * MAX_SET}"
    return None


def bipartite_soft_matching(metric: Tensor, r: int, *, num_prefix: int = 0, size: Tensor | None = None,
                            mergeable: Tensor | None = None, strict: bool = False) -> tuple[core.MergeFn, core.MergeFn]:
    """:func:`visattn.core.merge.bipartite_soft_matching` on the kernels where they run (see the module doc)."""
    r = core.merge_count(metric, r, num_prefix, mergeable)
    if r <= 0:
        return core.bipartite_soft_matching(metric, 0)
    n_img = metric.shape[1] - num_prefix
    reason = "a key mask (padded tokens)" if mergeable is not None else unavailable_reason(metric, n_img)
    if reason is not None:  # r is clamped already: the core decision, not its entry point (no second clamp)
        fallback(f"tome:{reason}", f"visattn tome merge kernels: {reason}; merging through PyTorch", strict)
        return core.merge_functions(core.decide(metric, r, num_prefix, size, mergeable), metric.shape[:2], size)
    with torch.no_grad():
        m = core.Match(*match(metric, r, num_prefix, size))
    return core.merge_functions(m, metric.shape[:2], size,
                                mean=lambda x: merge_mean(x, m.kept, m.src, m.dst_out, size, m.size))


def _kernels():
    """The Triton module, imported on first use (so ``TRITON_INTERPRET`` is read then)."""
    return importlib.import_module("visattn.kernels._tome_triton")


def _pow2(v: int, low: int) -> int:
    return max(low, 1 << (v - 1).bit_length())


def match(metric: Tensor, r: int, num_prefix: int, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decision for ``metric`` ``[B, N, D]``: ``(kept [B, N - r], src [B, r], dst_out [B, r],
    size [B, N - r])`` as in :class:`visattn.core.merge._Match`."""
    batch, n, d = metric.shape
    n_img = n - num_prefix
    a_off = num_prefix % 2
    na, nb = (n_img - a_off + 1) // 2, (n_img - (1 - a_off) + 1) // 2
    metric = metric.contiguous()
    kept = torch.empty(batch, n - r, dtype=torch.long, device=metric.device)
    src = torch.empty(batch, r, dtype=torch.long, device=metric.device)
    dst = torch.empty(batch, r, dtype=torch.long, device=metric.device)
    new_size = torch.empty(batch, n - r, dtype=torch.float32, device=metric.device)
    size_in = new_size if size is None else size.float().contiguous()
    _kernels()._match_kernel[(batch,)](
        metric, size_in, kept, src, dst, new_size, n, d, num_prefix, r, n - r, na, nb,
        A_OFF=a_off, B_OFF=1 - a_off, HAS_SIZE=size is not None,
        BLOCK=_pow2(max(na, nb), 16), BLOCK_D=_pow2(d, 16),
        BLOCK_P=_pow2(num_prefix, 2), num_warps=8)
    return kept, src, dst, new_size


def merge_mean(x: Tensor, kept: Tensor, src: Tensor, dst: Tensor, size: Tensor | None, new_size: Tensor) -> Tensor:
    """``[B, N, C] -> [B, N - r, C]``: every group's size-weighted average."""
    batch, n, c = x.shape
    n_out = kept.shape[1]
    x = x.contiguous()
    out = torch.empty(batch, n_out, c, dtype=x.dtype, device=x.device)
    size_in = new_size if size is None else size.float().contiguous()
    block_c = _pow2(c, 16)
    _kernels()._merge_kernel[(batch * n_out,)](
        x, out, kept, src, dst, size_in, new_size, n, n_out, c, src.shape[1],
        HAS_SIZE=size is not None, BLOCK_C=block_c, BLOCK_R=_pow2(src.shape[1], 2),
        num_warps=max(1, min(8, block_c // 256)))
    return out
