"""Gated linear attention (GLA, arXiv:2312.06635).

Per-key-channel, data-dependent decay from a low-rank projection: `g_t = logsigmoid(W2 W1 x_t + b) / 16`,
`S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`, then a per-head RMS norm and a swish output gate.
Keys are half the model width by default (the paper's `expand_k=0.5`).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput,
    Mixer,
    QKVProjection,
    fused_linear,
    masked_fill_zero,
    pick_state,
    run_kernel,
    upcast,
)
from x_transformers.ops import chunk_gla, fused_recurrent_gla


class GLA(Mixer):
    name = "gla"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=0.5, expand_v=1.0, gate_low_rank_dim=16,
                 gate_logit_normalizer=16.0, use_short_conv=False, conv_size=4, output_norm=True,
                 output_gate="swish"):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        dim_v = int(dim * expand_v) // heads
        self.gate_logit_normalizer = gate_logit_normalizer
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.to_gate = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, heads * self.dim_k)
        )
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        # the low-rank decay projection and the output gate read x through one matmul
        low_rank, gate = fused_linear(x, self.to_gate[0], self.out.to_gate)
        g = F.logsigmoid(upcast(self.to_gate[1](low_rank))) / self.gate_logit_normalizer
        g = rearrange(g, "b n (h d) -> b n h d", h=self.heads)
        k, v, g = (masked_fill_zero(t, mask) for t in (k, v, g))
        o, s = run_kernel(
            chunk_gla, fused_recurrent_gla, q, k, v, g,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x, gate=gate), (s, conv_state) if want_state else None
