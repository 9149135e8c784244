"""Intra-chunk stages of `chunk_gla` for chunks of strong decay: the causal attention matrix inside each chunk and
its gradient back to q, k.

A chunk of BT = 64 tokens is split into NC sub-chunks of BC = 16. With per-channel decay exp(G_t - G_s) cannot be
factored over a whole chunk (exp(-G_s) overflows when g reaches -20 per step), so:
- an off-diagonal block (query sub-chunk i, key sub-chunk j != i) goes through a reference row r between them:
  exp(G_t - G_r) * exp(G_r - G_s), both exponents <= 0, so the factors can only underflow where the product does;
- a diagonal block is built pair-wise, one column (or row) at a time, from exp of masked differences.
Where the decay across the whole chunk is mild (G_first - G_last <= SPAN in every channel, checked per chunk at run
time: GLA's logsigmoid / 16 gates decay ~3 over a chunk), every block can go through the chunk's first row instead:
exp(G_t - G_0) <= 1 and exp(G_0 - G_s) <= exp(SPAN), so a whole chunk's A (and dq, dk) is one product on the tensor
cores. The forward does those chunks inside the output kernel of chunk.py, which loads the same operands anyway,
and so does the backward's dq / dk / dg kernel for half-precision inputs (FUSED; in fp32 its registers would spill,
so the mild path below does them); the programs here return at once for them. All of it in fp32; A is
stored [B*T, H, BT] in the input dtype (row t holds its chunk's columns, scale included), since it only feeds
products with v whose operands are cast to that dtype anyway. dA and the intra dq, dk stay fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds


@triton.jit
def _chunk_span(gc, first, last, i_k0, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr):
    """Largest decay across the chunk, G_first - G_last, over the channels of K tiles i_k0 .. i_k0 + NK - 1."""
    span = tl.full([], 0.0, dtype=tl.float32)
    for i_k in range(i_k0, i_k0 + NK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_g0 = tl.load(gc + first * (H * K) + o_k, mask=m_k, other=0.0)
        b_gl = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0.0)
        span = tl.maximum(span, tl.max(b_g0 - b_gl, axis=0))
    return span


@triton.jit
def chunk_gla_fwd_intra_kernel(
    q,
    k,
    gc,
    A,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    SPAN: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Rows of sub-chunk i_i of A, every block left of and on the diagonal, for chunks of strong decay.
    Grid (NT, BT // BC, B * H)."""
    i_t, i_i, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, _, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    o_i = i_t * BT + i_i * BC
    if o_i >= T:
        return
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    A += (bos * H + i_h) * BT
    o_c = o_i + tl.arange(0, BC)
    m_c = o_c < T
    o_a = tl.arange(0, BC)
    first = i_t * BT
    last = tl.minimum(first + BT, T) - 1

    if _chunk_span(gc, first, last, 0, H, K, BK, tl.cdiv(K, BK)) <= SPAN:
        return  # mild decay: chunk_gla_fwd_o_kernel builds this chunk's A on the tensor cores

    # off-diagonal blocks j < i, reference row = first row of sub-chunk i
    for i_j in range(0, i_i):
        o_j = i_t * BT + i_j * BC + tl.arange(0, BC)
        b_A = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_ck = m_c[:, None] & m_k[None, :]
            b_q = tl.load(q + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
            b_g = tl.load(gc + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
            b_gn = tl.load(gc + o_i * (H * K) + o_k, mask=m_k, other=0.0)
            b_k = tl.load(k + o_j[:, None] * (H * K) + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
            b_gk = tl.load(gc + o_j[:, None] * (H * K) + o_k[None, :], mask=m_k[None, :], other=0.0)
            b_qg = b_q * tl.exp(tl.where(m_c[:, None], b_g - b_gn[None, :], float("-inf")))
            b_kg = b_k * tl.exp(b_gn[None, :] - b_gk)
            b_A += tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC)
        p_A = A + o_c[:, None] * (H * BT) + i_j * BC + o_a[None, :]
        tl.store(p_A, (b_A * scale).to(A.dtype.element_ty), mask=m_c[:, None])

    # diagonal block, one column at a time: A[t, s] = sum_k q_t k_s exp(G_t - G_s), s <= t
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_ck = m_c[:, None] & m_k[None, :]
        b_q = tl.load(q + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0).to(tl.float32)
        b_g = tl.load(gc + o_c[:, None] * (H * K) + o_k[None, :], mask=m_ck, other=0.0)
        for j in range(0, BC):
            # key row j, if within the sequence: a scalar condition enters masks through tl.where, which keeps
            # them boolean (`&` with a scalar comparison gives int32 masks in Triton 3.9's interpreter)
            m_j = tl.where(o_i + j < T, m_k, False)
            b_kj = tl.load(k + (o_i + j) * (H * K) + o_k, mask=m_j, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + (o_i + j) * (H * K) + o_k, mask=m_j, other=0.0)
            m_s = (o_a >= j) & m_c
            b_e = tl.exp(tl.where(m_s[:, None], b_g - b_gj[None, :], float("-inf")))
            b_col = tl.sum(b_q * b_kj[None, :] * b_e, axis=1)
            b_A += tl.where(o_a[None, :] == j, b_col[:, None], 0.0)
    p_A = A + o_c[:, None] * (H * BT) + i_i * BC + o_a[None, :]
    tl.store(p_A, (b_A * scale).to(A.dtype.element_ty), mask=m_c[:, None])


@triton.jit
def chunk_gla_bwd_intra_kernel(
    q,
    k,
    gc,
    dA,
    dq,
    dk,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    NC: tl.constexpr,
    SPAN: tl.constexpr,
    FUSED: tl.constexpr,
    PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Intra-chunk parts of dq, dk from dA (scale included) for one sub-chunk and one K tile; with FUSED, only for
    (chunk, K tile) pairs of strong decay.

    dq_t = sum_{s <= t} dA[t, s] k_s exp(G_t - G_s),  dk_s = sum_{t >= s} dA[t, s] q_t exp(G_t - G_s).
    Grid (cdiv(K, BK) * NC, NT, B * H).
    """
    i_kc, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_i = i_kc // NC, i_kc % NC
    i_b, i_h = i_bh // H, i_bh % H
    i_t, _, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    o_i = i_t * BT + i_i * BC
    if o_i >= T:
        return
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    dA += (bos * H + i_h) * BT
    dq += (bos * H + i_h) * K
    dk += (bos * H + i_h) * K
    o_c = o_i + tl.arange(0, BC)
    m_c = o_c < T
    o_a = tl.arange(0, BC)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_ck = m_c[:, None] & m_k[None, :]
    p_c = o_c[:, None] * (H * K) + o_k[None, :]
    b_g = tl.load(gc + p_c, mask=m_ck, other=0.0)
    first = i_t * BT
    last = tl.minimum(first + BT, T) - 1

    if _chunk_span(gc, first, last, i_k, H, K, BK, 1) <= SPAN:
        if FUSED:
            return  # chunk_gla_bwd_dqkg_kernel computes this (chunk, K tile) itself, with the same K tile
        # mild decay in this K tile: both sums through the chunk's first row, on the tensor cores
        o_s = first + tl.arange(0, BT)
        m_s = o_s < T
        m_sk = m_s[:, None] & m_k[None, :]
        p_s = o_s[:, None] * (H * K) + o_k[None, :]
        b_g0 = tl.load(gc + first * (H * K) + o_k, mask=m_k, other=0.0)
        b_gs = tl.load(gc + p_s, mask=m_sk, other=0.0)
        b_kg = tl.load(k + p_s, mask=m_sk, other=0.0).to(tl.float32)
        b_kg *= tl.exp(tl.where(m_s[:, None], b_g0[None, :] - b_gs, float("-inf")))
        b_qg = tl.load(q + p_s, mask=m_sk, other=0.0).to(tl.float32)
        b_qg *= tl.exp(tl.where(m_s[:, None], b_gs - b_g0[None, :], float("-inf")))
        # dA is zero above the diagonal: rows of this sub-chunk for dq, its columns for dk
        o_b = tl.arange(0, BT)
        b_dAr = tl.load(dA + o_c[:, None] * (H * BT) + o_b[None, :], mask=m_c[:, None], other=0.0)
        b_dAc = tl.load(dA + o_s[:, None] * (H * BT) + i_i * BC + o_a[None, :], mask=m_s[:, None], other=0.0)
        b_dq = tl.dot(b_dAr, b_kg, input_precision=PREC)
        b_dq *= tl.exp(tl.where(m_c[:, None], b_g - b_g0[None, :], float("-inf")))
        b_dk = tl.dot(tl.trans(b_dAc), b_qg, input_precision=PREC)
        b_dk *= tl.exp(tl.where(m_c[:, None], b_g0[None, :] - b_g, float("-inf")))
        tl.store(dq + p_c, b_dq, mask=m_ck)
        tl.store(dk + p_c, b_dk, mask=m_ck)
        return

    # dq, off-diagonal blocks j < i through the first row of sub-chunk i
    b_gn = tl.load(gc + o_i * (H * K) + o_k, mask=m_k, other=0.0)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_i):
        o_j = i_t * BT + i_j * BC + o_a
        b_k = tl.load(k + o_j[:, None] * (H * K) + o_k[None, :], mask=m_k[None, :], other=0.0).to(tl.float32)
        b_gk = tl.load(gc + o_j[:, None] * (H * K) + o_k[None, :], mask=m_k[None, :], other=0.0)
        b_kg = b_k * tl.exp(b_gn[None, :] - b_gk)
        b_dA = tl.load(dA + o_c[:, None] * (H * BT) + i_j * BC + o_a[None, :], mask=m_c[:, None], other=0.0)
        b_dq += tl.dot(b_dA, b_kg, input_precision=PREC)
    b_dq *= tl.exp(tl.where(m_c[:, None], b_g - b_gn[None, :], float("-inf")))
    # dq, diagonal block, one column s at a time
    for j in range(0, BC):
        o_s = o_i + j
        m_j = tl.where(o_s < T, m_k, False)
        b_kj = tl.load(k + o_s * (H * K) + o_k, mask=m_j, other=0.0).to(tl.float32)
        b_gj = tl.load(gc + o_s * (H * K) + o_k, mask=m_j, other=0.0)
        b_dAj = tl.load(dA + o_c * (H * BT) + i_i * BC + j, mask=m_c, other=0.0)
        m_s = (o_a >= j) & m_c
        b_e = tl.exp(tl.where(m_s[:, None], b_g - b_gj[None, :], float("-inf")))
        b_dq += b_dAj[:, None] * b_kj[None, :] * b_e

    # dk, off-diagonal blocks j > i through the last (valid) row of sub-chunk i
    b_gn = tl.load(gc + (tl.minimum(o_i + BC, T) - 1) * (H * K) + o_k, mask=m_k, other=0.0)
    b_dk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(i_i + 1, NC):
        o_j = i_t * BT + i_j * BC + o_a
        m_j = o_j < T
        m_jk = m_j[:, None] & m_k[None, :]
        b_q = tl.load(q + o_j[:, None] * (H * K) + o_k[None, :], mask=m_jk, other=0.0).to(tl.float32)
        b_gq = tl.load(gc + o_j[:, None] * (H * K) + o_k[None, :], mask=m_jk, other=0.0)
        b_qg = b_q * tl.exp(tl.where(m_j[:, None], b_gq - b_gn[None, :], float("-inf")))
        b_dA = tl.load(dA + o_j[:, None] * (H * BT) + i_i * BC + o_a[None, :], mask=m_j[:, None], other=0.0)
        b_dk += tl.dot(tl.trans(b_dA), b_qg, input_precision=PREC)
    b_dk *= tl.exp(tl.where(m_c[:, None], b_gn[None, :] - b_g, float("-inf")))
    # dk, diagonal block, one row t at a time
    for j in range(0, BC):
        o_t = o_i + j
        m_j = tl.where(o_t < T, m_k, False)
        m_s = tl.where(o_t < T, o_a <= j, False)
        b_qj = tl.load(q + o_t * (H * K) + o_k, mask=m_j, other=0.0).to(tl.float32)
        b_gj = tl.load(gc + o_t * (H * K) + o_k, mask=m_j, other=0.0)
        # dA is zero above the diagonal: row j's columns past j need no load
        b_dAj = tl.load(dA + o_t * (H * BT) + i_i * BC + o_a, mask=m_s, other=0.0)
        b_e = tl.exp(tl.where(m_s[:, None], b_gj[None, :] - b_g, float("-inf")))
        b_dk += b_dAj[:, None] * b_qj[None, :] * b_e

    tl.store(dq + p_c, b_dq, mask=m_ck)
    tl.store(dk + p_c, b_dk, mask=m_ck)
