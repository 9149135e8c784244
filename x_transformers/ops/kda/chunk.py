"""Chunked KDA in Triton: forward and backward kernels, autograd glue, and the entry point that `chunk_kda` (the
package's public function) calls for CUDA tensors or under TRITON_INTERPRET=1.

The delta rule's WY step (`delta_rule/chunk.py`) with GLA's per-channel intra-chunk decay (`gla/chunk_intra.py`).
Per chunk of BT steps (64; 32 for fp32 or K > 128), with G the cumulative log-gate inside the chunk ([BT, K]) and S0
the state entering it:

    Akk[t, s] = sum_c k_tc k_sc exp(G_tc - G_sc)  (s < t),   Aqk[t, s] = sum_c q_tc k_sc exp(G_tc - G_sc)  (s <= t)
    A = (I + diag(beta) Akk)^-1                                        (blockwise forward substitution)
    w = A (beta k exp(G)),  u = A (beta v)                             (WY representation)
    d = u - w S0                                                       (the corrected values)
    o = scale ((q exp(G)) S0 + Aqk d)
    S_next = diag(exp(G_last)) S0 + (k exp(G_last - G))^T d

Akk and Aqk never factor as exp(G_t) . exp(-G_s) (exp(-G_s) overflows under strong decay): they are built from
sub-chunks of BC = 16, blocks below the diagonal through the first row of the query sub-chunk (both factors have
exponents <= 0), diagonal blocks pair-wise, one column at a time, from differences masked before the exp. Nothing
pair-wise is ever held beyond one [BC, BK] tile.

Kernels, in order: gla's in-chunk cumsum -> `intra_fwd` (Aqk, Akk per sub-chunk) -> `wy_fwd` (A, w, u)
-> `state_fwd` (sequential over chunks: S0 and d) -> `output_fwd`; backward: `state_bwd` (reverse over chunks: dS
and dd) -> `chunk_bwd` (dv, dbeta and the inter-chunk / WY parts of dq, dk, dG, plus dAqk, dAkk) -> `intra_bwd`
(the intra-chunk parts from dAqk, dAkk, per sub-chunk) -> `dg` (reverse in-chunk cumsum of dG).
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
from x_transformers.ops.common.utils import min_dot_tile, narrow_value_tiles, sm_count
from x_transformers.ops.delta_rule.chunk import _merge_inverse
from x_transformers.ops.gla.chunk_state import chunk_gla_cumsum_kernel
from x_transformers.ops.kda.fused_recurrent import fused_recurrent_kda_triton

BC = 16
# the triangular solve substitutes row by row inside WY_SUB x WY_SUB diagonal blocks and merges the rest with
# tensor-core products (as in delta_rule/chunk.py)
WY_SUB = 4
# pipelining depth of the two sequential state passes (the delta rule's kernels hit an illegal memory access in
# bf16 with 1 on an H100, Triton 3.6)
STATE_STAGES = 2
# half-precision keys narrower than this are zero-padded to it (16-wide half key blocks fail on Hopper, see
# delta_rule/chunk.py)
MIN_HALF_K = 32
# widest key tile of the intra-chunk kernels (they loop over key tiles)
INTRA_BK = 64


@triton.jit
def _load_gates(gc, row0, o_i, m_t, last, o_k, m_k, H: tl.constexpr, K: tl.constexpr):
    """Cumulative gates [BT, BK] of a chunk whose first (token, head) row is row0, and those of its last valid row
    [BK]; rows past the end repeat the last one (they act like g = 0 steps: every exp(G_i - G_j), i >= j, stays
    <= 1)."""
    b_gl = tl.load(gc + (row0 + last * H) * K + o_k, mask=m_k, other=0.0)
    b_gc = load_tile(gc + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    return tl.where(m_t[:, None], b_gc, b_gl[None, :]), b_gl


@triton.jit
def _unit_lower_inverse(b_L, o_i, SUB: tl.constexpr, PREC: tl.constexpr):
    """(I + L)^-1 in fp32 for a strictly lower-triangular [BT, BT] L (BT <= 64): forward substitution inside
    SUB x SUB diagonal blocks, then merges SUB -> 16 -> BT on the tensor cores (see delta_rule/chunk.py)."""
    m_lower = o_i[:, None] > o_i[None, :]
    m_eye = o_i[:, None] == o_i[None, :]
    m_sub = (o_i[:, None] // SUB) == (o_i[None, :] // SUB)
    m_16 = (o_i[:, None] // 16) == (o_i[None, :] // 16)
    # row r of (I + L_blk)^-1 - I is -L_r - sum_{j<r} L_rj row_j; rows r, r+SUB, ... touch disjoint columns
    b_D = tl.where(m_lower & m_sub, -b_L, 0.0)
    for r in range(1, SUB):
        m_r = (o_i % SUB) == r
        b_a = tl.sum(tl.where(m_r[:, None], b_D, 0.0), 0)
        b_a += tl.sum(b_a[:, None] * b_D, 0)
        b_D = tl.where(m_r[:, None] & m_sub, b_a[None, :], b_D)
    b_D += tl.where(m_eye, 1.0, 0.0)
    if SUB < 16:
        b_D = _merge_inverse(b_D, tl.where(m_lower & m_16 & ~m_sub, b_L, 0.0), m_eye, PREC)
    b_A = _merge_inverse(b_D, tl.where(m_lower & ~m_16, b_L, 0.0), m_eye, PREC)
    # exact zeros above the diagonal (the products leave rounding dust there)
    return tl.where(m_lower | m_eye, b_A, 0.0)


@triton.jit
def intra_fwd_kernel(
    q, k, gc, Aqk, Akk, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """grid (NT, BT // BC, B*H). Rows of sub-chunk i_i of Aqk (s <= t) and Akk (s < t), every block left of and on
    the diagonal, fp32 [B,T,H,BT] (row t holds its chunk's columns); blocks right of the diagonal are not written."""
    i_i, i_bh = tl.program_id(1), tl.program_id(2)
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    if i_t * BT + i_i * BC >= T:
        return
    # offsets from the chunk's first (token, head) row (int64) stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    q += row0 * K
    k += row0 * K
    gc += row0 * K
    Aqk += row0 * BT
    Akk += row0 * BT
    o_a = tl.arange(0, BC)
    o_c = i_i * BC + o_a
    m_c = i_t * BT + o_c < T

    # blocks j < i through the reference row n = the first of sub-chunk i: exp(G_t - G_n) exp(G_n - G_s)
    for i_j in range(0, i_i):
        o_j = i_j * BC + o_a
        m_j = o_j < BT  # all valid: they precede row n < T
        b_aq = tl.zeros([BC, BC], dtype=tl.float32)
        b_ak = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_gn = tl.load(gc + (i_i * BC) * (H * K) + o_k, mask=m_k, other=0.0)
            b_e = tl.exp(tl.where(m_c[:, None], load_tile(gc, o_c, m_c, H * K, o_k, m_k, 1) - b_gn[None, :],
                                  float("-inf")))
            b_qe = load_tile(q, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32) * b_e
            b_ke = load_tile(k, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32) * b_e
            b_kj = load_tile(k, o_j, m_j, H * K, o_k, m_k, 1).to(tl.float32)
            b_kj *= tl.exp(b_gn[None, :] - load_tile(gc, o_j, m_j, H * K, o_k, m_k, 1))
            b_aq += tl.dot(b_qe, tl.trans(b_kj), input_precision=PREC)
            b_ak += tl.dot(b_ke, tl.trans(b_kj), input_precision=PREC)
        store_tile(Aqk, b_aq, o_c, m_c, H * BT, o_j, m_j, 1)
        store_tile(Akk, b_ak, o_c, m_c, H * BT, o_j, m_j, 1)

    # the diagonal block, one key column s at a time
    b_aq = tl.zeros([BC, BC], dtype=tl.float32)
    b_ak = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_tile(q, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32)
        b_k = load_tile(k, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32)
        b_g = load_tile(gc, o_c, m_c, H * K, o_k, m_k, 1)
        for j in range(0, BC):
            # key row j, if within the sequence (a scalar condition enters masks through tl.where, which keeps them
            # boolean under the interpreter)
            m_kj = tl.where(i_t * BT + i_i * BC + j < T, m_k, False)
            b_kj = tl.load(k + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0).to(tl.float32)
            b_gj = tl.load(gc + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0)
            m_s = (o_a >= j) & m_c
            b_ke = b_kj[None, :] * tl.exp(tl.where(m_s[:, None], b_g - b_gj[None, :], float("-inf")))
            b_aq += tl.where(o_a[None, :] == j, tl.sum(b_q * b_ke, 1)[:, None], 0.0)
            b_ak += tl.where((o_a[None, :] == j) & (o_a[:, None] > j), tl.sum(b_k * b_ke, 1)[:, None], 0.0)
    store_tile(Aqk, b_aq, o_c, m_c, H * BT, o_c, o_c < BT, 1)
    store_tile(Akk, b_ak, o_c, m_c, H * BT, o_c, o_c < BT, 1)


@triton.jit
def wy_fwd_kernel(
    k, v, beta, gc, Akk, A, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    SUB: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). A = (I + diag(beta) Akk)^-1 [B,T,H,BT], w = A (beta k exp(G)) [B,T,H,K],
    u = A (beta v) [B,T,H,V], all in the input dtype."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = k.dtype.element_ty
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    row0 = (bos + i_t * BT) * H + i_h
    last = tl.minimum(BT, T - i_t * BT) - 1
    b_beta = tl.load(beta + row0 + o_i * H, mask=m_t, other=0.0).to(tl.float32)
    b_gc, _ = _load_gates(gc, row0, o_i, m_t, last, o_k, m_k, H, K)
    m_lower = o_i[:, None] > o_i[None, :]
    b_L = tl.load(Akk + row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None] & m_lower, other=0.0)
    b_A = _unit_lower_inverse(b_L * b_beta[:, None], o_i, SUB, PREC).to(DT)
    store_tile(A + row0 * BT, b_A, o_i, m_t, H * BT, o_i, o_i < BT, 1)

    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_kb = (b_k * (tl.exp(b_gc) * b_beta[:, None])).to(DT)
    store_tile(w + row0 * K, tl.dot(b_A, b_kb, input_precision=PREC), o_i, m_t, H * K, o_k, m_k, 1)
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
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
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
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_u = load_tile(u + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_d = (b_u.to(tl.float32) - tl.dot(b_w, b_hc, input_precision=PREC)).to(DT)
        store_tile(d + row0 * V, b_d, o_i, m_t, H * V, o_v, m_v, 1)
        b_gc, b_gl = _load_gates(gc, row0, o_i, m_t, tl.minimum(BT, T - i_t * BT) - 1, o_k, m_k, H, K)
        b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DT)
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_d, input_precision=PREC)
    if STORE_FINAL_STATE:
        store_tile(ht + i_nh.to(tl.int64) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def output_fwd_kernel(
    q, d, gc, Aqk, h, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NV, NT, B*H). o = scale ((q exp(G)) S0 + Aqk d), o [B,T,H,V]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(2)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(1), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    row0 = (bos + i_t * BT) * H + i_h
    b_gc, _ = _load_gates(gc, row0, o_i, m_t, tl.minimum(BT, T - i_t * BT) - 1, o_k, m_k, H, K)
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    b_qg = (b_q * tl.exp(b_gc)).to(DT)
    b_o = tl.dot(b_qg, load_tile(h + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1), input_precision=PREC)
    m_causal = o_i[:, None] >= o_i[None, :]
    b_A = tl.load(Aqk + row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None] & m_causal, other=0.0)
    b_o += tl.dot(b_A.to(DT), load_tile(d + row0 * V, o_i, m_t, H * V, o_v, m_v, 1), input_precision=PREC)
    store_tile(o + row0 * V, b_o * scale, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def state_bwd_kernel(
    q, k, w, gc, Aqk, do, dh, dd, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
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
    # Aqk transposed: rows s, columns t >= s
    m_causal_t = o_i[:, None] <= o_i[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = load_tile(dht + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        b_dhc = b_dh.to(DT)
        store_tile(dh + ((boh + i_t) * H + i_h) * K * V, b_dhc, o_k, m_k, V, o_v, m_v, 1)
        b_gc, b_gl = _load_gates(gc, row0, o_i, m_t, tl.minimum(BT, T - i_t * BT) - 1, o_k, m_k, H, K)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_At = tl.load(Aqk + row0 * BT + o_i[None, :] * (H * BT) + o_i[:, None], mask=m_t[None, :] & m_causal_t,
                       other=0.0)
        b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_gc)).to(DT)
        b_dd = tl.dot(b_At.to(DT), b_do, input_precision=PREC) * scale + tl.dot(b_kd, b_dhc, input_precision=PREC)
        b_dd = b_dd.to(DT)
        store_tile(dd + row0 * V, b_dd, o_i, m_t, H * V, o_v, m_v, 1)
        b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_qg = (b_q * tl.exp(b_gc) * scale).to(DT)
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_dh = b_dh * tl.exp(b_gl)[:, None] - tl.dot(tl.trans(b_w), b_dd, input_precision=PREC)
        b_dh += tl.dot(tl.trans(b_qg), b_do, input_precision=PREC)
    if USE_INITIAL_STATE:
        store_tile(dh0 + i_nh.to(tl.int64) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_kernel(
    q, k, v, beta, gc, A, Akk, h, d, dh, dd, do, dq, dk, dv, dG, dbeta, dAqk, dAkk, cu_seqlens, chunk_indices,
    scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). From the forward's A, Akk, h, d and the backward's dh, dd: dv [B,T,H,V], dbeta [B,T,H], and
    the inter-chunk and WY parts of dq, dk and dG (the gradient of the cumulative gate G) [B,T,H,K] fp32, plus the
    gradients dAqk (scale included) and dAkk [B,T,H,BT] fp32 that `intra_bwd` turns into the intra-chunk parts."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    DT = q.dtype.element_ty
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    m_causal = o_i[:, None] >= o_i[None, :]
    m_lower = o_i[:, None] > o_i[None, :]
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    row0 = (bos + i_t * BT) * H + i_h
    last = tl.minimum(BT, T - i_t * BT) - 1

    b_beta = tl.load(beta + row0 + o_i * H, mask=m_t, other=0.0).to(tl.float32)
    b_gc, b_gl = _load_gates(gc, row0, o_i, m_t, last, o_k, m_k, H, K)
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
        # output stage: o = scale ((q exp(G)) S0 + Aqk d)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
        b_ds += tl.dot(b_do, tl.trans(b_d), input_precision=PREC)
        # state stage: S_next = diag(exp(G_last)) S0 + (k exp(G_last - G))^T d
        b_dks += tl.dot(b_d, tl.trans(b_dh), input_precision=PREC)
        b_dhh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
        # d = u - w S0 with u = A (beta v)
        b_dw -= tl.dot(b_dd, tl.trans(b_h), input_precision=PREC)
        b_dA += tl.dot(b_dd, tl.trans((b_v * b_beta[:, None]).to(DT)), input_precision=PREC)
        b_du = tl.dot(tl.trans(b_A), b_dd, input_precision=PREC)
        store_tile(dv + row0 * V, b_du * b_beta[:, None], o_i, m_t, H * V, o_v, m_v, 1)
        b_dbeta += tl.sum(b_du * b_v.to(tl.float32), 1)

    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_eg = tl.exp(b_gc)
    b_dq *= b_eg * scale
    b_dG = b_q * b_dq
    b_dks *= tl.exp(b_gl[None, :] - b_gc)
    b_xs = b_k * b_dks
    b_dG -= b_xs
    # G_last scales the state leaving the chunk: its gradient lands on the last valid row
    b_dGl = tl.exp(b_gl) * b_dhh + tl.sum(b_xs, 0)
    b_dG += tl.where(o_i[:, None] == last, b_dGl[None, :], 0.0)

    # WY stage: w = A (beta exp(G) k), A = (I + L)^-1 with L = diag(beta) Akk, so dL = -A^T dA A^T (strictly lower)
    b_kb = b_k * (b_eg * b_beta[:, None])
    b_dwc = b_dw.to(DT)
    b_dkb = tl.dot(tl.trans(b_A), b_dwc, input_precision=PREC)
    b_dA += tl.dot(b_dwc, tl.trans(b_kb.to(DT)), input_precision=PREC)
    b_dk = b_dks + b_dkb * (b_eg * b_beta[:, None])
    b_dbeta += tl.sum(b_dkb * b_k * b_eg, 1)
    b_dG += b_dkb * b_kb
    b_dL = tl.dot(b_dA.to(DT), tl.trans(b_A), input_precision=PREC)
    b_dL = -tl.dot(tl.trans(b_A), b_dL.to(DT), input_precision=PREC)
    b_dL = tl.where(m_lower, b_dL, 0.0)
    b_Akk = tl.load(Akk + row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_t[:, None] & m_lower, other=0.0)
    b_dbeta += tl.sum(b_dL * b_Akk, 1)

    store_tile(dq + row0 * K, b_dq, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dk + row0 * K, b_dk, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dG + row0 * K, b_dG, o_i, m_t, H * K, o_k, m_k, 1)
    tl.store(dbeta + row0 + o_i * H, b_dbeta, mask=m_t)
    store_tile(dAqk + row0 * BT, tl.where(m_causal, b_ds * scale, 0.0), o_i, m_t, H * BT, o_i, o_i < BT, 1)
    store_tile(dAkk + row0 * BT, b_dL * b_beta[:, None], o_i, m_t, H * BT, o_i, o_i < BT, 1)


@triton.jit
def intra_bwd_kernel(
    q, k, gc, dAqk, dAkk, dq, dk, dG, dq_out, dk_out, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr,
    PREC: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(K, BK) * NC, NT, B*H). For sub-chunk i_i and one key tile, the intra-chunk parts

        dq_t  = sum_{s <= t} dAqk[t, s] k_s exp(G_t - G_s),   dkr_t = sum_{s < t} dAkk[t, s] k_s exp(G_t - G_s),
        dkc_s = sum_{t >= s} (dAqk[t, s] q_t + dAkk[t, s] k_t) exp(G_t - G_s),

    added to the partial dq, dk (written to dq_out, dk_out in the input dtype) and dG += q dq + k dkr - k dkc (in
    place). Blocks off the diagonal go through a reference row of sub-chunk i (its first row for the rows' sums, its
    last valid row for the columns'), diagonal blocks one row / column at a time."""
    i_kc, i_bh = tl.program_id(0), tl.program_id(2)
    i_k, i_i = i_kc // NC, i_kc % NC
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(1), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    if i_t * BT + i_i * BC >= T:
        return
    row0 = (bos + i_t * BT) * H + i_h
    q += row0 * K
    k += row0 * K
    gc += row0 * K
    dAqk += row0 * BT
    dAkk += row0 * BT
    o_a = tl.arange(0, BC)
    o_c = i_i * BC + o_a
    m_c = i_t * BT + o_c < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    b_g = load_tile(gc, o_c, m_c, H * K, o_k, m_k, 1)

    # rows, blocks j < i through the first row n of sub-chunk i
    b_gn = tl.load(gc + (i_i * BC) * (H * K) + o_k, mask=m_k, other=0.0)
    b_dq = tl.zeros([BC, BK], dtype=tl.float32)
    b_dkr = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(0, i_i):
        o_j = i_j * BC + o_a
        m_j = o_j < BT
        b_kj = load_tile(k, o_j, m_j, H * K, o_k, m_k, 1).to(tl.float32)
        b_kj *= tl.exp(b_gn[None, :] - load_tile(gc, o_j, m_j, H * K, o_k, m_k, 1))
        b_dq += tl.dot(load_tile(dAqk, o_c, m_c, H * BT, o_j, m_j, 1), b_kj, input_precision=PREC)
        b_dkr += tl.dot(load_tile(dAkk, o_c, m_c, H * BT, o_j, m_j, 1), b_kj, input_precision=PREC)
    b_e = tl.exp(tl.where(m_c[:, None], b_g - b_gn[None, :], float("-inf")))
    b_dq *= b_e
    b_dkr *= b_e
    # rows, the diagonal block one key column s at a time (dAkk is zero on the diagonal)
    for j in range(0, BC):
        m_kj = tl.where(i_t * BT + i_i * BC + j < T, m_k, False)
        b_kj = tl.load(k + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0).to(tl.float32)
        b_gj = tl.load(gc + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0)
        m_s = (o_a >= j) & m_c
        b_ke = b_kj[None, :] * tl.exp(tl.where(m_s[:, None], b_g - b_gj[None, :], float("-inf")))
        b_dq += tl.load(dAqk + o_c * (H * BT) + i_i * BC + j, mask=m_s, other=0.0)[:, None] * b_ke
        b_dkr += tl.load(dAkk + o_c * (H * BT) + i_i * BC + j, mask=m_s, other=0.0)[:, None] * b_ke

    # columns, blocks j > i through the last valid row n of sub-chunk i
    n_last = tl.minimum(i_i * BC + BC, T - i_t * BT) - 1
    b_gn = tl.load(gc + n_last * (H * K) + o_k, mask=m_k, other=0.0)
    b_dkc = tl.zeros([BC, BK], dtype=tl.float32)
    for i_j in range(i_i + 1, NC):
        o_j = i_j * BC + o_a
        m_j = i_t * BT + o_j < T
        b_ej = tl.exp(tl.where(m_j[:, None], load_tile(gc, o_j, m_j, H * K, o_k, m_k, 1) - b_gn[None, :],
                               float("-inf")))
        b_qj = load_tile(q, o_j, m_j, H * K, o_k, m_k, 1).to(tl.float32) * b_ej
        b_kj = load_tile(k, o_j, m_j, H * K, o_k, m_k, 1).to(tl.float32) * b_ej
        b_dkc += tl.dot(tl.trans(load_tile(dAqk, o_j, m_j, H * BT, o_c, m_c, 1)), b_qj, input_precision=PREC)
        b_dkc += tl.dot(tl.trans(load_tile(dAkk, o_j, m_j, H * BT, o_c, m_c, 1)), b_kj, input_precision=PREC)
    b_dkc *= tl.exp(tl.where(m_c[:, None], b_gn[None, :] - b_g, float("-inf")))
    # columns, the diagonal block one query row t at a time
    for j in range(0, BC):
        m_kj = tl.where(i_t * BT + i_i * BC + j < T, m_k, False)
        m_s = tl.where(i_t * BT + i_i * BC + j < T, o_a <= j, False)
        b_qj = tl.load(q + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0).to(tl.float32)
        b_kj = tl.load(k + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0).to(tl.float32)
        b_gj = tl.load(gc + (i_i * BC + j) * (H * K) + o_k, mask=m_kj, other=0.0)
        b_e = tl.exp(tl.where(m_s[:, None], b_gj[None, :] - b_g, float("-inf")))
        b_aq = tl.load(dAqk + (i_i * BC + j) * (H * BT) + o_c, mask=m_s, other=0.0)
        b_ak = tl.load(dAkk + (i_i * BC + j) * (H * BT) + o_c, mask=m_s, other=0.0)
        b_dkc += (b_aq[:, None] * b_qj[None, :] + b_ak[:, None] * b_kj[None, :]) * b_e

    b_q = load_tile(q, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32)
    b_k = load_tile(k, o_c, m_c, H * K, o_k, m_k, 1).to(tl.float32)
    p = row0 * K
    b_dG = load_tile(dG + p, o_c, m_c, H * K, o_k, m_k, 1) + b_q * b_dq + b_k * (b_dkr - b_dkc)
    store_tile(dG + p, b_dG, o_c, m_c, H * K, o_k, m_k, 1)
    b_dq += load_tile(dq + p, o_c, m_c, H * K, o_k, m_k, 1)
    store_tile(dq_out + p, b_dq, o_c, m_c, H * K, o_k, m_k, 1)
    b_dk = b_dkr + b_dkc + load_tile(dk + p, o_c, m_c, H * K, o_k, m_k, 1)
    store_tile(dk_out + p, b_dk, o_c, m_c, H * K, o_k, m_k, 1)


@triton.jit
def dg_kernel(
    dG, dg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(K, BK), NT, B*H). dg_t = sum over s >= t in the chunk of dG_s, since G_s = g_1 + ... + g_s."""
    i_k, i_bh = tl.program_id(0), tl.program_id(2)
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(1), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p = ((bos + i_t * BT) * H + i_h) * K
    b_dG = load_tile(dG + p, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dg + p, tl.cumsum(b_dG, axis=0, reverse=True), o_i, m_t, H * K, o_k, m_k, 1)


def _blocks(K, V, dtype):
    """Key block (all of K) and value tile, at least `min_dot_tile(dtype)` wide (masked beyond V)."""
    BK = max(16, triton.next_power_of_2(K))
    BV = min(32 if BK > 128 else 64, max(min_dot_tile(dtype), triton.next_power_of_2(V)))
    return BK, BV


def _state_bv(BV, V, NH, device):
    """Value tile of the two sequential state passes: narrower (down to 16) while sequences * heads * value tiles
    leave SMs idle (see delta_rule/chunk.py)."""
    sms = sm_count(device)
    while BV > 16 and NH * triton.cdiv(V, BV) < sms:
        BV //= 2
    return BV


def _launch(dtype, K):
    """(chunk size, tf32 mode of fp32 products, warps): as the delta rule's kernels (delta_rule/chunk.py), whose
    shapes these follow; half-precision products on the tensor cores, fp32 ones from three tf32 passes in 32-step
    chunks."""
    if dtype in (torch.bfloat16, torch.float16) and K <= 128:
        return 64, "tf32", 4
    return 32, "tf32x3", 8 if K > 64 else 4


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
    IK: int  # key tile of the intra-chunk kernels
    prec: str
    intra_prec: str  # the intra-chunk kernels multiply fp32 operands
    warps: int
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    NT_total: int  # chunks of all sequences
    NT_grid: int  # chunks along the grid's time axis


def _plan(q, v, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    (BT, prec, warps), (BK, BV) = _launch(q.dtype, K), _blocks(K, V, q.dtype)
    IK = max(min_dot_tile(q.dtype), min(INTRA_BK, triton.next_power_of_2(K)))
    intra_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return _Plan(B, T, H, K, V, N, BT, BK, BV, _state_bv(BV, V, N * H, q.device), IK, prec, intra_prec, warps,
                 *chunk_meta(cu_seqlens, B, T, BT))


def chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, plan):
    B, T, H, K, V, N, BT, BK, BV, BVs, IK = plan[:11]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    # intermediates that only feed tensor-core products are kept in the input dtype
    io = dict(device=q.device, dtype=q.dtype)
    common = dict(H=H, K=K, BT=BT, IS_VARLEN=varlen)

    gc = torch.empty(B, T, H, K, **f32)
    chunk_gla_cumsum_kernel[(triton.cdiv(K, IK), plan.NT_grid, grid_bh)](
        g, gc, cu_seqlens, plan.chunk_indices, T, BK=IK, **common
    )
    Aqk, Akk = torch.empty(B, T, H, BT, **f32), torch.empty(B, T, H, BT, **f32)
    intra_fwd_kernel[(plan.NT_grid, BT // BC, grid_bh)](
        q, k, gc, Aqk, Akk, cu_seqlens, plan.chunk_indices, T, BC=BC, BK=IK, PREC=plan.intra_prec, **common
    )
    A, w, u = torch.empty(B, T, H, BT, **io), torch.empty(B, T, H, K, **io), torch.empty(B, T, H, V, **io)
    wy_fwd_kernel[(plan.NT_grid, grid_bh)](
        k, v, beta, gc, Akk, A, w, u, cu_seqlens, plan.chunk_indices, T, V=V, BK=BK, BV=BV, SUB=WY_SUB,
        PREC=plan.prec, num_warps=plan.warps, **common
    )
    h, d = torch.empty(plan.NT_total, H, K, V, **io), torch.empty(B, T, H, V, **io)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    state_fwd_kernel[(triton.cdiv(V, BVs), N * H)](
        k, w, u, gc, h, d, initial_state, ht, cu_seqlens, plan.chunk_offsets, T, V=V, BK=BK, BV=BVs,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state, PREC=plan.prec,
        num_stages=STATE_STAGES, num_warps=plan.warps, **common
    )
    o = torch.empty_like(v)
    output_fwd_kernel[(triton.cdiv(V, BV), plan.NT_grid, grid_bh)](
        q, d, gc, Aqk, h, o, cu_seqlens, plan.chunk_indices, scale, T, V=V, BK=BK, BV=BV, PREC=plan.prec,
        num_warps=plan.warps, **common
    )
    return o, ht, (gc, Aqk, Akk, A, w, h, d)


def chunk_kda_bwd(q, k, v, beta, scale, initial_state, cu_seqlens, plan, saved, do, dht):
    B, T, H, K, V, N, BT, BK, BV, BVs, IK = plan[:11]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    io = dict(device=q.device, dtype=q.dtype)
    common = dict(H=H, K=K, BT=BT, IS_VARLEN=varlen)
    gc, Aqk, Akk, A, w, h, d = saved

    dh, dd = torch.empty(plan.NT_total, H, K, V, **io), torch.empty(B, T, H, V, **io)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    state_bwd_kernel[(triton.cdiv(V, BVs), N * H)](
        q, k, w, gc, Aqk, do, dh, dd, dht, dh0, cu_seqlens, plan.chunk_offsets, scale, T, V=V, BK=BK, BV=BVs,
        USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None, PREC=plan.prec,
        num_stages=STATE_STAGES, num_warps=plan.warps, **common
    )
    dq, dk, dG = (torch.empty(B, T, H, K, **f32) for _ in range(3))
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, H, **f32)
    dAqk, dAkk = torch.empty(B, T, H, BT, **f32), torch.empty(B, T, H, BT, **f32)
    # many [BT, BK] blocks live at once: narrower value tiles keep it within shared memory
    chunk_bwd_kernel[(plan.NT_grid, grid_bh)](
        q, k, v, beta, gc, A, Akk, h, d, dh, dd, do, dq, dk, dv, dG, dbeta, dAqk, dAkk, cu_seqlens,
        plan.chunk_indices, scale, T, V=V, BK=BK, BV=min(BV, 32), PREC=plan.prec, num_warps=8, **common
    )
    dq_out, dk_out = torch.empty_like(q), torch.empty_like(k)
    intra_bwd_kernel[(triton.cdiv(K, IK) * (BT // BC), plan.NT_grid, grid_bh)](
        q, k, gc, dAqk, dAkk, dq, dk, dG, dq_out, dk_out, cu_seqlens, plan.chunk_indices, T, BC=BC, BK=IK,
        NC=BT // BC, PREC=plan.intra_prec, **common
    )
    dg = dq  # the fp32 partial dq is consumed: its memory takes dg
    dg_kernel[(triton.cdiv(K, IK), plan.NT_grid, grid_bh)](dG, dg, cu_seqlens, plan.chunk_indices, T, BK=IK, **common)
    return dq_out, dk_out, dv, dg, dbeta, dh0


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        # the chunk bookkeeping of packed sequences syncs with the host: once per call, not again in the backward
        plan = _plan(q, v, cu_seqlens)
        o, ht, saved = chunk_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, plan)
        ctx.save_for_backward(q, k, v, beta, initial_state, cu_seqlens, *saved)
        ctx.scale, ctx.plan, ctx.g_dtype = scale, plan, g.dtype
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = chunk_kda_bwd(
            q, k, v, beta, ctx.scale, initial_state, cu_seqlens, ctx.plan, saved, do.contiguous(),
            dht.contiguous() if dht is not None else None,
        )
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, dg.to(ctx.g_dtype), dbeta.to(beta.dtype), None, dh0, None, None


def chunk_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """`chunk_kda` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    K, V = q.shape[-1], v.shape[-1]
    if K > 256:
        # the chunk kernels hold all K columns of a chunk in one block, which no longer fits in shared memory
        return fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    # the kernels multiply in v's dtype: q and k follow it (under autocast L2-normalised q, k arrive in fp32)
    q, k, v, g, beta = q.to(v.dtype).contiguous(), k.to(v.dtype).contiguous(), v.contiguous(), g.contiguous(), \
        beta.contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None
    if narrow_value_tiles(v.dtype, *_blocks(max(K, MIN_HALF_K), V, v.dtype)):
        o, ht = chunk_kda_triton(q.float(), k.float(), v.float(), g, beta, scale, initial_state, output_final_state,
                                 cu_seqlens)
        return o.to(v.dtype), ht
    if K < MIN_HALF_K and v.dtype in (torch.bfloat16, torch.float16):
        # zero key channels (with zero gates) leave the recurrence and the output unchanged: their state rows stay
        # zero; autograd slices the gradients back
        pad = MIN_HALF_K - K
        q, k, g = F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(g, (0, pad))
        if initial_state is not None:
            initial_state = F.pad(initial_state, (0, 0, 0, pad))
        o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        return o, ht[:, :, :K] if output_final_state else None
    o, ht = ChunkKDAFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return o, ht if output_final_state else None
