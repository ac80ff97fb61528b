"""Triton kernel of one-row (decode step) attention with VAR redistribution or PAI logit amplification.

Imported lazily by :mod:`visattn.kernels.reweighted_decode` on the first call, so that
``TRITON_INTERPRET=1`` set before that call runs it in Triton's interpreter (CPU tests).

One program per (sample, query head) streams the keys in tiles of ``BLOCK_N`` with an online softmax.
``CLS[b, j]`` (int8, ``j < N_CLS``, 0 past it) classes key ``j``: 0 text, 1 sink image token, 2 other
image token. ``MODE == 1`` (VAR) keeps three partial sums (text, sinks, other image) under one running
max and combines them at the end with the gains of :func:`visattn.core.redistribute.redistribute`;
``MODE == 2`` (PAI) adds ``alpha * |s|`` to the logits of class-2 keys. ``MASK[b, j]`` (uint8, 1 =
attend) is read when ``HAS_MASK``. Logits are float32 from the input dtype's q and k.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def reweighted_decode_kernel(Q, K, V, OUT, CLS, MASK,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                             stride_ob, stride_oh, stride_cb, stride_mb, stride_mn,
                             n_keys, n_cls, group, scale, alpha, p, rho, summ,
                             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                             MODE: tl.constexpr, HAS_MASK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    scale, alpha = tl.cast(scale, tl.float32), tl.cast(alpha, tl.float32)  # Inductor passes Python floats as
    p, rho, summ = tl.cast(p, tl.float32), tl.cast(rho, tl.float32), tl.cast(summ, tl.float32)  # float64
    hk = h // group
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_D
    q = tl.load(Q + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
    m = -float("inf")
    acc_t = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_D], dtype=tl.float32)
    l_t = 0.0
    l_s = 0.0
    l_r = 0.0
    for start in range(0, n_keys, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < n_keys
        tile = nmask[:, None] & dmask[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + n[:, None] * stride_kn + d[None, :], mask=tile, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        c = tl.load(CLS + b * stride_cb + n, mask=n < n_cls, other=0).to(tl.int32)
        if MODE == 2:
            s = tl.where(c == 2, s + alpha * tl.abs(s), s)
        valid = nmask
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + n * stride_mn, mask=nmask, other=0) != 0)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        corr = tl.exp(m - m_safe)
        w = tl.exp(s - m_safe)
        v = tl.load(V + b * stride_vb + hk * stride_vh + n[:, None] * stride_vn + d[None, :], mask=tile,
                    other=0.0).to(tl.float32)
        if MODE == 1:
            w_s = tl.where(c == 1, w, 0.0)
            w_r = tl.where(c == 2, w, 0.0)
            w_t = w - w_s - w_r
            acc_s = acc_s * corr + tl.sum(w_s[:, None] * v, axis=0)
            acc_r = acc_r * corr + tl.sum(w_r[:, None] * v, axis=0)
            l_s = l_s * corr + tl.sum(w_s, axis=0)
            l_r = l_r * corr + tl.sum(w_r, axis=0)
        else:
            w_t = w
        acc_t = acc_t * corr + tl.sum(w_t[:, None] * v, axis=0)
        l_t = l_t * corr + tl.sum(w_t, axis=0)
        m = m_new
    z = l_t + l_s + l_r
    if MODE == 1:
        a_s = l_s / z
        a_r = l_r / z
        centric = (a_s + a_r >= summ) & (a_s <= rho * (a_s + a_r)) & (a_r > 0)
        g_s = tl.where(centric, p, 1.0)
        g_r = tl.where(centric, 1.0 + (1.0 - p) * a_s / tl.maximum(a_r, 1e-30), 1.0)
        out = (acc_t + g_s * acc_s + g_r * acc_r) / z
    else:
        out = acc_t / z
    tl.store(OUT + b * stride_ob + h * stride_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)
