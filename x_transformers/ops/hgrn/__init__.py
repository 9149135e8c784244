"""Elementwise gated scan `h_t = exp(g_t) * h_{t-1} + x_t` (HGRN, minGRU)."""

from x_transformers.ops.hgrn.naive import naive_hgrn
from x_transformers.ops.hgrn.scan import hgrn_scan
from x_transformers.ops.hgrn.scan_torch import hgrn_scan_torch

__all__ = ["hgrn_scan", "hgrn_scan_torch", "naive_hgrn"]
