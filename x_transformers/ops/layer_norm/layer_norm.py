"""Bias-less LayerNorm over the last dimension in Triton, forward and backward.

PyTorch's CUDA LayerNorm backward is two kernels, and the gain's (GammaBetaBackward) is slow at narrow widths: about
180 us together for a 16 x 1024 x 512 float32 residual stream on an H100, against a forward of about 40 us, in every
norm of every layer. Here each program normalises a block of rows (up to 16) in float32 and keeps their mean and
1/std; the backward recomputes x_hat from them, writes dx and one partial gain gradient per program, summed once
afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 4096  # rows per program = this / padded width (1 to 16): ~32 values per thread and tensor


def _launch(M: int, D: int) -> tuple[int, int, int, int]:
    """(padded width, rows per program, programs, warps). Wide rows get more warps so that the backward, which holds
    x, dy and x_hat of its rows, keeps its registers (the sm_90 compile check shows no spills)."""
    BD = triton.next_power_of_2(D)
    BM = max(1, min(16, ELEMENTS_PER_PROGRAM // BD))
    warps = 4 if BD <= 4096 else (8 if BD <= 8192 else 16)
    return BD, BM, triton.cdiv(M, BM), warps


@triton.jit
def layer_norm_fwd_kernel(x, w, y, mean, rstd, M, eps, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """grid (cdiv(M, BM),). x, y [M, D] contiguous; w [D]; mean, rstd [M] float32."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    m = m_m[:, None] & m_d[None, :]
    p = o_m[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0.0).to(tl.float32)
    b_mean = tl.sum(b_x, axis=1) / D
    b_xc = tl.where(m, b_x - b_mean[:, None], 0.0)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / D + eps)
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(y + p, (b_xc * b_rstd[:, None] * b_w[None, :]).to(y.dtype.element_ty), mask=m)
    tl.store(mean + o_m, b_mean, mask=m_m)
    tl.store(rstd + o_m, b_rstd, mask=m_m)


@triton.jit
def layer_norm_bwd_kernel(x, w, dy, mean, rstd, dx, dw_part, M, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """grid (cdiv(M, BM),). dx = rstd (dy w - mean(dy w) - x_hat mean(dy w x_hat)); dw_part[pid] = sum dy x_hat."""
    i_m = tl.program_id(0)
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m, m_d = o_m < M, o_d < D
    m = m_m[:, None] & m_d[None, :]
    p = o_m[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + p, mask=m, other=0.0).to(tl.float32)
    b_mean = tl.load(mean + o_m, mask=m_m, other=0.0)
    b_rstd = tl.load(rstd + o_m, mask=m_m, other=0.0)
    b_w = tl.load(w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_xhat = tl.where(m, (b_x - b_mean[:, None]) * b_rstd[:, None], 0.0)
    b_g = b_dy * b_w[None, :]
    c1 = tl.sum(b_g * b_xhat, axis=1) / D
    c2 = tl.sum(b_g, axis=1) / D
    b_dx = (b_g - c2[:, None] - b_xhat * c1[:, None]) * b_rstd[:, None]
    tl.store(dx + p, b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + i_m * D + o_d, tl.sum(b_dy * b_xhat, axis=0), mask=m_d)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        BD, BM, programs, warps = _launch(M, D)
        layer_norm_fwd_kernel[(programs,)](x2, weight, y, mean, rstd, M, eps, D=D, BD=BD, BM=BM, num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, D = x2.shape
        dy2 = dy.reshape(M, D).contiguous()
        dx = torch.empty_like(x2)
        BD, BM, programs, warps = _launch(M, D)
        dw_part = torch.empty(programs, D, dtype=torch.float32, device=x2.device)
        layer_norm_bwd_kernel[(programs,)](x2, weight, dy2, mean, rstd, dx, dw_part, M, D=D, BD=BD, BM=BM,
                                           num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None
