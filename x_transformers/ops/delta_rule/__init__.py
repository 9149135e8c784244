from x_transformers.ops.delta_rule.naive import naive_delta_rule

chunk_delta_rule = naive_delta_rule
fused_recurrent_delta_rule = naive_delta_rule

__all__ = ["chunk_delta_rule", "fused_recurrent_delta_rule", "naive_delta_rule"]
