"""Chunked `gla`: per-key-channel decay, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

Pipeline (chunks of BT = 64, sub-chunks of BC = 16, all decay arithmetic in fp32):
  forward:  gc = in-chunk cumsum(g) -> h = state entering each chunk (chunk_state.py)
            -> A of chunks with strong decay, sub-chunk by sub-chunk (chunk_intra.py)
            -> o = scale * (q exp(gc)) h + A v, building A of the mild chunks (nearly all) in the same pass
  backward: dh = state gradients, last chunk first -> dA = scale * do v^T and intra dq, dk of strong chunks
            (chunk_intra.py) -> dv = A^T do + (k exp(gc_last - gc)) dh -> inter + intra dq, dk and dg (reverse
            in-chunk cumsum of q dq - k dk, plus the gradient through each chunk's total decay), building the mild
            chunks' dA and intra parts in the same pass.
Offsets inside one sequence are int32 (T * H * max(K, V, 64) < 2**31 per sequence), sequence starts int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds
from x_transformers.ops.common.chunk_index import prepare_chunk_indices, prepare_chunk_offsets
from x_transformers.ops.common.utils import fill_sm_tiles, interpreting, min_dot_tile, narrow_value_tiles, pow2_block
from x_transformers.ops.gla.chunk_intra import _chunk_span, chunk_gla_bwd_intra_kernel, chunk_gla_fwd_intra_kernel
from x_transformers.ops.gla.chunk_state import chunk_gla_bwd_dh_kernel, chunk_gla_cumsum_kernel, chunk_gla_fwd_h_kernel

BT = 64
BC = 16
# launch options of the kernels holding [64, 64] tiles: with 8 warps ptxas (sm_90) fits them in registers without
# spills, where 4 warps spill up to 1.6 KB per thread in the backward; tests/ops/test_gla.py checks both on a GPU
BIG_TILES = dict(num_warps=8, num_stages=2)
# largest V tile of the output / dv kernels (128 measured on an H200 at K = V = 128 bf16: fwd+bwd 2.45 -> 2.32 ms at
# B=4, T=4k, from loading q, gc and A once per chunk), and the K / V tiles of dq, dk, dg (one program per K tile, a
# loop over V tiles)
OUT_BV_CAP = 128
# (64 for every dtype: before the mild intra dq / dk moved into that kernel a 128-wide K tile won for half inputs,
# fwd+bwd 2.41 -> 2.24 ms at K = V = 128, B=4, T=4k on an H200; with them inside, it spills 600 B per thread and
# loses, 1.80 ms at 64 vs 1.96 ms at 128; fp32 spills 9 KB per thread at 128)
DQKG_BK_CAP, DQKG_BV_CAP = 64, 64
# largest K, V tiles of the two sequential state passes; they run one program per (K tile, V tile, sequence, head),
# so with few sequences * heads the tiles halve (down to the dot minimum) until the programs fill the SMs (B=1,
# T=16k, H=16 on an H200: fwd+bwd 3.06 -> 2.83 ms with 32-wide tiles, where B=4, T=4k lost with them)
STATE_CAP = 64
# chunks whose decay G_first - G_last stays within this in every channel take the intra kernels' tensor-core path
# (factors up to exp(50) ~ 5e21, far inside fp32 / tf32 range); a negative value turns that path off
INTRA_SPAN = 50.0
# whether half-precision backward passes build the mild chunks' intra dq, dk inside the dq / dk / dg kernel (a
# launch knob for bench_ops.py --set; False runs them in the intra kernel, with a dq / dk round trip through memory)
FUSED_INTRA_BWD = True


@triton.jit
def chunk_gla_fwd_o_kernel(
    q,
    k,
    v,
    gc,
    h,
    A,
    o,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """o = scale * (q exp(gc)) h + A v for one chunk and one V tile. Grid (cdiv(V, BV), NT, B * H).

    A chunk of mild decay (span <= SPAN, see chunk_intra.py) gets its A here, through the chunk's first row:
    A = causal((q exp(gc - gc_0)) (k exp(gc_0 - gc))^T) * scale, on the same q, gc tiles the state product loads,
    and the first V tile's program stores it for the backward; a chunk of strong decay loads the A that
    chunk_gla_fwd_intra_kernel wrote."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    gc += (bos * H + i_h) * K
    o += (bos * H + i_h) * V
    A += (bos * H + i_h) * BT
    first = i_t * BT
    last = tl.minimum(first + BT, T) - 1
    mild = _chunk_span(gc, first, last, 0, H, K, BK, tl.cdiv(K, BK)) <= SPAN
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_tk = o_t[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(gc + p_tk, mask=m_tk, other=0.0)
        b_h = tl.load(h + (i_tg * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                      other=0.0)
        if mild:
            b_g0 = tl.load(gc + first * (H * K) + o_k, mask=m_k, other=0.0)
            # rows past the end get exp(-inf) = 0: no inf * 0 from their zero-padded decays
            b_qg = b_q * tl.exp(tl.where(m_t[:, None], b_g - b_g0[None, :], float("-inf")))
            b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_kg = b_k * tl.exp(tl.where(m_t[:, None], b_g0[None, :] - b_g, float("-inf")))
            b_A += tl.dot(b_qg, tl.trans(b_kg), input_precision=PREC)
            # decay from the chunk start to each token, exp(gc) = exp(gc - gc_0) exp(gc_0): exponents <= 0
            b_o += tl.dot((b_qg * tl.exp(b_g0)[None, :]).to(DT), b_h.to(DT), input_precision=PREC)
        else:
            b_o += tl.dot((b_q * tl.exp(b_g)).to(DT), b_h.to(DT), input_precision=PREC)
    b_o *= scale

    o_c = tl.arange(0, BT)
    # causal inside the chunk (the intra kernel writes only on and below the diagonal blocks)
    m_A = m_t[:, None] & (o_c[None, :] <= o_c[:, None])
    p_A = A + o_t[:, None] * (H * BT) + o_c[None, :]
    if mild:
        b_A = tl.where(m_A, b_A * scale, 0.0)
        # (a scalar condition enters the mask through tl.where, which keeps it boolean: `&` with a scalar
        # comparison gives an int32 mask in Triton 3.9's interpreter)
        tl.store(p_A, b_A.to(A.dtype.element_ty), mask=tl.where(i_v == 0, m_t[:, None], False))
    else:
        b_A = tl.load(p_A, mask=m_A, other=0.0).to(tl.float32)
    b_o += tl.dot(b_A.to(DT), b_v.to(DT), input_precision=PREC)
    tl.store(o + o_t[:, None] * (H * V) + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_gla_bwd_dA_kernel(
    v,
    do,
    gc,
    dA,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    FUSED: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dA = scale * do v^T, causal inside the chunk, the input of chunk_gla_bwd_intra_kernel; with FUSED only for
    chunks of strong decay in some channel (the dq / dk / dg kernel builds dA of the others itself).
    Grid (NT, B * H)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, _, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    gc += (bos * H + i_h) * K
    last = tl.minimum(i_t * BT + BT, T) - 1
    if FUSED:
        if _chunk_span(gc, i_t * BT, last, 0, H, K, BK, tl.cdiv(K, BK)) <= SPAN:
            return
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    v += (bos * H + i_h) * V
    do += (bos * H + i_h) * V
    dA += (bos * H + i_h) * BT
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
        b_dA += tl.dot(b_do.to(DT), tl.trans(b_v).to(DT), input_precision=PREC)
    o_c = tl.arange(0, BT)
    b_dA = tl.where(o_c[:, None] >= o_c[None, :], b_dA * scale, 0.0)
    tl.store(dA + o_t[:, None] * (H * BT) + o_c[None, :], b_dA, mask=m_t[:, None])


@triton.jit
def chunk_gla_bwd_dv_kernel(
    k,
    gc,
    A,
    do,
    dh,
    dv,
    cu_seqlens,
    chunk_indices,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dv = A^T do + (k exp(gc_last - gc)) dh for one chunk and one V tile. Grid (cdiv(V, BV), NT, B * H)."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    k += (bos * H + i_h) * K
    gc += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    A += (bos * H + i_h) * BT
    last = tl.minimum(i_t * BT + BT, T) - 1
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
    o_c = tl.arange(0, BT)
    # A is written only on and below the diagonal blocks
    m_A = m_t[:, None] & (o_c[None, :] <= o_c[:, None])
    b_A = tl.load(A + o_t[:, None] * (H * BT) + o_c[None, :], mask=m_A, other=0.0)
    b_dv = tl.dot(tl.trans(b_A).to(DT), b_do.to(DT), input_precision=PREC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_k = tl.load(k + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0)
        b_g = tl.load(gc + o_t[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0.0)
        b_gl = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0.0)
        p_dh = dh + (i_tg * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :]
        b_dh = tl.load(p_dh, mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_kd = tl.where(m_t[:, None], b_k * tl.exp(b_gl[None, :] - b_g), 0.0)
        b_dv += tl.dot(b_kd.to(DT), b_dh.to(DT), input_precision=PREC)
    tl.store(dv + o_t[:, None] * (H * V) + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def chunk_gla_bwd_dqkg_kernel(
    q,
    k,
    v,
    gc,
    h,
    do,
    dh,
    dq_intra,
    dk_intra,
    dq,
    dk,
    dg,
    cu_seqlens,
    chunk_indices,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    FUSED: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Inter-chunk dq, dk plus the intra parts, and dg. Grid (cdiv(K, BK), NT, B * H).

    Intra parts: with FUSED, where this K tile's decay across the chunk is mild, from dA = causal(scale * do v^T),
    built in the V loop, through the chunk's first row on the tensor cores (see chunk_intra.py); elsewhere from
    dq_intra, dk_intra written by chunk_gla_bwd_intra_kernel with the same K tile.

    With gc the in-chunk cumulative decay, q enters as q exp(gc) and k as k exp(-gc), so the gradient of gc_t is
    q_t dq_t - k_t dk_t; the chunk's total decay gc_last also scales the state leaving it, adding
    exp(gc_last) sum_v(h dh) + sum_s k_s dk_s(inter) to every g of the chunk. dg = reverse in-chunk cumsum.
    """
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    gc += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    dq_intra += (bos * H + i_h) * K
    dk_intra += (bos * H + i_h) * K
    dq += (bos * H + i_h) * K
    dk += (bos * H + i_h) * K
    dg += (bos * H + i_h) * K
    h += (i_tg * H + i_h) * K * V
    dh += (i_tg * H + i_h) * K * V
    last = tl.minimum(i_t * BT + BT, T) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dgl = tl.zeros([BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
        b_v = tl.load(v + o_t[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0.0)
        p_kv = o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h + p_kv, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + p_kv, mask=m_kv, other=0.0)
        b_dq += tl.dot(b_do.to(DT), tl.trans(b_h).to(DT), input_precision=PREC)
        b_dk += tl.dot(b_v.to(DT), tl.trans(b_dh).to(DT), input_precision=PREC)
        b_dgl += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=1)
        if FUSED:
            b_dA += tl.dot(b_do.to(DT), tl.trans(b_v).to(DT), input_precision=PREC)
    # q, k and the decays are loaded only now, to keep the V loop's registers free
    p_tk = o_t[:, None] * (H * K) + o_k[None, :]
    b_g = tl.load(gc + p_tk, mask=m_tk, other=0.0)
    b_gl = tl.load(gc + last * (H * K) + o_k, mask=m_k, other=0.0)
    b_dgl *= tl.exp(b_gl)
    first = i_t * BT
    if FUSED and _chunk_span(gc, first, last, i_k, H, K, BK, 1) <= SPAN:
        # everything through the chunk's first row: with e = exp(G - G_0), ei = exp(G_0 - G) (0 past the end),
        #   dq = e * (do h^T * scale exp(G_0) + dA (k ei)),  dk = ei * (v dh^T * exp(G_last - G_0) + dA^T (q e))
        # where dq_t = sum_{s <= t} dA[t, s] k_s exp(G_t - G_s), dk_s = sum_{t >= s} dA[t, s] q_t exp(G_t - G_s)
        # are the intra parts; one accumulator each, scaled per column (key channel) and row
        o_c = tl.arange(0, BT)
        b_dA = tl.where(m_t[:, None] & (o_c[None, :] <= o_c[:, None]), b_dA * scale, 0.0)
        b_g0 = tl.load(gc + first * (H * K) + o_k, mask=m_k, other=0.0)
        b_ei = tl.exp(tl.where(m_t[:, None], b_g0[None, :] - b_g, float("-inf")))
        b_kei = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32) * b_ei
        b_dk *= tl.exp(b_gl - b_g0)[None, :]
        # gradient of the chunk's total decay through the state leaving it: sum_s k_s dk_s (inter part only)
        b_dgl += tl.sum(b_dk * b_kei, axis=0)
        b_e = tl.exp(tl.where(m_t[:, None], b_g - b_g0[None, :], float("-inf")))
        b_dq = tl.dot(b_dA, b_kei, acc=b_dq * (scale * tl.exp(b_g0))[None, :], input_precision=PREC) * b_e
        b_qe = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32) * b_e
        b_dk = tl.dot(tl.trans(b_dA), b_qe, acc=b_dk, input_precision=PREC) * b_ei
    else:
        b_dq = b_dq * tl.exp(b_g) * scale + tl.load(dq_intra + p_tk, mask=m_tk, other=0.0)
        b_dk = tl.where(m_t[:, None], b_dk * tl.exp(b_gl[None, :] - b_g), 0.0)
        b_dgl += tl.sum(b_dk * tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32), axis=0)
        b_dk += tl.load(dk_intra + p_tk, mask=m_tk, other=0.0)
    b_q = tl.load(q + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_tk, mask=m_tk, other=0.0).to(tl.float32)
    b_dG = b_q * b_dq - b_k * b_dk
    b_dg = tl.cumsum(b_dG, axis=0, reverse=True) + b_dgl[None, :]
    tl.store(dq + p_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_tk, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dg + p_tk, b_dg.to(dg.dtype.element_ty), mask=m_tk)


def _blocks(K: int, V: int, cap: int, dtype: torch.dtype) -> tuple[int, int]:
    """K / V tile sizes: powers of two up to cap, at least `min_dot_tile(dtype)` (masked beyond K, V)."""
    return pow2_block(K, min_dot_tile(dtype), cap), pow2_block(V, min_dot_tile(dtype), cap)


def _half_tiles_unsafe(K: int, V: int, dtype: torch.dtype) -> bool:
    """Whether a half-precision call would run tiles Triton 3.6 gets wrong on Hopper, so computes in fp32 instead: a
    value tile narrower than the key tile (narrow_value_tiles), or K / V below 64 (32-wide intra / output tiles: an
    H200 gave relative errors 0.1 - 0.14 in bf16 at K = V = 32 and at K = 16, V = 32, where every shape with 64-wide
    ones passed; the state passes' 32-wide tiles pass)."""
    BK, BV = _blocks(K, V, 64, dtype)
    return narrow_value_tiles(dtype, BK, BV) or (dtype in (torch.float16, torch.bfloat16) and min(BK, BV) < 64)


def _state_tiles(K: int, V: int, NH: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    return fill_sm_tiles(*_blocks(K, V, STATE_CAP, dtype), K, V, NH, dtype, device)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs keep exact fp32 products (tests ask < 5e-3 rel RMS); half inputs use tensor cores anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtype(dtype: torch.dtype):
    """Operand dtype of the state / output dots: the input's half type on GPU, fp32 for fp32 inputs and under the
    interpreter (whose numpy backend has no bfloat16 matmul)."""
    if dtype == torch.float32 or interpreting():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _layout(q, cu_seqlens, chunk_indices):
    """(B, T, NT_total, N) for the launch grids."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return B, T, B * triton.cdiv(T, BT), B
    return B, T, chunk_indices.shape[0], cu_seqlens.numel() - 1


def chunk_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_offsets):
    B, T, H, K = q.shape
    V = v.shape[-1]
    _, _, NT, N = _layout(q, cu_seqlens, chunk_indices)
    BK, BV = _blocks(K, V, 64, v.dtype)
    prec, dt = _precision(v.dtype), _dot_dtype(v.dtype)
    varlen = cu_seqlens is not None
    nt_grid = NT if varlen else triton.cdiv(T, BT)

    gc = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    chunk_gla_cumsum_kernel[(triton.cdiv(K, BK), nt_grid, B * H)](
        g, gc, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT, BK=BK, IS_VARLEN=varlen
    )

    # the per-chunk states and A only feed products whose operands are cast to the dot dtype: stored in the input
    # dtype they cost half the traffic for half inputs and lose nothing (the running state itself stays fp32)
    io = dict(dtype=q.dtype, device=q.device)
    h = torch.empty(NT, H, K, V, **io)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    SK, SV = _state_tiles(K, V, N * H, v.dtype, q.device)
    chunk_gla_fwd_h_kernel[(triton.cdiv(K, SK), triton.cdiv(V, SV), N * H)](
        k, v, gc, h, initial_state, ht, cu_seqlens, chunk_offsets, T, H=H, K=K, V=V, BT=BT, BK=SK, BV=SV,
        PREC=prec, DT=dt, USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=varlen,
        **BIG_TILES,
    )

    A = torch.empty(B, T, H, BT, **io)
    chunk_gla_fwd_intra_kernel[(nt_grid, BT // BC, B * H)](
        q, k, gc, A, cu_seqlens, chunk_indices, scale, T, H=H, K=K, BT=BT, BC=BC, BK=BK, SPAN=INTRA_SPAN, PREC=prec,
        IS_VARLEN=varlen,
    )

    o = torch.empty_like(v)
    OV = max(BK, _blocks(K, V, OUT_BV_CAP, v.dtype)[1])  # never narrower than the key tile: narrow_value_tiles
    chunk_gla_fwd_o_kernel[(triton.cdiv(V, OV), nt_grid, B * H)](
        q, k, v, gc, h, A, o, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=OV, SPAN=INTRA_SPAN,
        PREC=prec, DT=dt, IS_VARLEN=varlen,
        **BIG_TILES,
    )
    return o, ht, gc, h, A


def chunk_gla_bwd(q, k, v, g, gc, h, A, do, dht, scale, initial_state, cu_seqlens, chunk_indices, chunk_offsets):
    B, T, H, K = q.shape
    V = v.shape[-1]
    _, _, NT, N = _layout(q, cu_seqlens, chunk_indices)
    BK, BV = _blocks(K, V, 64, v.dtype)
    prec, dt = _precision(v.dtype), _dot_dtype(v.dtype)
    varlen = cu_seqlens is not None
    nt_grid = NT if varlen else triton.cdiv(T, BT)
    do = do.contiguous()

    dh = torch.empty(NT, H, K, V, dtype=h.dtype, device=q.device)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    SK, SV = _state_tiles(K, V, N * H, v.dtype, q.device)
    chunk_gla_bwd_dh_kernel[(triton.cdiv(K, SK), triton.cdiv(V, SV), N * H)](
        q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T, H=H, K=K, V=V, BT=BT, BK=SK, BV=SV,
        PREC=prec, DT=dt, USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=initial_state is not None,
        IS_VARLEN=varlen,
        **BIG_TILES,
    )

    # mild chunks' intra dq, dk inside the dq / dk / dg kernel: for half inputs (fp32's exact products would spill
    # its registers there: 7 KB per thread on sm_90, so fp32 keeps them in the intra kernel)
    fused = v.dtype != torch.float32 and FUSED_INTRA_BWD
    dA = torch.empty(B, T, H, BT, dtype=torch.float32, device=q.device)
    chunk_gla_bwd_dA_kernel[(nt_grid, B * H)](
        v, do, gc, dA, cu_seqlens, chunk_indices, scale, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, SPAN=INTRA_SPAN,
        FUSED=fused, PREC=prec, DT=dt, IS_VARLEN=varlen,
        **BIG_TILES,
    )

    dv = torch.empty_like(v)
    OV = max(BK, _blocks(K, V, OUT_BV_CAP, v.dtype)[1])  # never narrower than the key tile: narrow_value_tiles
    chunk_gla_bwd_dv_kernel[(triton.cdiv(V, OV), nt_grid, B * H)](
        k, gc, A, do, dh, dv, cu_seqlens, chunk_indices, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=OV, PREC=prec, DT=dt,
        IS_VARLEN=varlen,
        **BIG_TILES,
    )

    # the intra kernel and dq / dk / dg decide mild or strong per (chunk, K tile): both take the same K tile
    QK = _blocks(K, V, DQKG_BK_CAP, v.dtype)[0]
    QV = max(QK, _blocks(K, V, DQKG_BV_CAP, v.dtype)[1])
    dq_intra = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk_intra = torch.empty_like(dq_intra)
    chunk_gla_bwd_intra_kernel[(triton.cdiv(K, QK) * (BT // BC), nt_grid, B * H)](
        q, k, gc, dA, dq_intra, dk_intra, cu_seqlens, chunk_indices, T, H=H, K=K, BT=BT, BC=BC, BK=QK,
        NC=BT // BC, SPAN=INTRA_SPAN, FUSED=fused, PREC=prec, IS_VARLEN=varlen,
    )

    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dg = torch.empty_like(g)
    chunk_gla_bwd_dqkg_kernel[(triton.cdiv(K, QK), nt_grid, B * H)](
        q, k, v, gc, h, do, dh, dq_intra, dk_intra, dq, dk, dg, cu_seqlens, chunk_indices, scale, T, H=H, K=K,
        V=V, BT=BT, BK=QK, BV=QV, SPAN=INTRA_SPAN, FUSED=fused, PREC=prec, DT=dt, IS_VARLEN=varlen,
        **BIG_TILES,
    )
    return dq, dk, dv, dg, dh0


def prepare_triton_inputs(q, k, v, g, initial_state, cu_seqlens):
    """What the gla kernels index: contiguous inputs, an fp32 initial state and int64 offsets on the inputs' device."""
    q, k, v, g = (t.contiguous() for t in (q, k, v, g))
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int64).contiguous()
    return q, k, v, g, initial_state, cu_seqlens


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_offsets):
        o, ht, gc, h, A = chunk_gla_fwd(
            q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_offsets
        )
        ctx.save_for_backward(q, k, v, g, gc, h, A, initial_state, cu_seqlens, chunk_indices, chunk_offsets)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, gc, h, A, initial_state, cu_seqlens, chunk_indices, chunk_offsets = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous()
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q, k, v, g, gc, h, A, do, dht, ctx.scale, initial_state, cu_seqlens, chunk_indices, chunk_offsets
        )
        return dq, dk, dv, dg, None, dh0, None, None, None, None


def chunk_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """`chunk_gla` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    K, V = q.shape[-1], v.shape[-1]
    if _half_tiles_unsafe(K, V, v.dtype):
        o, ht = chunk_gla_triton(q.float(), k.float(), v.float(), g, scale, initial_state, output_final_state,
                                 cu_seqlens)
        return o.to(v.dtype), ht
    q, k, v, g, initial_state, cu_seqlens = prepare_triton_inputs(q, k, v, g, initial_state, cu_seqlens)
    chunk_indices = chunk_offsets = None
    if cu_seqlens is not None:
        chunk_indices, chunk_offsets = prepare_chunk_indices(cu_seqlens, BT), prepare_chunk_offsets(cu_seqlens, BT)
    return ChunkGLAFunction.apply(
        q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_indices, chunk_offsets
    )
