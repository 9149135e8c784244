"""Bias-less LayerNorm in Triton (forward and backward); `torch.nn.functional.layer_norm` is its reference. The
Triton module (`layer_norm.py`) loads on the first Triton call."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from x_transformers.ops.common.utils import use_triton


def fused_layer_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """`F.layer_norm(x, (d,), weight, eps=eps)` (no bias) computed in float32, output in x's dtype; x (..., d).
    Off CUDA (unless TRITON_INTERPRET=1) F.layer_norm itself runs."""
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"fused_layer_norm wants a weight of shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    if x.shape[-1] > 16384:
        raise ValueError(f"fused_layer_norm normalises rows of at most 16384 features, got {x.shape[-1]}")
    if not use_triton(x, weight):
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), eps=eps).to(x.dtype)
    from x_transformers.ops.layer_norm.layer_norm import LayerNormFunction

    return LayerNormFunction.apply(x, weight, eps)


__all__ = ["fused_layer_norm"]
