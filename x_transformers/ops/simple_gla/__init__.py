"""Scalar-decay linear attention: `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale q_t S_t`.

Covers plain linear attention (g=None), RetNet (constant g per head), lightning attention / TNL and Mamba2-SSD
(data-dependent g per head)."""

from x_transformers.ops.simple_gla.chunk import chunk_simple_gla
from x_transformers.ops.simple_gla.chunk_torch import chunk_simple_gla_torch
from x_transformers.ops.simple_gla.fused_recurrent import fused_recurrent_simple_gla
from x_transformers.ops.simple_gla.naive import naive_simple_gla

__all__ = ["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_simple_gla_torch", "naive_simple_gla"]
