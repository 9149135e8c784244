"""`gla` family: per-key-channel decay, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

Covers GLA, HGRN2, GateLoop (real decay) and RWKV6's decay. Triton for CUDA tensors or under TRITON_INTERPRET=1 (the
modules `chunk.py`, `fused_recurrent.py`, loaded on the first such call), the torch paths otherwise.
"""

from __future__ import annotations

from x_transformers.ops.common.utils import check_linear_attn_inputs, default_scale, empty_input_result, use_triton
from x_transformers.ops.gla.chunk_torch import chunk_gla_torch
from x_transformers.ops.gla.naive import naive_recurrent_gla


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked gated linear attention with per-key-channel decay.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H, K] log decay (<= 0); initial_state: [N, H, K, V];
    cu_seqlens: [N + 1] offsets of packed sequences (B = 1). Returns (o [B, T, H, V] in v's dtype, final state
    [N, H, K, V] fp32 or None).
    """
    B, T, H, K, V, N = check_linear_attn_inputs("chunk_gla", q, k, v, g, initial_state, cu_seqlens, g_per_channel=True)
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if use_triton(q, k, v, g, initial_state):
        from x_transformers.ops.gla.chunk import chunk_gla_triton

        return chunk_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token gated linear attention with per-key-channel decay; same contract as `chunk_gla`."""
    B, T, H, K, V, N = check_linear_attn_inputs(
        "fused_recurrent_gla", q, k, v, g, initial_state, cu_seqlens, g_per_channel=True
    )
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if use_triton(q, k, v, g, initial_state):
        from x_transformers.ops.gla.fused_recurrent import fused_recurrent_gla_triton

        return fused_recurrent_gla_triton(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla"]
