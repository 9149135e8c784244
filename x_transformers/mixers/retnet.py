"""RetNet multi-scale retention (arXiv:2307.08621).

Fixed per-head decays `gamma_h = 1 - 2^(-5 - h)`, rotary (xPos-style) positions on queries and keys, a per-head
norm and a swish output gate: `S_t = gamma_h S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from x_transformers.mixers.base import HeadOutput, Mixer, QKVProjection, masked_fill_zero, pick_state, run_kernel
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla
from x_transformers.utils import exists


def rotate_pairs(t, offset, base=10000.0):
    """Rotary embedding on (b, n, h, d), positions starting at `offset` (a (b,) or scalar tensor)."""
    b, n, _, d = t.shape
    inv_freq = base ** (-torch.arange(0, d, 2, device=t.device, dtype=torch.float32) / d)
    pos = torch.arange(n, device=t.device, dtype=torch.float32) + offset.float().reshape(-1, 1)
    freqs = rearrange(pos[..., None] * inv_freq, "b n f -> b n 1 f")
    cos, sin = freqs.cos(), freqs.sin()
    t1, t2 = t.float()[..., 0::2], t.float()[..., 1::2]
    out = torch.stack((t1 * cos - t2 * sin, t1 * sin + t2 * cos), dim=-1)
    return rearrange(out, "... f two -> ... (f two)").to(t.dtype)


class RetNet(Mixer):
    name = "retnet"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=2.0, rotary=True, use_short_conv=False,
                 conv_size=4, output_norm=True, output_gate="swish"):
        super().__init__(dim, heads, causal)
        self.dim_k = int(dim * expand_k) // heads
        if rotary and self.dim_k % 2:
            raise ValueError(f"retnet rotary positions need an even key head dimension, got {self.dim_k}")
        dim_v = int(dim * expand_v) // heads
        self.rotary = rotary
        self.qkv = QKVProjection(dim, heads, self.dim_k, dim_v, use_short_conv, conv_size)
        self.out = HeadOutput(dim, heads, dim_v, norm=output_norm, gate=output_gate)
        log_decay = torch.tensor([math.log(1 - 2 ** (-5.0 - h)) for h in range(heads)])
        self.register_buffer("log_decay", log_decay, persistent=False)

    def mix(self, x, mask, state, want_state):
        x = masked_fill_zero(x, mask)
        b, n = x.shape[:2]
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1))
        offset = pick_state(state, 2)
        offset = offset if exists(offset) else torch.zeros(b, device=x.device, dtype=torch.long)
        if self.rotary:
            q, k = rotate_pairs(q, offset), rotate_pairs(k, offset)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)
        g = self.log_decay.expand(b, n, -1)
        g = masked_fill_zero(g, mask)
        o, s = run_kernel(
            chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, g,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state,
        )
        return self.out(o, x), (s, conv_state, offset + n) if want_state else None
