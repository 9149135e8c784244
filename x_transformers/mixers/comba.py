"""Comba (arXiv:2506.02475): a gated delta rule with a scalar-plus-low-rank transition and output correction.

    S_t = alpha_t S_{t-1} + beta_t k_t^T (v_t - p_t S_{t-1}),    p_t = sigmoid(d) * k_t,    o_t = (q_t - D p_t) S_t

in the `[K, V]` state layout (the paper's S^T). The transition alpha I - beta k^T p is diagonal plus rank one, so it
runs on the DPLR kernel with a = -p, b = beta k and k -> beta k. Queries and keys are L2-normalised after a short
SiLU convolution, alpha is gated DeltaNet's Mamba2-style forget gate, the output a per-head RMS norm with a swish
gate.
"""

from __future__ import annotations

import math

import torch
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
from x_transformers.ops.dplr import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule


class Comba(Mixer):
    name = "comba"
    packed_path = "cu_seqlens"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, use_short_conv=True, conv_size=4,
                 output_norm=True, output_gate="swish", dt_min=1e-3, dt_max=0.1):
        super().__init__(dim, heads, causal)
        self.dim_k = dk = int(dim * expand_k) // heads
        dv = int(dim * expand_v) // heads
        self.qkv = QKVProjection(dim, heads, dk, dv, use_short_conv, conv_size)
        self.to_beta = nn.Linear(dim, heads, bias=False)
        self.to_a = nn.Linear(dim, heads, bias=False)
        # the forget gate of gated DeltaNet: A in [1, 16] and dt log-uniform in [dt_min, dt_max], as Mamba2 sets them
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # p = sigmoid(d) k scales the key that reads the state; D corrects the query by it
        self.d = nn.Parameter(torch.zeros(heads, dk))
        self.D = nn.Parameter(torch.ones(heads))
        self.out = HeadOutput(dim, heads, dv, norm=output_norm, gate=output_gate)

    def recurrence(self, q, k, v, beta, g, scale, initial_state=None, want_state=False, pack=None):
        """Comba's recurrence on the DPLR kernel. q, k (b, n, h, dk); v (b, n, h, dv); beta, g (b, n, h)."""
        p = k * self.d.to(k.dtype).sigmoid()
        q = q - self.D.to(q.dtype)[:, None] * p
        beta_k = k * beta[..., None].to(k.dtype)
        gk = g[..., None].expand_as(k)
        return run_kernel(
            chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule, q, beta_k, v, -p, beta_k, gk,
            scale=scale, initial_state=initial_state, want_state=want_state, pack=pack,
        )

    def mix(self, x, mask, state, want_state, pack=None):
        x = masked_fill_zero(x, mask)
        q, k, v, conv_state = self.qkv(x, pick_state(state, 1), pack=pack)
        if self.qkv.conv is None:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = l2_normalize(q), l2_normalize(k)
        beta, a, gate = fused_linear(x, self.to_beta, self.to_a, self.out.to_gate)
        beta = upcast(beta).sigmoid()
        a = upcast(a)
        g = -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
        k, v, beta, g = (masked_fill_zero(t, mask) for t in (k, v, beta, g))
        o, s = self.recurrence(q, k, v, beta, g, self.dim_k**-0.5, pick_state(state, 0), want_state, pack)
        return self.out(o, x, gate=gate), (s, conv_state) if want_state else None
