"""Causal depthwise 1-D convolution (the short convolution before DeltaNet / gated DeltaNet / Mamba2) in Triton.

`out[t, c] = act(bias[c] + sum_j weight[c, j] * x[t - (w - 1) + j, c])` on (b, n, d) activations read in place, d
contiguous. cuDNN runs the grouped conv on such views with a slow direct kernel (~0.9 ms forward at 2 x 8192 x 1536
bf16 on an H100); this is a memory-bound pass instead. Each program owns BT rows and BD channels; the w shifted row
blocks it loads overlap in all but w - 1 rows, which come from L1 / L2, so HBM sees about one read of x.

The backward takes two passes. The first recomputes the pre-activation z from x (one conv, as forward), takes dy
through the activation to dz (stored only when there is an activation) and sums the weight and bias gradients over
its rows: each program writes its block's partial sums and one `sum` over blocks finishes them, so they come out the
same on every run (no atomics). The second is the conv reversed in time over dz, `dx[t] = sum_k weight[w - 1 - k] *
dz[t + k]`; with a cache, one extra block of rows before the first token gives the cache's gradient. (A single pass
that recomputed z at each of the w shifts ran 4x the instructions and 184 registers: 447 us at 16 x 1024 x 1536 bf16
with silu on an H100, at 12% occupancy.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from x_transformers.ops.common.utils import pow2_block
from x_transformers.ops.conv.naive import last_inputs

# (rows, channels, warps) per program; module-level so benchmarks/bench_conv.py can sweep them. The backward is two
# passes: the weight pass (dz through the activation, recomputed from x, and the weight / bias partial sums) and the
# input pass (dx, the conv reversed in time over dz). 64 x 64 blocks of 4 warps had the best forward + backward in
# the H100 sweep at 16 x 1024 x 1536 bf16 with silu (0.46 ms; 0.47 to 0.71 ms for the other shapes, though runs of
# one config varied by up to 25%); sm_90 registers there: forward 92-110, weight pass 72-158, input pass 78-92
FWD_BLOCKS = (64, 64, 4)
BWD_WEIGHT_BLOCKS = (64, 64, 4)
BWD_INPUT_BLOCKS = (64, 64, 4)
TRANSPOSE_WEIGHT_FROM = 256  # tokens (b * n)


@triton.jit
def _load_rows(x, cache, o_src, o_bos, m_row, o_d, m_d, T, D: tl.constexpr, W: tl.constexpr, USE_CACHE: tl.constexpr):
    """Rows `o_src` of x ([BT, BD] in fp32): zero before the sequence start `o_bos` (a per-row bound), and with a cache
    the w - 1 inputs before the first token read from it."""
    m = ((o_src >= o_bos) & (o_src >= 0) & (o_src < T) & m_row)[:, None] & m_d[None, :]
    b_x = tl.load(x + o_src.to(tl.int64)[:, None] * D + o_d[None, :], mask=m, other=0).to(tl.float32)
    if USE_CACHE:
        m_c = ((o_src < 0) & (o_src >= 1 - W) & m_row)[:, None] & m_d[None, :]
        b_x += tl.load(cache + (o_src + W - 1)[:, None] * D + o_d[None, :], mask=m_c, other=0).to(tl.float32)
    return b_x


@triton.jit
def _conv_rows(x, w, s_wj, s_wd, bias, cache, o_t, o_bos, m_row, o_d, m_d, T,
               D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
               HAS_BIAS: tl.constexpr, USE_CACHE: tl.constexpr):
    """The pre-activation output z at rows o_t ([BT, BD] fp32)."""
    b_z = tl.zeros([BT, BD], dtype=tl.float32)
    if HAS_BIAS:
        b_z += tl.load(bias + o_d, mask=m_d, other=0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        b_w = tl.load(w + j * s_wj + o_d * s_wd, mask=m_d, other=0).to(tl.float32)
        b_z += _load_rows(x, cache, o_t - (W - 1) + j, o_bos, m_row, o_d, m_d, T, D, W, USE_CACHE) * b_w[None, :]
    return b_z


@triton.jit
def causal_conv1d_fwd_kernel(
    x, w, s_wj, s_wd, bias, cache, y, seq_start, T,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_CACHE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD) * cdiv(T, BT), B), channel blocks fastest. x, y: [B, T, D]; w: tap j of channel c at
    `j * s_wj + c * s_wd` (a [D, W] weight, or its [W, D] transpose for 16-byte loads of the taps); bias: [D];
    cache: [B, W - 1, D]; seq_start: [T] int32, the first token of each token's sequence (packed batches)."""
    i_dt, i_b = tl.program_id(0), tl.program_id(1)
    ND = tl.cdiv(D, BD)
    i_d, i_t = i_dt % ND, i_dt // ND
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    x += i_b.to(tl.int64) * T * D
    y += i_b.to(tl.int64) * T * D
    if USE_CACHE:
        cache += i_b.to(tl.int64) * (W - 1) * D
    o_bos = 0
    if IS_VARLEN:
        o_bos = tl.load(seq_start + o_t, mask=m_t, other=0)

    b_z = _conv_rows(x, w, s_wj, s_wd, bias, cache, o_t, o_bos, m_t, o_d, m_d, T, D, W, BT, BD, HAS_BIAS, USE_CACHE)
    if ACT:
        b_z = b_z * tl.sigmoid(b_z)
    tl.store(y + o_t.to(tl.int64)[:, None] * D + o_d[None, :], b_z.to(y.dtype.element_ty),
             mask=m_t[:, None] & m_d[None, :])


@triton.jit
def causal_conv1d_bwd_weight_kernel(
    x, w, s_wj, s_wd, bias, cache, dy, dz, dw, db, seq_start, T,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_CACHE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD) * NT, B), NT = cdiv(T, BT). The gradient dz of the pre-activation output at this block's rows
    (dy through the activation, whose input is recomputed from x; written to dz, [B, T, D], only with ACT) and the
    block's share of the weight and bias gradients: dw [B * NT, W, D] and db [B * NT, D] fp32 partial sums."""
    i_dt, i_b = tl.program_id(0), tl.program_id(1)
    ND = tl.cdiv(D, BD)
    NT = tl.num_programs(0) // ND
    i_d, i_t = i_dt % ND, i_dt // ND
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    x += i_b.to(tl.int64) * T * D
    dy += i_b.to(tl.int64) * T * D
    if USE_CACHE:
        cache += i_b.to(tl.int64) * (W - 1) * D
    o_bos = 0
    if IS_VARLEN:
        o_bos = tl.load(seq_start + o_t, mask=m_t, other=0)

    p_rows = o_t.to(tl.int64)[:, None] * D + o_d[None, :]
    m_rows = m_t[:, None] & m_d[None, :]
    b_dz = tl.load(dy + p_rows, mask=m_rows, other=0).to(tl.float32)
    if ACT:
        b_z = _conv_rows(x, w, s_wj, s_wd, bias, cache, o_t, o_bos, m_t, o_d, m_d, T,
                         D, W, BT, BD, HAS_BIAS, USE_CACHE)
        b_s = tl.sigmoid(b_z)
        # d silu(z) / dz = s (1 + z (1 - s))
        b_dz = b_dz * b_s * (1 + b_z * (1 - b_s))
        tl.store(dz + i_b.to(tl.int64) * T * D + p_rows, b_dz.to(dz.dtype.element_ty), mask=m_rows)

    i_p = (i_b * NT + i_t).to(tl.int64)
    for j in tl.static_range(W):
        b_x = _load_rows(x, cache, o_t - (W - 1) + j, o_bos, m_t, o_d, m_d, T, D, W, USE_CACHE)
        tl.store(dw + (i_p * W + j) * D + o_d, tl.sum(b_dz * b_x, axis=0), mask=m_d)
    if HAS_BIAS:
        tl.store(db + i_p * D + o_d, tl.sum(b_dz, axis=0), mask=m_d)


@triton.jit
def causal_conv1d_bwd_input_kernel(
    dz, w, s_wj, s_wd, dx, dcache, seq_start, T,
    D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    USE_CACHE: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """grid (cdiv(D, BD) * NT, B) with NT = cdiv(T, BT), plus one block of rows before the first token when there is
    a cache (its last w - 1 rows are the cache's gradient). The conv reversed in time over dz, the gradient of the
    pre-activation output: dx[t] = sum_k weight[w - 1 - k] dz[t + k]. dx: [B, T, D], dcache: [B, W - 1, D]."""
    i_dt, i_b = tl.program_id(0), tl.program_id(1)
    ND = tl.cdiv(D, BD)
    i_d, i_t = i_dt % ND, i_dt // ND
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_t = i_t * BT + tl.arange(0, BT)
    if USE_CACHE:
        o_t -= BT
    dz += i_b.to(tl.int64) * T * D
    dx += i_b.to(tl.int64) * T * D
    if USE_CACHE:
        dcache += i_b.to(tl.int64) * (W - 1) * D

    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        o_u = o_t + k
        m_u = (o_u >= 0) & (o_u < T)
        if IS_VARLEN:
            # row t + k belongs to row t's sequence iff that sequence started at or before t
            m_u = m_u & (tl.load(seq_start + o_u, mask=m_u, other=0) <= o_t)
        b_dz = tl.load(dz + o_u.to(tl.int64)[:, None] * D + o_d[None, :],
                       mask=m_u[:, None] & m_d[None, :], other=0).to(tl.float32)
        b_w = tl.load(w + (W - 1 - k) * s_wj + o_d * s_wd, mask=m_d, other=0).to(tl.float32)
        b_dx += b_dz * b_w[None, :]

    tl.store(dx + o_t.to(tl.int64)[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty),
             mask=((o_t >= 0) & (o_t < T))[:, None] & m_d[None, :])
    if USE_CACHE:
        m_c = (o_t < 0) & (o_t >= 1 - W)
        tl.store(dcache + (o_t + W - 1)[:, None] * D + o_d[None, :], b_dx.to(dcache.dtype.element_ty),
                 mask=m_c[:, None] & m_d[None, :])


def _blocks(blocks, T, D):
    # short inputs (decoding) get fewer rows per program; narrow ones fewer channels
    BT, BD, num_warps = blocks
    # at least 16 unless the configured block is narrower
    BT = pow2_block(T, min(16, BT), BT)
    BD = pow2_block(D, min(16, BD), BD)
    return BT, BD, num_warps


def _seq_start(cu_seqlens: Tensor | None, T: int, device) -> Tensor | None:
    """The first token of every token's sequence, [T] int32 (no host sync)."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], torch.arange(T, device=device), right=True)
    return cu[seq].to(torch.int32)


def _taps(weight: Tensor, tokens: int) -> Tensor:
    """The weight as [W, D]: a view of the [D, W] one for a few tokens (decoding: no extra launch), else a contiguous
    copy, so that each thread reads its 8 channels of a tap in one 16-byte load instead of 8 strided ones (those were
    8x the L1 traffic of the activations themselves)."""
    return weight.t() if tokens < TRANSPOSE_WEIGHT_FROM else weight.t().contiguous()


def causal_conv1d_fwd(x, wt, bias, cache, seq_start, act):
    B, T, D = x.shape
    W = wt.shape[0]
    y = torch.empty_like(x)
    BT, BD, num_warps = _blocks(FWD_BLOCKS, T, D)
    grid = (triton.cdiv(D, BD) * triton.cdiv(T, BT), B)
    causal_conv1d_fwd_kernel[grid](
        x, wt, wt.stride(0), wt.stride(1), bias, cache, y, seq_start, T, D=D, W=W, BT=BT, BD=BD,
        HAS_BIAS=bias is not None, ACT=act, USE_CACHE=cache is not None, IS_VARLEN=seq_start is not None,
        num_warps=num_warps,
    )
    return y


def causal_conv1d_bwd(x, wt, bias, cache, seq_start, act, dy):
    B, T, D = x.shape
    W = wt.shape[0]
    # 1. dz (dy through the activation) and the weight / bias gradients, one block of rows per program
    BT, BD, num_warps = _blocks(BWD_WEIGHT_BLOCKS, T, D)
    NT = triton.cdiv(T, BT)
    # dz in x's dtype (the rounding dx gets anyway), fp32 for fp32 inputs
    dz = torch.empty_like(x) if act else dy
    dw = x.new_empty(B * NT, W, D, dtype=torch.float32)
    db = x.new_empty(B * NT, D, dtype=torch.float32) if bias is not None else None
    causal_conv1d_bwd_weight_kernel[(triton.cdiv(D, BD) * NT, B)](
        x, wt, wt.stride(0), wt.stride(1), bias, cache, dy, dz, dw, db, seq_start, T, D=D, W=W, BT=BT, BD=BD,
        HAS_BIAS=bias is not None, ACT=act, USE_CACHE=cache is not None, IS_VARLEN=seq_start is not None,
        num_warps=num_warps,
    )
    # 2. dx (and the cache's gradient): the conv reversed in time over dz
    BT, BD, num_warps = _blocks(BWD_INPUT_BLOCKS, T + (W - 1 if cache is not None else 0), D)
    dx = torch.empty_like(x)
    dcache = torch.empty_like(cache) if cache is not None else None
    causal_conv1d_bwd_input_kernel[(triton.cdiv(D, BD) * (triton.cdiv(T, BT) + (cache is not None)), B)](
        dz, wt, wt.stride(0), wt.stride(1), dx, dcache, seq_start, T, D=D, W=W, BT=BT, BD=BD,
        USE_CACHE=cache is not None, IS_VARLEN=seq_start is not None, num_warps=num_warps,
    )
    dw = dw.sum(0).t().to(wt.dtype)
    db = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dcache


class CausalConv1dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cache, seq_start, act):
        wt = _taps(weight, x.shape[0] * x.shape[1])
        y = causal_conv1d_fwd(x, wt, bias, cache, seq_start, act)
        ctx.save_for_backward(x, wt, bias, cache, seq_start)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wt, bias, cache, seq_start = ctx.saved_tensors
        dx, dw, db, dcache = causal_conv1d_bwd(x, wt, bias, cache, seq_start, ctx.act, dy.contiguous())
        return dx, dw, db, dcache, None, None


def causal_conv1d_triton(x, weight, bias, activation, cache, cu_seqlens):
    """`causal_conv1d` on the Triton kernels, for inputs it has checked (T > 0, width <= MAX_WIDTH)."""
    W = weight.shape[1]
    # a width-1 kernel has nothing to cache
    conv_cache = cache.contiguous() if cache is not None and W > 1 else None
    seq_start = _seq_start(cu_seqlens, x.shape[1], x.device)
    bias = bias.contiguous() if bias is not None else None
    out = CausalConv1dFunction.apply(
        x.contiguous(), weight.contiguous(), bias, conv_cache, seq_start, activation is not None
    )
    return out, last_inputs(x, cache, W, cu_seqlens)
