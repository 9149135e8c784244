"""Chunked scalar-decay linear attention (Triton): `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`.

Pipeline: chunk-local gate cumsum -> state before every chunk (`chunk_h.py`) -> output = inter-chunk `q h` plus the
causal intra-chunk attention. The backward pass recomputes the states, walks the state gradients back (`chunk_h.py`),
then gets dv and dq/dk per chunk, and the gate gradient `dg_s = exp(g_s) <S_{s-1}, dS_s>` from chunk-local pieces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import chunk_bounds
from x_transformers.ops.common.chunk_index import chunk_meta
from x_transformers.ops.common.cumsum import chunk_local_cumsum
from x_transformers.ops.common.tiles import load_tile, store_tile
from x_transformers.ops.common.utils import narrow_value_tiles
from x_transformers.ops.simple_gla.chunk_h import chunk_bwd_dh, chunk_fwd_h, tile

CHUNK_SIZE = 64


@triton.jit
def chunk_fwd_o_kernel(
    q, k, v, h, gc, o, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, NT, B * H). o = scale * (exp(gc) q h + (causal decayed q k^T) v) for one chunk and V tile."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q = q + row0 * K
    p_k = k + row0 * K
    p_h = h + (i_tg * H + i_h) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = load_tile(p_q, o_i, m_t, H * K, o_k, m_k, 1)
        b_k = load_tile(p_k, o_k, m_k, 1, o_i, m_t, H * K)
        b_h = load_tile(p_h, o_k, m_k, V, o_v, m_v, 1)
        b_o += tl.dot(b_q, b_h, input_precision="ieee")
        b_A += tl.dot(b_q, b_k, input_precision="ieee")

    # padded rows carry gate 0, so their decay factors could overflow: mask them out with the acausal part
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        b_g = tl.load(gc + row0 + o_i * H, mask=m_t, other=0)
        b_o = b_o * tl.exp(b_g)[:, None]
        b_A = b_A * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0))
    b_A = tl.where(m_A, b_A, 0)

    p_v = v + row0 * V
    b_v = load_tile(p_v, o_i, m_t, H * V, o_v, m_v, 1)
    b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision="ieee")) * scale
    store_tile(o + row0 * V, b_o, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_dv_kernel(
    q, k, do, dh, gc, dv, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, NT, B * H). dv_j = exp(G_last - G_j) k_j dh + scale * sum_{i >= j} exp(G_i - G_j) (k_j.q_i) do_i."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_q = q + row0 * K
    p_k = k + row0 * K
    p_dh = dh + (i_tg * H + i_h) * K * V

    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    # b_A[j, i] = k_j . q_i
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_k = load_tile(p_k, o_i, m_t, H * K, o_k, m_k, 1)
        b_q = load_tile(p_q, o_k, m_k, 1, o_i, m_t, H * K)
        b_dh = load_tile(p_dh, o_k, m_k, V, o_v, m_v, 1)
        b_A += tl.dot(b_k, b_q, input_precision="ieee")
        b_dv += tl.dot(b_k, b_dh, input_precision="ieee")

    m_A = (o_i[:, None] <= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_g_last = tl.load(gc + (bos + last) * H + i_h)
        b_g = tl.load(gc + row0 + o_i * H, mask=m_t, other=0)
        b_dv = b_dv * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_A = b_A * tl.exp(tl.where(m_A, b_g[None, :] - b_g[:, None], 0))
    b_A = tl.where(m_A, b_A * scale, 0)

    b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
    b_dv += tl.dot(b_A.to(b_do.dtype), b_do, input_precision="ieee")
    store_tile(dv + row0 * V, b_dv, o_i, m_t, H * V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_dqk_kernel(
    q, k, v, h, do, dh, gc, dq, dk, dg, cu_seqlens, chunk_indices, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NK: tl.constexpr, USE_G: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NK, NT, B * H). dq, dk for one chunk and K tile; with gates also this K tile's share of the gate
    gradient, written to dg: [B, T, H, NK] fp32."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_t, i_tg, bos, T = chunk_bounds(i_t, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    # the (token, head) row of this chunk's first token, int64: offsets from it stay small, in int32
    row0 = (bos + i_t * BT) * H + i_h
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_v = v + row0 * V
    p_do = do + row0 * V
    p_h = h + (i_tg * H + i_h) * K * V
    p_dh = dh + (i_tg * H + i_h) * K * V

    # b_ds[i, j] = do_i . v_j
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    # <h, dh> over this K tile: the chunk-start state against the gradient of the chunk-end state
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_v = load_tile(p_v, o_i, m_t, H * V, o_v, m_v, 1)
        b_do = load_tile(p_do, o_i, m_t, H * V, o_v, m_v, 1)
        b_h = load_tile(p_h, o_v, m_v, 1, o_k, m_k, V)
        b_dh = load_tile(p_dh, o_v, m_v, 1, o_k, m_k, V)
        b_ds += tl.dot(b_do, tl.trans(b_v), input_precision="ieee")
        b_dq += tl.dot(b_do, b_h.to(b_do.dtype), input_precision="ieee")
        b_dk += tl.dot(b_v, b_dh.to(b_v.dtype), input_precision="ieee")
        if USE_G:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), axis=0)

    p_q = q + row0 * K
    p_k = k + row0 * K
    b_q = load_tile(p_q, o_i, m_t, H * K, o_k, m_k, 1)
    b_k = load_tile(p_k, o_i, m_t, H * K, o_k, m_k, 1)

    # padded rows carry gate 0, so their decay factors could overflow: mask them out with the acausal part
    m_A = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    if USE_G:
        last = tl.minimum(i_t * BT + BT, T) - 1
        b_g_last = tl.load(gc + (bos + last) * H + i_h)
        b_g = tl.load(gc + row0 + o_i * H, mask=m_t, other=0)
        b_dq = b_dq * tl.exp(b_g)[:, None]
        b_dk = b_dk * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]
        b_ds = b_ds * tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0))
    b_ds = tl.where(m_A, b_ds * scale, 0)
    b_dq = b_dq * scale
    if USE_G:
        # dg_s = exp(g_s) <S_{s-1}, dS_s>, split into chunk-local pieces (no sequence-wide cumsum of q.dq - k.dk,
        # whose terms cancel heavily and lose bf16 precision): state x future state gradient, state x this chunk's
        # queries after s, this chunk's keys before s x future state gradient, keys before s x queries from s on
        b_qdq = tl.sum(b_q.to(tl.float32) * b_dq, axis=1)
        b_kdk = tl.sum(b_k.to(tl.float32) * b_dk, axis=1)
        b_dg = tl.exp(b_g_last) * tl.sum(b_hdh, axis=0)
        b_dg += tl.sum(b_qdq, axis=0) - tl.cumsum(b_qdq, axis=0) + b_qdq
        b_dg += tl.cumsum(b_kdk, axis=0) - b_kdk
        # b_P[i, j] = ds_ij * A_ij; pairs j < s <= i
        b_P = b_ds * tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        b_C = tl.cumsum(b_P, axis=1) - b_P
        b_dg += tl.sum(tl.where(o_i[:, None] >= o_i[None, :], b_C, 0), axis=0)
        tl.store(dg + row0 * NK + i_k + o_i * (H * NK), b_dg, mask=m_t)
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision="ieee")
    b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision="ieee")

    store_tile(dq + row0 * K, b_dq, o_i, m_t, H * K, o_k, m_k, 1)
    store_tile(dk + row0 * K, b_dk, o_i, m_t, H * K, o_k, m_k, 1)


def chunk_simple_gla_fwd(q, k, v, gc, scale, h0, output_final_state, cu_seqlens, meta, BT=CHUNK_SIZE):
    chunk_indices, chunk_offsets, num_chunks, grid_t = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    h, ht = chunk_fwd_h(k, v, gc, h0, output_final_state, cu_seqlens, chunk_offsets, num_chunks, BT)
    o = torch.empty_like(v)
    BK, BV = tile(K, v.dtype), tile(V, v.dtype)
    if grid_t > 0:
        chunk_fwd_o_kernel[(triton.cdiv(V, BV), grid_t, B * H)](
            q, k, v, h, gc, o, cu_seqlens, chunk_indices, scale, T,
            H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gc is not None, IS_VARLEN=cu_seqlens is not None,
            num_warps=4, num_stages=2,
        )
    return o, ht


def chunk_simple_gla_bwd(q, k, v, gc, scale, h0, do, dht, cu_seqlens, meta, BT=CHUNK_SIZE):
    chunk_indices, chunk_offsets, num_chunks, grid_t = meta
    B, T, H, K = q.shape
    V = v.shape[-1]
    # recompute the chunk states rather than keeping [NT, H, K, V] alive between passes
    h, _ = chunk_fwd_h(k, v, gc, h0, False, cu_seqlens, chunk_offsets, num_chunks, BT)
    dh, dh0 = chunk_bwd_dh(q, do, gc, dht, scale, h0 is not None, cu_seqlens, chunk_offsets, num_chunks, BT)
    BK, BV = tile(K, v.dtype), tile(V, v.dtype)
    NK = triton.cdiv(K, BK)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = q.new_empty(B, T, H, NK, dtype=torch.float32) if gc is not None else None
    if grid_t > 0:
        common = dict(H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gc is not None, IS_VARLEN=cu_seqlens is not None)
        chunk_bwd_dv_kernel[(triton.cdiv(V, BV), grid_t, B * H)](
            q, k, do, dh, gc, dv, cu_seqlens, chunk_indices, scale, T, **common,
            num_warps=4, num_stages=2,
        )
        chunk_bwd_dqk_kernel[(NK, grid_t, B * H)](
            q, k, v, h, do, dh, gc, dq, dk, dg, cu_seqlens, chunk_indices, scale, T, NK=NK, **common,
            # five [BT, BT] / [BT, BK] fp32 blocks live at once: spread them over more threads
            num_warps=8, num_stages=2,
        )
    if dg is not None:
        dg = dg.sum(-1) if NK > 1 else dg[..., 0]
    return dq, dk, dv, dg, dh0


class ChunkSimpleGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        meta = chunk_meta(cu_seqlens, q.shape[0], q.shape[1], CHUNK_SIZE)
        gc = chunk_local_cumsum(g, CHUNK_SIZE, cu_seqlens, meta[0]) if g is not None else None
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = chunk_simple_gla_fwd(q, k, v, gc, scale, h0, output_final_state, cu_seqlens, meta)
        ctx.save_for_backward(q, k, v, gc, h0, cu_seqlens)
        ctx.meta, ctx.scale = meta, scale
        ctx.g_dtype = g.dtype if g is not None else None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, h0, cu_seqlens = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_simple_gla_bwd(
            q, k, v, gc, ctx.scale, h0, do.contiguous(), dht, cu_seqlens, ctx.meta
        )
        dg = dg.to(ctx.g_dtype) if dg is not None else None
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq, dk, dv, dg, None, dh0, None, None


def chunk_simple_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """`chunk_simple_gla` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    K, V = q.shape[-1], v.shape[-1]
    if narrow_value_tiles(v.dtype, tile(K, v.dtype), tile(V, v.dtype)):
        o, ht = chunk_simple_gla_triton(q.float(), k.float(), v.float(), g, scale, initial_state, output_final_state,
                                        cu_seqlens)
        return o.to(v.dtype), ht
    return ChunkSimpleGLAFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous() if g is not None else None,
        scale, initial_state, output_final_state, cu_seqlens,
    )
