"""Mamba2 state-space duality (SSD, arXiv:2405.21060) on the scalar-decay kernel.

One input projection gives the gate z, the SSM input x, B, C and the step dt; x, B, C pass a short SiLU
convolution; with `dt = softplus(dt + dt_bias)` and `A = -exp(A_log)` per head the recurrence is
`S_t = exp(A dt_t) S_{t-1} + B_t^T (dt_t x_t)`, `y_t = C_t S_t + D x_t` — the scalar-decay kernel with q = C, k = B,
v = dt x — then a norm gated by `silu(z)` and the output projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from x_transformers.mixers.base import (
    Mixer, ShortConvolution, masked_fill_zero, pick_state, rms_norm, run_kernel, upcast,
)
from x_transformers.ops import chunk_simple_gla, fused_recurrent_simple_gla


class Mamba2(Mixer):
    name = "mamba2"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand=2, d_state=64, conv_size=4, dt_min=1e-3, dt_max=0.1):
        super().__init__(dim, heads, causal)
        self.d_inner = expand * dim
        if self.d_inner % heads:
            raise ValueError(f"mamba2: expand * dim ({self.d_inner}) must be divisible by heads ({heads})")
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * self.d_inner + 2 * d_state + heads, bias=False)
        self.conv = ShortConvolution(self.d_inner + 2 * d_state, conv_size)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(heads))
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def mix(self, x_in, mask, state, want_state, pack=None):
        x_in = masked_fill_zero(x_in, mask)
        b, n = x_in.shape[:2]
        z, xbc, dt = self.in_proj(x_in).split([self.d_inner, self.d_inner + 2 * self.d_state, self.heads], dim=-1)
        xbc, conv_state = self.conv(xbc, cache=pick_state(state, 1), pack=pack)
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        x = rearrange(x, "b n (h p) -> b n h p", h=self.heads)
        dt = upcast(dt)
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
        g = -self.A_log.to(dt.dtype).exp() * dt
        # B and C are shared by every head (one group)
        k = B[:, :, None].expand(b, n, self.heads, self.d_state)
        q = C[:, :, None].expand(b, n, self.heads, self.d_state)
        v = x * dt[..., None].to(x.dtype)
        k, v, g = (masked_fill_zero(t, mask) for t in (k, v, g))
        y, s = run_kernel(
            chunk_simple_gla, fused_recurrent_simple_gla, q.contiguous(), k.contiguous(), v, g,
            scale=1.0, initial_state=pick_state(state, 0), want_state=want_state, pack=pack,
        )
        y = torch.addcmul(y, x, self.D[:, None].to(x.dtype))
        y = rearrange(y, "b n h p -> b n (h p)")
        y = rms_norm(y * F.silu(z), self.norm.weight, self.norm.eps)
        return self.out_proj(y), (s, conv_state) if want_state else None
