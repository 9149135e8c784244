"""Normalization layers.

All the RMS-style norms are `x / rms(x)` (upstream writes `x / ||x|| * sqrt(dim)`, the same function) through
F.rms_norm: one fused op instead of a norm, clamp, divide and scale, each a kernel forward and backward.
`unit_offset=True` stores gamma - 1, so that weight decay pulls the effective gain towards 1 instead of 0.
LayerNorm runs the Triton kernel of x_transformers/ops/layer_norm on CUDA tensors (PyTorch's backward is slow at
these widths) and F.layer_norm elsewhere.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import Module

from x_transformers.utils import default

LinearNoBias = partial(nn.Linear, bias=False)

# F.rms_norm's default epsilon is the input dtype's (2^-7 for bf16, which would visibly damp small activations);
# this one only guards the zero vector, as F.normalize's 1e-12 on the norm does upstream
RMS_EPS = 1e-24


def _as_sequence_condition(condition):
    # a per-sample condition (b, d) applies to every position
    return condition[:, None, :] if condition.ndim == 2 else condition


def _use_fused_layer_norm(x) -> bool:
    """The Triton LayerNorm (x_transformers/ops/layer_norm) for CUDA tensors outside torch.compile (which fuses its
    own), where it gives F.layer_norm's dtype: float32 inputs, or any input with autocast off (autocast runs
    layer_norm in float32)."""
    if torch.compiler.is_compiling() or not (x.dtype == torch.float32 or not torch.is_autocast_enabled("cuda")):
        return False
    from x_transformers.ops.common.utils import fused_kernels_enabled

    return fused_kernels_enabled()


class LayerNorm(Module):
    """Bias-less LayerNorm, the bias adds nothing and hurts stability."""

    def __init__(self, dim, unit_offset=False):
        super().__init__()
        self.dim = dim
        self.unit_offset = unit_offset
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 - float(unit_offset)))

    def forward(self, x):
        # the unit offset costs an add (and its backward) on every call, so only when it is on
        gamma = self.gamma + 1.0 if self.unit_offset else self.gamma
        if x.is_cuda and _use_fused_layer_norm(x):
            from x_transformers.ops.layer_norm import fused_layer_norm

            return fused_layer_norm(x, gamma)
        return F.layer_norm(x, (self.dim,), weight=gamma)


class AdaptiveLayerNorm(Module):
    """LayerNorm whose gain is predicted from a condition (DiT-style adaLN), identity gain at init."""

    def __init__(self, dim, dim_condition=None):
        super().__init__()
        self.dim = dim
        self.to_gamma = LinearNoBias(default(dim_condition, dim), dim)
        nn.init.zeros_(self.to_gamma.weight)

    def forward(self, x, *, condition):
        gamma = self.to_gamma(_as_sequence_condition(condition))
        return F.layer_norm(x, (self.dim,)) * (gamma + 1.0)


class ScaleNorm(Module):
    """ScaleNorm, arXiv 1910.05895: l2-normalize, then one learned scalar gain (times sqrt(dim))."""

    def __init__(self, dim, unit_offset=False):
        super().__init__()
        self.dim = dim
        self.unit_offset = unit_offset
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.full((1,), 1.0 - float(unit_offset)))

    def forward(self, x):
        g = self.g + 1.0 if self.unit_offset else self.g
        return F.rms_norm(x, (self.dim,), eps=RMS_EPS) * g


class RMSNorm(Module):
    """RMSNorm, arXiv 1910.07467, with a learned gain per feature."""

    def __init__(self, dim, unit_offset=False):
        super().__init__()
        self.dim = dim
        self.unit_offset = unit_offset
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.full((dim,), 1.0 - float(unit_offset)))

    def forward(self, x):
        g = self.g + 1.0 if self.unit_offset else self.g
        return F.rms_norm(x, (self.dim,), weight=g, eps=RMS_EPS)


class AdaptiveRMSNorm(Module):
    """RMSNorm whose gain is predicted from a condition, identity gain at init."""

    def __init__(self, dim, dim_condition=None):
        super().__init__()
        self.dim = dim
        self.scale = dim**0.5
        self.to_gamma = LinearNoBias(default(dim_condition, dim), dim)
        nn.init.zeros_(self.to_gamma.weight)

    def forward(self, x, *, condition):
        gamma = self.to_gamma(_as_sequence_condition(condition))
        return F.rms_norm(x, (self.dim,), eps=RMS_EPS) * (gamma + 1.0)


class SimpleRMSNorm(Module):
    """RMSNorm without any learned gain, arXiv 2307.14995."""

    def __init__(self, dim, **kwargs):
        super().__init__()
        self.dim = dim
        self.scale = dim**0.5

    def forward(self, x):
        return F.rms_norm(x, (self.dim,), eps=RMS_EPS)


class MultiheadRMSNorm(Module):
    """RMSNorm over (b, h, n, d) with a separate gain per head, stored as gain - 1."""

    def __init__(self, dim, heads):
        super().__init__()
        self.rmsnorm = SimpleRMSNorm(dim)
        self.gamma = nn.Parameter(torch.zeros(heads, 1, dim))

    def forward(self, x):
        return self.rmsnorm(x) * (self.gamma + 1.0)


class DynamicTanh(Module):
    """Dynamic Tanh (DyT), arXiv 2503.10622: tanh(alpha * x) * gamma + beta, a normalization-free stand-in for the
    norm. alpha is one learned scalar, gamma and beta learned per feature. With `unit_offset` every parameter is
    stored as its offset from its init (alpha - init_alpha, gamma - 1), so weight decay pulls towards the init."""

    def __init__(self, dim, init_alpha=1.0, unit_offset=False):
        super().__init__()
        self.pre_tanh_scale_offset = float(init_alpha) if unit_offset else 0.0
        self.gamma_offset = float(unit_offset)
        self.pre_tanh_scale = nn.Parameter(torch.tensor(float(init_alpha) - self.pre_tanh_scale_offset))
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 - self.gamma_offset))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        alpha = self.pre_tanh_scale + self.pre_tanh_scale_offset
        return torch.tanh(x * alpha) * (self.gamma + self.gamma_offset) + self.beta


class Derf(Module):
    """Dynamic erf (Derf), arXiv 2512.10938: erf(alpha * x + s) * gamma + beta, with a learned scalar scale alpha and
    shift s, gamma and beta learned per feature. `unit_offset` stores alpha and gamma as their offsets from one."""

    def __init__(self, dim, init_alpha=0.5, init_bias=0.0, unit_offset=False):
        super().__init__()
        self.scale_offset = float(unit_offset)
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha) - self.scale_offset))
        self.s = nn.Parameter(torch.tensor(float(init_bias)))
        self.gamma = nn.Parameter(torch.full((dim,), 1.0 - self.scale_offset))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x = x * (self.alpha + self.scale_offset) + self.s
        return torch.erf(x) * (self.gamma + self.scale_offset) + self.beta
