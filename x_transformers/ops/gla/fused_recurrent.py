"""Token-by-token `gla` (placeholder while the Triton kernels land)."""

from x_transformers.ops.common.gla_utils import check_gla_inputs
from x_transformers.ops.gla.naive import naive_recurrent_gla


def fused_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens, "fused_recurrent_gla")
    return naive_recurrent_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
