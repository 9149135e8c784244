"""Chunked generalized delta rule in Triton: forward and backward kernels, autograd glue, and the entry point that
`chunk_dplr_delta_rule` (the package's public function) calls for CUDA tensors or under TRITON_INTERPRET=1.

Per chunk of BT steps, with G the inclusive cumulative log decay inside the chunk (per key channel), G' = G - gk the
exclusive one and S0 the state entering the chunk (see chunk_torch.py for the derivation):

    M_ab[t, s] = sum_c a_tc b_sc exp(G'_tc - G_sc) (s < t), M_ak likewise with k
    M_qb[t, s] = sum_c q_tc b_sc exp(G_tc - G_sc) (s <= t), M_qk likewise with k
    P = (I - M_ab)^-1,  w = P (a exp(G')),  u = P M_ak v,  U = u + w S0      (U: the reads a_t S_{t-1})
    o = scale (q exp(G) S0 + M_qk v + M_qb U)
    S_next = exp(G_last) S0 + (b exp(G_last - G))^T U + (k exp(G_last - G))^T v

Per-channel decay cannot be split into exp(G_t) exp(-G_s) factors without overflow under strong decay, so the four
M are built one column s at a time from masked differences exp(G_t - G_s), s <= t: every exponent anywhere is <= 0
and only `[BT, BK]` tiles are ever live. Kernels, in order: `intra_fwd` (G, the four M, P, w, u per chunk) ->
`state_fwd` (sequential over chunks: S0 and U) -> `output_fwd`; backward: `state_bwd` (reverse over chunks: the
gradient of the state leaving each chunk, and of U) -> `chunk_bwd` (every input gradient of one chunk, the column
loop again for the pairwise terms). Everything computes in fp32; the full key dimension is one register block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds, seq_chunk_bounds
from x_transformers.ops.common.chunk_index import chunk_meta
from x_transformers.ops.common.tiles import load_tile, store_tile
from x_transformers.ops.dplr.fused_recurrent import fused_recurrent_dplr_delta_rule_triton

# chunk length: the pairwise column loop costs BT * BK exponentials per token, and the backward keeps ~15 [BT, BK]
# fp32 tiles live
BT = 16
# keys wider than this run the token-by-token kernels (the chunk kernels hold all of K in registers)
MAX_K = 128
# fp32 products: three tf32 passes on the tensor cores, near fp32 accuracy
PREC = "tf32x3"
# 8 warps: the sm_90 compile (tests/ops/hopper_compile.py's launch interception) shows no register spills in the
# state passes at K = V = 128 with 8, several hundred bytes with 4. chunk_bwd still spills (its pairwise loop over
# product tiles): the first thing to tune on a GPU
NUM_WARPS = 8


@triton.jit
def _load_g(gc, row0, o_i, m_t, o_k, m_k, last, H: tl.constexpr, K: tl.constexpr):
    """Cumulative log decay of a chunk [BT, BK] and its last row G_last [BK]; rows past the end repeat G_last (they
    act like gk = 0 steps, so exp(G_last - G) stays 1 there and every pairwise exponent stays <= 0)."""
    b_glast = tl.load(gc + (row0 + last * H) * K + o_k, mask=m_k, other=0.0)
    b_g = load_tile(gc + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
    return tl.where(m_t[:, None], b_g, b_glast[None, :]), b_glast


@triton.jit
def _row(b_x, m_s):
    """Row s (selected by the one-hot m_s [BT]) of a [BT, BK] tile, as [BK]."""
    return tl.sum(tl.where(m_s[:, None], b_x, 0.0), 0)


@triton.jit
def intra_fwd_kernel(
    q, k, v, a, b, gk, gc, Mab, Mak, Mqb, Mqk, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). q, k, a, b, gk [B,T,H,K], v [B,T,H,V] -> gc (G) [B,T,H,K], Mab (holding P = (I - M_ab)^-1),
    Mak, Mqb, Mqk [B,T,H,BT], w [B,T,H,K], u [B,T,H,V], all fp32."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, _, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_a = load_tile(a + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_b = load_tile(b + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_gk = load_tile(gk + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    # padded rows have gk = 0: G stays flat past the end
    b_g = tl.cumsum(b_gk, 0)
    b_gx = b_g - b_gk
    store_tile(gc + row0 * K, b_g, o_i, m_t, H * K, o_k, m_k, 1)

    b_Mab = tl.zeros([BT, BT], dtype=tl.float32)
    b_Mak = tl.zeros([BT, BT], dtype=tl.float32)
    b_Mqb = tl.zeros([BT, BT], dtype=tl.float32)
    b_Mqk = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(BT):
        m_s = o_i == s
        b_gs, b_bs, b_ks = _row(b_g, m_s), _row(b_b, m_s), _row(b_k, m_s)
        # decays from step s to every later step, masked before exp
        b_ae = b_a * tl.exp(tl.where((o_i > s)[:, None], b_gx - b_gs[None, :], float("-inf")))
        b_qe = b_q * tl.exp(tl.where((o_i >= s)[:, None], b_g - b_gs[None, :], float("-inf")))
        m_col = m_s[None, :]
        b_Mab = tl.where(m_col, tl.sum(b_ae * b_bs[None, :], 1)[:, None], b_Mab)
        b_Mak = tl.where(m_col, tl.sum(b_ae * b_ks[None, :], 1)[:, None], b_Mak)
        b_Mqb = tl.where(m_col, tl.sum(b_qe * b_bs[None, :], 1)[:, None], b_Mqb)
        b_Mqk = tl.where(m_col, tl.sum(b_qe * b_ks[None, :], 1)[:, None], b_Mqk)

    # P = (I - M_ab)^-1 by forward substitution: row r of P - I is M_r + sum_{j<r} M_rj (P - I)_j
    b_P = b_Mab
    for r in range(1, BT):
        m_r = o_i == r
        b_x = tl.sum(tl.where(m_r[:, None], b_P, 0.0), 0)
        b_x += tl.sum(b_x[:, None] * b_P, 0)
        b_P = tl.where(m_r[:, None], b_x[None, :], b_P)
    b_P += tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)

    p_m = row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :]
    tl.store(Mab + p_m, b_P, mask=m_t[:, None])
    tl.store(Mak + p_m, b_Mak, mask=m_t[:, None])
    tl.store(Mqb + p_m, b_Mqb, mask=m_t[:, None])
    tl.store(Mqk + p_m, b_Mqk, mask=m_t[:, None])
    b_w = tl.dot(b_P, b_a * tl.exp(b_gx), input_precision=PREC)
    store_tile(w + row0 * K, b_w, o_i, m_t, H * K, o_k, m_k, 1)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
        b_u = tl.dot(b_P, tl.dot(b_Mak, b_v, input_precision=PREC), input_precision=PREC)
        store_tile(u + row0 * V, b_u, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def state_fwd_kernel(
    k, v, b, gc, w, u, h, U, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NV, N*H), sequential over the chunks of one sequence. Writes h [NT_total,H,K,V] (state entering each
    chunk), U [B,T,H,V] (the reads a_t S_{t-1}) and the final state ht [N,H,K,V], all fp32."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
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
        store_tile(h + ((boh + i_t) * H + i_h) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        b_u = load_tile(u + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_U = b_u + tl.dot(b_w, b_h, input_precision=PREC)
        store_tile(U + row0 * V, b_U, o_i, m_t, H * V, o_v, m_v, 1)
        b_g, b_glast = _load_g(gc, row0, o_i, m_t, o_k, m_k, tl.minimum(BT, T - i_t * BT) - 1, H, K)
        b_end = tl.exp(b_glast[None, :] - b_g)
        b_b = load_tile(b + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32) * b_end
        b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32) * b_end
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
        b_h = b_h * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_b), b_U, input_precision=PREC)
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
    if STORE_FINAL_STATE:
        store_tile(ht + i_nh.to(tl.int64) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def output_fwd_kernel(
    q, v, gc, Mqb, Mqk, h, U, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NV, NT, B*H). o = scale (q exp(G) S0 + M_qk v + M_qb U), o [B,T,H,V]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(2)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(1), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    row0 = (bos + i_t * BT) * H + i_h
    b_g, _ = _load_g(gc, row0, o_i, m_t, o_k, m_k, tl.minimum(BT, T - i_t * BT) - 1, H, K)
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32) * tl.exp(b_g)
    b_h = load_tile(h + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1)
    p_m = row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :]
    b_Mqb = tl.load(Mqb + p_m, mask=m_t[:, None], other=0.0)
    b_Mqk = tl.load(Mqk + p_m, mask=m_t[:, None], other=0.0)
    b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
    b_U = load_tile(U + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
    b_o = tl.dot(b_q, b_h, input_precision=PREC) + tl.dot(b_Mqk, b_v, input_precision=PREC)
    b_o += tl.dot(b_Mqb, b_U, input_precision=PREC)
    store_tile(o + row0 * V, b_o * scale, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def state_bwd_kernel(
    q, b, gc, w, Mqb, do, dh, dU, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
    PREC: tl.constexpr,
):
    """grid (NV, N*H), reverse over the chunks of one sequence. Writes dh [NT_total,H,K,V] (gradient of the state
    leaving each chunk), dU [B,T,H,V] (total gradient of the reads U) and dh0 [N,H,K,V], all fp32:

        dU = scale M_qb^T do + (b exp(G_last - G)) dS_next
        dS0 = exp(G_last) dS_next + w^T dU + scale (q exp(G))^T do
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = load_tile(dht + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        store_tile(dh + ((boh + i_t) * H + i_h) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)
        b_g, b_glast = _load_g(gc, row0, o_i, m_t, o_k, m_k, tl.minimum(BT, T - i_t * BT) - 1, H, K)
        b_b = load_tile(b + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32) * tl.exp(b_glast[None, :] - b_g)
        b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32) * (tl.exp(b_g) * scale)
        b_w = load_tile(w + row0 * K, o_i, m_t, H * K, o_k, m_k, 1)
        p_m = row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :]
        b_Mqb = tl.load(Mqb + p_m, mask=m_t[:, None], other=0.0)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
        b_dU = tl.dot(tl.trans(b_Mqb), b_do, input_precision=PREC) * scale
        b_dU += tl.dot(b_b, b_dh, input_precision=PREC)
        store_tile(dU + row0 * V, b_dU, o_i, m_t, H * V, o_v, m_v, 1)
        b_dh = b_dh * tl.exp(b_glast)[:, None] + tl.dot(tl.trans(b_w), b_dU, input_precision=PREC)
        b_dh += tl.dot(tl.trans(b_q), b_do, input_precision=PREC)
    if USE_INITIAL_STATE:
        store_tile(dh0 + i_nh.to(tl.int64) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_kernel(
    q, k, v, a, b, gk, gc, Pm, Mak, Mqb, Mqk, h, U, dh, dU, do, dq, dk, dv, da, db, dgk,
    cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """grid (NT, B*H). Every input gradient of one chunk from the forward's G, P, M, h, U and the backward's dh, dU:
    dq, dk, da, db, dgk [B,T,H,K], dv [B,T,H,V]. dG below is the gradient of the inclusive cumulative decay G (dGx
    of the exclusive one G' = G - gk); dgk is the reverse cumulative sum of dG inside the chunk, minus dGx."""
    i_bh = tl.program_id(1)
    i_h = i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(tl.program_id(0), i_bh // H, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_strict = o_i[:, None] > o_i[None, :]
    m_causal = o_i[:, None] >= o_i[None, :]
    row0 = (bos + i_t * BT) * H + i_h
    last = tl.minimum(BT, T - i_t * BT) - 1
    b_g, b_glast = _load_g(gc, row0, o_i, m_t, o_k, m_k, last, H, K)
    b_q = load_tile(q + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_k = load_tile(k + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_a = load_tile(a + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_b = load_tile(b + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    b_gx = b_g - load_tile(gk + row0 * K, o_i, m_t, H * K, o_k, m_k, 1).to(tl.float32)
    p_m = row0 * BT + o_i[:, None] * (H * BT) + o_i[None, :]
    b_P = tl.load(Pm + p_m, mask=m_t[:, None], other=0.0)
    b_Mak = tl.load(Mak + p_m, mask=m_t[:, None], other=0.0)
    b_Mqk = tl.load(Mqk + p_m, mask=m_t[:, None], other=0.0)
    b_end = tl.exp(b_glast[None, :] - b_g)
    b_kend = b_k * b_end

    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dbe = tl.zeros([BT, BK], dtype=tl.float32)
    b_dke = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dMqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dMqb = tl.zeros([BT, BT], dtype=tl.float32)
    b_dMak = tl.zeros([BT, BT], dtype=tl.float32)
    b_dP = tl.zeros([BT, BT], dtype=tl.float32)
    b_dhh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
        b_U = load_tile(U + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_dU = load_tile(dU + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1).to(tl.float32)
        b_h = load_tile(h + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1)
        b_dh = load_tile(dh + (i_tg * H + i_h) * K * V, o_k, m_k, V, o_v, m_v, 1)
        # output: o = scale (q exp(G) S0 + M_qk v + M_qb U)
        b_dqg += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
        b_dMqk += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_dMqb += tl.dot(b_do, tl.trans(b_U), input_precision=PREC)
        # state: S_next = exp(G_last) S0 + (b exp(G_last - G))^T U + (k exp(G_last - G))^T v
        b_dbe += tl.dot(b_U, tl.trans(b_dh), input_precision=PREC)
        b_dke += tl.dot(b_v, tl.trans(b_dh), input_precision=PREC)
        b_dhh += tl.sum(b_h * b_dh, 1)
        # reads: U = w S0 + P (M_ak v)
        b_dw += tl.dot(b_dU, tl.trans(b_h), input_precision=PREC)
        b_z = tl.dot(tl.trans(b_P), b_dU, input_precision=PREC)
        b_dMak += tl.dot(b_z, tl.trans(b_v), input_precision=PREC)
        b_dP += tl.dot(b_dU, tl.trans(tl.dot(b_Mak, b_v, input_precision=PREC)), input_precision=PREC)
        b_dv = tl.dot(tl.trans(b_Mqk), b_do, input_precision=PREC) * scale
        b_dv += tl.dot(b_kend, b_dh, input_precision=PREC) + tl.dot(tl.trans(b_Mak), b_z, input_precision=PREC)
        store_tile(dv + row0 * V, b_dv, o_i, m_t, H * V, o_v, m_v, 1)

    b_dMqk = tl.where(m_causal, b_dMqk * scale, 0.0)
    b_dMqb = tl.where(m_causal, b_dMqb * scale, 0.0)
    b_dMak = tl.where(m_strict, b_dMak, 0.0)
    # w = P (a exp(G')); P = (I - M_ab)^-1, so dM_ab = P^T dP P^T on the strict lower triangle
    b_eax = tl.exp(b_gx)
    b_dP += tl.dot(b_dw, tl.trans(b_a * b_eax), input_precision=PREC)
    b_dag = tl.dot(tl.trans(b_P), b_dw, input_precision=PREC)
    b_dMab = tl.dot(tl.dot(tl.trans(b_P), b_dP, input_precision=PREC), tl.trans(b_P), input_precision=PREC)
    b_dMab = tl.where(m_strict, b_dMab, 0.0)

    # the terms outside the pairwise sums
    b_eg = tl.exp(b_g)
    b_dq = b_dqg * b_eg * scale
    b_dG = b_q * b_dq
    b_da = b_dag * b_eax
    b_dGx = b_a * b_da
    b_db = b_dbe * b_end
    b_dk = b_dke * b_end
    b_x = b_b * b_db + b_k * b_dk
    b_dG -= b_x
    b_dglast = tl.sum(b_x, 0) + tl.exp(b_glast) * b_dhh

    # the pairwise sums M[t, s] = sum_c x_tc y_sc exp(Gx_tc - G_sc), one column s at a time as in the forward
    b_dqp = tl.zeros([BT, BK], dtype=tl.float32)
    b_dap = tl.zeros([BT, BK], dtype=tl.float32)
    b_dbp = tl.zeros([BT, BK], dtype=tl.float32)
    b_dkp = tl.zeros([BT, BK], dtype=tl.float32)
    for s in range(BT):
        m_s = o_i == s
        b_gs, b_bs, b_ks = _row(b_g, m_s), _row(b_b, m_s), _row(b_k, m_s)
        b_er = tl.exp(tl.where((o_i > s)[:, None], b_gx - b_gs[None, :], float("-inf")))
        b_eo = tl.exp(tl.where((o_i >= s)[:, None], b_g - b_gs[None, :], float("-inf")))
        c_ab = tl.sum(tl.where(m_s[None, :], b_dMab, 0.0), 1)[:, None]
        c_ak = tl.sum(tl.where(m_s[None, :], b_dMak, 0.0), 1)[:, None]
        c_qb = tl.sum(tl.where(m_s[None, :], b_dMqb, 0.0), 1)[:, None]
        c_qk = tl.sum(tl.where(m_s[None, :], b_dMqk, 0.0), 1)[:, None]
        b_dap += (c_ab * b_bs[None, :] + c_ak * b_ks[None, :]) * b_er
        b_dqp += (c_qb * b_bs[None, :] + c_qk * b_ks[None, :]) * b_eo
        b_ae, b_qe = b_a * b_er, b_q * b_eo
        b_dbp = tl.where(m_s[:, None], tl.sum(c_ab * b_ae + c_qb * b_qe, 0)[None, :], b_dbp)
        b_dkp = tl.where(m_s[:, None], tl.sum(c_ak * b_ae + c_qk * b_qe, 0)[None, :], b_dkp)
    b_da += b_dap
    b_dGx += b_a * b_dap
    b_dq += b_dqp
    b_dG += b_q * b_dqp
    b_db += b_dbp
    b_dk += b_dkp
    b_dG -= b_b * b_dbp + b_k * b_dkp

    # G_t = gk_1 + ... + gk_t inside the chunk and G' = G - gk: dgk_t = sum_{s >= t} dG_s - dGx_t
    b_dG += b_dGx + tl.where((o_i == last)[:, None], b_dglast[None, :], 0.0)
    b_dG = tl.where(m_t[:, None], b_dG, 0.0)
    b_dgk = tl.sum(b_dG, 0)[None, :] - tl.cumsum(b_dG, 0) + b_dG - b_dGx
    store_tile(dq + row0 * K, b_dq, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dk + row0 * K, b_dk, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(da + row0 * K, b_da, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(db + row0 * K, b_db, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dgk + row0 * K, b_dgk, o_i, m_t, H * K, o_k, m_k, 1)


class _Plan(NamedTuple):
    """Shapes and launch parameters of one call, made once in the forward and reused by the backward."""

    B: int
    T: int
    H: int
    K: int
    V: int
    N: int  # independent sequences
    BK: int
    BV: int
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None
    NT_total: int  # chunks of all sequences
    NT_grid: int  # chunks along the grid's time axis


def _plan(q, v, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK = max(16, triton.next_power_of_2(K))
    BV = min(64, max(16, triton.next_power_of_2(V)))
    return _Plan(B, T, H, K, V, N, BK, BV, *chunk_meta(cu_seqlens, B, T, BT))


def chunk_dplr_fwd(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, plan):
    B, T, H, K, V, N, BK, BV = plan[:8]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    shape = dict(H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=varlen, PREC=PREC, num_warps=NUM_WARPS)

    gc, w = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)
    P, Mak, Mqb, Mqk = (torch.empty(B, T, H, BT, **f32) for _ in range(4))
    u = torch.empty(B, T, H, V, **f32)
    intra_fwd_kernel[(plan.NT_grid, grid_bh)](
        q, k, v, a, b, gk, gc, P, Mak, Mqb, Mqk, w, u, cu_seqlens, plan.chunk_indices, T, **shape
    )
    h, U = torch.empty(plan.NT_total, H, K, V, **f32), torch.empty(B, T, H, V, **f32)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    state_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        k, v, b, gc, w, u, h, U, initial_state, ht, cu_seqlens, plan.chunk_offsets, T,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state, **shape,
    )
    o = torch.empty_like(v)
    output_fwd_kernel[(triton.cdiv(V, BV), plan.NT_grid, grid_bh)](
        q, v, gc, Mqb, Mqk, h, U, o, cu_seqlens, plan.chunk_indices, scale, T, **shape
    )
    return o, ht, (gc, P, Mak, Mqb, Mqk, w, h, U)


def chunk_dplr_bwd(q, k, v, a, b, gk, scale, initial_state, cu_seqlens, plan, saved, do, dht):
    B, T, H, K, V, N, BK, BV = plan[:8]
    varlen, grid_bh = cu_seqlens is not None, B * H if cu_seqlens is None else H
    f32 = dict(device=q.device, dtype=torch.float32)
    shape = dict(H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, IS_VARLEN=varlen, PREC=PREC, num_warps=NUM_WARPS)
    gc, P, Mak, Mqb, Mqk, w, h, U = saved

    dh, dU = torch.empty(plan.NT_total, H, K, V, **f32), torch.empty(B, T, H, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    state_bwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, b, gc, w, Mqb, do, dh, dU, dht, dh0, cu_seqlens, plan.chunk_offsets, scale, T,
        USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None, **shape,
    )
    dq, dk, da, db = (torch.empty_like(x) for x in (q, k, a, b))
    dgk, dv = torch.empty_like(gk), torch.empty_like(v)
    chunk_bwd_kernel[(plan.NT_grid, grid_bh)](
        q, k, v, a, b, gk, gc, P, Mak, Mqb, Mqk, h, U, dh, dU, do, dq, dk, dv, da, db, dgk,
        cu_seqlens, plan.chunk_indices, scale, T, **shape,
    )
    return dq, dk, dv, da, db, dgk, dh0


class ChunkDPLRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
        # the chunk bookkeeping of packed sequences syncs with the host: once per call, not again in the backward
        plan = _plan(q, v, cu_seqlens)
        o, ht, saved = chunk_dplr_fwd(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, plan)
        ctx.save_for_backward(q, k, v, a, b, gk, initial_state, cu_seqlens, *saved)
        ctx.scale, ctx.plan = scale, plan
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, gk, initial_state, cu_seqlens, *saved = ctx.saved_tensors
        dq, dk, dv, da, db, dgk, dh0 = chunk_dplr_bwd(
            q, k, v, a, b, gk, ctx.scale, initial_state, cu_seqlens, ctx.plan, saved, do.contiguous(),
            dht.contiguous() if dht is not None else None,
        )
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
        return dq, dk, dv, da, db, dgk, None, dh0, None, None


def chunk_dplr_delta_rule_triton(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
    """`chunk_dplr_delta_rule` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    if q.shape[-1] > MAX_K:
        return fused_recurrent_dplr_delta_rule_triton(q, k, v, a, b, gk, scale, initial_state, output_final_state,
                                                      cu_seqlens)
    q, k, v, a, b, gk = (x.contiguous() for x in (q, k, v, a, b, gk))
    initial_state = initial_state.contiguous() if initial_state is not None else None
    o, ht = ChunkDPLRFunction.apply(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)
    return o, ht if output_final_state else None
