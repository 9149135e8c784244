"""Rotary position embedding applied in one fused pass (forward and backward), beside its PyTorch reference."""

from x_transformers.ops.rotary.naive import naive_rotary, swap_pairs
from x_transformers.ops.rotary.rotary import fused_rotary

__all__ = ["fused_rotary", "naive_rotary", "swap_pairs"]
