"""Causal depthwise short convolution (kernel width <= 8) on (b, n, d) activations, with a decode cache."""

from x_transformers.ops.conv.causal_conv import causal_conv1d
from x_transformers.ops.conv.naive import naive_causal_conv1d

__all__ = ["causal_conv1d", "naive_causal_conv1d"]
