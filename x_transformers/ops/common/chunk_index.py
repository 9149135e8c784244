"""Host-side chunk bookkeeping for packed (`cu_seqlens`) batches, shared by the chunked kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def prepare_chunk_indices(cu_seqlens: Tensor, chunk_size: int) -> Tensor:
    """`[NT, 2]` int32 rows `(sequence, chunk within it)` listing every chunk; chunks never straddle sequences and
    empty sequences own no chunk. Syncs with the host once (varlen only)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + chunk_size - 1) // chunk_size
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    seq = torch.repeat_interleave(torch.arange(len(counts), device=cu_seqlens.device), counts)
    within = torch.arange(len(seq), device=cu_seqlens.device) - offsets[seq]
    return torch.stack([seq, within], 1).to(torch.int32).contiguous()


def prepare_chunk_offsets(cu_seqlens: Tensor, chunk_size: int) -> Tensor:
    """`[N + 1]` int32: index of the first chunk of each sequence (the last entry is the total chunk count)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = (lens + chunk_size - 1) // chunk_size
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32).contiguous()


def chunk_meta(cu_seqlens: Tensor | None, batch: int, seqlen: int, chunk_size: int):
    """(chunk_indices, chunk_offsets, chunks of all sequences, chunks along a kernel grid's time axis) for a call of
    `batch` rows of `seqlen` tokens, or of packed sequences (the grid then enumerates every chunk)."""
    if cu_seqlens is None:
        per_row = (seqlen + chunk_size - 1) // chunk_size
        return None, None, batch * per_row, per_row
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
    return chunk_indices, prepare_chunk_offsets(cu_seqlens, chunk_size), len(chunk_indices), len(chunk_indices)


def last_positions(cu_seqlens: Tensor | None, batch: int, seqlen: int, device) -> tuple[Tensor, Tensor]:
    """`(rows, cols)` into a `[B, T, ...]` tensor at the last token of every non-empty sequence, and which sequence
    each belongs to (for adding final-state terms to per-token gradients)."""
    if cu_seqlens is None:
        seq = torch.arange(batch if seqlen > 0 else 0, device=device)
        return (seq, torch.full_like(seq, seqlen - 1)), seq
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    seq = torch.nonzero(lens > 0).flatten()
    cols = (cu_seqlens[1:][seq] - 1).long()
    return (torch.zeros_like(cols), cols), seq
