"""The forget gate's cumulative sum c = cumsum(g) within each document for the attention kernels, and its backward
dg = suffix sums of dc, both accumulated in fp64 over the whole document.

c only enters as the bias c_i - c_j, but |c| grows without bound along a document, so the forward returns c (times
log2(e)) as two fp32 parts hi + lo whose differences keep fp64's accuracy (see flash.py). The backward walks each
document from its end, so that the gates after the last token a loss reads get exactly zero gradient: their suffix
sums add zeros only, in whatever order the scan adds them.

One program per document and block of heads walks its chunks in order (torch's cumsum along time, not the innermost
dimension of [B, T, H], would walk every (batch, head) column one token at a time).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from x_transformers.ops.common.utils import pow2_block


@triton.jit
def gate_cumsum_kernel(
    x, y, lo, cu_seqlens, T, scale,
    H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, REVERSE: tl.constexpr, SPLIT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """grid (N, cdiv(H, BH)): s = scale * cumsum of x within each sequence (from its end when REVERSE), in fp64.
    SPLIT: y = s rounded to fp32, lo = s - y in fp32; otherwise y = s in y's dtype."""
    i_n, i_hb = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
    NT = tl.cdiv(T, BT)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    b_carry = tl.zeros([BH], dtype=tl.float64)
    for i in range(NT):
        i_t = NT - 1 - i if REVERSE else i
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_h[None, :]
        p = (bos + o_t)[:, None] * H + o_h[None, :]
        b_x = tl.load(x + p, mask=m, other=0).to(tl.float64)
        b_s = tl.cumsum(b_x, axis=0, reverse=REVERSE) + b_carry[None, :]
        b_carry += tl.sum(b_x, axis=0)
        b_s *= scale
        if SPLIT:
            b_hi = b_s.to(tl.float32)
            tl.store(y + p, b_hi, mask=m)
            tl.store(lo + p, (b_s - b_hi.to(tl.float64)).to(tl.float32), mask=m)
        else:
            tl.store(y + p, b_s.to(y.dtype.element_ty), mask=m)


def _launch(x, y, lo, cu_seqlens, scale, reverse):
    B, T, H = x.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if N * T * H == 0:
        return
    BH = pow2_block(H, hi=16)
    gate_cumsum_kernel[(N, triton.cdiv(H, BH))](
        x, y, lo, cu_seqlens, T, scale, H=H, BT=256, BH=BH, REVERSE=reverse, SPLIT=lo is not None,
        IS_VARLEN=cu_seqlens is not None,
    )


def forget_cumsum(g: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """g `[B, T, H]` (contiguous) -> `[2, B, T, H]` fp32: hi and lo of c * log2(e), c = cumsum(g) within each
    document (hi = c * log2(e) rounded to fp32, lo = what that rounding lost)."""
    c = torch.empty(2, *g.shape, dtype=torch.float32, device=g.device)
    _launch(g, c[0], c[1], cu_seqlens, math.log2(math.e), reverse=False)
    return c


def forget_cumsum_backward(dc: torch.Tensor, cu_seqlens: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """dg from the gradient dc `[B, T, H]` of c = cumsum(g): its suffix sums within each document, in `dtype`."""
    dg = torch.empty(dc.shape, dtype=dtype, device=dc.device)
    _launch(dc, dg, None, cu_seqlens, 1.0, reverse=True)
    return dg
