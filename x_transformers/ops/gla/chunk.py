"""Chunked `gla` (placeholder while the Triton kernels land)."""

from x_transformers.ops.common.gla_utils import check_gla_inputs
from x_transformers.ops.gla.chunk_torch import chunk_gla_torch


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    check_gla_inputs(q, k, v, g, initial_state, cu_seqlens, "chunk_gla")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return chunk_gla_torch(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
