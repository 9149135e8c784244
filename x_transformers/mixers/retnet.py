"""RetNet multi-scale retention (arXiv:2307.08621).

Fixed per-head decays `gamma_h = 1 - 2^(-5 - h)`, rotary (xPos-style) positions on queries and keys, a per-head
norm and a swish output gate: `S_t = gamma_h S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`.
"""

from __future__ import annotations

import torch
from einops import rearrange

from x_transformers.mixers.base import (
    HeadOutput, Mixer, QKVProjection, acc_dtype, masked_fill_zero, pick_state, run_kernel,
)
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla
from x_transformers.utils import exists


def rotations(offset, n, d, device, base=10000.0, dtype=torch.float32, pos=None):
    """Unit complex numbers e^(i pos theta_f) (b, n, 1, d / 2) for positions `offset` .. `offset + n - 1` (or the
    positions `pos` (b, n) given, e.g. within packed documents), with real and imaginary parts in `dtype` (fp32 or
    fp64)."""
    inv_freq = base ** (-torch.arange(0, d, 2, device=device, dtype=dtype) / d)
    if pos is None:
        pos = torch.arange(n, device=device, dtype=dtype) + offset.to(dtype).reshape(-1, 1)
    pos = pos.to(dtype)
    angles = rearrange(pos[..., None] * inv_freq, "b n f -> b n 1 f")
    return torch.polar(torch.ones_like(angles), angles)


def rotate_pairs(t, rotation):
    """Rotary embedding on (b, n, h, d): each pair (t[2f], t[2f + 1]) turns by `rotation[f]`, as one complex product
    (the real form took six products and sums plus a stack, each a full pass, for q and for k)."""
    real = rotation.real.dtype
    pairs = torch.view_as_complex(t.to(real).contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(t.dtype)


class RetNet(Mixer):
    name = "retnet"
    packed_path = "cu_seqlens"

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

    def log_decay(self, device, dtype):
        """log gamma_h per head, made in the compute dtype on every call: a buffer would follow `model.half()` and
        lose the small differences between the decays of the later heads."""
        return torch.log1p(-torch.exp2(-5.0 - torch.arange(self.heads, device=device, dtype=dtype)))

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        b, n = x.shape[:2]
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        offset = pick_state(state, 2)
        offset = offset if exists(offset) else torch.zeros(b, device=x.device, dtype=torch.long)
        acc = acc_dtype(x.dtype)
        if self.rotary:
            # packed documents each rotate from position 0
            pos = pack.positions.reshape(1, -1) if exists(pack) else None
            rotation = rotations(offset, n, self.dim_k, x.device, dtype=acc, pos=pos)
            q, k = rotate_pairs(q, rotation), rotate_pairs(k, rotation)
        k, v = masked_fill_zero(k, mask), masked_fill_zero(v, mask)
        g = self.log_decay(x.device, acc).expand(b, n, -1)
        g = masked_fill_zero(g, mask)
        o, s = run_kernel(
            chunk_simple_gla, fused_recurrent_simple_gla, q, k, v, g,
            scale=self.dim_k**-0.5, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        return self.out(o, x), (s, conv_state, offset + n) if want_state else None
