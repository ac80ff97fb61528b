"""Triton kernels of ToMe's bipartite soft matching (see :mod:`visattn.core.merge`, their oracle).

``_match_kernel``: one program per sequence. It loads sets A and B of the metric (summing it over
heads as it reads, when given keys ``[B, H, N, D]``: cosine similarity does not see the mean's ``1 / H``), takes cosine
similarities with one ``tl.dot``, each a's best b, the ``r`` best edges (by rank: how many edges
beat each one), and writes the decision: the kept token of every output position, the merged
tokens and the output position each joins, and the new sizes. Everything in between lives in
registers, as ``BLOCK x BLOCK`` comparison matrices (``BLOCK`` <= 128, so up to 256 image tokens).

``_merge_kernel``: one program per output token: ``x_G = (s_kept x_kept + sum_src s_src x_src) / s_G``,
reading each input row once; with ``HAS_ADD`` it averages ``x + y`` (a block's residual and its attention
branch), so the sum is never written out.

``cell_mean_kernel`` (ToMe for Stable Diffusion, :mod:`visattn.core.merge_sd`): one program per tile of output
slots and channels; each slot averages the rows of its group, read through ``perm`` (the input tokens sorted by
the slot they go to) between ``first[j]`` and ``first[j + 1]``. A gather: no atomics, the same sums in the same
order on every run. ``cell_update_kernel``: a block's residual update unmerged onto the residual stream,
``y_i = x_i + out_{slot(i)} - merged_{slot(i)}``, in one pass.

ToMe-SD's decision (:func:`visattn.core.merge_sd.match_to_cells`, their oracle) in four launches:
``cell_score_kernel``, each source's best cosine similarity to a destination and which one (one program per tile
of sources, looping over tiles of destinations and channels with ``tl.dot``); ``cell_rank_kernel``, each source's
rank (how many sources beat it: a higher score, or an equal one and an earlier index), its slot, and for a merged
source how many earlier-ranked sources joined the same destination (one program per tile of sources, comparing
it with every source: no sort); ``cell_start_kernel``, the groups' offsets (a prefix sum of the destinations'
counts, one program per sample) and the destinations' places in ``perm``; ``cell_place_kernel``, the sources'
places in ``perm``. Within a group the destination comes first, then its sources by rank.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _match_kernel(metric, size_in, kept_out, src_out, dst_out, size_out,
                  N, D, H, stride_b, stride_h, stride_n, P, R, N_OUT, NA, NB, A_OFF: tl.constexpr,
                  B_OFF: tl.constexpr, HAS_SIZE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    ok_a, ok_b = i < NA, i < NB
    pos_a = P + A_OFF + 2 * i  # sequence positions of A (rows) and B (columns)
    pos_b = P + B_OFF + 2 * i
    ok_d = d[None, :] < D
    a = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    bb = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    seq = metric + b.to(tl.int64) * stride_b
    for h in range(H):  # the metric summed over heads (H = 1: the metric itself)
        base = seq + h * stride_h
        a += tl.load(base + pos_a[:, None] * stride_n + d[None, :], mask=ok_a[:, None] & ok_d, other=0.0).to(
            tl.float32)
        bb += tl.load(base + pos_b[:, None] * stride_n + d[None, :], mask=ok_b[:, None] & ok_d, other=0.0).to(
            tl.float32)
    a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-12)[:, None]
    bb = bb / tl.maximum(tl.sqrt(tl.sum(bb * bb, axis=1)), 1e-12)[:, None]
    scores = tl.dot(a.to(metric.dtype.element_ty), tl.trans(bb.to(metric.dtype.element_ty)))  # [A, B]
    scores = tl.where(ok_b[None, :], scores, float("-inf"))
    best = tl.max(scores, axis=1)
    is_best = (scores == best[:, None]) & ok_b[None, :]
    partner = tl.min(tl.where(is_best, i[None, :], BLOCK), axis=1)  # first b of highest similarity
    best = tl.where(ok_a, best, float("-inf"))
    # rank of each edge: edges that beat it (higher similarity, or equal and earlier)
    beats = (best[None, :] > best[:, None]) | ((best[None, :] == best[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum((beats & ok_a[None, :]).to(tl.int32), axis=1)
    merged = (rank < R) & ok_a
    # merged A tokens before each A token, and before each B token (in sequence order)
    before_a = tl.sum((merged[None, :] & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
    before_b = tl.sum((merged[:, None] & (pos_a[:, None] < pos_b[None, :])).to(tl.int32), axis=0)
    out_a = pos_a - before_a
    out_b = pos_b - before_b
    # sizes: a kept token keeps its own; a B token adds those of the A tokens merged into it
    sbase = size_in + b * N
    if HAS_SIZE:
        s_a = tl.load(sbase + pos_a, mask=ok_a, other=0.0)
        s_b = tl.load(sbase + pos_b, mask=ok_b, other=0.0)
    else:
        s_a = tl.where(ok_a, 1.0, 0.0)
        s_b = tl.where(ok_b, 1.0, 0.0)
    joins = merged[:, None] & (partner[:, None] == i[None, :])  # [A, B]: a merges into b
    s_b = s_b + tl.sum(tl.where(joins, s_a[:, None], 0.0), axis=0)
    dst = tl.sum(tl.where(joins, out_b[None, :], 0), axis=1)  # output position each merged a joins
    keep_a = ok_a & (rank >= R)
    obase = b * N_OUT
    tl.store(kept_out + obase + out_a, pos_a.to(tl.int64), mask=keep_a)
    tl.store(kept_out + obase + out_b, pos_b.to(tl.int64), mask=ok_b)
    tl.store(size_out + obase + out_a, s_a, mask=keep_a)
    tl.store(size_out + obase + out_b, s_b, mask=ok_b)
    tl.store(src_out + b * R + before_a, pos_a.to(tl.int64), mask=merged)
    tl.store(dst_out + b * R + before_a, dst.to(tl.int64), mask=merged)
    p = tl.arange(0, BLOCK_P)
    if HAS_SIZE:
        s_p = tl.load(sbase + p, mask=p < P, other=0.0)
    else:
        s_p = tl.where(p < P, 1.0, 0.0)
    tl.store(kept_out + obase + p, p.to(tl.int64), mask=p < P)
    tl.store(size_out + obase + p, s_p, mask=p < P)


@triton.jit
def _row(x, y, offsets, mask, HAS_ADD: tl.constexpr):
    """A row of ``x`` (plus the same row of ``y``), in fp32."""
    row = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        row += tl.load(y + offsets, mask=mask, other=0.0).to(tl.float32)
    return row


@triton.jit
def _merge_kernel(x, y, out, kept, src, dst, size_in, size_out, N, N_OUT, C, R,
                  HAS_SIZE: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // N_OUT
    j = pid % N_OUT
    c = tl.arange(0, BLOCK_C)
    cm = c < C
    row = tl.load(kept + pid)
    total = tl.load(size_out + pid)
    w = tl.load(size_in + b * N + row) / total if HAS_SIZE else 1.0 / total
    acc = _row(x, y, (b * N + row) * C + c, cm, HAS_ADD) * w
    k = tl.arange(0, BLOCK_R)
    joining = tl.sum((tl.load(dst + b * R + k, mask=k < R, other=-1) == j).to(tl.int32), axis=0)
    if joining > 0:  # a destination: add its sources (most outputs have none and skip this)
        for i in range(R):
            if tl.load(dst + b * R + i) == j:
                s_row = tl.load(src + b * R + i)
                w = tl.load(size_in + b * N + s_row) / total if HAS_SIZE else 1.0 / total
                acc += _row(x, y, (b * N + s_row) * C + c, cm, HAS_ADD) * w
    tl.store(out + pid * C + c, acc.to(out.dtype.element_ty), mask=cm)


@triton.jit
def cell_mean_kernel(x, out, perm, first, N, N_OUT, C, stride_xb, stride_xn,
                     BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_j, ok_c = j < N_OUT, c < C
    lo = tl.load(first + b * (N_OUT + 1) + j, mask=ok_j, other=0)
    count = tl.load(first + b * (N_OUT + 1) + j + 1, mask=ok_j, other=0) - lo
    acc = tl.zeros([BLOCK_J, BLOCK_C], dtype=tl.float32)
    for k in range(0, tl.max(count, axis=0)):  # the largest group of the tile; most groups hold 1 to 3 tokens
        live = k < count
        row = tl.load(perm + b * N + lo + k, mask=live, other=0)
        acc += tl.load(x + b * stride_xb + row[:, None] * stride_xn + c[None, :],
                       mask=live[:, None] & ok_c[None, :], other=0.0).to(tl.float32)
    acc = acc / tl.maximum(count, 1).to(tl.float32)[:, None]
    tl.store(out + (b * N_OUT + j[:, None]) * C + c[None, :], acc.to(out.dtype.element_ty),
             mask=ok_j[:, None] & ok_c[None, :])


@triton.jit
def cell_update_kernel(x, out, merged, slot, y, N, N_OUT, C, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (i < N)[:, None] & (c < C)[None, :]
    j = tl.load(slot + b * N + i, mask=i < N, other=0)
    at = (b * N + i[:, None]) * C + c[None, :]
    group = (b * N_OUT + j[:, None]) * C + c[None, :]
    total = tl.load(x + at, mask=ok, other=0.0).to(tl.float32) + (
        tl.load(out + group, mask=ok, other=0.0).to(tl.float32) - tl.load(merged + group, mask=ok, other=0.0).to(
            tl.float32))
    tl.store(y + at, total.to(y.dtype.element_ty), mask=ok)


@triton.jit
def cell_score_kernel(x, src, dst, best, partner, S, D, C, stride_xb, stride_xn,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_i = i < S
    rows = tl.load(src + i, mask=ok_i, other=0)
    base = x + b * stride_xb
    norm = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        xi = tl.load(base + rows[:, None] * stride_xn + c[None, :], mask=ok_i[:, None] & (c < C)[None, :],
                     other=0.0).to(tl.float32)
        norm += tl.sum(xi * xi, axis=1)
    top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok_d = d < D
        cols = tl.load(dst + d, mask=ok_d, other=0)
        dot = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        norm_d = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok_c = (c < C)[None, :]
            xi = tl.load(base + rows[:, None] * stride_xn + c[None, :], mask=ok_i[:, None] & ok_c, other=0.0)
            xd = tl.load(base + cols[:, None] * stride_xn + c[None, :], mask=ok_d[:, None] & ok_c, other=0.0)
            dot += tl.dot(xi, tl.trans(xd))
            xd = xd.to(tl.float32)
            norm_d += tl.sum(xd * xd, axis=1)
        score = dot / tl.maximum(tl.sqrt(norm_d), 1e-12)[None, :]
        score = tl.where(ok_d[None, :], score, float("-inf"))
        tile_top = tl.max(score, axis=1)
        tile_arg = tl.argmax(score, axis=1)  # the first of equal maxima
        better = tile_top > top  # strictly: an earlier tile keeps a tie
        arg = tl.where(better, tile_arg + d0, arg)
        top = tl.where(better, tile_top, top)
    top = top / tl.maximum(tl.sqrt(norm), 1e-12)
    tl.store(best + b * S + i, top, mask=ok_i)
    tl.store(partner + b * S + i, arg, mask=ok_i)


@triton.jit
def cell_rank_kernel(best, partner, src, slot, rank, within, counts, N, S, D, R,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = i < S
    top_i = tl.load(best + b * S + i, mask=ok_i, other=0.0)
    top_i = tl.where(top_i == top_i, top_i, float("-inf"))  # NaN ranks last
    arg_i = tl.load(partner + b * S + i, mask=ok_i, other=0)
    beaten = tl.zeros([BLOCK_I], dtype=tl.int32)
    joined = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, S, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        ok_j = j < S
        top_j = tl.load(best + b * S + j, mask=ok_j, other=0.0)
        top_j = tl.where(top_j == top_j, top_j, float("-inf"))
        arg_j = tl.load(partner + b * S + j, mask=ok_j, other=-1)
        beats = ((top_j[None, :] > top_i[:, None]) | ((top_j[None, :] == top_i[:, None]) & (j[None, :] < i[:, None]))) \
            & ok_j[None, :]
        beaten += tl.sum(beats.to(tl.int32), axis=1)
        joined += tl.sum((beats & (arg_j[None, :] == arg_i[:, None])).to(tl.int32), axis=1)
    merged = beaten < R
    kept = S - R
    tl.store(slot + b * N + tl.load(src + i, mask=ok_i, other=0), tl.where(merged, kept + arg_i, beaten - R).to(
        tl.int64), mask=ok_i)
    tl.store(rank + b * S + i, beaten, mask=ok_i)
    tl.store(within + b * S + i, joined, mask=ok_i)
    tl.atomic_add(counts + b * D + arg_i, tl.full([BLOCK_I], 1, dtype=tl.int32), mask=ok_i & merged)


@triton.jit
def cell_start_kernel(counts, dst, slot, first, perm, N, D, KEPT, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    stride = KEPT + D + 1
    for j0 in range(0, KEPT, BLOCK):  # a kept source's group is itself
        j = j0 + tl.arange(0, BLOCK)
        tl.store(first + b * stride + j, j, mask=j < KEPT)
    carry = tl.full([], 0, dtype=tl.int32)
    for d0 in range(0, D, BLOCK):
        d = d0 + tl.arange(0, BLOCK)
        ok = d < D
        size = tl.where(ok, tl.load(counts + b * D + d, mask=ok, other=0) + 1, 0)
        start = KEPT + carry + tl.cumsum(size, axis=0) - size
        tl.store(first + b * stride + KEPT + d, start, mask=ok)
        token = tl.load(dst + d, mask=ok, other=0)
        tl.store(perm + b * N + start, token.to(tl.int32), mask=ok)
        tl.store(slot + b * N + token, (KEPT + d).to(tl.int64), mask=ok)
        carry += tl.sum(size, axis=0)
    tl.store(first + b * stride + KEPT + D, carry + KEPT)


@triton.jit
def cell_place_kernel(src, partner, rank, within, first, perm, N, S, D, R, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < S
    beaten = tl.load(rank + b * S + i, mask=ok, other=0)
    kept = S - R
    start = tl.load(first + b * (kept + D + 1) + kept + tl.load(partner + b * S + i, mask=ok, other=0),
                    mask=ok & (beaten < R), other=0)
    place = tl.where(beaten < R, start + 1 + tl.load(within + b * S + i, mask=ok, other=0), beaten - R)
    tl.store(perm + b * N + place, tl.load(src + i, mask=ok, other=0).to(tl.int32), mask=ok)
