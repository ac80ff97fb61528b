"""Routed block-sparse flash attention: one kernel behind BiFormer, VSA-style tile top-k, GRAT and STA.

Papers: BiFormer (Zhu et al., CVPR 2023, bi-level routing attention), VSA (video sparse attention:
tile-level top-k, trained through the sparse kernel) and FlashAttention-2 (Dao, 2023; the
online-softmax forward and the dq / dk-dv backward split used here).

For query block ``i`` (tokens ``[i * block_q, (i + 1) * block_q)``) let ``S_i`` be the tokens of the kv
blocks ``kv_indices[b, h, i, :kv_counts[b, h, i]]`` together with every token of the ``always_kv``
ranges. Each query row ``x`` of the block computes

    o_x = sum_{y in S_i} softmax_y(scale * q_x . k_y) v_y,   lse_x = log sum_{y in S_i} exp(scale * q_x . k_y)

and a row with ``S_i`` empty gives ``o_x = 0``, ``lse_x = -inf`` (the reference's convention). The
kernel visits only the listed blocks, so its cost is proportional to the kept fraction.

Options and their identity values: listing every kv block for every query block reproduces dense
attention; ``always_kv=None`` adds nothing; ``scale=None`` is ``D ** -0.5``.

Dispatch: CUDA tensors (or any tensors while ``TRITON_INTERPRET=1``) with Triton importable run the
Triton kernels; anything else falls back to :func:`visattn.core.attention.block_sparse_attention_reference`,
logged once, or raises :class:`~visattn.errors.KernelUnavailableError` under ``strict=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._logging import fallback
from ..core.attention import block_sparse_attention_reference, check_block_lists, check_order, to_rows
from ..errors import ShapeError
from ._runtime import Kernel, interpreting, needs_op, op, runtime_unavailable

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


def kernel_unavailable_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the Triton kernel cannot run on these tensors, or ``None`` when it can."""
    reason = runtime_unavailable(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} is not supported by the kernel (float16 or bfloat16)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} exceeds the kernel's maximum {MAX_HEAD_DIM}"
    return None


@dataclass(frozen=True)
class _Plan:
    """The block lists as the kernels read them (int32, contiguous), always blocks split off."""

    kv_indices: Tensor          # [Bi, Hi, nqb, max_kv] int32, always blocks removed
    kv_counts: Tensor           # [Bi, Hi, nqb] int32
    num_kv_blocks: int
    always_blocks: Tensor | None = None   # [nA] int32: kv blocks holding always-attended tokens
    always_tokens: Tensor | None = None   # [N_kv] int8: 1 on always-attended tokens
    always_listed: Tensor | None = None   # [Bi, Hi, nqb, nA] int8: query block listed always block a
    order: Tensor | None = None           # [N] int32: the routed order's tokens' positions in memory

    @property
    def num_always(self) -> int:
        return 0 if self.always_blocks is None else int(self.always_blocks.numel())


def _int32(t: Tensor) -> Tensor:
    """``t`` as contiguous int32; ``t`` itself when it is (asked in Python: each tensor method call costs the host
    a dispatch, and eager calls of small kernels are bound by the host)."""
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _make_plan(kv_indices: Tensor, kv_counts: Tensor, always_kv: Sequence[tuple[int, int]] | None,
               order: Tensor | None, *, num_kv: int, block_k: int) -> _Plan:
    nkb = -(-num_kv // block_k)
    idx, cnt = _int32(kv_indices), _int32(kv_counts)
    order = None if order is None else _int32(order)
    ranges = [(int(s), int(e)) for s, e in (always_kv or ()) if int(e) > int(s)]
    if not ranges:
        return _Plan(idx, cnt, nkb, order=order)
    device = idx.device
    tokens = torch.zeros(nkb * block_k, dtype=torch.int8, device=device)
    for start, end in ranges:
        tokens[start:end] = 1
    held = [j for j in range(nkb) if any(s < (j + 1) * block_k and e > j * block_k for s, e in ranges)]
    blocks = torch.tensor(held, dtype=torch.long, device=device)  # known on the host: no sync, no dynamic shape
    holds = torch.zeros(nkb, dtype=torch.bool, device=device)
    holds[blocks] = True
    slot = torch.full((nkb + 1,), -1, dtype=torch.long, device=device)
    slot[blocks] = torch.arange(len(held), device=device)
    valid = torch.arange(idx.shape[-1], device=device) < cnt.unsqueeze(-1)
    safe = torch.where(valid, idx.long(), nkb)  # unused slots may hold anything
    in_always = valid & holds[safe.clamp(max=nkb - 1)] & (safe < nkb)
    listed = torch.zeros(*idx.shape[:3], len(held) + 1, dtype=torch.int8, device=device)
    listed.scatter_(-1, torch.where(in_always, slot[safe], len(held)), 1)
    keep = valid & ~in_always
    listing = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    return _Plan(idx.gather(-1, listing).contiguous(), keep.sum(-1).to(torch.int32), nkb,
                 blocks.to(torch.int32), tokens[:num_kv].contiguous(), listed[..., :-1].contiguous(), order)


def _transpose_lists(plan: _Plan) -> tuple[Tensor, Tensor]:
    """For each kv block, the query blocks that list it: ``([Bi, Hi, nkb, nqb], [Bi, Hi, nkb])`` int32.

    Built with a sort and a scatter, without host synchronisation: unused list slots get a
    sentinel key that sorts last, and the lists are ``nqb`` wide (the most they can hold).
    """
    idx, cnt, nkb = plan.kv_indices, plan.kv_counts, plan.num_kv_blocks
    bi, hi, nqb, max_kv = idx.shape
    device = idx.device
    groups = bi * hi * nkb
    valid = torch.arange(max_kv, device=device) < cnt.unsqueeze(-1)
    group = torch.arange(bi * hi, device=device).view(bi, hi, 1, 1) * nkb + idx.long()
    qblk = torch.arange(nqb, device=device).view(1, 1, nqb, 1)
    pair = torch.where(valid, group * nqb + qblk, groups * nqb).flatten().sort().values
    key, q_sorted = pair // nqb, pair % nqb  # (bh, kv block) major, query block minor; sentinel last
    counts = torch.zeros(groups + 1, dtype=torch.long, device=device)
    counts.index_add_(0, key, torch.ones_like(key))
    pos = torch.arange(key.numel(), device=device) - (counts.cumsum(0) - counts)[key]
    pos = torch.where(key < groups, pos, 0)
    out = torch.zeros(groups + 1, nqb, dtype=torch.int32, device=device)
    out[key, pos] = q_sorted.to(torch.int32)
    return out[:groups].view(bi, hi, nkb, nqb), counts[:groups].view(bi, hi, nkb).to(torch.int32)


def _next_pow2(x: int) -> int:
    return 1 << max(x - 1, 0).bit_length()


def _interp_tile(block: int) -> int:
    return min(32, max(16, _next_pow2(block)))


def _meta(q: Tensor, k: Tensor, plan: _Plan, block_q: int, block_k: int) -> dict:
    """Compile-time flags; under the interpreter (no autotuner) also fixed small tiles."""
    head_dim = q.shape[-1]
    padded = max(16, _next_pow2(head_dim))
    interpreted = interpreting()
    meta = dict(GROUP=q.shape[1] // k.shape[1], BLOCK_Q=block_q, BLOCK_K=block_k, HEAD_DIM=padded,
                MASK_Q=q.shape[2] % block_q != 0, MASK_KV=k.shape[2] % block_k != 0,
                MASK_D=head_dim != padded, HAS_ALW=plan.always_blocks is not None,
                DOT_F32=interpreted and q.dtype == torch.bfloat16)
    if interpreted:
        meta.update(BLOCK_M=_interp_tile(block_q), BLOCK_N=_interp_tile(block_k))
    return meta


def _bcast_stride(t: Tensor, dim: int) -> int:
    return 0 if t.shape[dim] == 1 else t.stride(dim)


def _list_strides(idx: Tensor, cnt: Tensor) -> tuple[int, ...]:
    return (_bcast_stride(idx, 0), _bcast_stride(idx, 1), idx.stride(2), _bcast_stride(cnt, 0),
            _bcast_stride(cnt, 1))


def _always_args(plan: _Plan) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int]]:
    """The always-attended blocks' tensors and strides; without them the counts stand in for the pointers
    (the kernels do not read them), as any placeholder made here would be a fake tensor when traced."""
    lst = plan.always_listed
    if lst is None:
        return plan.kv_counts, plan.kv_counts, plan.kv_counts, (0, 0, 0)
    return (plan.always_blocks, plan.always_tokens, lst,
            (_bcast_stride(lst, 0), _bcast_stride(lst, 1), lst.stride(2)))


_TRITON_MODULE = "visattn.kernels._block_sparse_triton"
_FWD = Kernel(_TRITON_MODULE, "fwd_kernel", "fwd_tuned")
_DQ = Kernel(_TRITON_MODULE, "dq_kernel", "dq_tuned")
_DKDV = Kernel(_TRITON_MODULE, "dkdv_kernel", "dkdv_tuned")


def _empty_out(q: Tensor) -> Tensor:
    """The output ``[B, H, N, D]``, laid out as ``[B, N, H, D]`` in memory (as SDPA's), so that the usual
    ``out.transpose(1, 2).reshape(B, N, H * D)`` copies nothing."""
    b, h, n, d = q.shape
    return torch.empty_strided((b, h, n, d), (n * h * d, d, h * d, 1), dtype=q.dtype, device=q.device)


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: _Plan, *, block_q: int, block_k: int, scale: float,
             traced: bool = False) -> tuple[Tensor, Tensor]:
    """``(o, lse2)``, ``lse2`` the log-sum-exp in base 2 (float32); ``traced``: inside the op's body."""
    b, h, nq, d = q.shape
    nqb = -(-nq // block_q)
    o = _empty_out(q)
    lse = torch.empty(b, h, nq, dtype=torch.float32, device=q.device)
    alw_blk, alw_tok, alw_lst, lst_strides = _always_args(plan)
    _FWD(lambda m: (nqb * -(-block_q // m["BLOCK_M"]), b * h),
         q, k, v, o, lse, plan.kv_indices, plan.kv_counts, alw_blk, alw_tok, alw_lst,
         plan.kv_counts if plan.order is None else plan.order,
         *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
         *_list_strides(plan.kv_indices, plan.kv_counts), *lst_strides,
         h, nq, k.shape[2], d, plan.num_always, scale * _LOG2E, traced=traced,
         ORDERED=plan.order is not None, **_meta(q, k, plan, block_q, block_k))
    return o, lse


def _backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Tensor | None,
              plan: _Plan, *, block_q: int, block_k: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-nq // block_q), plan.num_kv_blocks
    dq = torch.empty_like(o)  # o, do and dq share o's layout (dense)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    alw_blk, alw_tok, alw_lst, lst_strides = _always_args(plan)
    meta = _meta(q, k, plan, block_q, block_k)
    _DQ(lambda m: (nqb * -(-block_q // m["BLOCK_M"]), b * h),
        q, k, v, o, do, dq, lse, delta, lse if dlse is None else dlse,
        plan.kv_indices, plan.kv_counts, alw_blk, alw_tok, alw_lst,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *_list_strides(plan.kv_indices, plan.kv_counts), *lst_strides,
        h, nq, nk, d, plan.num_always, scale * _LOG2E, scale, traced=True, HAS_DLSE=dlse is not None, **meta)

    q_idx, q_cnt = _transpose_lists(plan)
    if plan.num_always:
        slot = torch.full((nkb,), -1, dtype=torch.int32, device=q.device)
        slot[plan.always_blocks.long()] = torch.arange(plan.num_always, dtype=torch.int32, device=q.device)
    else:
        slot = q_cnt  # not read
    _DKDV(lambda m: (nkb * -(-block_k // m["BLOCK_N"]), b * hkv),
          q, k, v, do, dk, dv, lse, delta, q_idx, q_cnt, slot, alw_tok, alw_lst,
          *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *dk.stride()[:3],
          *_list_strides(q_idx, q_cnt), *lst_strides,
          hkv, nq, nk, d, nqb, scale * _LOG2E, scale, traced=True, **meta)
    return dq, dk, dv


def _attend(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, num_kv_blocks: int,
            always_blocks: Tensor | None, always_tokens: Tensor | None, always_listed: Tensor | None,
            order: Tensor | None, block_q: int, block_k: int, scale: float) -> tuple[Tensor, Tensor]:
    """The forward op over a plan's tensors: ``(o, lse2)`` as :func:`_forward` returns them."""
    plan = _Plan(kv_indices, kv_counts, num_kv_blocks, always_blocks, always_tokens, always_listed, order)
    return _forward(q, k, v, plan, block_q=block_q, block_k=block_k, scale=scale, traced=True)


def _attend_fake(q: Tensor, k: Tensor, v: Tensor, *args) -> tuple[Tensor, Tensor]:
    return _empty_out(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attend_grad(do: Tensor, dlse2: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse2: Tensor,
                 kv_indices: Tensor, kv_counts: Tensor, num_kv_blocks: int, always_blocks: Tensor | None,
                 always_tokens: Tensor | None, always_listed: Tensor | None, order: Tensor | None, block_q: int,
                 block_k: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The backward op: ``(dq, dk, dv)`` (``dlse2``: the gradient of ``lse2``, or ``None``).

    With an ``order``, every tensor is taken into the routed order first (the backward kernels read
    tokens in place) and the gradients are put back."""
    plan = _Plan(kv_indices, kv_counts, num_kv_blocks, always_blocks, always_tokens, always_listed)
    if order is not None:
        do, q, k, v, o = (t.index_select(2, order) for t in (do, q, k, v, o))
        lse2, dlse2 = (None if t is None else t.index_select(2, order) for t in (lse2, dlse2))
    dlse = None  # the kernels take the gradient of the natural lse: d lse / d logits = p folds into delta
    if dlse2 is not None:
        dlse = (dlse2.float() * _LOG2E).contiguous()
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)
    grads = _backward(do, q, k, v, o, lse2, dlse, plan, block_q=block_q, block_k=block_k, scale=scale)
    if order is None:
        return grads
    return tuple(to_rows(g, order) for g in grads)


_attend_op = op("visattn::block_sparse_attention", _attend, _attend_fake)
_attend_grad_op = op("visattn::block_sparse_attention_backward", _attend_grad,
                     lambda do, dlse, q, k, v, *args: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))


def _attend_setup(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, kv_indices, kv_counts, num_kv_blocks, alw_blk, alw_tok, alw_lst, order, block_q, block_k, scale = inputs
    ctx.save_for_backward(q, k, v, *output, kv_indices, kv_counts, alw_blk, alw_tok, alw_lst, order)
    ctx.options = num_kv_blocks, block_q, block_k, scale
    ctx.set_materialize_grads(False)  # an unused lse (or output) gets no zero-filled gradient


def _attend_backward(ctx, do: Tensor | None, dlse2: Tensor | None) -> tuple:
    q, k, v, o, lse2, kv_indices, kv_counts, alw_blk, alw_tok, alw_lst, order = ctx.saved_tensors
    num_kv_blocks, block_q, block_k, scale = ctx.options
    do = torch.zeros_like(o) if do is None else do
    dq, dk, dv = _attend_grad_op(do, dlse2, q, k, v, o, lse2, kv_indices, kv_counts, num_kv_blocks, alw_blk,
                                 alw_tok, alw_lst, order, block_q, block_k, scale)
    return (dq, dk, dv) + (None,) * 10


_attend_op.register_autograd(_attend_backward, setup_context=_attend_setup)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int,
                  always_kv: Sequence[tuple[int, int]] | None, order: Tensor | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ShapeError(f"block_sparse_attention: q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ShapeError(f"block_sparse_attention: k and v must match and share B and D with q; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ShapeError(f"block_sparse_attention: query heads ({q.shape[1]}) must be a multiple of kv heads "
                         f"({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"block_sparse_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 1:
            raise ShapeError(f"block_sparse_attention: {name} must be a positive int; got {blk!r}")
    for rng in always_kv or ():
        if len(rng) != 2 or not 0 <= int(rng[0]) <= int(rng[1]) <= k.shape[2]:
            raise ShapeError(f"block_sparse_attention: always_kv ranges must be (start, end) with "
                             f"0 <= start <= end <= {k.shape[2]}; got {tuple(rng)}")
    if order is not None and (q.shape[2] != k.shape[2] or order.shape != (q.shape[2],)
                              or order.dtype not in (torch.int32, torch.int64)):
        raise ShapeError(f"block_sparse_attention: order must be an int32 or int64 permutation of the "
                         f"{q.shape[2]} tokens, for self-attention (Nq == Nk); got {order.dtype} "
                         f"{tuple(order.shape)} with Nq={q.shape[2]}, Nk={k.shape[2]}")


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_indices: Tensor, kv_counts: Tensor, *,
                           block_q: int, block_k: int, scale: float | None = None,
                           always_kv: Sequence[tuple[int, int]] | None = None, order: Tensor | None = None,
                           return_lse: bool = False, strict: bool = False,
                           check_values: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of each query block to its listed kv blocks (and ``always_kv`` tokens); see the module doc.

    Args:
        q: ``[B, H, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``H % Hkv == 0`` (grouped kv heads).
            The kernel takes float16 / bfloat16 and any ``D <= 256``, any ``Nq``, ``Nk``.
        kv_indices: int32/int64 ``[B|1, H|1, ceil(Nq / block_q), max_kv]``; the first ``kv_counts``
            entries of a row are distinct kv block indices in ``[0, ceil(Nk / block_k))``.
        kv_counts: int32/int64 ``[B|1, H|1, ceil(Nq / block_q)]`` in ``[0, max_kv]``.
        block_q, block_k: query and kv block sizes in tokens (any positive size; 64 or 128 run best).
        scale: logit scale, ``D ** -0.5`` when ``None``.
        always_kv: ``(start, end)`` kv token ranges every query attends to (prefix or text tokens).
        order: for self-attention (``Nq == Nk``), a permutation of the token positions, int ``[N]``: blocks
            (and ``always_kv``) are taken over the tokens in this order, token ``i`` of it being row
            ``order[i]`` of q, k and v; the output stays in the rows of the input. The kernel reads the
            tokens in place (BiFormer's regions, tiles of a video grid), so nothing is copied into that
            order and back. ``None``: the tokens' own order.
        return_lse: also return the float32 natural log-sum-exp ``[B, H, Nq]`` (differentiable).
        strict: raise :class:`~visattn.errors.KernelUnavailableError` instead of falling back.
        check_values: check list values (range, duplicates, counts); this syncs with the host, so hot
            loops whose router is trusted may pass ``False`` (a bad index then reads wrong memory).
    """
    _check_inputs(q, k, v, block_q, block_k, always_kv, order)
    b, h, nq, d = q.shape
    check_block_lists(kv_indices, kv_counts, batch=b, heads=h, num_q_blocks=-(-nq // block_q),
                      num_kv_blocks=-(-k.shape[2] // block_k), check_values=check_values)
    if check_values and order is not None:
        check_order(order, nq)
    scale = d ** -0.5 if scale is None else float(scale)
    reason = kernel_unavailable_reason(q, k, v)
    if reason is not None:
        fallback(f"block_sparse_attention:{reason}", f"visattn block_sparse_attention: {reason}; using the "
                 "PyTorch reference", strict)
        return block_sparse_attention_reference(q, k, v, kv_indices, kv_counts, block_q=block_q,
                                                block_k=block_k, scale=scale, always_kv=always_kv, order=order,
                                                return_lse=return_lse, check_values=False)
    plan = _make_plan(kv_indices, kv_counts, always_kv, order, num_kv=k.shape[2], block_k=block_k)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if needs_op(q, k, v):
        out, lse2 = _attend_op(q, k, v, plan.kv_indices, plan.kv_counts, plan.num_kv_blocks, plan.always_blocks,
                               plan.always_tokens, plan.always_listed, plan.order, block_q, block_k, scale)
    else:
        out, lse2 = _forward(q, k, v, plan, block_q=block_q, block_k=block_k, scale=scale)
    return (out, lse2 * _LN2) if return_lse else out
