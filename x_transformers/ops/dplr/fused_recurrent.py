"""Token-by-token generalized delta rule in Triton, forward and backward: for decoding and short inputs.

One program per (value tile, sequence * head) keeps its `[K, BV]` slice of the fp32 state in registers and walks the
sequence; the read `a_t S_{t-1}` sums over keys only, so value tiles never talk to each other. The backward replays
the forward to checkpoint the state every `BT` steps, then walks the chunks in reverse: it replays one chunk into a
small scratch buffer (the state before each step) and back-propagates through its steps. Gradients that sum over
values (dq, dk, da, db, dgk) are written per value tile and summed afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_bounds
from x_transformers.ops.common.chunk_index import prepare_chunk_offsets


@triton.jit
def _step(b_h, p_k, m_k, b_k, b_v, a, b, gk):
    """One step S_t = exp(gk) S + b^T (a S) + k^T v on the state tile; returns (S_t, the read a S)."""
    b_a = tl.load(a + p_k, mask=m_k, other=0.0).to(tl.float32)
    b_b = tl.load(b + p_k, mask=m_k, other=0.0).to(tl.float32)
    b_w = tl.exp(tl.load(gk + p_k, mask=m_k, other=0.0).to(tl.float32))
    b_u = tl.sum(b_h * b_a[:, None], 0)
    b_h = b_h * b_w[:, None] + b_b[:, None] * b_u[None, :] + b_k[:, None] * b_v[None, :]
    return b_h, b_u


@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, a, b, gk, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, N*H). q, k, a, b, gk [B,T,H,K], v, o [B,T,H,V], h0, ht [N,H,K,V] (fp32)."""
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
        p_k = ((bos + t) * H + i_h) * K + o_k
        p_v = ((bos + t) * H + i_h) * V + o_v
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_h, _ = _step(b_h, p_k, m_k, b_k, b_v, a, b, gk)
        b_q = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32) * scale
        tl.store(o + p_v, tl.sum(b_h * b_q[:, None], 0).to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h, mask=m_h)


@triton.jit
def fused_recurrent_bwd_kernel(
    q, k, v, a, b, gk, h0, do, dht, dq, dk, dv, da, db, dgk, dh0, ckpt, scratch, cu_seqlens, offsets, scale, T, BT,
    n_k,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, N*H). do [B,T,H,V], dht [N,H,K,V] -> dv [B,T,H,V], dh0 [N,H,K,V] and per value tile
    dq, dk, da, db, dgk [NV,B,T,H,K] (n_k = B*T*H*K). ckpt [NT_total,H,K,V] and scratch [NV*N*H, BT, BK, BV] are
    fp32 workspaces."""
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
    # value tile i_v writes its partial sums into slice i_v of the key-sized gradients
    part = i_v.to(tl.int64) * n_k
    dq += part
    dk += part
    da += part
    db += part
    dgk += part

    # replay the forward, checkpointing the state that enters every BT-step chunk
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h = tl.load(h0 + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for t in range(T):
        if t % BT == 0:
            tl.store(ckpt + ((boh + t // BT) * H + i_h) * K * V + o_h, b_h, mask=m_h)
        p_k = ((bos + t) * H + i_h) * K + o_k
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + ((bos + t) * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_h, _ = _step(b_h, p_k, m_k, b_k, b_v, a, b, gk)

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh = tl.load(dht + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0.0).to(tl.float32)
    for i_t in range(NT - 1, -1, -1):
        t0 = i_t * BT
        t1 = tl.minimum(t0 + BT, T)
        b_h = tl.load(ckpt + ((boh + i_t) * H + i_h) * K * V + o_h, mask=m_h, other=0.0)
        for t in range(t0, t1):
            tl.store(scratch + o_s + (t - t0) * BK * BV, b_h)
            p_k = ((bos + t) * H + i_h) * K + o_k
            b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_v = tl.load(v + ((bos + t) * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
            b_h, _ = _step(b_h, p_k, m_k, b_k, b_v, a, b, gk)
        tl.debug_barrier()
        for t in range(t1 - 1, t0 - 1, -1):
            p_k = ((bos + t) * H + i_h) * K + o_k
            p_v = ((bos + t) * H + i_h) * V + o_v
            # the state before step t (bypassing L1: this program just wrote it)
            b_hp = tl.load(scratch + o_s + (t - t0) * BK * BV, cache_modifier=".cg")
            b_q = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32) * scale
            b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_a = tl.load(a + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_b = tl.load(b + p_k, mask=m_k, other=0.0).to(tl.float32)
            b_w = tl.exp(tl.load(gk + p_k, mask=m_k, other=0.0).to(tl.float32))
            b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
            b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
            # forward step: u = a S, S_t = w S + b^T u + k^T v, o = scale q S_t
            b_u = tl.sum(b_hp * b_a[:, None], 0)
            b_hn = b_hp * b_w[:, None] + b_b[:, None] * b_u[None, :] + b_k[:, None] * b_v[None, :]
            b_dh += b_q[:, None] * b_do[None, :]
            b_du = tl.sum(b_dh * b_b[:, None], 0)
            tl.store(dv + p_v, tl.sum(b_dh * b_k[:, None], 0).to(dv.dtype.element_ty), mask=m_v)
            tl.store(dq + p_k, tl.sum(b_hn * b_do[None, :], 1) * scale, mask=m_k)
            tl.store(dk + p_k, tl.sum(b_dh * b_v[None, :], 1), mask=m_k)
            tl.store(db + p_k, tl.sum(b_dh * b_u[None, :], 1), mask=m_k)
            tl.store(da + p_k, tl.sum(b_hp * b_du[None, :], 1), mask=m_k)
            tl.store(dgk + p_k, tl.sum(b_dh * b_hp, 1) * b_w, mask=m_k)
            b_dh = b_dh * b_w[:, None] + b_a[:, None] * b_du[None, :]
        tl.debug_barrier()
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_h, b_dh, mask=m_h)


def _blocks(K, V):
    BK = triton.next_power_of_2(K)
    BV = min(32 if BK > 128 else 64, triton.next_power_of_2(V))
    return BK, BV


def fused_recurrent_dplr_fwd(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    BK, BV = _blocks(K, V)
    o = torch.empty_like(v)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, a, b, gk, o, initial_state, ht, cu_seqlens, scale, T, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None, num_warps=1 if BK * BV <= 2048 else 4,
    )
    return o, ht


def fused_recurrent_dplr_bwd(q, k, v, a, b, gk, scale, initial_state, cu_seqlens, do, dht):
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
    dq, dk, da, db, dgk = (torch.empty(NV, *q.shape, **f32) for _ in range(5))
    dv = torch.empty_like(v)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    fused_recurrent_bwd_kernel[(NV, N * H)](
        q, k, v, a, b, gk, initial_state, do, dht, dq, dk, dv, da, db, dgk, dh0, ckpt, scratch, cu_seqlens,
        offsets, scale, T, BT, q.numel(), H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, USE_FINAL_STATE_GRADIENT=dht is not None,
        IS_VARLEN=cu_seqlens is not None, num_warps=1 if BK * BV <= 2048 else 4,
    )
    return dq.sum(0), dk.sum(0), dv, da.sum(0), db.sum(0), dgk.sum(0), dh0


class FusedRecurrentDPLRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = fused_recurrent_dplr_fwd(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, a, b, gk, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, gk, initial_state, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, da, db, dgk, dh0 = fused_recurrent_dplr_bwd(
            q, k, v, a, b, gk, ctx.scale, initial_state, cu_seqlens, do.contiguous(),
            dht.contiguous() if dht is not None else None,
        )
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv, da.to(a.dtype), db.to(b.dtype), dgk.to(gk.dtype), None,
            dh0.to(initial_state.dtype) if dh0 is not None else None, None, None,
        )


def fused_recurrent_dplr_delta_rule_triton(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
    """`fused_recurrent_dplr_delta_rule` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    q, k, v, a, b, gk = (x.contiguous() for x in (q, k, v, a, b, gk))
    initial_state = initial_state.contiguous() if initial_state is not None else None
    o, ht = FusedRecurrentDPLRFunction.apply(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)
    return o, ht if output_final_state else None
