"""Feedforward blocks: GELU / SiLU / ReLU^2 / SoLU MLPs, optionally gated (GLU), arXiv 2002.05202."""

from __future__ import annotations

from copy import deepcopy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Module

from x_transformers.norms import LayerNorm
from x_transformers.utils import default, exists

# FeedForward flags that the MoE experts (x_transformers/moe.py) do not implement
FF_DENSE_ONLY_FLAGS = (
    "solu", "custom_activation", "softclamp_value", "glu_softclamp", "glu_gate_softclamp_value", "glu_up_softclamp_value"
)


def softclamp(t, value):
    """value * tanh(t / value): the identity near zero, saturating smoothly at +-value."""
    return torch.tanh(t / value) * value


class SoftClamp(Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return softclamp(x, self.value)

    def extra_repr(self):
        return f"value={self.value}"


class ReluSquared(Module):
    """relu(x)^2, the Primer activation, arXiv 2109.08668."""

    def forward(self, x):
        return F.relu(x) ** 2


class SoLU(Module):
    """Softmax linear unit, x * softmax(x) over the features, then a LayerNorm (Anthropic, 2022)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.norm(x * x.softmax(dim=-1))


class SoftClampedGate(Module):
    """GELU / SiLU with the linear factor soft clamped: softclamp(x) * Phi(x) or softclamp(x) * sigmoid(x) (the gate
    of SiTU-GLU): the gate stays bounded by `value` where the plain activation grows linearly."""

    def __init__(self, activation: Module, value: float):
        super().__init__()
        if isinstance(activation, nn.GELU) and activation.approximate == "none":
            self.nonlinearity = torch.special.ndtr
        elif isinstance(activation, nn.SiLU):
            self.nonlinearity = torch.sigmoid
        else:
            raise ValueError(
                f"`glu_softclamp` soft clamps a GELU (exact) or SiLU gate, got the activation {activation!r}"
            )
        self.value = value

    def forward(self, x):
        return softclamp(x, self.value) * self.nonlinearity(x)


class GLU(Module):
    """One projection to (up, gate); out = up * act(gate) (* a learned per-feature bias if mult_bias). With
    `softclamp` the up branch is soft clamped at `up_softclamp_value` and the gate's linear factor at
    `gate_softclamp_value`, so the product stays bounded (SiTU-GLU)."""

    def __init__(self, dim_in, dim_out, activation: Callable, mult_bias=False, softclamp=False,
                 gate_softclamp_value=4.0, up_softclamp_value=25.0):
        super().__init__()
        if softclamp:
            activation = SoftClampedGate(activation, gate_softclamp_value)
        self.act = activation
        self.up_softclamp_value = up_softclamp_value if softclamp else None
        self.proj = nn.Linear(dim_in, dim_out * 2)
        self.mult_bias = nn.Parameter(torch.ones(dim_out)) if mult_bias else 1.0

    def forward(self, x):
        up, gate = self.proj(x).chunk(2, dim=-1)
        if exists(self.up_softclamp_value):
            up = softclamp(up, self.up_softclamp_value)
        return up * self.act(gate) * self.mult_bias


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
        solu=False,  # softmax linear unit
        custom_activation: Module | None = None,  # any per-position module, copied into each feedforward
        post_act_ln=False,  # normformer, arXiv 2110.09456
        dropout=0.0,
        no_bias=False,
        zero_init_output=False,
        softclamp_value: float | None = None,  # soft clamp the pre-activations (non-GLU)
        glu_softclamp=False,  # SiTU-GLU: soft clamp the up branch and the gate's linear factor
        glu_gate_softclamp_value=4.0,
        glu_up_softclamp_value=25.0,
    ):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)

        # one activation choice: a custom module would otherwise silently override the named ones
        chosen = [name for name, on in (("relu_squared", relu_squared), ("solu", solu), ("swish", swish)) if on]
        if exists(custom_activation) and chosen:
            raise ValueError(f"`custom_activation` replaces the activation; do not also pass {', '.join(chosen)}")
        if relu_squared and solu:
            raise ValueError("choose at most one of `relu_squared` and `solu`")
        if exists(custom_activation) and not isinstance(custom_activation, Module):
            raise TypeError(f"`custom_activation` must be an nn.Module, got {type(custom_activation).__name__}")

        # soft clamps: each acts on one kind of block, and must not be set where it would do nothing
        if exists(softclamp_value) and glu:
            raise ValueError("`softclamp_value` clamps the non-GLU pre-activations; with `glu` use `glu_softclamp`")
        if exists(softclamp_value) and not softclamp_value > 0:
            raise ValueError(f"`softclamp_value` must be positive, got {softclamp_value}")
        if glu_softclamp and not glu:
            raise ValueError("`glu_softclamp` needs `glu=True`")
        if not glu_softclamp and (glu_gate_softclamp_value, glu_up_softclamp_value) != (4.0, 25.0):
            raise ValueError("`glu_gate_softclamp_value` / `glu_up_softclamp_value` need `glu_softclamp=True`")
        if glu_softclamp and not (glu_gate_softclamp_value > 0 and glu_up_softclamp_value > 0):
            raise ValueError(
                f"glu soft clamp values must be positive, got {glu_gate_softclamp_value}, {glu_up_softclamp_value}"
            )

        if exists(custom_activation):
            activation = deepcopy(custom_activation)
        elif relu_squared:
            activation = ReluSquared()
        elif solu:
            activation = SoLU(inner_dim)
        elif swish:
            activation = nn.SiLU()
        else:
            activation = nn.GELU()

        # glu - the activation gates a second projection of the input
        if glu:
            project_in = GLU(
                dim,
                inner_dim,
                activation,
                mult_bias=glu_mult_bias,
                softclamp=glu_softclamp,
                gate_softclamp_value=glu_gate_softclamp_value,
                up_softclamp_value=glu_up_softclamp_value,
            )
        else:
            clamp = SoftClamp(softclamp_value) if exists(softclamp_value) else None
            project_in = nn.Sequential(
                *[m for m in (nn.Linear(dim, inner_dim, bias=not no_bias), clamp, activation) if exists(m)]
            )

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
        # position-wise: a token's output reads that token only (a custom activation must be per position too)
        return None
