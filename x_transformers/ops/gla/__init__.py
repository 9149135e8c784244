"""`gla` family: per-key-channel decay, S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.

Covers GLA, HGRN2, GateLoop (real decay) and RWKV6's decay.
"""

from x_transformers.ops.gla.chunk import chunk_gla
from x_transformers.ops.gla.fused_recurrent import fused_recurrent_gla
from x_transformers.ops.gla.naive import naive_recurrent_gla

__all__ = ["chunk_gla", "fused_recurrent_gla", "naive_recurrent_gla"]
