"""Cumulative sums of scalar per-head log gates `[B, T, H]`: within chunks (forward) and over whole sequences in
reverse (the backward of a cumsum), both aware of packed sequences."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from x_transformers.ops.common.chunk_index import prepare_chunk_indices
from x_transformers.ops.common.utils import pow2_block


@triton.jit
def chunk_local_cumsum_kernel(g, gc, cu_seqlens, chunk_indices, T, H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """grid (NT, B * H): inclusive cumsum of g restarted at every chunk start, in fp32."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_b.to(tl.int64) * T
    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_g = tl.load(g + (bos + o_t) * H + i_h, mask=m_t, other=0).to(tl.float32)
    tl.store(gc + (bos + o_t) * H + i_h, tl.cumsum(b_g, axis=0), mask=m_t)


@triton.jit
def reverse_cumsum_kernel(x, y, cu_seqlens, T, H: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, IS_VARLEN: tl.constexpr):
    """grid (N, cdiv(H, BH)): y_t = sum_{s >= t} x_s within each sequence, walking its chunks from the end."""
    i_n, i_hb = tl.program_id(0), tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        T = (tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
    NT = tl.cdiv(T, BT)
    o_h = i_hb * BH + tl.arange(0, BH)
    m_h = o_h < H
    b_carry = tl.zeros([BH], dtype=tl.float32)
    for i in range(NT):
        i_t = NT - 1 - i
        o_t = i_t * BT + tl.arange(0, BT)
        m = (o_t < T)[:, None] & m_h[None, :]
        p = (bos + o_t)[:, None] * H + o_h[None, :]
        b_x = tl.load(x + p, mask=m, other=0).to(tl.float32)
        b_tot = tl.sum(b_x, axis=0)
        # suffix sum inside the chunk = total - prefix + self
        b_y = b_tot[None, :] - tl.cumsum(b_x, axis=0) + b_x + b_carry[None, :]
        tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)
        b_carry += b_tot


def chunk_local_cumsum(g: Tensor, chunk_size: int, cu_seqlens: Tensor | None = None, chunk_indices: Tensor | None = None) -> Tensor:
    """`g: [B, T, H]` -> fp32 cumsum restarted every `chunk_size` tokens (and at every sequence start)."""
    B, T, H = g.shape
    gc = torch.empty(B, T, H, dtype=torch.float32, device=g.device)
    if cu_seqlens is not None and chunk_indices is None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    NT = triton.cdiv(T, chunk_size) if cu_seqlens is None else len(chunk_indices)
    if NT * B * H == 0:
        return gc
    chunk_local_cumsum_kernel[(NT, B * H)](
        g, gc, cu_seqlens, chunk_indices, T, H=H, BT=chunk_size, IS_VARLEN=cu_seqlens is not None
    )
    return gc


def reverse_cumsum(x: Tensor, cu_seqlens: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """`x: [B, T, H]` -> suffix sums within each sequence (fp32 accumulation, `out_dtype` or x's dtype)."""
    B, T, H = x.shape
    y = torch.empty(B, T, H, dtype=out_dtype or x.dtype, device=x.device)
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if N * T * H == 0:
        return y.zero_()
    BH = pow2_block(H, hi=64)
    reverse_cumsum_kernel[(N, triton.cdiv(H, BH))](
        x, y, cu_seqlens, T, H=H, BT=64, BH=BH, IS_VARLEN=cu_seqlens is not None
    )
    return y
