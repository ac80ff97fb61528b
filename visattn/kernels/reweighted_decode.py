"""Fused decode steps of ``visual_sink`` (VAR) and ``head_modulation`` (PAI, imbalance).

A decode step has one query row per sample; the PyTorch path
(:func:`visattn.core.redistribute.attend_rows` with a redistribution or logit hook) takes about twenty
small launches per layer for it, and at decode time launches are the cost. The Triton kernel computes
the same row at once: ``softmax(q k^T * scale)`` with VAR's sink redistribution (``mode="var"``, Eqs. 4-6
of "See What You Are Told") or PAI's ``l + alpha * |l|`` on image keys (``mode="pai"``; with a per-head
``gain``, imbalance's ``l + alpha * w_h * |l|`` on its selected keys), then ``@ v``. As flash-decoding does, the
keys of a row are shared out among several programs when the rows alone are too few to fill the GPU, and a
second launch merges their partial softmax sums (:func:`split_count` chooses).

:func:`decode_row` dispatches as every kernel of this package does: where the kernel cannot run (no
Triton, not CUDA unless ``TRITON_INTERPRET=1``, float32, an additive float mask, head dim > 256) it
logs that once, or raises :class:`~visattn.errors.KernelUnavailableError` under ``strict=True``, and
returns ``None``; callers then take the PyTorch path, which is the kernel's oracle in the tests.

The launches are the torch op ``visattn::reweighted_decode`` (a ``triton_op`` on GPUs, see
:mod:`visattn.kernels._runtime`), so a compiled decode step captures them as one node; eager inference
launches the kernels directly. The kernels have no backward: a call that needs gradients takes the PyTorch path.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._logging import fallback
from ..errors import ShapeError
from ._runtime import Kernel, launch, op, runtime_unavailable

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MODES = {"var": 1, "pai": 2}


def unavailable_reason(q: Tensor, mask: Tensor | None) -> str | None:
    """Why the kernel cannot take the decode step of ``q`` ``[B, H, 1, D]`` under ``mask``, or ``None``."""
    reason = runtime_unavailable(q)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and q.requires_grad:
        return "gradients (the kernel has no backward)"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the kernel takes float16 or bfloat16)"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (the kernel takes up to 256)"
    if mask is not None and (mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1:3] != (1, 1)):
        return f"a {mask.dtype} mask of shape {tuple(mask.shape)} (the kernel takes a boolean [B, 1, 1, N] mask)"
    return None


def decode_row(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, classes: Tensor, *, scale: float, mode: str,
               alpha: float = 0.0, gain: Tensor | None = None, p: float = 1.0, rho: float = 1.0, summ: float = 0.0,
               splits: int | None = None, strict: bool = False) -> Tensor | None:
    """Attention of one query row: ``q`` ``[B, H, 1, D]``, ``k``/``v`` ``[B, Hkv, Nk, D]`` (last dim
    contiguous), ``mask`` bool ``[B|1, 1, 1, Nk]`` or None, ``classes`` int8 ``[B, n <= Nk]`` (0 text,
    1 sink image token, 2 other image token; keys past ``n`` are text). ``gain`` (``mode="pai"``): float32
    ``[B, H]``, a per-head factor of ``alpha``. ``splits``: how many programs share each row's keys (None:
    enough to fill the GPU, :func:`split_count`). Returns ``[B, 1, H, D]``, or ``None`` where the kernel cannot
    run (see the module doc)."""
    if q.shape[2] != 1:
        raise ShapeError(f"decode_row takes one query row per sample; got {q.shape[2]}")
    reason = unavailable_reason(q, mask)
    if reason is not None:
        fallback(f"reweighted_decode:{mode}:{reason}", f"visattn {mode} decode kernel: {reason}; using the "
                 f"PyTorch path", strict)
        return None
    flags = None
    if mask is not None:  # uint8, 1 = attend: a view in eager; compiled, a cast (Inductor cannot bitcast bool)
        row = mask[:, 0, 0, :]
        flags = row.to(torch.uint8) if torch.compiler.is_compiling() else row.view(torch.uint8)
    if gain is not None:
        gain = gain.float().expand(q.shape[0], q.shape[1]).contiguous()
    return launch(_row_op, _row, q, k, v, flags, classes, gain, scale, MODES[mode], alpha, p, rho, summ,
                  splits or 0)


BLOCK_N = 64
PROGRAMS_PER_SM = 2  # H100, LLaVA-7B shapes (benchmarks/decode_kernel.py): 512 rows run best unsplit, 32 in 9
SPLIT_KEYS = 2 * BLOCK_N  # the fewest keys a split streams


def split_count(rows: int, n_keys: int, device: torch.device) -> int:
    """Programs per (sample, kv head) row: enough for ``rows`` rows to give every SM of ``device``
    ``PROGRAMS_PER_SM`` programs, each streaming at least ``SPLIT_KEYS`` keys (one program per row off CUDA)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(-(-PROGRAMS_PER_SM * sms // rows), n_keys // SPLIT_KEYS))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_TRITON_MODULE = "visattn.kernels._reweighted_decode_triton"
_DECODE = Kernel(_TRITON_MODULE, "reweighted_decode_kernel")
_COMBINE = Kernel(_TRITON_MODULE, "combine_kernel")


def _row(q: Tensor, k: Tensor, v: Tensor, flags: Tensor | None, classes: Tensor, gain: Tensor | None, scale: float,
         mode: int, alpha: float, p: float, rho: float, summ: float, splits: int, traced: bool = False) -> Tensor:
    """The launches (``flags``: the mask as uint8 ``[B|1, Nk]``; ``splits`` 0: :func:`split_count`'s); ``traced``:
    inside the op's body."""
    b, h, _, d = q.shape
    n = k.shape[2]
    splits = splits or split_count(b * k.shape[1], n, q.device)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    per_split = -(-n // (splits * BLOCK_N)) * BLOCK_N  # whole tiles; the last split may be shorter
    splits = max(1, -(-n // per_split))
    block_d = max(16, 1 << (d - 1).bit_length())
    out = _empty_row(q)
    stat = acc = out  # read only with several splits
    if splits > 1:
        stat = torch.empty(b, h, splits, 4, dtype=torch.float32, device=q.device)
        acc = torch.empty(b, h, splits, 3, block_d, dtype=torch.float32, device=q.device)
    mask_b = flags.stride(0) if flags is not None and flags.shape[0] > 1 else 0
    hkv = k.shape[1]
    group = h // hkv
    _DECODE(lambda meta: (b, hkv, splits), q, k, v, out, stat, acc, classes, classes if flags is None else flags,
            classes if gain is None else gain,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), out.stride(0), out.stride(2), classes.stride(0), mask_b,
            1 if flags is None else flags.stride(-1), h, n, per_split, classes.shape[1], group, scale,
            alpha, p, rho, summ, traced=traced, HEAD_D=d, BLOCK_D=block_d, BLOCK_N=BLOCK_N,
            BLOCK_G=max(16, 1 << (group - 1).bit_length()), MODE=mode, HAS_MASK=flags is not None,
            HAS_GAIN=gain is not None, SPLIT=splits > 1, num_warps=4)
    if splits > 1:
        _COMBINE(lambda meta: (b, h), out, stat, acc, out.stride(0), out.stride(2), splits, p, rho, summ,
                 traced=traced, HEAD_D=d, BLOCK_D=block_d, BLOCK_S=max(2, 1 << (splits - 1).bit_length()),
                 MODE=mode, num_warps=4)
    return out


def _empty_row(q: Tensor) -> Tensor:
    b, h, _, d = q.shape
    return torch.empty(b, 1, h, d, dtype=q.dtype, device=q.device)


def _row_traced(q: Tensor, k: Tensor, v: Tensor, flags: Tensor | None, classes: Tensor, gain: Tensor | None,
                scale: float, mode: int, alpha: float, p: float, rho: float, summ: float, splits: int) -> Tensor:
    return _row(q, k, v, flags, classes, gain, scale, mode, alpha, p, rho, summ, splits, traced=True)


_row_op = op("visattn::reweighted_decode", _row_traced, lambda q, *args: _empty_row(q))
