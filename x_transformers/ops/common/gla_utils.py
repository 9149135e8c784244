"""Input checks and chunk bookkeeping for the `gla` family (per-key-channel decay)."""

from __future__ import annotations

import torch
from torch import Tensor

from x_transformers.ops.common.utils import check_cu_seqlens, check_float, check_shape


def check_gla_inputs(q, k, v, g, initial_state, cu_seqlens, where: str) -> int:
    """Validate shapes / dtypes of a `gla` call; returns N, the number of independent sequences."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
        check_float(name, t, where)
    if q.ndim != 4:
        raise ValueError(f"{where}: `q` must have shape (B, T, H, K), got {tuple(q.shape)}")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), where)
    check_shape("v", v, (B, T, H, None), where)
    check_shape("g", g, (B, T, H, K), where)
    check_cu_seqlens(cu_seqlens, B, T, where)
    if cu_seqlens is not None:
        if cu_seqlens.numel() < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"{where}: `cu_seqlens` must start at 0 and end at T={T}, got {cu_seqlens.tolist()}")
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"{where}: `cu_seqlens` must be non-decreasing, got {cu_seqlens.tolist()}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_float("initial_state", initial_state, where)
        check_shape("initial_state", initial_state, (N, H, K, v.shape[-1]), where)
    return N


def prepare_chunk_indices(cu_seqlens: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Chunks that never straddle two segments (one host sync, varlen only).

    Returns `chunk_indices` [NT, 2] int32 rows of (segment, chunk within segment) and `chunk_offsets` [N + 1] int32,
    the index of each segment's first chunk (used to address per-chunk states).
    """
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_chunks = (lens + chunk_size - 1) // chunk_size
    chunk_offsets = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])
    total = int(chunk_offsets[-1])
    seg = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), n_chunks, output_size=total)
    within = torch.arange(total, device=lens.device) - chunk_offsets[seg]
    chunk_indices = torch.stack([seg, within], dim=1).to(torch.int32).contiguous()
    return chunk_indices, chunk_offsets.to(torch.int32).contiguous()


def empty_input_result(q: Tensor, v: Tensor, initial_state: Tensor | None, output_final_state: bool, N: int):
    """(o, final_state) for T = 0, where no kernel can be launched: nothing decays, the state passes through."""
    B, _, H, K = q.shape
    o = v.new_zeros(v.shape)
    if not output_final_state:
        return o, None
    if initial_state is None:
        return o, q.new_zeros(N, H, K, v.shape[-1], dtype=torch.float32)
    return o, initial_state.float()
