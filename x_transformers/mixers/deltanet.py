"""DeltaNet (arXiv:2102.11174, parallelised in arXiv:2406.06484): linear attention with the delta update rule.

`S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})`, `o_t = q_t S_t`, with L2-normalised queries/keys after a short
SiLU convolution, `beta_t = sigmoid(W_b x_t)` per head, a per-head RMS norm and an optional swish output gate.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput,
    Mixer,
    QKVProjection,
    fused_linear,
    l2_normalize,
    masked_fill_zero,
    pick_state,
    run_kernel,
    upcast,
)
from x_transformers.ops import chunk_delta_rule, fused_recurrent_delta_rule


class DeltaNet(Mixer):
    name = "deltanet"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, use_short_conv=True, conv_size=4,
                 output_norm=True, output_gate=None):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        dim_v = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.to_beta = nn.Linear(dim, heads, bias=False)
        self.to_a = None  # the gated variant's decay projection
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def log_gate(self, a):
        """Per-head log decay (b, n, h) from the decay logits `a`, or None; the gated variant overrides it."""
        return None

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        if self.qkv.conv is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = l2_normalize(q), l2_normalize(k)
        # beta, the decay and the output gate logits: the small projections of x as one matmul
        beta, a, gate = fused_linear(x, self.to_beta, self.to_a, self.out.to_gate)
        beta, g = upcast(beta).sigmoid(), self.log_gate(a)
        k, v, beta, g = (masked_fill_zero(t, mask) for t in (k, v, beta, g))
        o, s = run_kernel(
            chunk_delta_rule, fused_recurrent_delta_rule, q, k, v, beta,
            g=g, scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x, gate=gate), (s, conv_state) if want_state else None
