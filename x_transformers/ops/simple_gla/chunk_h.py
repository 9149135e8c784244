"""Inter-chunk state passing for the scalar-decay recurrence (Triton): the forward pass stores the state at the start
of every chunk, the backward pass the gradient of the state at the end of every chunk.

Gates arrive as fp32 cumsums restarted at every chunk (`gc`), so every decay factor is `exp(gc_a - gc_b)` with
`a >= b` inside one chunk: never an exp of a positive number, whatever the decay strength.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_chunk_bounds
from x_transformers.ops.common.tiles import load_tile, store_tile
from x_transformers.ops.common.utils import fill_sm_tiles, min_dot_tile, num_seqs


def tile(n: int, dtype: torch.dtype | None = None, cap: int = 64) -> int:
    """Power-of-2 block over n. tl.dot wants at least 16 on every side, and half precision 32 (see min_dot_tile);
    dtype=None is for kernels without tensor-core products."""
    return max(16 if dtype is None else min_dot_tile(dtype), min(cap, triton.next_power_of_2(n)))


@triton.jit
def chunk_fwd_h_kernel(
    k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NK, NV, N * H). k: [B, T, H, K], v: [B, T, H, V], gc: [B, T, H] fp32 chunk-local cumsum,
    h: [NT_total, H, K, V] (state before each chunk), h0 / ht: [N, H, K, V] fp32."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += load_tile(h0 + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)

    for i_t in range(NT):
        store_tile(h + ((boh + i_t) * H + i_h) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        b_k = load_tile(k + row0 * K, o_k, m_k, 1, o_i, m_t, H * K)
        b_v = load_tile(v + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_g_last = tl.load(gc + (bos + last) * H + i_h)
            b_g = tl.load(gc + row0 + o_i * H, mask=m_t, other=0)
            b_v = (b_v * tl.where(m_t, tl.exp(b_g_last - b_g), 0)[:, None]).to(b_k.dtype)
            b_h *= tl.exp(b_g_last)
        b_h += tl.dot(b_k, b_v, input_precision="ieee")

    if STORE_FINAL_STATE:
        store_tile(ht + i_nh.to(tl.int64) * K * V, b_h, o_k, m_k, V, o_v, m_v, 1)


@triton.jit
def chunk_bwd_dh_kernel(
    q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """grid (NK, NV, N * H). Walks chunks from the end: dh[c] = gradient of the state after chunk c;
    dh0 (gradient of the initial state) = what is left after the first chunk."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T, NT, boh = seq_chunk_bounds(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += load_tile(dht + i_nh.to(tl.int64) * K * V, o_k, m_k, V, o_v, m_v, 1).to(tl.float32)

    for i in range(NT):
        i_t = NT - 1 - i
        store_tile(dh + ((boh + i_t) * H + i_h) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)
        m_t = i_t * BT + o_i < T
        row0 = (bos + i_t * BT) * H + i_h
        b_q = load_tile(q + row0 * K, o_k, m_k, 1, o_i, m_t, H * K)
        b_do = load_tile(do + row0 * V, o_i, m_t, H * V, o_v, m_v, 1)
        if USE_G:
            last = tl.minimum(i_t * BT + BT, T) - 1
            b_g_last = tl.load(gc + (bos + last) * H + i_h)
            b_g = tl.load(gc + row0 + o_i * H, mask=m_t, other=0)
            b_q = (b_q * (tl.exp(b_g) * scale)[None, :]).to(b_do.dtype)
            b_dh *= tl.exp(b_g_last)
        else:
            b_q = (b_q * scale).to(b_do.dtype)
        b_dh += tl.dot(b_q, b_do, input_precision="ieee")

    if STORE_INITIAL_STATE_GRADIENT:
        store_tile(dh0 + i_nh.to(tl.int64) * K * V, b_dh, o_k, m_k, V, o_v, m_v, 1)


def chunk_fwd_h(k, v, gc, h0, output_final_state, cu_seqlens, chunk_offsets, num_chunks, BT):
    """-> (h [NT_total, H, K, V] in k's dtype, ht [N, H, K, V] fp32 or None)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N = num_seqs(B, cu_seqlens)
    h = k.new_empty(num_chunks, H, K, V)
    ht = k.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    BK, BV = fill_sm_tiles(tile(K, k.dtype), tile(V, k.dtype), K, V, N * H, k.dtype, k.device)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)
    chunk_fwd_h_kernel[grid](
        k, v, gc, h, h0, ht, cu_seqlens, chunk_offsets, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gc is not None, USE_INITIAL_STATE=h0 is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, num_warps=4, num_stages=2,
    )
    return h, ht


def chunk_bwd_dh(q, do, gc, dht, scale, need_dh0, cu_seqlens, chunk_offsets, num_chunks, BT):
    """-> (dh [NT_total, H, K, V] in q's dtype, dh0 [N, H, K, V] fp32 or None)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    N = num_seqs(B, cu_seqlens)
    dh = q.new_empty(num_chunks, H, K, V)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if need_dh0 else None
    BK, BV = fill_sm_tiles(tile(K, q.dtype), tile(V, q.dtype), K, V, N * H, q.dtype, q.device)
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), N * H)
    chunk_bwd_dh_kernel[grid](
        q, do, gc, dh, dht, dh0, cu_seqlens, chunk_offsets, scale, T,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
        USE_G=gc is not None, USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=need_dh0,
        IS_VARLEN=cu_seqlens is not None, num_warps=4, num_stages=2,
    )
    return dh, dh0
