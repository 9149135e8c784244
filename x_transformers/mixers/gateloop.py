"""GateLoop (arXiv:2311.01927), real-valued: data-controlled per-channel state transitions.

`a_t = sigmoid(W_a x_t)` per key channel, `S_t = diag(a_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` — the per-channel
decay kernel with `g_t = logsigmoid(W_a x_t)`. (The paper's complex-valued phase is left out.)
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, masked_fill_zero, pick_state, run_kernel, upcast,
)
from x_transformers.ops import chunk_gla, fused_recurrent_gla


class GateLoop(Mixer):
    name = "gateloop"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, use_short_conv=False, conv_size=4,
                 output_norm=True, output_gate="swish"):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        dim_v = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.to_a = nn.Linear(dim, heads * self.dim_k)
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        g = rearrange(F.logsigmoid(upcast(self.to_a(x))), "b n (h d) -> b n h d", h=self.heads)
        k, v, g = (masked_fill_zero(t, mask) for t in (k, v, g))
        o, s = run_kernel(
            chunk_gla, fused_recurrent_gla, q, k, v, g,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x), (s, conv_state) if want_state else None
