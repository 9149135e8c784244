"""Chunked (gated) delta rule in Triton: forward and backward kernels, autograd glue, and the entry point that
`chunk_delta_rule` (the package's public function) calls for CUDA tensors or under TRITON_INTERPRET=1.

Per chunk of BT steps (64; 32 for fp32 or K > 128), with G the cumulative log-gate inside the chunk and S0 the state
entering it:

    A = (I + strict_tril(diag(beta) K K^T * exp(G_i - G_j)))^-1       (blockwise forward substitution)
    w = A (beta exp(G) k),  u = A (beta v)                            (WY representation)
    d = u - w S0                                                       (the corrected values, "v_new")
    o = scale (exp(G) q S0 + (q k^T * exp(G_i - G_j))_causal d)
    S_next = exp(G_last) S0 + (k exp(G_last - G))^T d

Kernels, in order: `wy_fwd` (A, w, u, G per chunk) -> `state_fwd` (sequential over chunks: S0 and d)
-> `output_fwd`; backward: `state_bwd` (reverse over chunks: dS and dd) -> `chunk_bwd` (every input gradient of
one chunk). The full key dimension is one register block (BK = next power of 2 of K); values are tiled by BV.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds, seq_chunk_bounds
from x_transformers.ops.common.chunk_index import chunk_meta
from x_transformers.ops.common.tiles import load_tile, store_tile
from x_transformers.ops.common.utils import min_dot_tile, narrow_value_tiles, pow2_block, sm_count
from x_transformers.ops.delta_rule.fused_recurrent import fused_recurrent_delta_rule_triton

# the triangular solve substitutes row by row inside WY_SUB x WY_SUB diagonal blocks (4 or 16) and merges the rest
# with tensor-core products: fewer serial steps of cross-warp reductions
WY_SUB = 4
# software-pipelining depth of the two sequential state passes: the next chunk's loads overlap this chunk's products.
# Keep it at 2 or more: with 1, the bf16 state kernels hit an illegal memory access on an H100 (Triton 3.6).
STATE_STAGES = 2
# pipelining depth of the wy and chunk_bwd kernels (single pass over one chunk: nothing to overlap at 1)
WY_STAGES = BWD_STAGES = 1
# half-precision keys narrower than this are zero-padded to it: with 16-wide key blocks, wy_fwd hits an illegal
# memory access on Hopper (Triton 3.6, bf16, any of the stage / warp settings tried: benchmarks/check_configs.py),
# while 32 is checked there
MIN_HALF_K = 32
# warps per kernel and chunk_bwd's value tile; 0 = the default of `_launch` (tuning knobs for bench_ops.py --set)
WY_WARPS = STATE_WARPS = OUTPUT_WARPS = BWD_WARPS = BWD_BV = 0

@triton.jit
def _load_gates(gc, bos, i_t, i_h, T, H: tl.constexpr, BT: tl.constexpr):
    """Cumulative gates of a chunk; rows past the end repeat the last one (they act like g = 0 steps, so every
    exp(G_i - G_j) with i >= j stays <= 1 even there)."""
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    last = tl.minimum(i_t * BT + BT, T) - 1
    b_glast = tl.load(gc + (bos + last) * H + i_h)
    b_gc = tl.load(gc + (bos + o_t) * H + i_h, mask=m_t, other=0.0)
    return tl.where(m_t, b_gc, b_glast), b_glast


@triton.jit
def _merge_inverse(b_D, b_Lo, m_eye, PREC: tl.constexpr):
    """(I + L)^-1 from D = (I + L_d)^-1, the inverse of L's block diagonal, and L_o = L - L_d below those blocks:
    I + L = (I + L_d)(I + N) with N = D L_o strictly block-lower, so with at most 4 blocks N^4 = 0 and
    (I + L)^-1 = (I - N)(I + N^2) D."""
    b_I = tl.where(m_eye, 1.0, 0.0)
    b_N = tl.dot(b_D, b_Lo, input_precision=PREC)
    b_X = tl.dot(b_I - b_N, b_I + tl.dot(b_N, b_N, input_precision=PREC), input_precision=PREC)
    return tl.dot(b_X, b_D, input_precision=PREC)


@triton.jit
def wy_fwd_kernel(
    k, v, beta, g, gc, A, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). k [B,T,H,K], v [B,T,H,V], beta/g [B,T,H] -> gc [B,T,H] (fp32), A [B,T,H,BT], w [B,T,H,K],
    u [B,T,H,V] (in the input dtype)."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = k.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_gc = tl.zeros([BT], dtype=tl.float32)
    if USE_G:
        b_gc = tl.cumsum(tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32), 0)
        tl.store(gc + (bos + o_t) * H + i_h, b_gc, mask=m_t)

    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    m_lower = o_i[:, None] > o_i[None, :]
    b_L = tl.dot(b_k, tl.trans(b_k), input_precision=PREC) * b_beta[:, None]
    b_L *= tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], 0.0))
    # (I + L)^-1 in fp32, bottom-up. First the SUB x SUB diagonal blocks, by forward substitution: row r of
    # (I + L_blk)^-1 - I is -L_r - sum_{j<r} L_rj row_j. Rows r, r+SUB, ... touch disjoint columns, so one pass
    # handles the same row of every block at once.
    m_eye = o_i[:, None] == o_i[None, :]
    m_sub = (o_i[:, None] // SUB) == (o_i[None, :] // SUB)
    m_16 = (o_i[:, None] // 16) == (o_i[None, :] // 16)
    b_D = tl.where(m_lower & m_sub, -b_L, 0.0)
    for r in range(1, SUB):
        m_r = (o_i % SUB) == r
        b_a = tl.sum(tl.where(m_r[:, None], b_D, 0.0), 0)
        b_a += tl.sum(b_a[:, None] * b_D, 0)
        b_D = tl.where(m_r[:, None] & m_sub, b_a[None, :], b_D)
    b_D += tl.where(m_eye, 1.0, 0.0)
    # then merge on the tensor cores, SUB -> 16 -> BT, each level from at most 4 inverted diagonal blocks
    if SUB < 16:
        b_D = _merge_inverse(b_D, tl.where(m_lower & m_16 & ~m_sub, b_L, 0.0), m_eye, PREC)
    b_A = _merge_inverse(b_D, tl.where(m_lower & ~m_16, b_L, 0.0), m_eye, PREC)
    # exact zeros above the diagonal (the products above leave rounding dust there)
    b_A = tl.where(m_lower | m_eye, b_A, 0.0).to(DT)
    tl.store(A + row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :], b_A, mask=m_t[:, None])

    b_w = tl.dot(b_A, (b_k * (b_beta * tl.exp(b_gc))[:, None]).to(DT), input_precision=PREC)
    store_tile(w + row0 * K, b_w, o_i, m_t, H * K, o_k, m_k, 1)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_u = tl.dot(b_A, (b_v * b_beta[:, None]).to(DT), input_precision=PREC)
        store_tile(u + row0 * V, b_u, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def state_fwd_kernel(
    k, w, u, gc, h, d, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NV, N*H), sequential over the chunks of one sequence. Writes h [NT_total,H,K,V] (state entering each
    chunk) and d [B,T,H,V] (corrected values), both in the input dtype, and the final state ht [N,H,K,V] (fp32).
    The running state stays fp32; its rounded copy feeds the products."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    DT = k.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = load_tile(h0 + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)
    for i_t in range(NT):
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        b_hc = b_h.to(DT)
        store_tile(h + ((boh + i_t) * H + i_h) * K * V, b_hc, o_k, m_k, V, o_v, m_v, 1)
        b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_u = load_tile(u + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_d = b_u.to(tl.float32) - tl.dot(b_w, b_hc, input_precision=PREC)
        b_d = b_d.to(DT)
        store_tile(d + row0 * V, b_d, o_i, m_t, H * V, o_v, m_v, 1)
        if USE_G:
            b_gc, b_glast = _load_gates(gc, bos, i_t, i_h, T, H, BT)
            b_h *= tl.exp(b_glast)
            b_k = (b_k * tl.exp(b_glast - b_gc)[:, None]).to(DT)
        b_h += tl.dot(tl.trans(b_k), b_d, input_precision=PREC)
    if STORE_FINAL_STATE:
        store_tile(ht + i_nh.to(tl.int64) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def output_fwd_kernel(
    q, k, d, gc, h, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NV, NT, B*H). o = scale (exp(G) q S0 + causal(q k^T exp(G_i - G_j)) d), o [B,T,H,V]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(2)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(1), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_o = tl.dot(b_q, load_tile(h + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1), input_precision=PREC)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    m_causal = o_i[:, None] >= o_i[None, :]
    if USE_G:
        b_gc, b_glast = _load_gates(gc, bos, i_t, i_h, T, H, BT)
        b_o *= tl.exp(b_gc)[:, None]
        b_s *= tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0))
    b_s = tl.where(m_causal, b_s, 0.0).to(DT)
    b_o += tl.dot(b_s, load_tile(d + row0 * V, o_i, m_t, H * V, o_v, m_v, 1), input_precision=PREC)
    store_tile(o + row0 * V, b_o * scale, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def state_bwd_kernel(
    q, k, w, gc, do, dh, dd, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (NV, N*H), reverse over the chunks of one sequence. Writes dh [NT_total,H,K,V] (gradient of the state
    leaving each chunk) and dd [B,T,H,V] (total gradient of the corrected values d), both in the input dtype, and
    dh0 [N,H,K,V] (fp32). The running gradient stays fp32."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    DT = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    # rows j, columns i: entry (j, i) links key j to query i >= j
    m_causal_t = o_i[:, None] <= o_i[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = load_tile(dht + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        b_dhc = b_dh.to(DT)
        store_tile(dh + ((boh + i_t) * H + i_h) * K * V, b_dhc, o_k, m_k, V, o_v, m_v, 1)
        b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_gc, b_glast = _load_gates(gc, bos, i_t, i_h, T, H, BT)

        b_s = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
        b_s *= tl.exp(tl.where(m_causal_t, b_gc[None, :] - b_gc[:, None], 0.0))
        b_s = tl.where(m_causal_t, b_s, 0.0).to(DT)
        b_kd = (b_k * tl.exp(b_glast - b_gc)[:, None]).to(DT)
        b_dd = tl.dot(b_s, b_do, input_precision=PREC) * scale + tl.dot(b_kd, b_dhc, input_precision=PREC)
        b_dd = b_dd.to(DT)
        store_tile(dd + row0 * V, b_dd, o_i, m_t, H * V, o_v, m_v, 1)
        b_qg = (b_q * (tl.exp(b_gc) * scale)[:, None]).to(DT)
        b_dh = b_dh * tl.exp(b_glast) - tl.dot(tl.trans(b_w), b_dd, input_precision=PREC)
        b_dh += tl.dot(tl.trans(b_qg), b_do, input_precision=PREC)
    if USE_INITIAL_STATE:
        store_tile(dh0 + i_nh.to(tl.int64) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_kernel(
    q, k, v, beta, gc, A, h, d, dh, dd, do, dq, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). Every input gradient of one chunk, from the forward's A, h, d and the backward's dh, dd:
    dq, dk [B,T,H,K], dv [B,T,H,V], dbeta, dg [B,T,H]. dG below is the gradient of the cumulative gate G; dg is
    its reverse cumulative sum inside the chunk. Products take input-dtype operands, sums stay fp32."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    o_t = i_t * BT + o_i
    m_t = o_t < T
    m_causal = o_i[:, None] >= o_i[None, :]
    m_lower = o_i[:, None] > o_i[None, :]

    b_beta = tl.load(beta + (bos + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_gc, b_glast = _load_gates(gc, bos, i_t, i_h, T, H, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_A = tl.load(A + row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None], other=0)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dhh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_d = load_tile(d + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_dd = load_tile(dd + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_h = load_tile(h + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1)
        b_dh = load_tile(dh + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1)
        # output stage: o = scale (exp(G) q S0 + causal(q k^T decay) d)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
        b_ds += tl.dot(b_do, tl.trans(b_d), input_precision=PREC)
        # state stage: S_next = exp(G_last) S0 + (k exp(G_last - G))^T d
        b_dks += tl.dot(b_d, tl.trans(b_dh), input_precision=PREC)
        b_dhh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
        # d = u - w S0 with u = A (beta v)
        b_dw -= tl.dot(b_dd, tl.trans(b_h), input_precision=PREC)
        b_dA += tl.dot(b_dd, tl.trans((b_v * b_beta[:, None]).to(DT)), input_precision=PREC)
        b_du = tl.dot(tl.trans(b_A), b_dd, input_precision=PREC)
        store_tile(dv + row0 * V, b_du * b_beta[:, None], o_i, m_t, H * V, o_v, m_v, 1)
        b_dbeta += tl.sum(b_du * b_v.to(tl.float32), 1)

    b_qf, b_kf = b_q.to(tl.float32), b_k.to(tl.float32)
    b_eg = tl.exp(b_gc)
    b_toend = tl.exp(b_glast - b_gc)
    b_ds *= tl.where(m_causal, tl.exp(tl.where(m_causal, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0) * scale
    b_dsc = b_ds.to(DT)
    b_dG = tl.sum(b_dq * b_qf, 1) * b_eg * scale
    b_dq = b_dq * (b_eg * scale)[:, None] + tl.dot(b_dsc, b_k, input_precision=PREC)
    b_x = b_ds * tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_dG += tl.sum(b_x, 1) - tl.sum(b_x, 0)
    b_dk = tl.dot(tl.trans(b_dsc), b_q, input_precision=PREC)
    b_xs = tl.sum(b_kf * b_dks, 1) * b_toend
    b_dk += b_dks * b_toend[:, None]
    b_dG -= b_xs
    last = tl.minimum(BT, T - i_t * BT) - 1
    b_dG += tl.where(o_i == last, tl.exp(b_glast) * tl.sum(b_dhh, 0) + tl.sum(b_xs, 0), 0.0)

    # WY stage: w = A (beta exp(G) k), A = (I + L)^-1 so dL = -A^T dA A^T on the strict lower triangle
    b_bg = b_beta * b_eg
    b_kb = b_kf * b_bg[:, None]
    b_dwc = b_dw.to(DT)
    b_dkb = tl.dot(tl.trans(b_A), b_dwc, input_precision=PREC)
    b_dA += tl.dot(b_dwc, tl.trans(b_kb.to(DT)), input_precision=PREC)
    b_dk += b_dkb * b_bg[:, None]
    b_dbeta += tl.sum(b_dkb * b_kf, 1) * b_eg
    b_dG += tl.sum(b_dkb * b_kb, 1)
    b_dL = tl.dot(b_dA.to(DT), tl.trans(b_A), input_precision=PREC)
    b_dL = -tl.dot(tl.trans(b_A), b_dL.to(DT), input_precision=PREC)
    b_dL = tl.where(m_lower, b_dL * tl.exp(tl.where(m_lower, b_gc[:, None] - b_gc[None, :], 0.0)), 0.0)
    b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=PREC)
    b_dbeta += tl.sum(b_dL * b_kk, 1)
    b_dL *= b_beta[:, None]
    b_z = b_dL * b_kk
    b_dG += tl.sum(b_z, 1) - tl.sum(b_z, 0)
    b_dLc = b_dL.to(DT)
    b_dk += tl.dot(b_dLc, b_k, input_precision=PREC) + tl.dot(tl.trans(b_dLc), b_k, input_precision=PREC)

    store_tile(dq + row0 * K, b_dq, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dk + row0 * K, b_dk, o_i, m_t, H * K, o_k, m_k, 1)
    tl.store(dbeta + (bos + o_t) * H + i_h, b_dbeta, mask=m_t)
    if USE_G:
        b_dG = tl.where(m_t, b_dG, 0.0)
        # dg_t = sum over s >= t of dG_s, since G_s = g_1 + ... + g_s inside the chunk
        b_dg = tl.sum(tl.where(o_i[:, None] <= o_i[None, :], b_dG[None, :], 0.0), 1)
        tl.store(dg + (bos + o_t) * H + i_h, b_dg, mask=m_t)


def _blocks(K, V, dtype):
    """Key block (all of K: half-precision keys arrive padded to MIN_HALF_K) and value tile, at least
    `min_dot_tile(dtype)` wide (masked beyond V)."""
    BK = pow2_block(K, 16)
    BV = pow2_block(V, min_dot_tile(dtype), 32 if BK > 128 else 64)
    return BK, BV


def _state_bv(BV, V, NH, device):
    """Value tile of the two sequential state passes. They run one program per (value tile, sequence * head), each
    walking every chunk in turn, so with few sequences * heads most SMs would idle: narrower value tiles (down to 16,
    the narrowest tensor-core tile) give more programs, each a shorter chain of smaller products. Every value tile
    re-reads the chunk's keys, mostly from L2. Off CUDA (the interpreter, the offline sm_90 compile check) it assumes
    an H100's 132 SMs, so the tests see the tiles such a GPU gets."""
    sms = sm_count(device)
    while BV > 16 and NH * triton.cdiv(V, BV) < sms:
        BV //= 2
    return BV


def _launch(dtype, K):
    """(chunk size, tf32 mode of fp32 products, warps of the wy and output kernels, of the state passes, of chunk_bwd).

    Half-precision inputs multiply in their own dtype on the tensor cores (fp32 accumulate); only the fp32 triangular
    solve uses tf32 there. fp32 inputs get near-fp32 products from three tf32 passes (tests hold them to 5e-3) and
    32-step chunks, which keeps them within shared memory. Warps: measured on an H100 at K = V = 128 bf16
    (bench_ops.py --set ...WARPS=n): 4 warps beat 8 for the wy, state and output kernels (forward 1.19 -> ~0.75 ms
    at B=16, T=1024), while chunk_bwd, which holds the most tiles, wants 8. Narrower keys keep the state passes at 8
    warps, where the sm_90 compile check shows no register spills (not timed)."""
    if dtype in (torch.bfloat16, torch.float16) and K <= 128:
        return 64, "tf32", 4, (4 if K > 64 else 8), 8
    warps = 8 if K > 64 else 4
    return 32, "tf32x3", warps, warps, warps


class _Plan(NamedTuple):
    """Shapes and launch parameters of one call, made once in the forward and reused by the backward."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # independent sequences
    BT: int
    BK: int
    BV: int
    BVs: int  # value tile of the state passes
    prec: str
    warps: int
    state_warps: int
    bwd_warps: int
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    NT_total: int  # chunks of all sequences
    NT_grid: int  # chunks along the grid's time axis


def _plan(q, v, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    (BT, prec, warps, state_warps, bwd_warps), (BK, BV) = _launch(q.dtype, K), _blocks(K, V, q.dtype)
    return _Plan(B, T, H, K, V, N, BT, BK, BV, _state_bv(BV, V, N * H, q.device), prec, warps, state_warps, bwd_warps,
                 *chunk_meta(cu_seqlens, B, T, BT))


def chunk_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, plan):
    B, T, H, K, V, N, BT, BK, BV, BVs, prec = plan[:11]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    # intermediates that only feed tensor-core products are kept in the input dtype (half the traffic for bf16)
    io = dict(device=q.device, dtype=q.dtype)

    gc = torch.zeros(B, T, H, **f32)
    A, w, u = torch.empty(B, T, H, BT, **io), torch.empty(B, T, H, K, **io), torch.empty(B, T, H, V, **io)
    wy_fwd_kernel[(plan.NT_grid, grid_bh)](
        k, v, beta, g, gc, A, w, u, cu_seqlens, plan.chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        SUB=WY_SUB, USE_G=g is not None, IS_VARLEN=varlen, PREC=prec, num_stages=WY_STAGES,
        num_warps=WY_WARPS or plan.warps,
    )
    h, d = torch.empty(plan.NT_total, H, K, V, **io), torch.empty(B, T, H, V, **io)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    state_fwd_kernel[(triton.cdiv(V, BVs), N * H)](
        k, w, u, gc, h, d, initial_state, ht, cu_seqlens, plan.chunk_offsets, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BVs,
        USE_G=g is not None, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=varlen, PREC=prec, num_stages=STATE_STAGES, num_warps=STATE_WARPS or plan.state_warps,
    )
    o = torch.empty_like(v)
    output_fwd_kernel[(triton.cdiv(V, BV), plan.NT_grid, grid_bh)](
        q, k, d, gc, h, o, cu_seqlens, plan.chunk_indices, scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=g is not None, IS_VARLEN=varlen, PREC=prec, num_warps=OUTPUT_WARPS or plan.warps,
    )
    return o, ht, (gc, A, w, h, d)


def chunk_delta_rule_bwd(q, k, v, beta, g, scale, initial_state, cu_seqlens, plan, saved, do, dht):
    B, T, H, K, V, N, BT, BK, BV, BVs, prec = plan[:11]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    io = dict(device=q.device, dtype=q.dtype)
    gc, A, w, h, d = saved

    dh, dd = torch.empty(plan.NT_total, H, K, V, **io), torch.empty(B, T, H, V, **io)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    state_bwd_kernel[(triton.cdiv(V, BVs), N * H)](
        q, k, w, gc, do, dh, dd, dht, dh0, cu_seqlens, plan.chunk_offsets, scale, T, H=H, K=K, V=V, BT=BT, BK=BK,
        BV=BVs, USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
        IS_VARLEN=varlen, PREC=prec, num_stages=STATE_STAGES, num_warps=STATE_WARPS or plan.state_warps,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbeta = torch.empty(B, T, H, **f32)
    dg = torch.empty(B, T, H, **f32) if g is not None else None
    # this kernel keeps many [BT, BK] blocks live at once: narrower value tiles keep it within shared memory
    chunk_bwd_kernel[(plan.NT_grid, grid_bh)](
        q, k, v, beta, gc, A, h, d, dh, dd, do, dq, dk, dv, dbeta, dg, cu_seqlens, plan.chunk_indices, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BWD_BV or min(BV, 32), USE_G=g is not None, IS_VARLEN=varlen, PREC=prec,
        num_warps=BWD_WARPS or plan.bwd_warps, num_stages=BWD_STAGES,
    )
    return dq, dk, dv, dbeta, dg, dh0


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens):
        # the chunk bookkeeping of packed sequences syncs with the host: once per call, not again in the backward
        plan = _plan(q, v, cu_seqlens)
        o, ht, saved = chunk_delta_rule_fwd(
            q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, plan
        )
        ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens, *saved)
        ctx.scale, ctx.plan = scale, plan
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        dq, dk, dv, dbeta, dg, dh0 = chunk_delta_rule_bwd(
            q, k, v, beta, g, ctx.scale, initial_state, cu_seqlens, ctx.plan, saved, do.contiguous(),
            dht.contiguous() if dht is not None else None,
        )
        dbeta = dbeta.to(beta.dtype)
        dg = dg.to(g.dtype) if dg is not None else None
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dbeta, dg, None, dh0, None, None


def chunk_delta_rule_triton(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens):
    """`chunk_delta_rule` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    K, V = q.shape[-1], v.shape[-1]
    if K > 256:
        # the chunk kernels hold all K columns of a chunk in one block, which no longer fits in shared memory
        return fused_recurrent_delta_rule_triton(q, k, v, beta, g, scale, initial_state, output_final_state,
                                                 cu_seqlens)
    # the kernels multiply in v's dtype: q and k follow it (under autocast L2-normalised q, k arrive in fp32)
    q, k, v, beta = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous(), v.contiguous(), beta.contiguous()
    g = g.contiguous() if g is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    if narrow_value_tiles(v.dtype, *_blocks(max(K, MIN_HALF_K), V, v.dtype)):
        o, ht = chunk_delta_rule_triton(q.float(), k.float(), v.float(), beta, g, scale, initial_state,
                                        output_final_state, cu_seqlens)
        return o.to(v.dtype), ht
    if K < MIN_HALF_K and v.dtype in (torch.bfloat16, torch.float16):
        # zero key channels leave the recurrence and the output unchanged (their state rows stay zero); autograd
        # slices the gradients back
        pad = MIN_HALF_K - K
        q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, 0, 0, pad))
        o, ht = ChunkDeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
        return o, ht[:, :, :K] if output_final_state else None
    o, ht = ChunkDeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    return o, ht if output_final_state else None
