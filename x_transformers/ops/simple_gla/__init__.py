"""Scalar-decay linear attention: `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`.

Covers plain linear attention (g=None), RetNet (constant g per head), lightning attention / TNL and Mamba2-SSD
(data-dependent g per head). The Triton modules (`chunk.py`, `fused_recurrent.py`) load on the first Triton call."""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import check_linear_attn_inputs, default_scale, empty_input_result, use_triton
from x_transformers.ops.simple_gla.chunk_torch import chunk_simple_gla_torch
from x_transformers.ops.simple_gla.naive import naive_simple_gla


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scalar-decay linear attention, chunked. q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] log decay per step
    (None = plain linear attention); initial_state / final state: [N, H, K, V] fp32. Returns (o in v's dtype, ht)."""
    B, T, H, K, V, N = check_linear_attn_inputs(
        "chunk_simple_gla", q, k, v, g, initial_state, cu_seqlens, g_per_channel=False
    )
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if use_triton(q, k, v, g, initial_state):
        from x_transformers.ops.simple_gla.chunk import chunk_simple_gla_triton

        return chunk_simple_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_simple_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same contract and results as `chunk_simple_gla`, computed token by token (decoding, short inputs)."""
    B, T, H, K, V, N = check_linear_attn_inputs(
        "fused_recurrent_simple_gla", q, k, v, g, initial_state, cu_seqlens, g_per_channel=False
    )
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if use_triton(q, k, v, g, initial_state):
        from x_transformers.ops.simple_gla.fused_recurrent import fused_recurrent_simple_gla_triton

        return fused_recurrent_simple_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    # CPU: the step loop is cheap for the short inputs this op is meant for
    o, ht = naive_simple_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return o.to(v.dtype), ht


__all__ = ["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_simple_gla_torch", "naive_simple_gla"]
