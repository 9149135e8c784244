"""Elementwise gated scan `h_t = exp(g_t) * h_{t-1} + x_t` (HGRN, minGRU).

`chunk_hgrn` scans whole sequences in parallel, `fused_recurrent_hgrn` walks them token by token (decoding, a few
tokens). Triton (`scan.py`, loaded on the first such call) for CUDA tensors or under TRITON_INTERPRET=1, the torch
paths otherwise (`scan_torch.py`, `recurrent_torch.py`)."""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import (
    check_cu_seqlens, check_float, check_shape, empty_input_result, num_seqs, use_triton,
)
from x_transformers.ops.hgrn.naive import naive_hgrn
from x_transformers.ops.hgrn.recurrent_torch import recurrent_hgrn_torch
from x_transformers.ops.hgrn.scan_torch import chunk_hgrn_torch


def _run(where, x, g, initial_state, output_final_state, cu_seqlens, recurrent: bool):
    for name, t in (("x", x), ("g", g), ("initial_state", initial_state)):
        check_float(name, t, where)
    if x.ndim not in (3, 4):
        raise ValueError(f"{where}: `x` must have shape (B, T, D) or (B, T, H, D), got {tuple(x.shape)}")
    check_shape("g", g, tuple(x.shape), where)
    check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], where)
    N = num_seqs(x.shape[0], cu_seqlens)
    state_shape = (N, *x.shape[2:])
    check_shape("initial_state", initial_state, state_shape, where)

    B, T = x.shape[:2]
    if T == 0:
        return empty_input_result(x, state_shape, initial_state, output_final_state)
    x3, g3 = x.reshape(B, T, -1), g.reshape(B, T, -1)
    h0 = initial_state.reshape(N, -1) if initial_state is not None else None
    if use_triton(x, g, initial_state):
        from x_transformers.ops.hgrn.scan import chunk_hgrn_triton

        # the token-by-token entry keeps the one-program-per-sequence walk, never the chunk-parallel passes
        h, ht = chunk_hgrn_triton(x3, g3, h0, output_final_state, cu_seqlens, chunked=False if recurrent else None)
    else:
        torch_path = recurrent_hgrn_torch if recurrent else chunk_hgrn_torch
        h, ht = torch_path(x3, g3, h0, output_final_state, cu_seqlens)
    return h.view(x.shape), (ht.view(state_shape) if ht is not None else None)


def chunk_hgrn(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Elementwise gated scan `h_t = exp(g_t) * h_{t-1} + x_t`, parallel over the sequence. x, g: [B, T, D] (or
    [B, T, H, D], treated as D' = H * D channels); initial_state / final state: [N, D] (or [N, H, D]) fp32;
    cu_seqlens: [N + 1] offsets of packed sequences (B = 1). Returns (h in x's dtype, final state or None)."""
    return _run("chunk_hgrn", x, g, initial_state, output_final_state, cu_seqlens, recurrent=False)


def fused_recurrent_hgrn(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`chunk_hgrn` token by token, for decoding and a few tokens; same signature and results (exactly the same at
    T = 1). On Triton the per-sequence scan kernel (one launch), on the torch path a loop over the tokens."""
    return _run("fused_recurrent_hgrn", x, g, initial_state, output_final_state, cu_seqlens, recurrent=True)


__all__ = ["chunk_hgrn", "fused_recurrent_hgrn", "chunk_hgrn_torch", "naive_hgrn", "recurrent_hgrn_torch"]
