"""Triton kernels of block-sparse flash attention: forward, dq, and dk/dv (FlashAttention-2 split).

Imported lazily by :mod:`visattn.kernels.block_sparse` on the first kernel call, so that
``TRITON_INTERPRET=1`` set before that call runs them in Triton's interpreter (CPU tests).

Conventions shared by the three kernels (all the host-side preparation lives in ``block_sparse``):

- q, o, do: ``[B, H, N_Q, D]``; k, v, dk, dv: ``[B, H // GROUP, N_KV, D]``; the last dim contiguous.
- ``MASK_Q`` / ``MASK_KV``: the sequence ends inside a block; tiles that cut a block unevenly are
  masked as well (``ROWS_MASKED`` / ``COLS_MASKED``).
- A routing query block ``i`` is tokens ``[i * BLOCK_Q, (i + 1) * BLOCK_Q)`` and is processed in
  ``ceil(BLOCK_Q / BLOCK_M)`` row tiles; a routing kv block is cut into ``ceil(BLOCK_K / BLOCK_N)``
  column tiles. Block sizes need not be powers of two: tiles past a block's end are masked.
- ``KV_IDX[b, h, i, :KV_CNT[b, h, i]]`` lists the kv blocks of query block ``i`` (a broadcast batch
  or head dim has stride 0). The "always" blocks (kv blocks that hold always-attended tokens) are
  removed from those lists on the host and visited by every query block in a second, masked loop:
  a token of always block ``a`` is attended where ``ALW_TOK[token]`` is set or query block ``i``
  listed that block (``ALW_LIST[b, h, i, a]``).
- ``ORDERED`` (forward only): blocks are formed over the tokens in the order ``ORDER`` gives (token ``i``
  of that order lies at row ``ORDER[i]`` of q, k, v, o and LSE); the backward kernels take tensors
  already in that order.
- Logits are kept in base 2: ``qk_scale = scale * log2(e)``; ``LSE`` holds ``m + log2(l)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._runtime import interpreting


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # DOT_F32 works around Triton's interpreter, which multiplies bfloat16 dot operands as raw bits.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _at(ORDER, tokens, n, ORDERED: tl.constexpr):
    # Where tokens (positions in the routed order) lie in memory: ORDER[tokens] when ORDERED.
    if ORDERED:
        tokens = tl.load(ORDER + tokens, mask=tokens < n, other=0)
    return tokens


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    KV_IDX, KV_CNT, ALW_BLK, ALW_TOK, ALW_LIST, ORDER,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    sib, sih, siq, scb, sch, slb, slh, slq,
    H, N_Q, N_KV, D, N_ALW, qk_scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_Q: tl.constexpr, MASK_KV: tl.constexpr, MASK_D: tl.constexpr, HAS_ALW: tl.constexpr,
    ORDERED: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as float64
    SUB_M: tl.constexpr = (BLOCK_Q + BLOCK_M - 1) // BLOCK_M
    SUB_N: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
    ROWS_MASKED: tl.constexpr = MASK_Q or (BLOCK_Q % BLOCK_M != 0)
    COLS_MASKED: tl.constexpr = MASK_KV or (BLOCK_K % BLOCK_N != 0)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    qblk = pid_m // SUB_M
    r_in = (pid_m % SUB_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * BLOCK_Q + r_in
    row_ok = (r_in < BLOCK_Q) & (rows < N_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    rows_at = _at(ORDER, rows, N_Q, ORDERED)
    q_ptrs = Q + b * sqb + h * sqh + rows_at[:, None] * sqn + offs_d[None, :]
    if ROWS_MASKED or MASK_D:
        q = tl.load(q_ptrs, mask=(rows < N_Q)[:, None] & d_ok[None, :], other=0.0)
    else:
        q = tl.load(q_ptrs)
    k_base = K + b * skb + hk * skh + offs_d[None, :]
    v_base = V + b * svb + hk * svh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    idx_base = KV_IDX + b * sib + h * sih + qblk * siq
    count = tl.load(KV_CNT + b * scb + h * sch + qblk)
    n_iter = count * SUB_N
    # The next block index is loaded one iteration ahead of its k / v tiles, so that the software
    # pipeline can issue those tiles' loads early (measured on the H100: kept-block rate 0.56-0.65 ->
    # 0.63-0.75 of SDPA at block 64; the same change in the backward kernels made them slower).
    nxt = tl.load(idx_base, mask=n_iter > 0, other=0)
    for it in range(n_iter):
        blk = nxt
        nxt = tl.load(idx_base + (it + 1) // SUB_N, mask=it + 1 < n_iter, other=0)
        c_in = (it % SUB_N) * BLOCK_N + offs_n
        cols = blk * BLOCK_K + c_in
        cols_at = _at(ORDER, cols, N_KV, ORDERED)
        if COLS_MASKED or MASK_D:
            kv_mask = (cols < N_KV)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols_at[:, None] * skn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols_at[:, None] * svn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + cols_at[:, None] * skn)
            v = tl.load(v_base + cols_at[:, None] * svn)
        s = _dot(q, tl.trans(k), DOT_F32)
        if COLS_MASKED:
            s = tl.where(((c_in < BLOCK_K) & (cols < N_KV))[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new

    if HAS_ALW:
        lst_base = ALW_LIST + b * slb + h * slh + qblk * slq
        for it in range(N_ALW * SUB_N):
            a = it // SUB_N
            blk = tl.load(ALW_BLK + a)
            listed = tl.load(lst_base + a) != 0
            c_in = (it % SUB_N) * BLOCK_N + offs_n
            cols = blk * BLOCK_K + c_in
            in_seq = cols < N_KV
            tok = tl.load(ALW_TOK + cols, mask=in_seq, other=0) != 0
            ok = (c_in < BLOCK_K) & in_seq & (tok | listed)
            kv_mask = in_seq[:, None] & d_ok[None, :]
            cols_at = _at(ORDER, cols, N_KV, ORDERED)
            k = tl.load(k_base + cols_at[:, None] * skn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols_at[:, None] * svn, mask=kv_mask, other=0.0)
            s = tl.where(ok[None, :], _dot(q, tl.trans(k), DOT_F32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that attend nothing: output 0, lse -inf
    out = acc / l_safe[:, None]
    o_ptrs = O + b * sob + h * soh + rows_at[:, None] * son + offs_d[None, :]
    lse_ptrs = LSE + bh * N_Q + rows_at
    if ROWS_MASKED or MASK_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    if ROWS_MASKED:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_safe), mask=row_ok)
    else:
        tl.store(lse_ptrs, m_i + tl.math.log2(l_safe))


@triton.jit
def _dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, DLSE,
    KV_IDX, KV_CNT, ALW_BLK, ALW_TOK, ALW_LIST,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    sib, sih, siq, scb, sch, slb, slh, slq,
    H, N_Q, N_KV, D, N_ALW, qk_scale, scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_Q: tl.constexpr, MASK_KV: tl.constexpr, MASK_D: tl.constexpr, HAS_ALW: tl.constexpr,
    HAS_DLSE: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # o, do and dq share one layout (strides so*). Besides dq, this kernel computes and stores
    # DELTA = rowsum(o * do) - dlse for the dk/dv kernel, which runs after it.
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # as in _fwd_kernel
    SUB_M: tl.constexpr = (BLOCK_Q + BLOCK_M - 1) // BLOCK_M
    SUB_N: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
    ROWS_MASKED: tl.constexpr = MASK_Q or (BLOCK_Q % BLOCK_M != 0)
    COLS_MASKED: tl.constexpr = MASK_KV or (BLOCK_K % BLOCK_N != 0)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    qblk = pid_m // SUB_M
    r_in = (pid_m % SUB_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = qblk * BLOCK_Q + r_in
    row_ok = (r_in < BLOCK_Q) & (rows < N_Q)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    q_off = b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :]
    o_off = b * sob + h * soh + rows[:, None] * son + offs_d[None, :]
    if ROWS_MASKED or MASK_D:
        qd_mask = (rows < N_Q)[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=qd_mask, other=0.0)
        do = tl.load(DO + o_off, mask=qd_mask, other=0.0)
        o = tl.load(O + o_off, mask=qd_mask, other=0.0)
    else:
        q = tl.load(Q + q_off)
        do = tl.load(DO + o_off)
        o = tl.load(O + o_off)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if ROWS_MASKED:
        lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=float("inf"))
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh * N_Q + rows, mask=row_ok, other=0.0)
        tl.store(DELTA + bh * N_Q + rows, delta, mask=row_ok)
    else:
        lse = tl.load(LSE + bh * N_Q + rows)
        if HAS_DLSE:
            delta -= tl.load(DLSE + bh * N_Q + rows)
        tl.store(DELTA + bh * N_Q + rows, delta)
    k_base = K + b * skb + hk * skh + offs_d[None, :]
    v_base = V + b * svb + hk * svh + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    idx_base = KV_IDX + b * sib + h * sih + qblk * siq
    count = tl.load(KV_CNT + b * scb + h * sch + qblk)
    for it in range(count * SUB_N):
        blk = tl.load(idx_base + it // SUB_N)
        c_in = (it % SUB_N) * BLOCK_N + offs_n
        cols = blk * BLOCK_K + c_in
        if COLS_MASKED or MASK_D:
            kv_mask = (cols < N_KV)[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * skn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * skn)
            v = tl.load(v_base + cols[:, None] * svn)
        s = _dot(q, tl.trans(k), DOT_F32)
        if COLS_MASKED:
            s = tl.where(((c_in < BLOCK_K) & (cols < N_KV))[None, :], s, float("-inf"))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_F32)

    if HAS_ALW:
        lst_base = ALW_LIST + b * slb + h * slh + qblk * slq
        for it in range(N_ALW * SUB_N):
            a = it // SUB_N
            blk = tl.load(ALW_BLK + a)
            listed = tl.load(lst_base + a) != 0
            c_in = (it % SUB_N) * BLOCK_N + offs_n
            cols = blk * BLOCK_K + c_in
            in_seq = cols < N_KV
            tok = tl.load(ALW_TOK + cols, mask=in_seq, other=0) != 0
            ok = (c_in < BLOCK_K) & in_seq & (tok | listed)
            kv_mask = in_seq[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * skn, mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svn, mask=kv_mask, other=0.0)
            s = tl.where(ok[None, :], _dot(q, tl.trans(k), DOT_F32), float("-inf"))
            p = tl.math.exp2(s * qk_scale - lse[:, None])
            dp = _dot(do, tl.trans(v), DOT_F32)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, DOT_F32)

    dq_ptrs = DQ + o_off
    if ROWS_MASKED or MASK_D:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    Q_IDX, Q_CNT, ALW_SLOT, ALW_TOK, ALW_LIST,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdb, sdh, sdn,
    stb, sth, stk, sub, suh, slb, slh, slq,
    HKV, N_Q, N_KV, D, N_QBLK, qk_scale, scale,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASK_Q: tl.constexpr, MASK_KV: tl.constexpr, MASK_D: tl.constexpr, HAS_ALW: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns one column tile of one kv block of one kv head, and visits the query blocks
    # of every head in its group that listed this kv block (Q_IDX / Q_CNT, the transposed lists).
    # do has strides so*; dk and dv share one layout (strides sd*).
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # as in _fwd_kernel
    SUB_M: tl.constexpr = (BLOCK_Q + BLOCK_M - 1) // BLOCK_M
    SUB_N: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
    ROWS_MASKED: tl.constexpr = MASK_Q or (BLOCK_Q % BLOCK_M != 0)
    COLS_MASKED: tl.constexpr = MASK_KV or (BLOCK_K % BLOCK_N != 0)
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    kblk = pid_n // SUB_N
    c_in = (pid_n % SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = kblk * BLOCK_K + c_in
    col_ok = (c_in < BLOCK_K) & (cols < N_KV)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < D
    offs_m = tl.arange(0, BLOCK_M)

    k_off = b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :]
    v_off = b * svb + hk * svh + cols[:, None] * svn + offs_d[None, :]
    if COLS_MASKED or MASK_D:
        kv_mask = (cols < N_KV)[:, None] & d_ok[None, :]
        k = tl.load(K + k_off, mask=kv_mask, other=0.0)
        v = tl.load(V + v_off, mask=kv_mask, other=0.0)
    else:
        k = tl.load(K + k_off)
        v = tl.load(V + v_off)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if HAS_ALW:
        slot = tl.load(ALW_SLOT + kblk)
        tok = tl.load(ALW_TOK + cols, mask=cols < N_KV, other=0) != 0

    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * (HKV * GROUP) + h
        q_base = b * sqb + h * sqh + offs_d[None, :]
        do_base = b * sob + h * soh + offs_d[None, :]
        idx_base = Q_IDX + b * stb + h * sth + kblk * stk
        count = tl.load(Q_CNT + b * sub + h * suh + kblk)
        for it in range(count * SUB_M):
            qblk = tl.load(idx_base + it // SUB_M)
            r_in = (it % SUB_M) * BLOCK_M + offs_m
            rows = qblk * BLOCK_Q + r_in
            if ROWS_MASKED or MASK_D:
                qd_mask = (rows < N_Q)[:, None] & d_ok[None, :]
                q = tl.load(Q + q_base + rows[:, None] * sqn, mask=qd_mask, other=0.0)
                do = tl.load(DO + do_base + rows[:, None] * son, mask=qd_mask, other=0.0)
            else:
                q = tl.load(Q + q_base + rows[:, None] * sqn)
                do = tl.load(DO + do_base + rows[:, None] * son)
            if ROWS_MASKED:
                row_ok = (r_in < BLOCK_Q) & (rows < N_Q)
                lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
            else:
                lse = tl.load(LSE + bh * N_Q + rows)
                delta = tl.load(DELTA + bh * N_Q + rows)
            s_t = _dot(k, tl.trans(q), DOT_F32)
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
            if ROWS_MASKED:
                p_t = tl.where(row_ok[None, :], p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, DOT_F32)
            dp_t = _dot(v, tl.trans(do), DOT_F32)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, DOT_F32)
        if HAS_ALW:
            if slot >= 0:
                lst_base = ALW_LIST + b * slb + h * slh + slot
                for it in range(N_QBLK * SUB_M):
                    qblk = it // SUB_M
                    listed = tl.load(lst_base + qblk * slq) != 0
                    r_in = (it % SUB_M) * BLOCK_M + offs_m
                    rows = qblk * BLOCK_Q + r_in
                    row_ok = (r_in < BLOCK_Q) & (rows < N_Q)
                    qd_mask = (rows < N_Q)[:, None] & d_ok[None, :]
                    q = tl.load(Q + q_base + rows[:, None] * sqn, mask=qd_mask, other=0.0)
                    do = tl.load(DO + do_base + rows[:, None] * son, mask=qd_mask, other=0.0)
                    lse = tl.load(LSE + bh * N_Q + rows, mask=row_ok, other=float("inf"))
                    delta = tl.load(DELTA + bh * N_Q + rows, mask=row_ok, other=0.0)
                    s_t = _dot(k, tl.trans(q), DOT_F32)
                    ok = (tok | listed)[:, None] & row_ok[None, :]
                    p_t = tl.where(ok, tl.math.exp2(s_t * qk_scale - lse[None, :]), 0.0)
                    dv += _dot(p_t.to(do.dtype), do, DOT_F32)
                    dp_t = _dot(v, tl.trans(do), DOT_F32)
                    ds_t = p_t * (dp_t - delta[None, :])
                    dk += _dot(ds_t.to(q.dtype), q, DOT_F32)

    store_mask = col_ok[:, None] & d_ok[None, :]
    d_off = b * sdb + hk * sdh + cols[:, None] * sdn + offs_d[None, :]
    tl.store(DK + d_off, (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + d_off, dv.to(DV.dtype.element_ty), mask=store_mask)


def _prune(configs, named_args, **kwargs):
    """Keep the tile shapes that do not overshoot the routing blocks (at least one config)."""
    args = {**named_args, **kwargs}
    bq, bk = args["BLOCK_Q"], args["BLOCK_K"]
    fits = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(bq))
            and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(bk))]
    if fits:
        return fits
    smallest = min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs)
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == smallest]


def _configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KEY = ["N_Q", "BLOCK_Q", "BLOCK_K", "HEAD_DIM", "GROUP", "HAS_ALW"]
_PRUNE = {"early_config_prune": _prune}

# Few configs each: (BLOCK_M, BLOCK_N, warps, stages).
FWD_CONFIGS = _configs([(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4),
                        (64, 64, 4, 2)])
DQ_CONFIGS = _configs([(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3), (64, 128, 8, 2)])
DKDV_CONFIGS = _configs([(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 3)])

if interpreting():
    fwd_tuned = dq_tuned = dkdv_tuned = None
else:
    fwd_tuned = triton.autotune(FWD_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_fwd_kernel)
    dq_tuned = triton.autotune(DQ_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_dq_kernel)
    dkdv_tuned = triton.autotune(DKDV_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)(_dkdv_kernel)
fwd_kernel, dq_kernel, dkdv_kernel = _fwd_kernel, _dq_kernel, _dkdv_kernel
