"""(Gated) delta rule: `S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - k_t exp(g_t) S_{t-1})`, `o_t = scale q_t S_t`."""

from x_transformers.ops.delta_rule.chunk import chunk_delta_rule
from x_transformers.ops.delta_rule.chunk_torch import chunk_delta_rule_torch
from x_transformers.ops.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from x_transformers.ops.delta_rule.naive import naive_delta_rule

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "chunk_delta_rule_torch", "naive_delta_rule"]
