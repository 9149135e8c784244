"""Reference rotation for the fused kernel: y = t * cos + swap_pairs(t) * sin in float32, cast back to t's dtype.

`cos` / `sin` are the tables of `x_transformers.positional.RotaryTable` (the rotate-half sign folded into sin, cos 1
and sin 0 past the rotary dimension), (1 or b, n, d) float32, already cut to t's positions.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def swap_pairs(t: Tensor) -> Tensor:
    """(x1, x2) -> (x2, x1) for each interleaved pair of the last dimension."""
    return rearrange(rearrange(t, "... (d r) -> ... d r", r=2).flip(-1), "... d r -> ... (d r)")


def naive_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate t (b, h, n, d) or (b, n, d); cos, sin (1 or b, n, d)."""
    if t.ndim == 4:
        cos, sin = cos[:, None], sin[:, None]
    return (t * cos + swap_pairs(t) * sin).type(t.dtype)
