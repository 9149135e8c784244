"""Generalized delta rule with a diagonal-plus-low-rank transition (DPLR), the recurrence under RWKV-7 and Comba:

    S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t^T v_t,      o_t = scale q_t S_t

with the `[K, V]` state of the other families (the transpose of the `[V, K]` form
S_t = S_{t-1} (Diag(w_t) + a_t b_t^T) + v_t k_t^T). gk is the log decay, <= 0; `a_t S_{t-1}` reads the state before
this step's decay. The gated delta rule is the special case a = -beta exp(g) k, b = k, v -> beta v, gk = g.

Triton for CUDA tensors or under TRITON_INTERPRET=1 (the modules `chunk.py`, `fused_recurrent.py`, loaded on the
first such call), the torch paths otherwise."""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import check_linear_attn_inputs, check_shape, default_scale, use_triton
from x_transformers.ops.common.utils import empty_input_result
from x_transformers.ops.dplr.chunk_torch import chunk_dplr_delta_rule_torch
from x_transformers.ops.dplr.naive import naive_dplr_delta_rule


def _check(where, q, k, v, a, b, gk, initial_state, cu_seqlens):
    """Validate a call; returns (B, T, H, K, V, N). q, k, a, b, gk may differ in dtype from v: the kernels load
    every input as it comes and compute in fp32."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: `{name}` must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: `{name}` must be a floating point tensor, got {t.dtype}")
    B, T, H, K, V, N = check_linear_attn_inputs(
        where, q, k, v, gk, initial_state, cu_seqlens, g_per_channel=True, same_dtype=False
    )
    check_shape("a", a, (B, T, H, K), where)
    check_shape("b", b, (B, T, H, K), where)
    return B, T, H, K, V, N


def chunk_dplr_delta_rule(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Chunked generalized delta rule: `S_t = exp(gk_t) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t`,
    `o_t = scale q_t S_t`.

    q, k, a, b: `[B, T, H, K]`; v: `[B, T, H, V]`; gk: `[B, T, H, K]` log decay (<= 0); initial_state
    `[N, H, K, V]`; cu_seqlens `[N+1]` offsets of packed sequences (B = 1). Returns `(o [B, T, H, V] in v's dtype,
    final state [N, H, K, V] fp32 or None)`. The kernels compute in fp32 whatever the input dtype. Keys wider than
    256 run the token-by-token kernels.
    """
    B, T, H, K, V, N = _check("chunk_dplr_delta_rule", q, k, v, a, b, gk, initial_state, cu_seqlens)
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if not use_triton(q, k, v, a, b, gk, initial_state):
        return chunk_dplr_delta_rule_torch(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.dplr.chunk import chunk_dplr_delta_rule_triton

    return chunk_dplr_delta_rule_triton(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)


def fused_recurrent_dplr_delta_rule(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """Token-by-token generalized delta rule with the same signature and results as `chunk_dplr_delta_rule`; meant
    for decoding (T = 1 with a carried state) and short inputs. Off CUDA (and outside the Triton interpreter) it runs
    the step-by-step PyTorch reference."""
    B, T, H, K, V, N = _check("fused_recurrent_dplr_delta_rule", q, k, v, a, b, gk, initial_state, cu_seqlens)
    if T == 0:
        return empty_input_result(v, (N, H, K, V), initial_state, output_final_state)
    scale = default_scale(q, scale)
    if not use_triton(q, k, v, a, b, gk, initial_state):
        return naive_dplr_delta_rule(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens)
    from x_transformers.ops.dplr.fused_recurrent import fused_recurrent_dplr_delta_rule_triton

    return fused_recurrent_dplr_delta_rule_triton(
        q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens
    )


__all__ = [
    "chunk_dplr_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "chunk_dplr_delta_rule_torch",
    "naive_dplr_delta_rule",
]
