"""Gated DeltaNet (arXiv:2412.06464): the delta rule with a Mamba2-style scalar forget gate per head.

`S_t = alpha_t (S_{t-1} - beta_t k_t^T k_t S_{t-1}) + beta_t k_t^T v_t` with
`log alpha_t = -exp(A_log) softplus(W_a x_t + dt_bias)`, then a per-head RMS norm gated by `silu(W_g x_t)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from x_transformers.mixers.base import upcast
from x_transformers.mixers.deltanet import DeltaNet


class GatedDeltaNet(DeltaNet):
    name = "gated_deltanet"

    def __init__(self, dim, heads, causal=True, expand_k=1.0, expand_v=1.0, use_short_conv=True, conv_size=4,
                 output_norm=True, output_gate="swish", dt_min=1e-3, dt_max=0.1):
        super().__init__(dim, heads, causal, expand_k, expand_v, use_short_conv, conv_size, output_norm, output_gate)
        self.to_a = nn.Linear(dim, heads, bias=False)
        # A in [1, 16] and dt log-uniform in [dt_min, dt_max], as Mamba2 initialises them
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def log_gate(self, a):
        a = upcast(a)
        return -self.A_log.to(a.dtype).exp() * F.softplus(a + self.dt_bias.to(a.dtype))
