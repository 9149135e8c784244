"""Token-by-token `gla` for decoding and short inputs: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

One program walks one sequence and one V tile, holding its [K, V] state slice in registers. The backward pass walks
forward once for dq, backward once for dk, dv and the initial-state gradient, then a last reverse walk gives dg:
g_t enters through G_t = cumsum(g), and with q_t exp(G_t), k_t exp(-G_t) the gradient of G_t is q_t dq_t - k_t dk_t
(plus sum_v S_T dS_T at the last step), so dg is its reverse cumsum; no exp(+G) is ever formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.bounds import seq_bounds
from x_transformers.ops.common.utils import num_seqs
from x_transformers.ops.gla.chunk import prepare_triton_inputs


@triton.jit
def fused_recurrent_gla_fwd_kernel(
    q,
    k,
    v,
    g,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Grid (cdiv(V, BV), N * H); BK >= K holds the whole key dim."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    p_k = (bos * H + i_h) * K + o_k
    p_v = (bos * H + i_h) * V + o_v

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)
    for _ in range(0, T):
        b_q = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)
        p_k += H * K
        p_v += H * V
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit
def fused_recurrent_gla_bwd_dq_kernel(
    k,
    v,
    g,
    do,
    dq,
    h0,
    cu_seqlens,
    scale,
    T,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Forward walk: dq_t = scale * S_t do_t, per V tile (summed on the host). Grid (cdiv(V, BV), N * H)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    T_all = B * T
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_k = (bos * H + i_h) * K + o_k
    p_v = (bos * H + i_h) * V + o_v
    # dq holds one [B*T, H, K] slab per V tile
    p_dq = i_v.to(tl.int64) * T_all * H * K + p_k

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
    for _ in range(0, T):
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(dq + p_dq, tl.sum(b_h * b_do[None, :], axis=1) * scale, mask=m_k)
        p_k += H * K
        p_v += H * V
        p_dq += H * K


@triton.jit
def fused_recurrent_gla_bwd_dkv_kernel(
    q,
    k,
    v,
    g,
    do,
    dk,
    dv,
    dht,
    dh0,
    cu_seqlens,
    scale,
    T,
    B,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Backward walk: dS_{t-1} = exp(g_t) (dS_t + scale q_t^T do_t); dk_t = dS_t v_t (per V tile), dv_t = k_t dS_t.

    Grid (cdiv(V, BV), N * H).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    T_all = B * T
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    # start at the last token of the sequence and walk back
    p_k = ((bos + T - 1) * H + i_h) * K + o_k
    p_v = ((bos + T - 1) * H + i_h) * V + o_v
    p_dk = i_v.to(tl.int64) * T_all * H * K + p_k

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0)
    for _ in range(0, T):
        b_q = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_dh += b_q[:, None] * b_do[None, :]
        tl.store(dk + p_dk, tl.sum(b_dh * b_v[None, :], axis=1), mask=m_k)
        tl.store(dv + p_v, tl.sum(b_dh * b_k[:, None], axis=0).to(dv.dtype.element_ty), mask=m_v)
        b_dh *= tl.exp(b_g)[:, None]
        p_k -= H * K
        p_v -= H * V
        p_dk -= H * K
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)


@triton.jit
def fused_recurrent_gla_bwd_dg_kernel(
    q,
    k,
    dq,
    dk,
    dg,
    dg_last,
    cu_seqlens,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BK: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dg_t = sum_{u >= t} (q_u dq_u - k_u dk_u) + dg_last, dg_last = sum_v S_T dS_T. Grid (cdiv(K, BK), N * H)."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, T = seq_bounds(i_n, T, cu_seqlens, IS_VARLEN)

    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    p_k = ((bos + T - 1) * H + i_h) * K + o_k
    b_acc = tl.zeros([BK], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_acc += tl.load(dg_last + i_nh.to(tl.int64) * K + o_k, mask=m_k, other=0.0)
    for _ in range(0, T):
        b_q = tl.load(q + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_dq = tl.load(dq + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_dk = tl.load(dk + p_k, mask=m_k, other=0.0).to(tl.float32)
        b_acc += b_q * b_dq - b_k * b_dk
        tl.store(dg + p_k, b_acc.to(dg.dtype.element_ty), mask=m_k)
        p_k -= H * K


def _blocks(K: int, V: int) -> tuple[int, int]:
    BK = triton.next_power_of_2(K)
    # the [BK, BV] state slice lives in registers: narrower V tiles for wide keys
    BV = min(triton.next_power_of_2(V), 32 if BK <= 128 else 16)
    return BK, BV


def fused_recurrent_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_seqs(B, cu_seqlens)
    BK, BV = _blocks(K, V)
    o = torch.empty_like(v)
    ht = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if output_final_state else None
    fused_recurrent_gla_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, g, o, initial_state, ht, cu_seqlens, scale, T, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None,
    )
    return o, ht


def fused_recurrent_gla_bwd(q, k, v, g, do, dht, ht, scale, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_seqs(B, cu_seqlens)
    BK, BV = _blocks(K, V)
    NV = triton.cdiv(V, BV)
    varlen = cu_seqlens is not None
    do = do.contiguous()

    dq = torch.empty(NV, B, T, H, K, dtype=torch.float32, device=q.device)
    fused_recurrent_gla_bwd_dq_kernel[(NV, N * H)](
        k, v, g, do, dq, initial_state, cu_seqlens, scale, T, B, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_INITIAL_STATE=initial_state is not None, IS_VARLEN=varlen,
    )
    dq = dq.sum(0)

    dk = torch.empty(NV, B, T, H, K, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(v)
    dh0 = torch.empty(N, H, K, V, dtype=torch.float32, device=q.device) if initial_state is not None else None
    fused_recurrent_gla_bwd_dkv_kernel[(NV, N * H)](
        q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, scale, T, B, H=H, K=K, V=V, BK=BK, BV=BV,
        USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=initial_state is not None, IS_VARLEN=varlen,
    )
    dk = dk.sum(0)

    # the final state carries every decay of its sequence: d(S_T)/d(G_T) = S_T
    dg_last = (ht * dht).sum(-1).contiguous() if dht is not None else None
    dg = torch.empty_like(g)
    BKg = min(64, BK)
    fused_recurrent_gla_bwd_dg_kernel[(triton.cdiv(K, BKg), N * H)](
        q, k, dq, dk, dg, dg_last, cu_seqlens, T, H=H, K=K, BK=BKg, USE_FINAL_STATE_GRADIENT=dht is not None,
        IS_VARLEN=varlen,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv, dg, dh0


class FusedRecurrentGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        o, ht = fused_recurrent_gla_fwd(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, g, ht, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, ht, initial_state, cu_seqlens = ctx.saved_tensors
        dht = None if dht is None else dht.contiguous()
        dq, dk, dv, dg, dh0 = fused_recurrent_gla_bwd(q, k, v, g, do, dht, ht, ctx.scale, initial_state, cu_seqlens)
        return dq, dk, dv, dg, None, dh0, None, None


def fused_recurrent_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """`fused_recurrent_gla` on the Triton kernels, for inputs it has checked (T > 0, scale set)."""
    q, k, v, g, initial_state, cu_seqlens = prepare_triton_inputs(q, k, v, g, initial_state, cu_seqlens)
    return FusedRecurrentGLAFunction.apply(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
