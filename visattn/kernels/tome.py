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

ToMe for Stable Diffusion (:func:`match_to_cells`) decides with ``visattn::tome_cells`` (:func:`cells`: four
Triton launches and a zero fill, in place of the core's thirty-odd PyTorch kernels, a sort among them; the same
decision as :func:`visattn.core.merge_sd.match_to_cells`, up to the rounding of equal scores), averages its groups
with ``visattn::tome_cell_mean`` (one gather over the hidden states, in place of the core's scatter-add with
atomics, a zero fill and a division), and adds a merged block's update back onto the residual stream with
``visattn::tome_cell_update`` (one pass in place of three). Eager, a merging block costs the host seven launches.

Dispatch (:func:`bipartite_soft_matching`, :func:`match_to_cells`, as for every kernel of this package): CUDA
tensors (or any tensors under ``TRITON_INTERPRET=1``) with Triton importable (and, for ViTs, at most
``2 * MAX_SET`` image tokens and no key mask) run the kernels; anything else falls back to the core path,
logged once, or raises :class:`~visattn.errors.KernelUnavailableError` under ``strict=True``.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .._logging import fallback
from ..core import merge as core
from ..core import merge_sd
from ._runtime import Kernel, launch, op, runtime_unavailable

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
    """:func:`visattn.core.merge.bipartite_soft_matching` on the kernels where they run (see the module doc).

    ``metric`` may also be ToMe's keys ``[B, H, N, D]``, standing for their mean over heads: the match kernel
    averages them as it reads them (no ``[B, N, D]`` mean is written out); every other path takes the mean first."""
    tokens = (metric.shape[0], metric.shape[-2])
    n_img = tokens[1] - num_prefix
    reason = "a key mask (padded tokens)" if mergeable is not None else unavailable_reason(metric, n_img)
    if metric.ndim == 4 and reason is not None:
        metric = metric.mean(dim=1)
    r = core.merge_count(metric, r, num_prefix, mergeable)
    if r <= 0:
        return core.bipartite_soft_matching(metric, 0)
    if reason is not None:  # r is clamped already: the core decision, not its entry point (no second clamp)
        fallback(f"tome:{reason}", f"visattn tome merge kernels: {reason}; merging through PyTorch", strict)
        return core.merge_functions(core.decide(metric, r, num_prefix, size, mergeable), tokens, size)
    with torch.no_grad():
        m = core.Match(*match(metric, r, num_prefix, size))
    return core.merge_functions(m, tokens, size,
                                mean=lambda x, add: merge_mean(x, m.kept, m.src, m.dst_out, size, m.size, add))


def _kernels():
    """The Triton module, imported on first use (so ``TRITON_INTERPRET`` is read then)."""
    return importlib.import_module("visattn.kernels._tome_triton")


def _pow2(v: int, low: int) -> int:
    return max(low, 1 << (v - 1).bit_length())


def match(metric: Tensor, r: int, num_prefix: int, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decision for ``metric`` ``[B, N, D]`` (or keys ``[B, H, N, D]``, averaged over heads as they are read):
    ``(kept [B, N - r], src [B, r], dst_out [B, r], size [B, N - r])`` as in :class:`visattn.core.merge.Match`."""
    return launch(_match_op, _match, metric, r, num_prefix, size)


def _match_outputs(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, n = metric.shape[0], metric.shape[-2]
    longs = dict(dtype=torch.long, device=metric.device)
    return (torch.empty(batch, n - r, **longs), torch.empty(batch, r, **longs), torch.empty(batch, r, **longs),
            torch.empty(batch, n - r, dtype=torch.float32, device=metric.device))


def _match(metric: Tensor, r: int, num_prefix: int, size: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    keys = metric if metric.ndim == 4 else metric[:, None]  # [B, H, N, D], H = 1 for a metric
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    batch, heads, n, d = keys.shape
    n_img = n - num_prefix
    a_off = num_prefix % 2
    na, nb = (n_img - a_off + 1) // 2, (n_img - (1 - a_off) + 1) // 2
    kept, src, dst, new_size = _match_outputs(metric, r)
    size_in = new_size if size is None else size.float().contiguous()
    _kernels()._match_kernel[(batch,)](
        keys, size_in, kept, src, dst, new_size, n, d, heads, *keys.stride()[:3], num_prefix, r, n - r, na, nb,
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


def match_to_cells(metric: Tensor, dst: Tensor, src: Tensor, r: int, *, strict: bool = False) -> merge_sd.CellMerge:
    """:func:`visattn.core.merge_sd.match_to_cells` decided by :func:`cells` and averaged by :func:`cell_mean` where
    the kernels run (see the module doc)."""
    batch, n, _ = metric.shape
    r = min(r, src.numel())
    if r <= 0:
        return merge_sd.CellMerge(None, n)
    reason = runtime_unavailable(metric)
    if reason is not None:
        fallback(f"tome-sd:{reason}", f"visattn tome merge kernel: {reason}; merging through PyTorch", strict)
        return merge_sd.match_to_cells(metric, dst, src, r)
    with torch.no_grad():
        slot, perm, first = cells(metric, dst, src, r)
    kept = src.numel() - r
    decision = merge_sd.CellMerge(slot, n - r, lambda: torch.cat([perm[:, :kept].long(), dst.expand(batch, -1)], 1))
    decision.average = lambda x: cell_mean(x, perm, first, slot)
    decision.add_update = lambda x, out, merged: cell_update(x, out, merged, slot, first)
    return decision


def cells(metric: Tensor, dst: Tensor, src: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe-SD's decision for ``metric`` ``[B, N, C]`` (``0 < r <= len(src)``): ``slot`` ``[B, N]`` (int64, as
    :class:`~visattn.core.merge_sd.CellMerge` takes it), and the groups as :func:`cell_mean` reads them: ``perm``
    ``[B, N]`` (int32, the input tokens sorted by slot) and ``first`` ``[B, N - r + 1]`` (int32, each slot's
    offset in ``perm``)."""
    return launch(_cells_op, _cells, metric, dst, src, r)


_SCORE_TILE = 64  # sources, destinations and channels of a similarity tile
_RANK_ROWS, _RANK_COLS, _PLACE_ROWS, _START_ROWS = 64, 128, 256, 1024


def _cells_out(metric: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, _ = metric.shape
    return (metric.new_empty(batch, n, dtype=torch.long), metric.new_empty(batch, n, dtype=torch.int32),
            metric.new_empty(batch, n - r + 1, dtype=torch.int32))


def _cells(metric: Tensor, dst: Tensor, src: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    batch, n, c = metric.shape
    s, d = src.numel(), dst.numel()
    if metric.stride(2) != 1:
        metric = metric.contiguous()
    slot, perm, first = _cells_out(metric, r)
    best = metric.new_empty(batch, s, dtype=torch.float32)
    partner, rank, within = (metric.new_empty(batch, s, dtype=torch.int32) for _ in range(3))
    counts = metric.new_zeros(batch, d, dtype=torch.int32)
    _CELL_SCORE(lambda meta: (-(-s // _SCORE_TILE), batch), metric, src, dst, best, partner, s, d, c,
                metric.stride(0), metric.stride(1),
                BLOCK_M=_SCORE_TILE, BLOCK_D=_SCORE_TILE, BLOCK_C=_SCORE_TILE, num_warps=4)
    _CELL_RANK(lambda meta: (-(-s // _RANK_ROWS), batch), best, partner, src, slot, rank, within, counts, n, s, d, r,
               BLOCK_I=_RANK_ROWS, BLOCK_J=_RANK_COLS, num_warps=4)
    _CELL_START(lambda meta: (batch,), counts, dst, slot, first, perm, n, d, s - r,
                BLOCK=_START_ROWS, num_warps=4)
    _CELL_PLACE(lambda meta: (-(-s // _PLACE_ROWS), batch), src, partner, rank, within, first, perm, n, s, d, r,
                BLOCK=_PLACE_ROWS, num_warps=4)
    return slot, perm, first


_CELL_SCORE, _CELL_RANK, _CELL_START, _CELL_PLACE = (
    Kernel("visattn.kernels._tome_triton", name)
    for name in ("cell_score_kernel", "cell_rank_kernel", "cell_start_kernel", "cell_place_kernel"))
_cells_op = op("visattn::tome_cells", _cells, lambda metric, dst, src, r: _cells_out(metric, r), opaque=True)


def cell_mean(x: Tensor, perm: Tensor, first: Tensor, slot: Tensor) -> Tensor:
    """``[B, N, C] -> [B, N_out, C]``: slot ``j`` the mean of the rows ``perm[b, first[b, j]:first[b, j + 1]]``.

    ``slot`` ``[B, N]`` (the slot of each input token; ``perm`` sorts it) gives the gradient,
    ``dx_i = dy_{slot(i)} / |G_{slot(i)}|``."""
    return launch(_cell_mean_op, _cell_mean, x, perm, first, slot)


_CELL_MEAN = Kernel("visattn.kernels._tome_triton", "cell_mean_kernel")
_CELL_ROWS, _CELL_CHANNELS = 16, 128  # a program's tile: output slots by channels


def _cell_mean_out(x: Tensor, first: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], first.shape[1] - 1, x.shape[2])


def _cell_mean(x: Tensor, perm: Tensor, first: Tensor, slot: Tensor) -> Tensor:
    batch, n, c = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = _cell_mean_out(x, first)
    n_out = out.shape[1]
    _CELL_MEAN(lambda meta: (-(-n_out // _CELL_ROWS), -(-c // _CELL_CHANNELS), batch),
               x, out, perm, first, n, n_out, c, x.stride(0), x.stride(1),
               BLOCK_J=_CELL_ROWS, BLOCK_C=_CELL_CHANNELS, num_warps=4)
    return out


_cell_mean_op = op("visattn::tome_cell_mean", _cell_mean, lambda x, perm, first, slot: _cell_mean_out(x, first),
                   opaque=True)


def _cell_mean_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, perm, first, slot = inputs
    ctx.save_for_backward(first, slot)


def _cell_mean_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    first, slot = ctx.saved_tensors
    size = (first[:, 1:] - first[:, :-1]).to(grad.dtype)
    dx = (grad / size[..., None]).gather(1, slot[..., None].expand(-1, -1, grad.shape[2]))
    return dx, None, None, None


_cell_mean_op.register_autograd(_cell_mean_backward, setup_context=_cell_mean_setup)


def cell_update(x: Tensor, out: Tensor, merged: Tensor, slot: Tensor, first: Tensor) -> Tensor:
    """``x + (out - merged)[slot]``: ``x`` ``[B, N, C]``, ``out`` and ``merged`` ``[B, N_out, C]``, in one pass
    (``first``, the groups' offsets as for :func:`cell_mean`, gives the gradient)."""
    return launch(_cell_update_op, _cell_update, x, out, merged, slot, first)


_CELL_UPDATE = Kernel("visattn.kernels._tome_triton", "cell_update_kernel")


def _cell_update(x: Tensor, out: Tensor, merged: Tensor, slot: Tensor, first: Tensor) -> Tensor:
    batch, n, c = x.shape
    x, out, merged = x.contiguous(), out.contiguous(), merged.contiguous()
    y = torch.empty_like(x)
    _CELL_UPDATE(lambda meta: (-(-n // _CELL_ROWS), -(-c // _CELL_CHANNELS), batch),
                 x, out, merged, slot, y, n, out.shape[1], c,
                 BLOCK_I=_CELL_ROWS, BLOCK_C=_CELL_CHANNELS, num_warps=4)
    return y


_cell_update_op = op("visattn::tome_cell_update", _cell_update,
                     lambda x, out, merged, slot, first: torch.empty_like(x, memory_format=torch.contiguous_format),
                     opaque=True)


def _cell_update_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[3], inputs[4])


def _cell_update_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """``dx = dy``; ``d out = -d merged`` = the sum of ``dy`` over each group."""
    slot, first = ctx.saved_tensors
    total = grad.new_zeros(grad.shape[0], first.shape[1] - 1, grad.shape[2]).scatter_add_(
        1, slot[..., None].expand_as(grad), grad)
    return grad, total, -total, None, None


_cell_update_op.register_autograd(_cell_update_backward, setup_context=_cell_update_setup)
