"""Input checks and varlen chunk bookkeeping for the delta-rule family."""

from __future__ import annotations

import torch
from torch import Tensor

from x_transformers.ops.common.utils import check_cu_seqlens, check_float, check_shape


def check_delta_inputs(where, q, k, v, beta, g, initial_state, cu_seqlens):
    """Validate `[B, T, H, *]` inputs and return `(B, T, H, K, V, N)` with N the number of sequences."""
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g), ("initial_state", initial_state)):
        check_float(name, t, where)
    if q.ndim != 4:
        raise ValueError(f"{where}: `q` must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), where)
    check_shape("v", v, (B, T, H, None), where)
    V = v.shape[-1]
    check_shape("beta", beta, (B, T, H), where)
    check_shape("g", g, (B, T, H), where)
    check_cu_seqlens(cu_seqlens, B, T, where)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    check_shape("initial_state", initial_state, (N, H, K, V), where)
    return B, T, H, K, V, N


def chunk_indices(cu_seqlens: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """For packed sequences: `(indices, offsets)` where `indices[i] = (sequence, chunk within it)` lists every chunk
    (chunks never straddle sequences) and `offsets[n]` is the first chunk of sequence n (`offsets[N]` = total)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + chunk_size - 1) // chunk_size
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    within = torch.arange(len(seq), device=cu_seqlens.device) - offsets[seq]
    return torch.stack([seq, within], 1).to(torch.int32).contiguous(), offsets.to(torch.int32).contiguous()

