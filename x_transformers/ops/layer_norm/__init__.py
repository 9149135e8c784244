"""Bias-less LayerNorm in Triton (forward and backward); `torch.nn.functional.layer_norm` is its reference."""

from x_transformers.ops.layer_norm.layer_norm import fused_layer_norm

__all__ = ["fused_layer_norm"]
