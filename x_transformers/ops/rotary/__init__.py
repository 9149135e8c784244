"""Rotary position embedding applied in one fused pass (forward and backward), beside its PyTorch reference. The
Triton module (`rotary.py`) loads on the first Triton call."""

from __future__ import annotations

from torch import Tensor

from x_transformers.ops.common.utils import use_triton
from x_transformers.ops.rotary.naive import naive_rotary, swap_pairs


def fused_rotary(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate t (b, h, n, d) or (b, n, d), any float dtype, d even and unit-strided (other strides are free), by the
    float32 tables cos, sin (1 or b, n, d) that do not require grad; returns a contiguous tensor in t's dtype.
    Same result as `naive_rotary` (float32 arithmetic, one rounding), which runs instead off CUDA (unless
    TRITON_INTERPRET=1)."""
    if t.ndim not in (3, 4) or t.shape[-1] % 2:
        raise ValueError(f"fused_rotary wants t (b, h, n, d) or (b, n, d) with d even, got {tuple(t.shape)}")
    expected = (t.shape[-2], t.shape[-1])
    shape_ok = cos.ndim == 3 and tuple(cos.shape[1:]) == expected and cos.shape[0] in (1, t.shape[0])
    if cos.shape != sin.shape or not shape_ok:
        raise ValueError(f"fused_rotary wants cos, sin of shape (1 or {t.shape[0]}, {expected[0]}, {expected[1]}), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("fused_rotary does not differentiate the tables; use naive_rotary")
    if not use_triton(t, cos, sin):
        return naive_rotary(t, cos, sin)
    from x_transformers.ops.rotary.rotary import RotaryFunction

    return RotaryFunction.apply(t, cos, sin)


__all__ = ["fused_rotary", "naive_rotary", "swap_pairs"]
