"""Lightning attention / TransNormerLLM (arXiv:2307.14995, arXiv:2401.04658).

Linear attention with fixed per-head exponential decay `lambda_h = exp(-8 (h + 1) / H * ratio)` (`ratio` =
`1 - layer / num_layers` in the paper; pass `decay_ratio`), SiLU feature maps, a simple RMS norm and a sigmoid
(GLU-style) output gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, acc_dtype, masked_fill_zero, pick_state, run_kernel,
)
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla


class Lightning(Mixer):
    name = "lightning"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, decay_ratio=1.0, use_short_conv=False,
                 conv_size=4, output_norm=True, output_gate="sigmoid"):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        dim_v = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)
        self.decay_ratio = decay_ratio

    def log_decay(self, device, dtype):
        """Per-head log decay, made in the compute dtype on every call (a buffer would follow `model.half()`)."""
        return -8.0 * (torch.arange(self.heads, device=device, dtype=dtype) + 1) / self.heads * self.decay_ratio

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        b, n = x.shape[:2]
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        q, k = F.silu(q), F.silu(k)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)
        g = masked_fill_zero(self.log_decay(x.device, acc_dtype(x.dtype)).expand(b, n, -1), mask)
        o, s = run_kernel(
            chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, g,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x), (s, conv_state) if want_state else None
