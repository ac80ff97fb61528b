"""ToMe's bipartite soft matching (Bolya et al., 2023) in two Triton launches per merging block.

The PyTorch path in :mod:`visattn.core.merge` takes some thirty small kernels per block to decide a
merge and three more to apply it; at ViT-B sizes that costs more than the merged tokens save. Here
:func:`match` decides in one launch (one program per sequence, all in registers) and
:func:`merge_mean` applies the size-weighted average in one pass over the hidden states. Both
compute exactly what :func:`visattn.core.merge.bipartite_soft_matching` computes (their oracle; ties
may pair differently).

Both are torch custom ops, ``visattn::tome_match`` and ``visattn::tome_merge_mean`` (the average with its
gradient, :func:`_merge_mean_backward`), so ``torch.compile`` captures a merging block without a graph
break and CUDA graphs record it (:func:`visattn.kernels._runtime.launch`).

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
from ._runtime import launch, runtime_unavailable

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
                                mean=lambda x, add: merge_mean(x, m.kept, m.src, m.dst_out, size, m.size, add))


def _kernels():
    """The Triton module, imported on first use (so ``TRITON_INTERPRET`` is read then)."""
    return importlib.import_module("visattn.kernels._tome_triton")


def _pow2(v: int, low: int) -> int:
    return max(low, 1 << (v - 1).bit_length())


def match(metric: Tensor, r: int, num_prefix: int, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decision for ``metric`` ``[B, N, D]``: ``(kept [B, N - r], src [B, r], dst_out [B, r],
    size [B, N - r])`` as in :class:`visattn.core.merge.Match`."""
    return launch(_match_op, _match, metric, r, num_prefix, size)


def _match_outputs(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n, _ = metric.shape
    longs = dict(dtype=torch.long, device=metric.device)
    return (torch.empty(batch, n - r, **longs), torch.empty(batch, r, **longs), torch.empty(batch, r, **longs),
            torch.empty(batch, n - r, dtype=torch.float32, device=metric.device))


def _match(metric: Tensor, r: int, num_prefix: int, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n, d = metric.shape
    n_img = n - num_prefix
    a_off = num_prefix % 2
    na, nb = (n_img - a_off + 1) // 2, (n_img - (1 - a_off) + 1) // 2
    metric = metric.contiguous()
    kept, src, dst, new_size = _match_outputs(metric, r)
    size_in = new_size if size is None else size.float().contiguous()
    _kernels()._match_kernel[(batch,)](
        metric, size_in, kept, src, dst, new_size, n, d, num_prefix, r, n - r, na, nb,
        A_OFF=a_off, B_OFF=1 - a_off, HAS_SIZE=size is not None,
        BLOCK=_pow2(max(na, nb), 16), BLOCK_D=_pow2(d, 16),
        BLOCK_P=_pow2(num_prefix, 2), num_warps=8)
    return kept, src, dst, new_size


_match_op = torch.library.custom_op("visattn::tome_match", _match, mutates_args=())
_match_op.register_fake(lambda metric, r, num_prefix, size: _match_outputs(metric, r))


def merge_mean(x: Tensor, kept: Tensor, src: Tensor, dst: Tensor, size: Tensor | None, new_size: Tensor,
               add: Tensor | None = None) -> Tensor:
    """``[B, N, C] -> [B, N - r, C]``: every group's size-weighted average of ``x`` (of ``x + add`` when ``add``
    is given: a block's residual stream and its attention branch, summed as they are read); differentiable in
    ``x`` and ``add``."""
    return launch(_merge_mean_op, _merge_mean, x, kept, src, dst, size, new_size, add)


def _merge_mean(x: Tensor, kept: Tensor, src: Tensor, dst: Tensor, size: Tensor | None, new_size: Tensor,
                add: Tensor | None) -> Tensor:
    batch, n, c = x.shape
    n_out = kept.shape[1]
    x = x.contiguous()
    y = x if add is None else add.contiguous()
    out = torch.empty(batch, n_out, c, dtype=x.dtype, device=x.device)
    size_in = new_size if size is None else size.float().contiguous()
    block_c = _pow2(c, 16)
    _kernels()._merge_kernel[(batch * n_out,)](
        x, y, out, kept, src, dst, size_in, new_size, n, n_out, c, src.shape[1],
        HAS_SIZE=size is not None, HAS_ADD=add is not None, BLOCK_C=block_c, BLOCK_R=_pow2(src.shape[1], 2),
        num_warps=max(1, min(8, block_c // 256)))
    return out


_merge_mean_op = torch.library.custom_op("visattn::tome_merge_mean", _merge_mean, mutates_args=())
_merge_mean_op.register_fake(lambda x, kept, src, dst, size, new_size, add: x.new_empty(x.shape[0], kept.shape[1],
                                                                                         x.shape[2]))


def _merge_mean_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, kept, src, dst, size, new_size, add = inputs
    ctx.save_for_backward(kept, src, dst, size, new_size)
    ctx.tokens = x.shape[:2]
    ctx.has_add = add is not None


def _merge_mean_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """``d x_i = s_i / s_G * d x_G`` for the group ``G`` that token ``i`` joined (the same for ``add``)."""
    kept, src, dst, size, new_size = ctx.saved_tensors
    _, unmerge = core.merge_functions(core.Match(kept, src, dst, new_size), ctx.tokens, size)
    s = new_size.new_ones(ctx.tokens) if size is None else size.float()
    weight = s / unmerge(new_size[..., None])[..., 0]
    dx = unmerge(grad) * weight.to(grad.dtype)[..., None]
    return dx, None, None, None, None, None, dx if ctx.has_add else None


_merge_mean_op.register_autograd(_merge_mean_backward, setup_context=_merge_mean_setup)
