"""Triton kernels of one-row (decode step) attention with VAR redistribution or PAI logit amplification.

Imported lazily by :mod:`visattn.kernels.reweighted_decode` on the first call, so that
``TRITON_INTERPRET=1`` set before that call runs it in Triton's interpreter (CPU tests).

:func:`reweighted_decode_kernel` runs one program per (sample, kv head, split of the keys); the query heads
that share the kv head are the rows of its tiles (padded to 16, so that ``q k^T`` and ``p v`` run on tensor
cores; ``p`` is rounded to the input dtype for the second, as flash attention rounds it). Each streams its keys
in tiles of ``BLOCK_N`` with an online softmax. ``CLS[b, j]`` (int8, ``j < N_CLS``, 0 past it)
classes key ``j``: 0 text, 1 sink image token, 2 other image token. ``MODE == 1`` (VAR) keeps three partial
sums (text, sinks, other image) under one running max and combines them at the end with the gains of
:func:`visattn.core.redistribute.redistribute`; ``MODE == 2`` (PAI) adds ``alpha * g * |s|`` to the logits of
class-2 keys, with ``g = GAIN[b, h]`` (float32) when ``HAS_GAIN`` (a per-head weight) and 1 otherwise. ``MASK[b, j]``
(uint8, 1 = attend) is read when ``HAS_MASK``. Logits are float32 from the input dtype's q and k.

With one split (``SPLIT`` false) the program writes the output row. With several (flash-decoding: a batch of
few rows over many keys fills the GPU only when the keys are shared out), each program writes its running
max, its three sums and its three accumulators to ``STAT`` and ``ACC`` (float32), and
:func:`combine_kernel`, one program per (sample, head), rescales them to a common max and finishes the row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _finish(acc_t, acc_s, acc_r, l_t, l_s, l_r, p, rho, summ, MODE: tl.constexpr):
    """The output row from the three sums and accumulators (VAR's gains, Eqs. 4-6, in ``MODE == 1``)."""
    z = l_t + l_s + l_r
    if MODE == 1:
        a_s = l_s / z
        a_r = l_r / z
        centric = (a_s + a_r >= summ) & (a_s <= rho * (a_s + a_r)) & (a_r > 0)
        g_s = tl.where(centric, p, 1.0)
        g_r = tl.where(centric, 1.0 + (1.0 - p) * a_s / tl.maximum(a_r, 1e-30), 1.0)
        return (acc_t + g_s * acc_s + g_r * acc_r) / z
    return acc_t / z


@triton.jit
def reweighted_decode_kernel(Q, K, V, OUT, STAT, ACC, CLS, MASK, GAIN,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                             stride_ob, stride_oh, stride_cb, stride_mb, stride_mn,
                             n_heads, n_keys, keys_per_split, n_cls, group, scale, alpha, p, rho, summ,
                             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_G: tl.constexpr, MODE: tl.constexpr, HAS_MASK: tl.constexpr,
                             HAS_GAIN: tl.constexpr, SPLIT: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    scale, alpha = tl.cast(scale, tl.float32), tl.cast(alpha, tl.float32)  # Inductor passes Python floats as
    p, rho, summ = tl.cast(p, tl.float32), tl.cast(rho, tl.float32), tl.cast(summ, tl.float32)  # float64
    g = tl.arange(0, BLOCK_G)  # the query heads of kv head hk, as the rows of a tile (tensor cores need 16)
    gmask = g < group
    h = hk * group + g
    gains = tl.full([BLOCK_G], 1.0, tl.float32)
    if HAS_GAIN:
        gains = tl.load(GAIN + b * n_heads + h, mask=gmask, other=0.0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_D
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], -float("inf"), tl.float32)
    acc_t = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_t = tl.zeros([BLOCK_G], dtype=tl.float32)
    l_s = tl.zeros([BLOCK_G], dtype=tl.float32)
    l_r = tl.zeros([BLOCK_G], dtype=tl.float32)
    first = split * keys_per_split
    last = tl.minimum(first + keys_per_split, n_keys)
    for start in range(first, last, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < last
        tile = nmask[:, None] & dmask[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + n[:, None] * stride_kn + d[None, :], mask=tile, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_N], float32
        c = tl.load(CLS + b * stride_cb + n, mask=n < n_cls, other=0).to(tl.int32)[None, :]
        if MODE == 2:
            s = tl.where(c == 2, s + (alpha * gains)[:, None] * tl.abs(s), s)
        valid = nmask
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + n * stride_mn, mask=nmask, other=0) != 0)
        s = tl.where(valid[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        corr = tl.exp(m - m_safe)
        w = tl.exp(s - m_safe[:, None])
        v = tl.load(V + b * stride_vb + hk * stride_vh + n[:, None] * stride_vn + d[None, :], mask=tile, other=0.0)
        if MODE == 1:
            w_s = tl.where(c == 1, w, 0.0)
            w_r = tl.where(c == 2, w, 0.0)
            w_t = w - w_s - w_r
            acc_s = acc_s * corr[:, None] + tl.dot(w_s.to(v.dtype), v)
            acc_r = acc_r * corr[:, None] + tl.dot(w_r.to(v.dtype), v)
            l_s = l_s * corr + tl.sum(w_s, axis=1)
            l_r = l_r * corr + tl.sum(w_r, axis=1)
        else:
            w_t = w
        acc_t = acc_t * corr[:, None] + tl.dot(w_t.to(v.dtype), v)
        l_t = l_t * corr + tl.sum(w_t, axis=1)
        m = m_new
    if SPLIT:
        row = (b * n_heads + h) * tl.num_programs(2) + split  # [BLOCK_G]
        tl.store(STAT + row * 4, m, mask=gmask)
        tl.store(STAT + row * 4 + 1, l_t, mask=gmask)
        tl.store(STAT + row * 4 + 2, l_s, mask=gmask)
        tl.store(STAT + row * 4 + 3, l_r, mask=gmask)
        rows = gmask[:, None]
        tl.store(ACC + (row * 3)[:, None] * BLOCK_D + d[None, :], acc_t, mask=rows)
        if MODE == 1:
            tl.store(ACC + (row * 3 + 1)[:, None] * BLOCK_D + d[None, :], acc_s, mask=rows)
            tl.store(ACC + (row * 3 + 2)[:, None] * BLOCK_D + d[None, :], acc_r, mask=rows)
    else:
        out = _finish(acc_t, acc_s, acc_r, l_t[:, None], l_s[:, None], l_r[:, None], p, rho, summ, MODE)
        tl.store(OUT + b * stride_ob + h[:, None] * stride_oh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=gmask[:, None] & dmask[None, :])


@triton.jit
def combine_kernel(OUT, STAT, ACC, stride_ob, stride_oh, splits, p, rho, summ,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, MODE: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p, rho, summ = tl.cast(p, tl.float32), tl.cast(rho, tl.float32), tl.cast(summ, tl.float32)
    s = tl.arange(0, BLOCK_S)
    smask = s < splits
    rows = (b * tl.num_programs(1) + h) * splits + s
    m = tl.load(STAT + rows * 4, mask=smask, other=-float("inf"))
    m_max = tl.max(m, axis=0)
    factor = tl.exp(m - tl.where(m_max == -float("inf"), 0.0, m_max))  # 0 for splits without a key
    d = tl.arange(0, BLOCK_D)
    tile = smask[:, None]
    acc_t = tl.sum(tl.load(ACC + (rows * 3)[:, None] * BLOCK_D + d[None, :], mask=tile, other=0.0) * factor[:, None],
                   axis=0)
    l_t = tl.sum(tl.load(STAT + rows * 4 + 1, mask=smask, other=0.0) * factor, axis=0)
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_s = 0.0
    l_r = 0.0
    if MODE == 1:
        acc_s = tl.sum(tl.load(ACC + (rows * 3 + 1)[:, None] * BLOCK_D + d[None, :], mask=tile, other=0.0)
                       * factor[:, None], axis=0)
        acc_r = tl.sum(tl.load(ACC + (rows * 3 + 2)[:, None] * BLOCK_D + d[None, :], mask=tile, other=0.0)
                       * factor[:, None], axis=0)
        l_s = tl.sum(tl.load(STAT + rows * 4 + 2, mask=smask, other=0.0) * factor, axis=0)
        l_r = tl.sum(tl.load(STAT + rows * 4 + 3, mask=smask, other=0.0) * factor, axis=0)
    out = _finish(acc_t, acc_s, acc_r, l_t, l_s, l_r, p, rho, summ, MODE)
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=d < HEAD_D)
