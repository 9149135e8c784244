"""Chunk-level stages of `chunk_gla`: in-chunk cumulative log decay, and the state passes between chunks.

Every kernel addresses q, k, g as [B*T, H, K] rows and v as [B*T, H, V]; `bos` is the first row of the sequence, so
packed (varlen) and batched inputs share one code path. Per-chunk states `h` are [NT_total, H, K, V] in the input
dtype (carried in fp32 inside the kernels), the state *entering* each chunk (for `dh`: the gradient of the state
*leaving* each chunk).
"""

from __future__ import annotations

import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds, seq_chunk_bounds


@triton.jit
def chunk_gla_cumsum_kernel(
    g,
    gc,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """gc = cumsum of g inside each chunk (fp32). Grid (cdiv(K, BK), NT, B * H)."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, _, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    g += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m = (o_t < T)[:, None] & (o_k < K)[None, :]
    p = o_t[:, None] * (H * K) + o_k[None, :]
    b_g = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
    tl.store(gc + p, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def chunk_gla_fwd_h_kernel(
    k,
    v,
    gc,
    h,
    h0,
    ht,
    cu_seqlens,
    chunk_offsets,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Forward state pass: h[chunk] = state entering the chunk. Grid (cdiv(K, BK), cdiv(V, BV), N * H)."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)

    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    v += (bos * H + i_h) * V

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(0, NT):
        tl.store(h + ((boh + i_t) * H + i_h) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_g = tl.load(gc + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_gl = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0.0)
        # decay from each token to the end of the chunk: exponent <= 0, padded rows contribute nothing
        b_kd = tl.where(m_t[:, None], b_k * tl.exp(b_gl[None, :] - b_g), 0.0)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd).to(DT), b_v.to(DT), input_precision=PREC)

    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def chunk_gla_bwd_dh_kernel(
    q,
    do,
    gc,
    dh,
    dht,
    dh0,
    cu_seqlens,
    chunk_offsets,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Backward state pass, last chunk first: dh[chunk] = gradient of the state leaving the chunk.

    Grid (cdiv(K, BK), cdiv(V, BV), N * H).
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)

    q += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    do += (bos * H + i_h) * V

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_s in range(0, NT):
        i_t = NT - 1 - i_s
        tl.store(dh + ((boh + i_t) * H + i_h) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_q = tl.load(q + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_g = tl.load(gc + o_t[:, None] * (H * K) + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        b_gl = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0.0)
        # decay from the chunk start to each token: exponent <= 0
        b_qg = b_q * tl.exp(b_g) * scale
        b_dh = b_dh * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qg).to(DT), b_do.to(DT), input_precision=PREC)

    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)
