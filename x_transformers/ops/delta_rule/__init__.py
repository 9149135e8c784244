"""(Gated) delta rule: `S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - k_t exp(g_t) S_{t-1})`, `o_t = scale q_t S_t`.

Triton for CUDA tensors or under TRITON_INTERPRET=1 (the modules `chunk.py`, `fused_recurrent.py`, loaded on the
first such call), the torch paths otherwise."""

from __future__ import annotations

from x_transformers.ops.common.utils import check_delta_inputs, use_triton
from x_transformers.ops.delta_rule.chunk_torch import chunk_delta_rule_torch
from x_transformers.ops.delta_rule.naive import naive_delta_rule


def chunk_delta_rule(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Chunked (gated) delta rule: `S' = exp(g_t) S_{t-1}`, `S_t = S' + beta_t k_t^T (v_t - k_t S')`,
    `o_t = scale q_t S_t`.

    q, k `[B, T, H, K]`; v `[B, T, H, V]`; beta, g `[B, T, H]` (g is a log-space gate, None = no decay);
    initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` offsets of packed sequences (B = 1). Returns
    `(o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None)`. Products run in v's dtype (q, k are cast
    to it): bf16/fp16 on the tensor cores with fp32 accumulation and an fp32 running state. Keys wider than 256 run
    the token-by-token kernels.
    """
    B, T, H, K, V, N = check_delta_inputs("chunk_delta_rule", q, k, v, beta, g, initial_state, cu_seqlens)
    scale = K**-0.5 if scale is None else scale
    if T == 0 or not use_triton(q, k, v, beta, g, initial_state):
        return chunk_delta_rule_torch(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.delta_rule.chunk import chunk_delta_rule_triton

    return chunk_delta_rule_triton(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_delta_rule(
    q, k, v, beta, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Token-by-token (gated) delta rule with the same signature and results as `chunk_delta_rule`; meant for
    decoding (T = 1 with a carried state) and short inputs. Off CUDA (and outside the Triton interpreter) it runs the
    step-by-step PyTorch reference."""
    B, T, H, K, V, N = check_delta_inputs("fused_recurrent_delta_rule", q, k, v, beta, g, initial_state, cu_seqlens)
    scale = K**-0.5 if scale is None else scale
    if T == 0 or not use_triton(q, k, v, beta, g, initial_state):
        return naive_delta_rule(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.delta_rule.fused_recurrent import fused_recurrent_delta_rule_triton

    return fused_recurrent_delta_rule_triton(q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)


__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_delta_rule_torch", "naive_delta_rule"]
