"""Token-by-token KDA in Triton, forward and backward: for decoding and short inputs.

One program per (value tile, sequence * head) keeps its `[K, BV]` slice of the state in registers and walks the
sequence. The backward replays the forward to checkpoint the state every `BT` steps, then walks the chunks in
reverse: it replays one chunk into a small scratch buffer (the state before each step) and back-propagates through
its steps. Gradients that sum over values (dq, dk, dg, dbeta) are written per value tile and summed afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_bounds
from x_transformers.ops.common.chunk_index import prepare_chunk_offsets


@triton.jit
def _step(b_h, k, v, g, beta, o_tk, o_tv, t_h, o_k, m_k, o_v, m_v):
    """One forward step on the state before it: (decayed state S', k, v, beta, a = exp(g), residual v - k S',
    new state)."""
    b_k = tl.load(k + o_tk + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + o_tv + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + t_h).to(tl.float32)
    b_a = tl.exp(tl.load(g + o_tk + o_k, mask=m_k, other=0.0).to(tl.float32))
    b_hp = b_h * b_a[:, None]
    b_r = b_v - tl.sum(b_hp * b_k[:, None], 0)
    b_hn = b_hp + b_k[:, None] * (b_beta * b_r)[None, :]
    return b_hp, b_k, b_v, b_beta, b_a, b_r, b_hn


@triton.jit
def fused_recurrent_kda_fwd_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, N*H). q, k, g [B,T,H,K], v, o [B,T,H,V], beta [B,T,H], h0, ht [N,H,K,V]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + o_h, mask=m_h, other=0.0).to(tl.float32)
    for t in range(T):
        o_tk = ((bos + t) * H + i_h) * K
        o_tv = ((bos + t) * H + i_h) * V
        _, _, _, _, _, _, b_h = _step(b_h, k, v, g, beta, o_tk, o_tv, (bos + t) * H + i_h, o_k, m_k, o_v, m_v)
        b_q = tl.load(q + o_tk + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        tl.store(o + o_tv + o_v, tl.sum(b_h * b_q[:, None], 0).to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h, mask=m_h)


@triton.jit
def fused_recurrent_kda_bwd_kernel(
    q, k, v, g, beta, h0, do, dht, dq, dk, dv, dg, dbeta, dh0, ckpt, scratch, cu_seqlens, offsets, scale, T, BT,
    n_qk, n_beta,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, N*H). do [B,T,H,V], dht [N,H,K,V] -> dv [B,T,H,V], dh0 [N,H,K,V] and per value tile
    dq, dk, dg [NV,B,T,H,K], dbeta [NV,B,T,H] (n_qk = B*T*H*K, n_beta = B*T*H). ckpt [NT_total,H,K,V] and
    scratch [NV*N*H, BT, BK, BV] are fp32 workspaces."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    if IS_VARLEN:
        boh = tl.load(offsets + i_n).to(tl.int64)
    else:
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(T, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]
    o_s = (i_v + NV * i_nh).to(tl.int64) * BT * BK * BV + o_k[:, None] * BV + tl.arange(0, BV)[None, :]
    # value tile i_v writes its partial sums into slice i_v of dq/dk/dg and dbeta
    dq += i_v.to(tl.int64) * n_qk
    dk += i_v.to(tl.int64) * n_qk
    dg += i_v.to(tl.int64) * n_qk
    dbeta += i_v.to(tl.int64) * n_beta

    # replay the forward, checkpointing the state that enters every BT-step chunk
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for t in range(T):
        if t % BT == 0:
            tl.store(ckpt + ((boh + t // BT) * H + i_h) * K * V + o_h, b_h, mask=m_h)
        o_tk = ((bos + t) * H + i_h) * K
        o_tv = ((bos + t) * H + i_h) * V
        _, _, _, _, _, _, b_h = _step(b_h, k, v, g, beta, o_tk, o_tv, (bos + t) * H + i_h, o_k, m_k, o_v, m_v)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = tl.load(dht + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        t0 = i_t * BT
        t1 = tl.minimum(t0 + BT, T)
        b_h = tl.load(ckpt + ((boh + i_t) * H + i_h) * K * V + o_h, mask=m_h, other=0.0)
        for t in range(t0, t1):
            tl.store(scratch + o_s + (t - t0) * BK * BV, b_h)
            o_tk = ((bos + t) * H + i_h) * K
            o_tv = ((bos + t) * H + i_h) * V
            _, _, _, _, _, _, b_h = _step(b_h, k, v, g, beta, o_tk, o_tv, (bos + t) * H + i_h, o_k, m_k, o_v, m_v)
        tl.debug_barrier()
        for t in range(t1 - 1, t0 - 1, -1):
            o_tk = ((bos + t) * H + i_h) * K
            o_tv = ((bos + t) * H + i_h) * V
            # the state before step t (bypassing L1: this program just wrote it)
            b_h = tl.load(scratch + o_s + (t - t0) * BK * BV, cache_modifier=".cg")
            b_hp, b_k, b_v, b_beta, b_a, b_r, b_hn = _step(
                b_h, k, v, g, beta, o_tk, o_tv, (bos + t) * H + i_h, o_k, m_k, o_v, m_v
            )
            b_q = tl.load(q + o_tk + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
            b_do = tl.load(do + o_tv + o_v, mask=m_v, other=0.0).to(tl.float32)
            # forward step: S' = diag(a) S, r = v - k S', S_t = S' + k^T beta r, o = scale q S_t
            b_dh += b_q[:, None] * b_do[None, :]
            b_dq = tl.sum(b_hn * b_do[None, :], 1) * scale
            b_dd = tl.sum(b_dh * b_k[:, None], 0)
            b_dp = -b_beta * b_dd
            b_dk = tl.sum(b_dh * (b_beta * b_r)[None, :], 1) + tl.sum(b_hp * b_dp[None, :], 1)
            b_dhp = b_dh + b_k[:, None] * b_dp[None, :]
            tl.store(dv + o_tv + o_v, (b_beta * b_dd).to(dv.dtype.element_ty), mask=m_v)
            tl.store(dq + o_tk + o_k, b_dq, mask=m_k)
            tl.store(dk + o_tk + o_k, b_dk, mask=m_k)
            # d/dg_c of S' = exp(g) S: sum over this tile's values of dS' * S'
            tl.store(dg + o_tk + o_k, tl.sum(b_dhp * b_hp, 1), mask=m_k)
            tl.store(dbeta + (bos + t) * H + i_h, tl.sum(b_dd * b_r, 0))
            b_dh = b_dhp * b_a[:, None]
        tl.debug_barrier()
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_h, b_dh, mask=m_h)


def _blocks(K, V):
    BK = triton.next_power_of_2(K)
    BV = min(32 if BK > 128 else 64, triton.next_power_of_2(V))
    return BK, BV


def fused_recurrent_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    fused_recurrent_kda_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, beta, o, initial_state, ht, cu_seqlens, scale, T, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, num_warps=1 if BK * BV <= 2048 else 4,
    )
    return o, ht


def fused_recurrent_kda_bwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, do, dht):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    # checkpoint spacing ~ sqrt(T) balances the checkpoints (T / BT states) against the scratch (BT states)
    BT = max(8, min(128, triton.next_power_of_2(math.isqrt(max(T, 1)))))
    if cu_seqlens is None:
        offsets, n_ckpt = None, B * triton.cdiv(T, BT)
    else:
        offsets = prepare_chunk_offsets(cu_seqlens, BT)
        n_ckpt = int(offsets[-1])
    f32 = dict(device=q.device, dtype=torch.float32)
    ckpt = torch.empty(max(n_ckpt, 1), H, K, V, **f32)
    scratch = torch.empty(NV * N * H, BT, BK, BV, **f32)
    dq, dk, dg = (torch.empty(NV, *q.shape, **f32) for _ in range(3))
    dv = torch.empty_like(v)
    dbeta = torch.empty(NV, *beta.shape, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    fused_recurrent_kda_bwd_kernel[(NV, N * H)](
        q, k, v, g, beta, initial_state, do, dht, dq, dk, dv, dg, dbeta, dh0, ckpt, scratch, cu_seqlens, offsets,
        scale, T, BT, q.numel(), beta.numel(), H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
        IS_VARLEN=cu_seqlens is not None, num_warps=1 if BK * BV <= 2048 else 4,
    )
    return dq.sum(0), dk.sum(0), dv, dg.sum(0), dbeta.sum(0), dh0


class FusedRecurrentKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = fused_recurrent_kda_fwd(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = fused_recurrent_kda_bwd(
            q, k, v, g, beta, ctx.scale, initial_state, cu_seqlens, do.contiguous(),
            dht.contiguous() if dht is not None else None,
        )
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g.dtype), dbeta.to(beta.dtype), None,
            dh0.to(initial_state.dtype) if dh0 is not None else None, None, None,
        )


def fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens):
    """`fused_recurrent_kda` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    initial_state = initial_state.contiguous() if initial_state is not None else None
    o, ht = FusedRecurrentKDAFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    return o, ht if output_final_state else None
