"""Rotary embedding in one Triton pass: y = t * cos + swap_pairs(t) * sin, forward and backward.

The PyTorch formula (naive.py) is five kernels forward (flip, two multiplies, add, cast) with float32 intermediates
of the whole q / k tensor, and about as many backward: a memory-bound chain that re-reads q and k several times per
layer. Here each program loads a block of rows of t (in its dtype, strided (b, h, n, d) views included, so q and k
can be rotated straight out of the fused projection) and its pair partners (the same cache lines), rotates in float32
and writes t's dtype once. The backward is the same pass: dt = dy * cos + swap_pairs(dy * sin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 16  # positions per program (times the head dimension, padded to a power of two)


@triton.jit
def rotary_kernel(
    x, cos, sin, y, N, H, sx_b, sx_h, sx_n, sc_b, sc_n, sy_b, sy_h, sy_n,
    D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BACKWARD: tl.constexpr,
):
    """grid (cdiv(N, BN), B * H). x, y (b, h, n, d) with unit stride in d; cos, sin (1 or b, n, d) float32."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    o_p = o_d ^ 1  # pair partner
    m = (o_n < N)[:, None] & (o_d < D)[None, :]
    row_x = x + i_b.to(tl.int64) * sx_b + i_h.to(tl.int64) * sx_h + o_n[:, None].to(tl.int64) * sx_n
    row_c = i_b.to(tl.int64) * sc_b + o_n[:, None].to(tl.int64) * sc_n
    b_x = tl.load(row_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_xp = tl.load(row_x + o_p[None, :], mask=m, other=0.0).to(tl.float32)
    b_c = tl.load(cos + row_c + o_d[None, :], mask=m, other=0.0)
    if BACKWARD:
        # dt_j = dy_j cos_j + dy_p(j) sin_p(j)
        b_s = tl.load(sin + row_c + o_p[None, :], mask=m, other=0.0)
    else:
        b_s = tl.load(sin + row_c + o_d[None, :], mask=m, other=0.0)
    b_y = b_x * b_c + b_xp * b_s
    row_y = y + i_b.to(tl.int64) * sy_b + i_h.to(tl.int64) * sy_h + o_n[:, None].to(tl.int64) * sy_n
    tl.store(row_y + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


def _rotate(t: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    t4 = t if t.ndim == 4 else t[:, None]
    if t4.stride(-1) != 1:
        t4 = t4.contiguous()
    B, H, N, D = t4.shape
    y = torch.empty(B, H, N, D, dtype=t.dtype, device=t.device)
    cos, sin = cos.float(), sin.float()
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    rotary_kernel[(triton.cdiv(N, BLOCK_ROWS), B * H)](
        t4, cos, sin, y, N, H, t4.stride(0), t4.stride(1), t4.stride(2), sc_b, cos.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        D=D, BD=triton.next_power_of_2(D), BN=BLOCK_ROWS, BACKWARD=backward, num_warps=4,
    )
    return y if t.ndim == 4 else y[:, 0]


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None
