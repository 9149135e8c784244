"""Linear-attention / RNN kernels.

Each family lives in its own folder beside its plain-PyTorch reference. The public functions dispatch to Triton for
CUDA tensors (and for any tensors under `TRITON_INTERPRET=1`), and to a chunked PyTorch path otherwise. Triton is
imported on the first kernel launch (`common/utils.py: use_triton`), so CPU-only installs need not have it.
"""

from x_transformers.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from x_transformers.ops.gla import chunk_gla, fused_recurrent_gla
from x_transformers.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from x_transformers.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
from x_transformers.ops.kda import chunk_kda, fused_recurrent_kda
from x_transformers.ops.dplr import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule
from x_transformers.ops.attention import flash_attention
from x_transformers.ops.conv import causal_conv1d

__all__ = [
    "chunk_simple_gla",
    "fused_recurrent_simple_gla",
    "chunk_gla",
    "fused_recurrent_gla",
    "chunk_delta_rule",
    "fused_recurrent_delta_rule",
    "chunk_hgrn",
    "fused_recurrent_hgrn",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_dplr_delta_rule",
    "fused_recurrent_dplr_delta_rule",
    "flash_attention",
    "causal_conv1d",
]
