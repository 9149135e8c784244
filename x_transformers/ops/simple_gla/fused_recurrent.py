"""Token-by-token scalar-decay linear attention (Triton), for decoding and short inputs.

Each program keeps one [BK, BV] tile of the state in registers and walks the sequence. The backward pass walks it
forward again for dq and backwards for dk, dv and the initial-state gradient; the gate gradient uses the same identity
as the chunked kernels (`dA_t = q_t.dq_t - k_t.dk_t`, reverse-cumsummed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_bounds
from x_transformers.ops.common.chunk_index import last_positions
from x_transformers.ops.common.cumsum import reverse_cumsum
from x_transformers.ops.common.utils import num_seqs
from x_transformers.ops.simple_gla.chunk_h import tile


@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, g, o, h0, ht, cu_seqlens, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, NK, N * H). q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H]; o: [NK, B * T, H, V] fp32 partial
    outputs (one per K tile, summed by the launcher; NTOK = B * T); h0 / ht: [N, H, K, V] fp32."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_h, other=0).to(tl.float32)

    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_o = o + ((i_k.to(tl.int64) * NTOK + bos) * H + i_h) * V + o_v
    for i_t in range(T):
        b_q = tl.load(p_q, mask=m_k, other=0).to(tl.float32) * scale
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + (bos + i_t) * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(p_o, tl.sum(b_h * b_q[:, None], axis=0), mask=m_v)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_o += H * V

    if STORE_FINAL_STATE:
        p_ht = ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_ht, b_h, mask=m_h)


@triton.jit
def fused_recurrent_bwd_dq_kernel(
    k, v, g, do, dq, h0, cu_seqlens, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (NV, NK, N * H). Replays the states forward: dq_t = scale * S_t do_t, as [NV, B * T, H, K] fp32 partials."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        p_h0 = h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_h += tl.load(p_h0, mask=m_h, other=0).to(tl.float32)

    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_do = do + (bos * H + i_h) * V + o_v
    p_dq = dq + ((i_v.to(tl.int64) * NTOK + bos) * H + i_h) * K + o_k
    for i_t in range(T):
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)
        b_do = tl.load(p_do, mask=m_v, other=0).to(tl.float32)
        if USE_G:
            b_h *= tl.exp(tl.load(g + (bos + i_t) * H + i_h).to(tl.float32))
        b_h += b_k[:, None] * b_v[None, :]
        tl.store(p_dq, tl.sum(b_h * b_do[None, :], axis=1) * scale, mask=m_k)
        p_k += H * K
        p_v += H * V
        p_do += H * V
        p_dq += H * K


@triton.jit
def fused_recurrent_bwd_dkv_kernel(
    q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, scale, T, NTOK,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_FINAL_STATE_GRADIENT: tl.constexpr, STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """grid (NV, NK, N * H). Walks back with dS_t = scale q_t^T do_t + exp(g_{t+1}) dS_{t+1}:
    dk_t = dS_t v_t ([NV, B * T, H, K] partials), dv_t = k_t dS_t ([NK, B * T, H, V] partials), dh0 = exp(g_1) dS_1."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        p_dht = dht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        b_dh += tl.load(p_dht, mask=m_h, other=0).to(tl.float32)

    last = bos + T - 1
    p_q = q + (last * H + i_h) * K + o_k
    p_k = k + (last * H + i_h) * K + o_k
    p_v = v + (last * H + i_h) * V + o_v
    p_do = do + (last * H + i_h) * V + o_v
    p_dk = dk + ((i_v.to(tl.int64) * NTOK + last) * H + i_h) * K + o_k
    p_dv = dv + ((i_k.to(tl.int64) * NTOK + last) * H + i_h) * V + o_v
    for i_t in range(T):
        b_q = tl.load(p_q, mask=m_k, other=0).to(tl.float32) * scale
        b_k = tl.load(p_k, mask=m_k, other=0).to(tl.float32)
        b_v = tl.load(p_v, mask=m_v, other=0).to(tl.float32)
        b_do = tl.load(p_do, mask=m_v, other=0).to(tl.float32)
        b_dh += b_q[:, None] * b_do[None, :]
        tl.store(p_dk, tl.sum(b_dh * b_v[None, :], axis=1), mask=m_k)
        tl.store(p_dv, tl.sum(b_dh * b_k[:, None], axis=0), mask=m_v)
        if USE_G:
            b_dh *= tl.exp(tl.load(g + (last - i_t) * H + i_h).to(tl.float32))
        p_q -= H * K
        p_k -= H * K
        p_v -= H * V
        p_do -= H * V
        p_dk -= H * K
        p_dv -= H * V

    if STORE_INITIAL_STATE_GRADIENT:
        p_dh0 = dh0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
        tl.store(p_dh0, b_dh, mask=m_h)


def fused_recurrent_simple_gla_fwd(q, k, v, g, scale, h0, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_seqs(B, cu_seqlens)
    BK, BV = tile(K), tile(V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    o = q.new_empty(NK, B * T, H, V, dtype=torch.float32)
    ht = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    if N * H > 0:
        fused_recurrent_fwd_kernel[(NV, NK, N * H)](
            q, k, v, g, o, h0, ht, cu_seqlens, scale, T, B * T,
            H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, USE_INITIAL_STATE=h0 is not None,
            STORE_FINAL_STATE=output_final_state, IS_VARLEN=cu_seqlens is not None, num_warps=1,
        )
    o = o.sum(0) if NK > 1 else o[0]
    return o.view(B, T, H, V).to(v.dtype), ht


def fused_recurrent_simple_gla_bwd(q, k, v, g, scale, h0, ht, do, dht, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_seqs(B, cu_seqlens)
    BK, BV = tile(K), tile(V)
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    dq = q.new_empty(NV, B * T, H, K, dtype=torch.float32)
    dk = q.new_empty(NV, B * T, H, K, dtype=torch.float32)
    dv = q.new_empty(NK, B * T, H, V, dtype=torch.float32)
    dh0 = q.new_empty(N, H, K, V, dtype=torch.float32) if h0 is not None else None
    flags = dict(H=H, K=K, V=V, BK=BK, BV=BV, USE_G=g is not None, IS_VARLEN=cu_seqlens is not None, num_warps=1)
    if N * H > 0:
        fused_recurrent_bwd_dq_kernel[(NV, NK, N * H)](
            k, v, g, do, dq, h0, cu_seqlens, scale, T, B * T, USE_INITIAL_STATE=h0 is not None, **flags
        )
        fused_recurrent_bwd_dkv_kernel[(NV, NK, N * H)](
            q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, scale, T, B * T,
            USE_FINAL_STATE_GRADIENT=dht is not None, STORE_INITIAL_STATE_GRADIENT=h0 is not None, **flags,
        )
    dq, dk, dv = (t.sum(0).view(B, T, H, -1) for t in (dq, dk, dv))
    dg = None
    if g is not None:
        dA = (q.float() * dq - k.float() * dk).sum(-1)
        if dht is not None and ht is not None:
            # A_T scales the whole final state: d<S_T, dS_T>/dA_T = <S_T, dS_T>
            (rows, cols), seq = last_positions(cu_seqlens, B, T, q.device)
            dA[rows, cols] += (ht * dht).sum((-2, -1))[seq]
        dg = reverse_cumsum(dA, cu_seqlens)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0


class FusedRecurrentSimpleGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        o, ht = fused_recurrent_simple_gla_fwd(q, k, v, g, scale, h0, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, g, h0, ht, cu_seqlens)
        ctx.scale = scale
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, ht, cu_seqlens = ctx.saved_tensors
        dht = dht.float().contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = fused_recurrent_simple_gla_bwd(
            q, k, v, g, ctx.scale, h0, ht, do.contiguous(), dht, cu_seqlens
        )
        dg = dg.to(g.dtype) if dg is not None else None
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return dq, dk, dv, dg, None, dh0, None, None


def fused_recurrent_simple_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """`fused_recurrent_simple_gla` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    return FusedRecurrentSimpleGLAFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous() if g is not None else None,
        scale, initial_state, output_final_state, cu_seqlens,
    )
