"""Kimi Delta Attention (KDA): the delta rule with a per-key-channel forget gate,

    S_t = (I - beta_t k_t^T k_t) diag(exp(g_t)) S_{t-1} + beta_t k_t^T v_t,    o_t = scale q_t S_t

with g_t in R^K (log decay, <= 0) per head. Triton for CUDA tensors or under TRITON_INTERPRET=1 (the modules
`chunk.py`, `fused_recurrent.py`, loaded on the first such call), the PyTorch paths otherwise.
"""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import (
    check_float,
    check_linear_attn_inputs,
    check_shape,
    default_scale,
    use_triton,
)
from x_transformers.ops.kda.chunk_torch import chunk_kda_torch
from x_transformers.ops.kda.naive import naive_kda


def check_kda_inputs(where, q, k, v, g, beta, initial_state, cu_seqlens):
    """Validate a `[B, T, H, *]` KDA call (g `[B, T, H, K]`, beta `[B, T, H]`); returns (B, T, H, K, V, N). q, k may
    differ in dtype from v (L2-normalising them under autocast gives fp32): the ops compute in v's dtype."""
    if not isinstance(beta, Tensor):
        raise TypeError(f"{where}: `beta` must be a tensor, got {type(beta).__name__}")
    check_float("beta", beta, where)
    B, T, H, K, V, N = check_linear_attn_inputs(
        where, q, k, v, g, initial_state, cu_seqlens, g_per_channel=True, same_dtype=False
    )
    check_shape("beta", beta, (B, T, H), where)
    return B, T, H, K, V, N


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Chunked KDA.

    q, k `[B, T, H, K]`; v `[B, T, H, V]`; g `[B, T, H, K]` log decay per key channel (<= 0); beta `[B, T, H]`;
    initial_state `[N, H, K, V]`; cu_seqlens `[N+1]` offsets of packed sequences (B = 1). Returns
    `(o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 (fp64 for fp64 inputs on the CPU) or None)`.
    Keys wider than 256 run the token-by-token kernels.
    """
    check_kda_inputs("chunk_kda", q, k, v, g, beta, initial_state, cu_seqlens)
    scale = default_scale(q, scale)
    if q.shape[1] == 0 or not use_triton(q, k, v, g, beta, initial_state):
        return chunk_kda_torch(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.kda.chunk import chunk_kda_triton

    return chunk_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Token-by-token KDA with the same signature and results as `chunk_kda`; meant for decoding (T = 1 with a
    carried state) and short inputs. Off CUDA (and outside the Triton interpreter) it runs the step-by-step PyTorch
    reference."""
    check_kda_inputs("fused_recurrent_kda", q, k, v, g, beta, initial_state, cu_seqlens)
    scale = default_scale(q, scale)
    if q.shape[1] == 0 or not use_triton(q, k, v, g, beta, initial_state):
        return naive_kda(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.kda.fused_recurrent import fused_recurrent_kda_triton

    return fused_recurrent_kda_triton(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)


__all__ = ["chunk_kda", "fused_recurrent_kda", "chunk_kda_torch", "naive_kda", "check_kda_inputs"]
