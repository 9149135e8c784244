"""Elementwise gated scan in plain PyTorch (the CPU path): a Hillis-Steele parallel scan over (log gate, value) pairs,
log2(T) vectorised steps instead of a loop over tokens. Gates only ever add, so decay factors are `exp` of sums of
gates: no overflow under strong decay. Packed sequences stop the scan at their boundaries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(*tensors) -> torch.dtype:
    """fp32 for half precision and fp32 inputs, fp64 for fp64 ones: the CPU path never computes below its inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def chunk_hgrn_torch(x: Tensor, g: Tensor, initial_state=None, output_final_state=False, cu_seqlens=None):
    """x, g: [B, T, D] -> (h [B, T, D] in x's dtype, final state [N, D] fp32 or None); [B, T, H, D] inputs are
    scanned as H * D channels and keep their shape (states [N, H, D])."""
    if x.ndim == 4:
        B, T, H, D = x.shape
        h0 = initial_state.reshape(-1, H * D) if initial_state is not None else None
        h, ht = chunk_hgrn_torch(x.reshape(B, T, -1), g.reshape(B, T, -1), h0, output_final_state, cu_seqlens)
        return h.view(x.shape), (ht.view(-1, H, D) if ht is not None else None)
    B, T, D = x.shape
    acc = _acc_dtype(x)
    a, b = g.to(acc), x.to(acc)
    pos = torch.arange(T, device=x.device)
    if cu_seqlens is None:
        seq_start = torch.zeros_like(pos)
    else:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(lens), device=x.device), lens)
        seq_start = cu_seqlens[:-1].long()[seq]

    s = 1
    while s < T:
        # fold in the span ending s tokens earlier, unless it lies in the previous sequence
        joins = (pos - s >= seq_start)[None, :, None]
        prev_a = F.pad(a[:, :-s], (0, 0, s, 0))
        prev_b = F.pad(b[:, :-s], (0, 0, s, 0))
        b = torch.where(joins, prev_b * a.exp() + b, b)
        a = torch.where(joins, prev_a + a, a)
        s *= 2

    # a is now the gate summed from each sequence start, so the initial state enters as exp(a) * h0
    if initial_state is not None:
        h0 = initial_state.to(acc)[:, None] if cu_seqlens is None else initial_state.to(acc)[seq][None]
        b = b + a.exp() * h0

    final = None
    if output_final_state:
        if cu_seqlens is None:
            final = b[:, -1] if T > 0 else _zeros_or(initial_state, B, D, x)
        else:
            final = _zeros_or(initial_state, len(cu_seqlens) - 1, D, x)
            nonempty = torch.nonzero(cu_seqlens[1:] > cu_seqlens[:-1]).flatten()
            last = b[0, cu_seqlens[1:][nonempty] - 1]
            final = final.index_put((nonempty,), last)
    return b.to(x.dtype), final


def _zeros_or(initial_state, n, d, x):
    acc = _acc_dtype(x)
    return initial_state.to(acc) if initial_state is not None else x.new_zeros(n, d, dtype=acc)
