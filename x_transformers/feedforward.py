"""Feedforward blocks: GELU / SiLU / ReLU^2 MLPs, optionally gated (GLU), arXiv 2002.05202."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Module

from x_transformers.norms import LayerNorm
from x_transformers.utils import default, exists


class ReluSquared(Module):
    """relu(x)^2, the Primer activation, arXiv 2109.08668."""

    def forward(self, x):
        return F.relu(x) ** 2


class GLU(Module):
    """One projection to (value, gate); out = value * act(gate) (* a learned per-feature bias if mult_bias)."""

    def __init__(self, dim_in, dim_out, activation: Callable, mult_bias=False):
        super().__init__()
        self.act = activation
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.mult_bias = nn.Parameter(torch.ones(dim_out)) if mult_bias else 1.0

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * self.act(gate) * self.mult_bias


class FeedForward(Module):
    def __init__(
        self,
        dim,
        dim_out=None,
        mult=4,
        glu=False,  # arXiv 2002.05202
        glu_mult_bias=False,  # a learned multiplicative bias on the gated output
        swish=False,
        relu_squared=False,  # arXiv 2109.08668
        post_act_ln=False,  # normformer, arXiv 2110.09456
        dropout=0.0,
        no_bias=False,
        zero_init_output=False,
    ):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)

        if relu_squared:
            activation = ReluSquared()
        elif swish:
            activation = nn.SiLU()
        else:
            activation = nn.GELU()

        # glu - the activation gates a second projection of the input
        if glu:
            project_in = GLU(dim, inner_dim, activation, mult_bias=glu_mult_bias)
        else:
            project_in = nn.Sequential(nn.Linear(dim, inner_dim, bias=not no_bias), activation)

        # post-activation layernorm - normformer's extra norm inside the MLP
        layers = [
            project_in,
            LayerNorm(inner_dim) if post_act_ln else None,
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim_out, bias=not no_bias),
        ]
        self.ff = nn.Sequential(*[layer for layer in layers if exists(layer)])

        # zero-init output - the block starts as the identity in the residual stream
        if zero_init_output:
            nn.init.zeros_(self.ff[-1].weight)
            if exists(self.ff[-1].bias):
                nn.init.zeros_(self.ff[-1].bias)

    def forward(self, x):
        return self.ff(x)

    def static_decode_refusal(self):
        # position-wise: a token's output reads that token only
        return None
